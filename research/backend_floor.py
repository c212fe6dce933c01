"""The Python backend's own cost per request, measured with trivial models: one INT64 [1, 100] input returned as 1 or
as 8 outputs (the preprocess step returns 8 tensors per request). CPU per process at a fixed concurrency, alternating
rounds (research/cpu_split.py's `split`). The evidence for "what packing the preprocess outputs into fewer tensors could
save" in docs/performance.md.

    .venv/bin/python research/backend_floor.py            # ~1 minute on 2 cores
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))  # perf/ modules (via cpu_split)
from cpu_split import alternating_splits  # noqa: E402

MODEL = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(f"y{i}", x) for i in range({outputs})]))
        return responses
'''


def write_model(repo: Path, outputs: int) -> str:
    name = f"outputs_{outputs}"
    (repo / name / "1").mkdir(parents=True)
    outs = ",\n".join(f'  {{ name: "y{i}", data_type: TYPE_INT64, dims: [ 1, 100 ] }}' for i in range(outputs))
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x", data_type: TYPE_INT64, dims: [ 1, 100 ] } ]\n'
        f"output [\n{outs}\n]\ninstance_group [ {{ count: 1, kind: KIND_CPU }} ]\n")
    (repo / name / "1" / "model.py").write_text(MODEL.replace("{outputs}", str(outputs)))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", default="1,8", help="output counts to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    from seqrank.server.triton import ServerOptions, TritonServer
    work = Path(tempfile.mkdtemp(prefix="seqrank-backend-floor-"))
    models = [write_model(work / "repo", int(k)) for k in args.outputs.split(",")]
    data = work / "x.json"
    data.write_text(json.dumps({"data": [{"x": {"content": list(range(100)), "shape": [1, 100]}}]}))
    server = TritonServer(ServerOptions(model_repository=work / "repo", http_port=0, grpc_port=0, metrics_port=0),
                          log_path=work / "server.log")
    server.start(timeout_s=120)
    try:
        alternating_splits(server, [(model, data) for model in models], args.rounds, args.concurrency, args.seconds)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
