"""Prepare what perf/model_analyzer.yaml points at: a CPU model repository and per-model perf_analyzer inputs.

    .venv/bin/python perf/prepare_model_analyzer.py --run runs/demo      # -> perf/results/model_analyzer/
    model-analyzer profile -f perf/model_analyzer.yaml                    # from the repository root

model_analyzer writes its config variants as ``config.pbtxt`` and cannot use ``--model-config-name``, so the
repository it gets has every ``configs/cpu.pbtxt`` promoted to ``config.pbtxt`` (the GPU configs removed): the ranker
is then the Python backend running ONNX Runtime, like ``tritonserver --model-config-name=cpu`` serves it.
Inputs (real data, perf/make_inputs.py): the fixed 1 user x 100 candidates request with its raw actions for the
ensemble and preprocess (no feature store needed), the ranker tensors preprocess builds for it, and postprocess
inputs (ranker probabilities for those candidates, top_k = 100).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "perf"
for p in (ROOT, PERF):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def cpu_repository(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for configs in dst.glob("*/configs"):
        cpu = configs / "cpu.pbtxt"
        if cpu.is_file():
            shutil.copy2(cpu, configs.parent / "config.pbtxt")
        shutil.rmtree(configs)
    return dst


def main(argv=None) -> int:
    import bench
    import make_inputs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--out", type=Path, default=PERF / "results" / "model_analyzer")
    args = p.parse_args(argv)
    run = args.run.resolve()
    out = args.out.resolve()
    repo = cpu_repository(run / "model_repository", out / "repository")
    inputs = out / "inputs"
    make_inputs.write_inputs(run, inputs, n_requests=16)
    reqs = json.loads((inputs / "requests.json").read_text())
    pre = bench.preprocessor(repo, None)
    req = reqs["fixed_1x100"][0]
    t = bench.request_tensors(pre, req, with_actions=True)
    bench.write_ranker_json(t, inputs / "ranker_1x100.json")
    sess = bench.ort_session(repo / "ranker" / "1" / "model.onnx", threads=2)
    probs = sess.run(None, {n: t[n] for n in bench.RANKER_INPUTS})[0][0]
    n = len(req["candidate_ids"])
    oov = np.asarray(t["cand_item"][0] == 1)          # OOV row (padding is PAD = 0, never OOV): preprocess's oov
    post = {"probs": {"content": probs.reshape(-1).tolist(), "shape": list(probs.shape)},
            "candidate_ids": {"content": req["candidate_ids"], "shape": [n]},
            "cand_oov": {"content": oov.tolist(), "shape": [int(oov.shape[0])]},
            "top_k": {"content": [n], "shape": [1]}}
    (inputs / "postprocess_1x100.json").write_text(json.dumps({"data": [post]}))
    print(json.dumps({"repository": str(repo), "inputs": sorted(x.name for x in inputs.glob("*.json"))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
