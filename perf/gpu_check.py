"""The GPU check of issue #4, prepared to run in one go (< 10 minutes) when a GPU is lent.

It needs only torch (with CUDA), numpy and this repository: the lent machine has no TensorRT, no GPU build of ONNX
Runtime and no Triton GPU backend, so it measures the ranker itself on the GPU, as the TensorRT/ONNX Runtime
backends would run it, with the exact request shapes of the serving path (1 user, S = 100 real actions, the
candidates padded to the preprocess bucket):

  * candidates 100 / 500 / 1000 (buckets 128 / 512 / 1024), one request per call: p50/p99 latency;
  * throughput with 32 requests per call (dynamic batching's shape): requests/s and candidates/s;
  * eager fp32 vs CUDA graphs (what Triton's `graphs` optimization does for TensorRT) vs bf16 autocast;
  * the factorized first layer (what `seqrank export` ships) vs the direct form, on the same weights;
  * achieved TFLOP/s from the analytic FLOPs (perf/bench.py ranker_flops, checked against torch's counter).

    python perf/gpu_check.py --run runs/demo --out "$OUT/gpu"      # on the GPU machine
    python perf/gpu_check.py --run runs/demo --out /tmp/g --device cpu --seconds 0.2   # smoke test anywhere

Writes OUT/gpu_check.json (every point, the GPU's name, versions) and OUT/gpu_check.md (a table). Trained weights are
loaded when safetensors is importable; otherwise the same architecture with random weights is timed (the FLOPs and
shapes are identical; the file says which).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from seqrank.config import RunConfig  # noqa: E402
from seqrank.features import FIRST_ID, N_CONTEXT  # noqa: E402
from seqrank.models.inference import ranker_for_serving  # noqa: E402
from seqrank.models.transact import TransActRanker  # noqa: E402
from seqrank.serving.preprocess import CANDIDATE_BUCKETS  # noqa: E402


def load_model(run: Path) -> tuple[TransActRanker, RunConfig, str]:
    cfg = RunConfig.load_saved(run)
    info = json.loads((run / "run.json").read_text())
    vocab = json.loads((run / "vocab" / "vocab.json").read_text())
    table = np.load(run / "item_table.npy")
    n_actions = len(vocab["actions"]) + FIRST_ID
    model = TransActRanker(cfg.transact, table, n_actions, info["user_dim"], N_CONTEXT, len(info["heads"]))
    try:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(run / "ranker.safetensors"))
        weights = "trained (ranker.safetensors)"
    except ImportError:
        weights = "random (safetensors not installed): same shapes and FLOPs"
    return model.eval(), cfg, weights


def request(model: TransActRanker, n_cand: int, batch: int, seq_len: int, device: str) -> tuple[torch.Tensor, ...]:
    bucket = next(b for b in CANDIDATE_BUCKETS if b >= n_cand)
    g = torch.Generator().manual_seed(0)
    n_items, n_actions = model.item_table.shape[0], model.action_emb.num_embeddings
    seq_item = torch.randint(FIRST_ID, n_items, (batch, seq_len), generator=g)
    seq_action = torch.randint(FIRST_ID, n_actions, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    user = torch.nn.functional.normalize(torch.randn(batch, model.user_dim, generator=g), dim=-1)
    context = torch.randn(batch, model.n_context, generator=g)
    cand = torch.randint(FIRST_ID, n_items, (batch, bucket), generator=g)
    return tuple(t.to(device) for t in (seq_item, seq_action, mask, user, context, cand))


def timed(fn, device: str, seconds: float) -> np.ndarray:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    lat, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(lat) < 5:
        t0 = time.perf_counter()
        fn()
        sync()
        lat.append(time.perf_counter() - t0)
    return np.asarray(lat) * 1e3


def runner(model, args, mode: str, device: str):
    """A callable running one forward pass in `mode`: eager | bf16 | cuda_graph."""
    if mode == "eager":
        return lambda: model(*args)
    if mode == "bf16":
        dtype = torch.bfloat16

        def run_bf16():
            with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype):
                return model(*args)
        return run_bf16
    if mode == "cuda_graph":
        static = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(*static)  # noqa: F841 - kept alive by the graph
        return graph.replay
    raise ValueError(mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=3.0, help="per point")
    parser.add_argument("--throughput-batch", type=int, default=32)
    parser.add_argument("--candidates", default="100,500,1000", help="candidate counts per request")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a smoke test")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; bf16 is its own mode
    from bench import ranker_flops  # the same analytic count as the CPU bench
    model, cfg, weights = load_model(args.run)
    model = model.to(args.device)
    seq_len = cfg.transact.seq_len
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    modes = ["eager", "bf16"] + (["cuda_graph"] if args.device.startswith("cuda") else [])
    points = []
    started = time.time()
    with torch.inference_mode():
        for factorized in (True, False):
            served = ranker_for_serving(model, factorize_first_layer=factorized)
            for n_cand in [int(n) for n in args.candidates.split(",")]:
                for batch in (1, args.throughput_batch):
                    tensors = request(model, n_cand, batch, seq_len, args.device)
                    bucket = tensors[-1].shape[1]
                    flops = ranker_flops(cfg.transact, bucket, model.item_table.shape[1], model.user_dim,
                                         model.n_context, model.heads.out_features)["total"] * batch
                    for mode in modes:
                        try:
                            lat = timed(runner(served, tensors, mode, args.device), args.device, args.seconds)
                        except Exception as exc:  # noqa: BLE001 - a mode the device cannot run is reported
                            points.append({"factorized": factorized, "candidates": n_cand, "batch": batch,
                                           "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]})
                            continue
                        mean_s = float(lat.mean()) / 1e3
                        points.append({
                            "factorized": factorized, "candidates": n_cand, "bucket": bucket, "batch": batch,
                            "mode": mode, "calls": int(lat.size), "p50_ms": float(np.percentile(lat, 50)),
                            "p99_ms": float(np.percentile(lat, 99)), "requests_per_s": batch / mean_s,
                            "candidates_per_s": batch * n_cand / mean_s, "tflops": flops / mean_s / 1e12})
                        print(json.dumps(points[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "weights": weights,
              "run": str(args.run), "seq_len": seq_len, "wall_s": round(time.time() - started, 1), "points": points,
              "anchors": "TransAct paper: 8 ms on GPU; TransAct V2: p99 15/29/41 ms at 128/256/512 candidates"}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    lines = [f"# GPU check: {gpu}", "", f"torch {torch.__version__}, CUDA {torch.version.cuda}; weights: {weights}; "
             f"S = {seq_len}; {result['wall_s']} s.", "",
             "| layer 0 | candidates | requests/call | mode | p50 ms | p99 ms | requests/s | candidates/s | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if "error" in p:
            lines.append(f"| {'factorized' if p['factorized'] else 'direct'} | {p['candidates']} | {p['batch']} | "
                         f"{p['mode']} | error: {p['error'][:60]} | | | | |")
            continue
        lines.append(f"| {'factorized' if p['factorized'] else 'direct'} | {p['candidates']} | {p['batch']} | "
                     f"{p['mode']} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['requests_per_s']:.1f} | "
                     f"{p['candidates_per_s']:.0f} | {p['tflops']:.2f} |")
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'gpu_check.json'} and gpu_check.md ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
