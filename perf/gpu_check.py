"""One-shot GPU check of the served ranker (issue #26 item 3): `make gpu-check` on a lent GPU machine.

The lent machine has torch with CUDA, numpy, onnx and onnxruntime, Python 3.12 and no network: no TensorRT, no
Triton, maybe none of seqrank's other dependencies. So this script imports only torch, numpy and seqrank's model
modules (seqrank.models.transact / inference, which pull in seqrank.config and through it pydantic: where pydantic
is missing, a stand-in with plain dataclasses is installed, see `_config_importable`), and it times the ranker as
served (`ranker_for_serving`: factorized first layer, merged single head) on the GPU itself.

Sweep (every point one request batch at a time, i.e. concurrency 1):
  dtype {fp32, fp16, bf16} x mode {eager, cuda_graph} x batch {1, 8, 32} x candidates {128, 256, 512, 1024}
  * timed region per iteration: pinned host-to-device copies of the request tensors (user-side tensors [B, ...] once
    per request, candidates [B, N]: request-level de-duplication), the forward pass, the probabilities back to a
    pinned host buffer; CUDA events around each iteration, synchronised after it (single-request latency, not
    latency under load); >= 300 iterations after warm-up: p50, p99, mean, candidates/s; plus a pipelined run (no
    synchronisation between iterations: what a busy instance sustains) for throughput;
  * cuda_graph: one graph captured per (dtype, batch, candidates) shape; the copies are outside the graph (into its
    static inputs) and inside the timed region. Serving partial batches: one graph per candidate bucket and batch
    size, a smaller batch (or fewer candidates) runs the smallest captured graph that holds it, padded with empty
    requests / PAD candidates whose outputs are dropped (Triton's TensorRT `graph_spec` with `lower_bound`);
  * parity against fp32 eager on the same inputs at each shape: max |delta p|, NaN count, top-10 overlap per request
    (by the utility: heads summed, negative heads subtracted, a run's utility_weights applied);
  * FLOPs per candidate of the served form from perf/flops.py's `ranker_flops` (imported, skipped if it fails).
Targets (GPU only): p99 <= 8 ms at 512 candidates, fp16, CUDA graph, one request (TransAct); TransAct V2's p99 15 /
29 / 41 ms at 128 / 256 / 512 candidates beaten (fp16, CUDA graph, one request).

Deadline: --deadline-s (default 330 s from start; the whole check must end within 6 minutes). A point is skipped when
the previous point's duration, or after its warm-up the estimate of its own timed loops, would cross the deadline;
the first point always runs. OUT/results.json (and a table, OUT/results.md) is rewritten after EVERY point (tmp file +
rename), so a run that is killed still leaves every number it measured (its "status" then stays "running").
Points run smallest batch first, so the target points (batch 1) come first.

    python perf/gpu_check.py --out "$OUT/gpu"                      # on the GPU machine: random weights (seeded)
    python perf/gpu_check.py --run runs/demo --out "$OUT/gpu"      # the run's weights
    python perf/gpu_check.py --device cpu --iterations 3 --out /tmp/g --batches 1 --candidates 128   # smoke, anywhere
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # the deadline counts from here (before torch's import)

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "perf"):  # seqrank's model modules; gpu_check_report beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gpu_check_report import evaluate_targets, finite, markdown, write_atomic  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("eager", "cuda_graph")
RANDOM_MODEL = {"n_items": 100_000, "item_table_dim": 64, "n_actions": 10, "user_dim": 64, "n_heads": 4}
TOP_K = 10


def _config_importable() -> str:
    """seqrank.config (imported by the model modules) builds its configs with pydantic (v2) dataclasses. The lent GPU
    machine may have no pydantic (or another major version): then a stand-in makes them plain dataclasses (no field
    validation; the default config and a run's saved config.json, validated where it was written, load the same)."""
    try:
        import seqrank.config  # noqa: F401
        return "pydantic"
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"
    for name in [m for m in sys.modules if m.split(".")[0] == "pydantic" or m == "seqrank.config"]:
        del sys.modules[name]

    class ValidationError(ValueError):
        def errors(self):
            return []

    def dataclass(cls=None, /, *, config=None, **kwargs):
        return (lambda c: dataclasses.dataclass(c, **kwargs)) if cls is None else dataclasses.dataclass(cls, **kwargs)

    mod, dc = types.ModuleType("pydantic"), types.ModuleType("pydantic.dataclasses")
    mod.ValidationError, mod.ConfigDict, mod.Field = ValidationError, dict, (lambda *a, **kw: ("Field", kw))
    dc.dataclass, mod.dataclasses = dataclass, dc
    sys.modules["pydantic"], sys.modules["pydantic.dataclasses"] = mod, dc
    return f"stand-in ({reason}): configs are plain dataclasses, unvalidated"


CONFIG_BACKEND = _config_importable()

from seqrank.config import RunConfig, TransActConfig  # noqa: E402
from seqrank.features import FIRST_ID, N_CONTEXT  # noqa: E402
from seqrank.models.inference import ranker_for_serving  # noqa: E402
from seqrank.models.transact import TransActRanker  # noqa: E402


# ----------------------------------------------------------------------------------------------------------- model

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file without the safetensors package: 8-byte little-endian header size, a JSON header
    (name -> dtype, shape, data_offsets), then the raw little-endian data."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, base = json.loads(raw[8:8 + n]), 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, (a, b) = SAFETENSORS_DTYPES[meta["dtype"]], meta["data_offsets"]
        flat = (torch.frombuffer(bytearray(raw[base + a:base + b]), dtype=dtype) if b > a
                else torch.empty(0, dtype=dtype))
        out[name] = flat.reshape(meta["shape"])
    return out


def load_run(run: Path) -> tuple[TransActRanker, dict]:
    """The run's ranker: seqrank.exporting.load_ranker where its imports (safetensors, onnx, ...) are present,
    else the same construction here with the file read directly."""
    try:
        from seqrank.exporting import load_ranker
        model, cfg, vocab = load_ranker(run)
        heads, negative, how = list(vocab.heads), list(vocab.negative_actions), "seqrank.exporting.load_ranker"
    except ImportError as exc:
        cfg = RunConfig.load_saved(run)
        vocab = json.loads((run / "vocab" / "vocab.json").read_text())
        heads, negative = list(vocab["heads"]), list(vocab["negative_actions"])
        table = np.load(run / "item_table.npy")
        model = TransActRanker(cfg.transact, table, len(vocab["actions"]) + FIRST_ID, cfg.pinnerformer.dim,
                               N_CONTEXT, len(heads))
        model.load_state_dict(read_safetensors(run / "ranker.safetensors"))
        how = f"read directly ({type(exc).__name__}: {exc})"
    weights = [cfg.utility_weights.get(h, 1.0) * (-1.0 if h in negative else 1.0) for h in heads]
    return model.eval(), {"weights": f"run {run} ({how})", "heads": heads, "utility_weights": weights}


def random_model(seed: int) -> tuple[TransActRanker, dict]:
    """The default TransActConfig with seeded random weights and a random (L2-normalised) item table: the same
    shapes and FLOPs as a trained run of that config."""
    torch.manual_seed(seed)
    r = RANDOM_MODEL
    table = torch.nn.functional.normalize(torch.randn(r["n_items"], r["item_table_dim"]), dim=-1).numpy()
    model = TransActRanker(TransActConfig(), table, r["n_actions"], r["user_dim"], N_CONTEXT, r["n_heads"])
    return model.eval(), {"weights": f"random (seed {seed}, default TransActConfig, {r})",
                          "heads": [f"head{i}" for i in range(r["n_heads"])], "utility_weights": [1.0] * r["n_heads"]}


def request(model: TransActRanker, batch: int, n_cand: int, seed: int, pin: bool) -> list[torch.Tensor]:
    """Host tensors of `batch` requests as the ranker receives them: user side [B, ...] once per request, candidates
    [B, N]. Histories of random length (request 0 full), newest first, padded with 0."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 10_007 + n_cand)
    S = model.cfg.seq_len
    n_items, n_actions = model.item_table.shape[0], model.action_emb.num_embeddings
    lengths = torch.randint(1, S + 1, (batch,), generator=g)
    lengths[0] = S
    mask = torch.arange(S)[None, :] < lengths[:, None]
    tensors = [torch.randint(FIRST_ID, n_items, (batch, S), generator=g) * mask,
               torch.randint(FIRST_ID, n_actions, (batch, S), generator=g) * mask, mask,
               torch.nn.functional.normalize(torch.randn(batch, model.user_dim, generator=g), dim=-1),
               torch.randn(batch, model.n_context, generator=g),
               torch.randint(FIRST_ID, n_items, (batch, n_cand), generator=g)]
    return [t.pin_memory() for t in tensors] if pin else tensors


class Runner:
    """One iteration = copy the request in (pinned, non-blocking), the forward pass (eager, or a CUDA graph's
    replay), the fp32 probabilities out to a pinned host buffer. Float inputs travel as fp32 (the wire type) and
    are cast on the device."""

    def __init__(self, served: torch.nn.Module, host: list[torch.Tensor], dtype: torch.dtype, mode: str,
                 device: torch.device, n_heads: int):
        self.served, self.host, self.dtype = served, host, dtype
        self.cuda = device.type == "cuda"
        self.dev = [torch.empty_like(h, device=device) for h in host]
        B, N = host[-1].shape
        self.out_host = torch.empty((B, N, n_heads), dtype=torch.float32, pin_memory=self.cuda)
        self.graph, self.static_out = None, None
        if mode == "cuda_graph":
            self.copy_in()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self.forward()

    def copy_in(self) -> None:
        for d, h in zip(self.dev, self.host):
            d.copy_(h, non_blocking=self.cuda)

    def forward(self) -> torch.Tensor:
        si, sa, m, u, c, cand = self.dev
        return self.served(si, sa, m, u.to(self.dtype), c.to(self.dtype), cand).float()

    def __call__(self) -> None:
        self.copy_in()
        if self.graph is not None:
            self.graph.replay()
            out = self.static_out
        else:
            out = self.forward()
        self.out_host.copy_(out, non_blocking=self.cuda)


def time_iterations(step, n: int, cuda: bool) -> np.ndarray:
    """Per-iteration latency in ms, each iteration synchronised before the next starts."""
    if not cuda:
        lat = np.empty(n)
        for i in range(n):
            t = time.perf_counter()
            step()
            lat[i] = (time.perf_counter() - t) * 1e3
        return lat
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        step()
        e.record()
        e.synchronize()
    return np.array([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_pipelined(step, n: int, cuda: bool) -> float:
    """Mean ms per iteration with no synchronisation between iterations (launches overlap the GPU's work)."""
    if not cuda:
        t = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t) * 1e3 / n
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(n):
        step()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


def parity(out: torch.Tensor, ref: torch.Tensor, utility_weights: list[float]) -> dict:
    """`out` against the fp32 reference `ref` (both [B, N, H] fp32 on the host)."""
    nan, inf = int(torch.isnan(out).sum()), int(torch.isinf(out).sum())
    diff = (out - ref).abs()
    diffs = diff[torch.isfinite(diff)]
    w = torch.tensor(utility_weights, dtype=torch.float32)
    k = min(TOP_K, out.shape[1])
    top_ref = (ref @ w).topk(k, dim=1).indices
    top = torch.nan_to_num(out @ w, nan=-float("inf")).topk(k, dim=1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(top_ref, top)]
    return {"reference": "fp32 eager, same inputs", "max_abs_dp": float(diffs.max()) if diffs.numel() else None,
            "nan_count": nan, "inf_count": inf, "top10_overlap_per_request": overlap, "top10_overlap_min": min(overlap),
            "top10_overlap_mean": float(np.mean(overlap))}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        info.update(name=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    threads=torch.get_num_threads())
    return info


def flop_count(model: TransActRanker) -> tuple[dict | None, str]:
    """perf/flops.py's analytic count of the served form (factorized first layer, merged single head)."""
    try:
        sys.path.insert(0, str(ROOT / "perf"))
        from flops import ranker_flops
        if model.cfg.n_heads != 1:
            return None, "skipped: ranker_flops counts the single-head (shipped) config only"
        f = ranker_flops(model.cfg, 1, model.item_table.shape[1], model.user_dim, model.n_context,
                         model.heads.out_features)
        return {"per_candidate": f["per_candidate"], "per_request": f["per_request"]}, \
            "perf/flops.py ranker_flops (served form: factorized first layer, merged single head)"
    except Exception as exc:  # noqa: BLE001 - the count is optional on the lent machine
        return None, f"skipped: {type(exc).__name__}: {exc}"[:300]


# ----------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("build/gpu_check"), help="directory for results.json / .md")
    p.add_argument("--run", type=Path, default=None, help="a trained run (its ranker weights); default random")
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (smoke mode)")
    p.add_argument("--deadline-s", type=float, default=330.0, help="stop starting points past this (from start)")
    p.add_argument("--iterations", type=int, default=300, help="timed iterations per point (>= 300 on a GPU)")
    p.add_argument("--warmup", type=int, default=20, help="untimed iterations per point")
    p.add_argument("--pipelined-iterations", type=int, default=100, help="0: no pipelined throughput")
    p.add_argument("--dtypes", type=names, default=list(DTYPES))
    p.add_argument("--modes", type=names, default=list(MODES))
    p.add_argument("--batches", type=ints, default=[1, 8, 32])
    p.add_argument("--candidates", type=ints, default=[128, 256, 512, 1024])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    bad = [d for d in args.dtypes if d not in DTYPES] + [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown dtype/mode {bad}: dtypes {list(DTYPES)}, modes {list(MODES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    elapsed = lambda: time.perf_counter() - T0  # noqa: E731
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    result = {"status": "running", "elapsed_s": 0.0, "deadline_s": args.deadline_s, "argv": sys.argv[1:],
              "device": {"name": "?", "torch": torch.__version__, "cuda": torch.version.cuda},
              "model": {"weights": "?"}, "points": [], "skipped": [], "targets": []}

    def save() -> None:
        result["elapsed_s"] = round(elapsed(), 2)
        result["targets"] = evaluate_targets(result["points"], cuda)
        write_atomic(out_dir / "results.json", json.dumps(finite(result), indent=1, allow_nan=False))
        write_atomic(out_dir / "results.md", markdown(result))

    if cuda and not torch.cuda.is_available():
        result["status"] = "error: no CUDA device (run with --device cpu for the smoke mode)"
        save()
        raise SystemExit(result["status"])
    result["device"] = device_info(device)
    if cuda:
        try:
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
            torch.backends.cudnn.allow_tf32 = False
            result["device"]["tf32"] = False
        except Exception as exc:  # noqa: BLE001 - a torch that refuses the legacy switch: say so
            result["device"]["tf32"] = f"unknown ({type(exc).__name__}: {exc})"[:200]

    model, meta = load_run(args.run) if args.run else random_model(args.seed)
    served = ranker_for_serving(model).to(device)
    flops, flops_source = flop_count(model)
    models = {d: served if d == "fp32" else copy.deepcopy(served).to(DTYPES[d]) for d in args.dtypes}
    n_heads = model.heads.out_features
    result["model"] = {**meta, "config": dataclasses.asdict(model.cfg),
                       "served_form": "ranker_for_serving(model): factorized first layer, merged single head",
                       "config_backend": CONFIG_BACKEND, "flops": flops, "flops_source": flops_source}
    result["method"] = {
        "timed_region": "pinned H2D copy of the request tensors (user side [B,...] once per request, candidates "
                        "[B,N]) + forward + fp32 probabilities D2H to a pinned buffer",
        "latency": "one request batch at a time, synchronised after each iteration (concurrency 1): "
                   + ("CUDA events" if cuda else "time.perf_counter"),
        "pipelined": "no synchronisation between iterations; throughput only",
        "iterations": args.iterations, "warmup": args.warmup, "pipelined_iterations": args.pipelined_iterations,
        "cuda_graph": "one graph per (dtype, batch, candidates), captured after 3 warm-up passes; copies into its "
                      "static inputs outside the graph. Partial batches would be served by one graph per bucket and "
                      "batch size, padded to the smallest captured shape that holds them (empty requests, PAD "
                      "candidates; Triton TensorRT graph_spec lower_bound)",
        "parity": "each point's last output against fp32 eager on the same inputs; top-10 by utility per request",
        "order": "batch, then candidates, then dtype, then mode; the first point always runs"}
    save()

    measured_s = None  # duration of the previous measured point
    with torch.inference_mode():
        for batch in args.batches:
            for n_cand in args.candidates:
                host = request(model, batch, n_cand, args.seed, pin=cuda)
                ref = None
                for dname in args.dtypes:
                    for mode in args.modes:
                        key = {"dtype": dname, "mode": mode, "batch": batch, "candidates": n_cand}
                        if mode == "cuda_graph" and not cuda:
                            result["skipped"].append({**key, "reason": "cuda_graph needs CUDA"})
                            continue
                        if measured_s is not None and elapsed() + measured_s > args.deadline_s:
                            result["skipped"].append({**key, "reason": f"deadline ({args.deadline_s} s)"})
                            continue
                        t_point = time.perf_counter()
                        point = dict(key)
                        runner = None
                        try:
                            if ref is None:
                                r = Runner(served, host, torch.float32, "eager", device, n_heads)
                                r()
                                if cuda:
                                    torch.cuda.synchronize()
                                ref = r.out_host.clone()
                                del r
                            if cuda:  # the point's own peak: bounds the activation memory of a batch
                                torch.cuda.reset_peak_memory_stats()
                                base_bytes = torch.cuda.memory_allocated()
                            t = time.perf_counter()
                            runner = Runner(models[dname], host, DTYPES[dname], mode, device, n_heads)
                            if mode == "cuda_graph":
                                point["graph_capture_s"] = round(time.perf_counter() - t, 3)
                            warm = time_iterations(runner, args.warmup, cuda) if args.warmup else np.zeros(1)
                            estimate = (float(np.median(warm)) * (args.iterations + args.pipelined_iterations)
                                        / 1e3)
                            if measured_s is not None and elapsed() + estimate > args.deadline_s:
                                result["skipped"].append({**key, "reason": f"deadline ({args.deadline_s} s): "
                                                                           f"~{estimate:.1f} s needed"})
                                continue
                            lat = time_iterations(runner, args.iterations, cuda)
                            mean_ms = float(lat.mean())
                            point.update(iterations=int(lat.size), p50_ms=float(np.percentile(lat, 50)),
                                         p99_ms=float(np.percentile(lat, 99)), mean_ms=mean_ms,
                                         min_ms=float(lat.min()), max_ms=float(lat.max()),
                                         requests_per_s=batch / mean_ms * 1e3,
                                         candidates_per_s=batch * n_cand / mean_ms * 1e3)
                            if args.pipelined_iterations:
                                pipe_ms = time_pipelined(runner, args.pipelined_iterations, cuda)
                                point.update(pipelined_mean_ms=pipe_ms,
                                             pipelined_candidates_per_s=batch * n_cand / pipe_ms * 1e3)
                            if flops:
                                total = batch * (flops["per_request"] + n_cand * flops["per_candidate"])
                                point["tflops_per_s"] = total / (mean_ms / 1e3) / 1e12
                            if cuda:
                                torch.cuda.synchronize()
                                peak = torch.cuda.max_memory_allocated() - base_bytes
                                point.update(peak_memory_mib=peak / 2 ** 20,
                                             peak_bytes_per_candidate=peak / (batch * n_cand))
                            point["parity"] = parity(runner.out_host.clone(), ref, meta["utility_weights"])
                        except Exception as exc:  # noqa: BLE001 - a point the device cannot run is reported
                            point["error"] = f"{type(exc).__name__}: {exc}"[:500]
                        finally:
                            del runner
                            if cuda:
                                torch.cuda.empty_cache()
                        measured_s = time.perf_counter() - t_point
                        point["point_s"] = round(measured_s, 3)
                        result["points"].append(point)
                        print(json.dumps({k: v for k, v in point.items() if k != "parity"}
                                         | ({"max_abs_dp": point["parity"]["max_abs_dp"],
                                             "nan": point["parity"]["nan_count"]} if "parity" in point else {})),
                              flush=True)
                        save()
    result["status"] = "complete" if not any(s["reason"].startswith("deadline") for s in result["skipped"]) \
        else "deadline"
    save()
    print(f"wrote {out_dir / 'results.json'} ({len(result['points'])} points, {len(result['skipped'])} skipped, "
          f"{result['elapsed_s']} s): {result['status']}", flush=True)
    return result


if __name__ == "__main__":
    main()
