"""Which candidate buckets let the GPU ranker's dynamic batches form: Triton's own batcher, measured on CPU.

On a GPU the ranker runs in a backend without ragged batching (TensorRT or ONNX Runtime), so Triton's dynamic
batcher puts only requests of equal shape into one batch, and it does not look past a request of another shape: the
pending batch is sent as soon as the next request in the queue has a different candidate bucket (core
dynamic_batch_scheduler.cc, GetDynamicBatch). Many buckets mean little padding but short batches; few buckets mean
long batches of padded candidates. Which wins depends on the request mix and on what an execution costs.

This script measures it with the real tritonserver and perf_analyzer on a stand-in for the GPU ranker: a Python
backend model with the shipped GPU config's batching (max_batch_size, dynamic_batching, instance count of
ranker/configs/h200.pbtxt) and no ragged batching, whose execution holds one lock shared by its instances (one
GPU) for a modeled time, ``scale`` x (``exec_us`` + ``candidate_us`` x the batch's padded candidates). Both costs
are assumptions (docs/deployment.md: the planning throughput, 10 % of an H200's fp16 peak = 0.128 us per
candidate; 200 us per execution for launch, copies and a CUDA graph replay) until ``make gpu-check`` measures them.
``scale`` slows the modeled GPU (and the config's queue delay) so that two CPU cores can drive it with Triton's own
per-request work a small share of the time; the batcher sees the same queue whatever the time unit, so throughputs
and latencies are reported back in GPU time (x scale, / scale), and budgets are given in GPU time.

For each bucket set: throughput within each p99 budget (perf/load.py's pa_search, perf_analyzer with
--percentile=99), the mean batch at that point (Triton's statistics), the padded share of the candidates.

    .venv/bin/python research/bucket_batching.py --exec-us 200       # deployment.md's table, ~18 minutes per cost
    .venv/bin/python research/bucket_batching.py --mix counts.txt --sets 16,128,512,1024 128,1024   # your mix
    .venv/bin/python research/bucket_batching.py --gpu-check gpu/results.json   # costs measured on your GPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))  # perf's modules
from load import pa_point, pa_search  # noqa: E402
from settings import Settings  # noqa: E402

from seqrank.exporting import triton_config  # noqa: E402
from seqrank.serving.preprocess import CANDIDATE_BUCKETS  # noqa: E402

GPU_CONFIG = Path(__file__).resolve().parents[1] / "model_repository" / "ranker" / "configs" / "h200.pbtxt"
MODEL = "ranker_sim"

STUB = '''"""The modeled GPU ranker: one execution at a time across instances (one GPU), for a time linear in the
batch's padded candidates; every request answered with zeros of its own shape."""
import fcntl
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        p = {k: float(v["string_value"]) for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.exec_s = p["scale"] * p["exec_us"] / 1e6
        self.candidate_s = p["scale"] * p["candidate_us"] / 1e6
        self.lock = open(args["model_repository"] + "/gpu.lock", "a")

    def execute(self, requests):
        cands = [pb_utils.get_input_tensor_by_name(r, "cand_item").as_numpy() for r in requests]
        busy = self.exec_s + self.candidate_s * sum(c.size for c in cands)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            time.sleep(busy)
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("probs", np.zeros(c.shape, dtype=np.float32))]) for c in cands]
'''


def write_model(repo: Path, exec_us: float, candidate_us: float, scale: float) -> None:
    """The stand-in model: the GPU config's batching and instance count, a Python backend, one cand_item input
    (no allow_ragged_batch, as on the GPU)."""
    gpu = triton_config.load(GPU_CONFIG)
    config = triton_config.parse(f'name: "{MODEL}"\nbackend: "python"\n'
                                 'input [ { name: "cand_item", data_type: TYPE_INT64, dims: [ -1 ] } ]\n'
                                 'output [ { name: "probs", data_type: TYPE_FP32, dims: [ -1 ] } ]\n')
    config.max_batch_size = gpu.max_batch_size
    config.dynamic_batching.CopyFrom(gpu.dynamic_batching)
    config.dynamic_batching.max_queue_delay_microseconds = int(gpu.dynamic_batching.max_queue_delay_microseconds * scale)
    group = config.instance_group.add()
    group.count, group.kind = sum(g.count for g in gpu.instance_group), group.KIND_CPU
    for key, value in (("exec_us", exec_us), ("candidate_us", candidate_us), ("scale", scale)):
        config.parameters[key].string_value = str(value)
    (repo / MODEL / "1").mkdir(parents=True)
    triton_config.save(config, repo / MODEL / "config.pbtxt")
    (repo / MODEL / "1" / "model.py").write_text(STUB)


def candidate_counts(mix: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Candidates per request. ``feed``: log-normal, median 300, most requests 100-900 (a retrieval stage's
    output after filtering); ``uniform``: 1..1024 alike; ``fixed500``: every request 500; a file path: your own
    requests' candidate counts, one integer per line, ``n`` of them drawn with replacement."""
    if Path(mix).is_file():
        counts = np.loadtxt(mix, dtype=np.int64, ndmin=1)
        if counts.size == 0 or counts.min() < 1 or counts.max() > max(CANDIDATE_BUCKETS):
            raise ValueError(f"{mix}: candidate counts must be 1..{max(CANDIDATE_BUCKETS)}")
        return rng.choice(counts, n)
    if mix == "feed":
        return np.clip(np.round(rng.lognormal(np.log(300), 0.6, n)), 1, 1024).astype(int)
    if mix == "uniform":
        return rng.integers(1, 1025, n)
    if mix == "fixed500":
        return np.full(n, 500)
    raise ValueError(f"unknown mix {mix!r}")


def padded(counts: np.ndarray, buckets: list[int]) -> np.ndarray:
    b = np.asarray(sorted(buckets))
    return b[np.searchsorted(b, counts)]


def fit_costs(points: list[dict], dtype: str = "fp16") -> tuple[float, float]:
    """(exec_us, candidate_us) of ``mean = exec + candidate x batch x candidates``, least squares over make gpu-check's
    points of ``dtype`` (CUDA graphs where measured, else eager): its results.json ``points``."""
    rows = [p for p in points if p.get("dtype") == dtype and "mean_ms" in p]
    modes = {p["mode"] for p in rows}
    rows = [p for p in rows if p["mode"] == ("cuda_graph" if "cuda_graph" in modes else "eager")]
    if len(rows) < 2:
        raise ValueError(f"make gpu-check measured fewer than 2 {dtype} points")
    work = np.array([p["batch"] * p["candidates"] for p in rows], dtype=float)
    us = np.array([p["mean_ms"] * 1e3 for p in rows])
    slope, intercept = np.polyfit(work, us, 1)
    if intercept < 0:  # no fixed cost measurable: a line through 0
        slope, intercept = float(work @ us / (work @ work)), 0.0
    return float(intercept), float(slope)


def write_inputs(path: Path, widths: np.ndarray) -> None:
    """perf_analyzer --input-data: one request per width, in the mix's (random) order."""
    data = [{"cand_item": {"content": [0] * int(w), "shape": [int(w)]}} for w in widths]
    path.write_text(json.dumps({"data": data}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["16,32,64,128,256,512,1024", "128,256,512,1024", "512,1024",
                                                  "16,512,1024", ",".join(map(str, CANDIDATE_BUCKETS)), "1024"],
                    help="bucket sets to compare in this run (default: docs/deployment.md's table)")
    ap.add_argument("--mix", default="feed", help="feed, uniform, fixed500, or a file of your requests' candidate "
                    "counts (one per line)")
    ap.add_argument("--requests", type=int, default=512, help="requests in the perf_analyzer input (cycled)")
    ap.add_argument("--budgets-ms", default="5,10,20", help="p99 budgets in GPU time")
    ap.add_argument("--exec-us", type=float, default=200.0, help="modeled GPU time per execution")
    ap.add_argument("--candidate-us", type=float, default=0.128, help="modeled GPU time per padded candidate")
    ap.add_argument("--gpu-check", type=Path, help="make gpu-check's results.json: fit --exec-us and "
                    "--candidate-us to its fp16 points instead")
    ap.add_argument("--scale", type=float, default=40.0, help="the stand-in runs this many times slower than the GPU")
    ap.add_argument("--max-concurrency", type=int, default=256)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    from seqrank.server.triton import ServerOptions, TritonServer
    if args.gpu_check:
        args.exec_us, args.candidate_us = fit_costs(json.loads(args.gpu_check.read_text())["points"])
        print(f"costs fitted to {args.gpu_check}: {args.exec_us:.1f} us per execution, "
              f"{args.candidate_us:.4f} us per candidate", flush=True)
    work = Path(tempfile.mkdtemp(prefix="seqrank-buckets-"))
    write_model(work / "repo", args.exec_us, args.candidate_us, args.scale)
    counts = candidate_counts(args.mix, args.requests, np.random.default_rng(0))
    budgets = [float(b) for b in args.budgets_ms.split(",")]
    st = Settings(False, pa_window_ms=1500, max_concurrency=args.max_concurrency)
    server = TritonServer(ServerOptions(model_repository=work / "repo", http_port=0, grpc_port=0, metrics_port=0),
                          log_path=work / "server.log")
    server.start(timeout_s=120)
    results = {"mix": args.mix, "candidates": {"p10": float(np.percentile(counts, 10)),
                                                "p50": float(np.median(counts)), "p90": float(np.percentile(counts, 90))},
               "exec_us": args.exec_us, "candidate_us": args.candidate_us, "scale": args.scale, "sets": []}
    try:
        for spec in args.sets:
            buckets = [int(b) for b in spec.split(",")]
            widths = padded(counts, buckets)
            data = work / f"in_{len(results['sets'])}.json"
            write_inputs(data, widths)
            found = pa_search(server.http_url, MODEL, data, [b * args.scale for b in budgets],
                              work / f"pa_{len(results['sets'])}.csv", st)
            row = {"buckets": buckets, "padding": float(widths.sum() / counts.sum() - 1), "budgets": {}}
            for budget in budgets:
                f = found[budget * args.scale]
                c = f["concurrency"]
                batch = None
                if c is not None:  # the mean batch at that level (Triton's statistics, a second run of the level)
                    again = pa_point(server.http_url, MODEL, data, work / "batch.csv", st, c)
                    batch = again["model_stats"].get(MODEL, {}).get("avg_batch")
                row["budgets"][str(budget)] = {
                    "requests_per_s": f["throughput"] * args.scale, "concurrency": c, "avg_batch": batch,
                    "real_candidates_per_s": f["throughput"] * args.scale * float(counts.mean()),
                    "p99_ms": None if f["p99_ms"] is None else f["p99_ms"] / args.scale}
            results["sets"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
