"""perf/gpu_check.py (issue #26 item 3) in its CPU smoke mode: what it writes and when, never how fast.

On CPU there are no CUDA events or graphs: the script times with time.perf_counter and lists cuda_graph points as
skipped. fp16 is left out here (CPU fp16 matmuls take ~1 s per iteration on this machine); fp32 and bf16 run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "perf" / "gpu_check.py"
SMOKE = ["--device", "cpu", "--iterations", "3", "--warmup", "1", "--pipelined-iterations", "2"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_writes_results_after_every_point(gpu_check, tmp_path, monkeypatch):
    """results.json is rewritten (atomically) after each point, so a killed run keeps every finished point;
    fp32 against its fp32 reference is exact; bf16 gives finite probabilities close to fp32."""
    out = tmp_path / "g"
    seen = []
    write = gpu_check.write_atomic

    def recording(path, text):
        write(path, text)
        if path.name == "results.json":
            seen.append(len(json.loads(path.read_text())["points"]))

    monkeypatch.setattr(gpu_check, "write_atomic", recording)
    result = gpu_check.main(["--out", str(out), *SMOKE, "--dtypes", "fp32,bf16", "--batches", "1,2",
                             "--candidates", "16"])
    n = 2 * 2
    assert seen[0] == 0 and seen[-1] == n
    assert sorted(set(seen)) == list(range(n + 1)), seen       # one write per point, none skipped over
    assert all(b - a in (0, 1) for a, b in zip(seen, seen[1:])), seen
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]   # no tmp file left behind

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["status"] == "complete" and on_disk == json.loads(json.dumps(result))
    assert on_disk["device"]["type"] == "cpu" and on_disk["device"]["torch"] == torch.__version__
    assert on_disk["model"]["weights"].startswith("random (seed 0")
    assert on_disk["model"]["flops"]["per_candidate"] > 0
    assert {(p["dtype"], p["batch"], p["candidates"]) for p in on_disk["points"]} == {
        (d, b, c) for d in ("fp32", "bf16") for b in (1, 2) for c in (16,)}
    assert {s["reason"] for s in on_disk["skipped"]} == {"cuda_graph needs CUDA"}
    assert len(on_disk["skipped"]) == n
    for p in on_disk["points"]:
        assert "error" not in p, p
        assert p["mode"] == "eager" and p["iterations"] == 3
        assert 0 < p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert p["candidates_per_s"] > 0 and p["tflops_per_s"] > 0
        q = p["parity"]
        assert set(q) >= {"max_abs_dp", "nan_count", "top10_overlap_per_request", "top10_overlap_min"}
        assert len(q["top10_overlap_per_request"]) == p["batch"]
        assert q["nan_count"] == 0 and q["inf_count"] == 0
        if p["dtype"] == "fp32":
            assert q["max_abs_dp"] == 0.0 and q["top10_overlap_min"] == 1.0
        else:
            assert 0.0 < q["max_abs_dp"] < 0.05 and math.isfinite(q["max_abs_dp"])
    # on CPU the GPU targets are listed but never judged
    from gpu_check_report import TARGETS  # gpu_check put perf/ on sys.path
    assert [t["name"] for t in on_disk["targets"]] == [t[0] for t in TARGETS]
    assert {t["status"] for t in on_disk["targets"]} == {"not_measured"}
    assert (out / "results.md").read_text().count("| bf16 | eager |") == 2


def test_evaluate_targets_judges_fp16_graph_points(gpu_check):
    """met / missed against the p99 bounds, only from fp16 CUDA-graph single-request points, only on a GPU."""
    def point(n, p99, nan=0, dtype="fp16"):
        return {"dtype": dtype, "mode": "cuda_graph", "batch": 1, "candidates": n, "p99_ms": p99,
                "parity": {"nan_count": nan}}
    points = [point(128, 14.9), point(256, 29.5), point(512, 7.0), point(512, 1.0, dtype="fp32")]
    status = {t["name"]: t["status"] for t in gpu_check.evaluate_targets(points, on_gpu=True)}
    assert status == {"transact_8ms_p99_at_512": "met", "transact_v2_p99_at_128": "met",
                      "transact_v2_p99_at_256": "missed", "transact_v2_p99_at_512": "met"}
    status = {t["name"]: t["status"] for t in gpu_check.evaluate_targets([point(512, 7.0, nan=3)], on_gpu=True)}
    assert status["transact_8ms_p99_at_512"] == "missed" and status["transact_v2_p99_at_128"] == "not_measured"
    assert {t["status"] for t in gpu_check.evaluate_targets(points, on_gpu=False)} == {"not_applicable (not a GPU)"}


def test_tiny_deadline_keeps_the_first_point_without_pydantic_pandas_safetensors(tmp_path):
    """As on the lent GPU machine (torch + numpy only): the script runs with pydantic, pandas and safetensors
    unimportable; a deadline already past stops it after the first point, which is on disk."""
    out = tmp_path / "g"
    blocked = ("pydantic", "pandas", "safetensors")
    code = (f"import sys, runpy\nfor m in {blocked!r}: sys.modules[m] = None\n"
            f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "assert sys.modules['pandas'] is None and sys.modules['safetensors'] is None\n"
            "assert not hasattr(sys.modules['pydantic'], '__file__')  # the stand-in, not the package\n")
    proc = subprocess.run([sys.executable, "-c", code, "--out", str(out), *SMOKE, "--deadline-s", "0",
                           "--dtypes", "fp32,bf16", "--batches", "1", "--candidates", "16,32"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["status"] == "deadline"
    assert result["model"]["config_backend"].startswith("stand-in")
    assert [(p["dtype"], p["candidates"]) for p in result["points"]] == [("fp32", 16)]
    reasons = [s["reason"] for s in result["skipped"] if s["mode"] == "eager"]
    assert len(reasons) == 3 and all(r.startswith("deadline") for r in reasons)


def _small_run(root: Path) -> Path:
    import seqrank
    from safetensors.torch import save_file
    from seqrank.config import RunConfig
    from seqrank.features import FIRST_ID, N_CONTEXT, Vocabulary
    from seqrank.models.transact import TransActRanker

    cfg = RunConfig().with_overrides(["transact.seq_len=8", "transact.mlp=[16]", "pinnerformer.dim=8",
                                      "utility_weights={\"click\": 2.0}"])
    vocab = Vocabulary(np.array([b"i%03d" % i for i in range(40)], dtype="S"), ["click", "hate", "like"],
                       ["click", "hate", "like"], ["hate"], None)
    torch.manual_seed(1)
    table = torch.randn(vocab.n_items, 8).numpy()
    model = TransActRanker(cfg.transact, table, len(vocab.actions) + FIRST_ID, cfg.pinnerformer.dim, N_CONTEXT,
                           len(vocab.heads))
    root.mkdir(parents=True)
    (root / "config.json").write_text(cfg.to_json())
    (root / "run.json").write_text(json.dumps({"seqrank_version": seqrank.__version__}))
    vocab.save(root / "vocab")
    np.save(root / "item_table.npy", table)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "ranker.safetensors"))
    return root


def test_run_weights_load_with_and_without_seqrank_exporting(gpu_check, tmp_path, monkeypatch):
    """--run loads the run's weights through seqrank.exporting.load_ranker, or (where its imports are missing)
    with the script's own safetensors reader: both give the same tensors; fp32 parity is exact either way."""
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    run = _small_run(tmp_path / "run")
    stored = load_file(str(run / "ranker.safetensors"))
    read = gpu_check.read_safetensors(run / "ranker.safetensors")
    assert read.keys() == stored.keys()
    assert all(read[k].dtype == stored[k].dtype and torch.equal(read[k], stored[k]) for k in stored)

    via_exporting, meta = gpu_check.load_run(run)
    assert "load_ranker" in meta["weights"]
    assert meta["utility_weights"] == [2.0, -1.0, 1.0]          # click x2, the negative head subtracted
    monkeypatch.setitem(sys.modules, "seqrank.exporting", None)  # as on the GPU machine without safetensors/onnx
    direct, meta_direct = gpu_check.load_run(run)
    assert "read directly" in meta_direct["weights"] and meta_direct["utility_weights"] == meta["utility_weights"]
    a, b = via_exporting.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    result = gpu_check.main(["--out", str(tmp_path / "g"), "--run", str(run), *SMOKE, "--dtypes", "fp32",
                             "--batches", "2", "--candidates", "12"])
    (p,) = result["points"]
    assert result["model"]["weights"].startswith(f"run {run}") and result["model"]["config"]["seq_len"] == 8
    assert p["parity"]["max_abs_dp"] == 0.0 and p["parity"]["top10_overlap_per_request"] == [1.0, 1.0]
