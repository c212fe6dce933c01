"""Side-by-side serving benchmark of one exported run, in ONE process run, written to perf/results/.

    .venv/bin/python perf/bench.py --run runs/demo            # the full bench (~12-15 min on 2 cores)
    .venv/bin/python perf/bench.py --run runs/demo --quick    # CI: tiny windows, few points (< 3 min)

Systems (docs/performance.md explains the method and the numbers):

(a) bare      the ranker's ONNX file in-process with ONNX Runtime (intra_op 2 threads, the ranker stub's settings) on
              the exact tensors preprocess builds for the fixed 1 user x 100 candidates request: the ceiling;
(b) tuned     the exported Triton ensemble as is (--model-config-name=cpu, feature store = the embedded SQLite
              store loaded with the log), perf_analyzer over gRPC, concurrency sweep + Poisson request-rate sweep;
(c) untuned   a copy of the repository with dynamic_batching removed from every model, one instance per model;
(d) naive     FastAPI + uvicorn (one process per core, Nagle off) + PyTorch eager (perf/naive_service.py) with the
              same model, tables and store, loaded by perf/loadgen.py (closed loop, same concurrencies, same
              statistics).

The compared systems are measured interleaved, round by round (one load level per round, every system in each
round), so a drift of the shared machine's background load hits all of them alike. Ratios are throughput ratios at
the same p99 budget (see ``ratio_at_budget``). Also: the FLOP count and roofline fraction, the de-duplication byte
ratio, the feature-store freshness through the ensemble (Redis), py-spy profiles of the Python backend stubs,
Triton's per-model statistics, an ONNX Runtime operator profile.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "perf"
for p in (ROOT, PERF, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import make_inputs  # noqa: E402  (perf/make_inputs.py)
from loadgen import closed_loop  # noqa: E402  (perf/loadgen.py)
from seqrank import triton_config  # noqa: E402
from seqrank.serving.batching import real_widths, trim_history_padding  # noqa: E402
from seqrank.serving.cpu_graph import cpu_graph_path, write_cpu_graph  # noqa: E402

SUMMARY_KEYS = ("ensemble_vs_bare_throughput", "ensemble_vs_bare_paired", "tuned_vs_untuned_throughput",
                "ensemble_vs_naive_throughput", "dedup_bytes_ratio", "roofline_fraction", "roofline_fraction_paired",
                "p99_ms", "freshness_p99_ms")
TARGETS = {  # issue #4
    "ensemble_vs_bare_throughput": (">=", 0.85),
    "tuned_vs_untuned_throughput": (">=", 2.0),
    "ensemble_vs_naive_throughput": (">=", 3.0),
    "dedup_bytes_ratio": (">=", 10.0),
    "roofline_fraction": (">=", 0.5),
    "freshness_p99_ms": ("<=", 1000.0),
}
RANKER_INPUTS = ("seq_item", "seq_action", "seq_mask", "user_emb", "context", "cand_item")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Settings:
    quick: bool
    concurrencies: tuple = (1, 2, 4, 8)
    pa_window_ms: int = 3000        # perf_analyzer: 3 windows of this, reported merged
    pa_count_window: int = 0        # > 0: count windows of at least this many requests instead (quick mode)
    lg_warmup_s: float = 1.0        # loadgen (naive): warm-up, then 3 windows
    lg_window_s: float = 3.0
    bare_s: float = 3.0             # bare: seconds per batch size
    peak_s: float = 2.0
    rate_fractions: tuple = (0.25, 0.5, 0.75, 0.9)
    log_concurrencies: tuple = (1, 4, 8)
    freshness_n: int = 200
    profile_s: float = 8.0
    n_requests: int = 256

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if not quick:
            return cls(False)
        return cls(True, concurrencies=(1, 4), pa_window_ms=400, pa_count_window=6, lg_warmup_s=0.3, lg_window_s=0.8,
                   bare_s=0.4,
                   peak_s=0.4, rate_fractions=(0.5,), log_concurrencies=(4,), freshness_n=10, profile_s=2.0,
                   n_requests=64)


# ----------------------------------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------------------------------


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def _cmd_out(cmd: list[str], env=None) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
        return (r.stdout + r.stderr).strip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({e})"


def machine_description() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env
    from redis_server import RedisServer
    redis_bin = RedisServer.find_binary()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "virtualized": "hypervisor" in flags,
        "memory_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "versions": {
            **{m: _version(m) for m in ("torch", "onnxruntime", "numpy", "tritonclient", "nvidia-pytriton", "fastapi",
                                        "uvicorn", "starlette", "httpx", "matplotlib", "redis", "py-spy")},
            "perf_analyzer": f"{_version('tritonclient')} (tritonclient wheel; binary: "
                             f"{_cmd_out([str(perf_analyzer_binary()), '--version'], env=perf_analyzer_env())})",
            "redis-server": _cmd_out([redis_bin, "--version"]) if redis_bin else None,
        },
        "note": "shared 2-core VM: other workloads run next to the bench (see loadavg per point); numbers are noisy",
    }


# ----------------------------------------------------------------------------------------------------------------------
# store, tensors, FLOPs
# ----------------------------------------------------------------------------------------------------------------------


def load_store(url: str, ev, run: Path, skip_actions=()) -> dict:
    """The log's actions into a feature store (``seqrank.ingest.replay_log``, without ``skip_actions``: the
    exposures) + the run's daily user embeddings."""
    from seqrank.ingest import replay_log
    from seqrank.store import open_store
    t0 = time.perf_counter()
    store = open_store(url, timeout_s=5.0, write_timeout_s=30.0)
    try:
        stats = replay_log(store, ev, skip_actions, batch_size=2000)
        users = [x.decode() if isinstance(x, bytes) else str(x) for x in np.load(run / "users.npy").tolist()]
        store.put_embeddings(users, np.load(run / "user_emb.npy").astype(np.float32),
                             int(ev.timestamp.max()) + 1)
    finally:
        store.close()
    return {"url": url, "ingest": stats.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}


def preprocessor(repo: Path, store_url: str | None):
    """The ensemble's preprocess step, in-process, with the repository's own parameters."""
    from seqrank.serving.preprocess import Preprocessor
    from seqrank.store import open_store
    config = triton_config.load(repo / "preprocess" / "config.pbtxt")
    params = {key: value.string_value for key, value in config.parameters.items()}
    return Preprocessor(repo / "preprocess" / "1" / "tables", seq_len=int(params["seq_len"]),
                        buckets=[int(b) for b in params["candidate_buckets"].split(",")],
                        max_candidates=int(params["max_candidates"]),
                        store=open_store(store_url, timeout_s=5.0) if store_url else None)


def request_tensors(pre, req: dict, with_actions: bool = False) -> dict:
    raw = {"user_id": np.array([req["user_id"]], dtype=object),
           "candidate_ids": np.array(req["candidate_ids"], dtype=object),
           "request_time_ms": np.array([req["request_time_ms"]], dtype=np.int64)}
    if with_actions:
        raw["action_item_ids"] = np.array([a[0] for a in req["actions"]], dtype=object)
        raw["action_types"] = np.array([a[1] for a in req["actions"]], dtype=object)
        raw["action_times_ms"] = np.array([a[2] for a in req["actions"]], dtype=np.int64)
    t = pre.build([pre.parse(raw)])[0]
    return {"seq_item": t.seq_item[None], "seq_action": t.seq_action[None], "seq_mask": t.seq_mask[None],
            "user_emb": np.ascontiguousarray(t.user_emb[None], dtype=np.float32), "context": t.context[None],
            "cand_item": t.cand_item[None], "_source": t.sequence_source, "_n": len(req["candidate_ids"])}


def ranker_flops(cfg, n_cand: int, item_table_dim: int, user_dim: int, n_context: int, n_heads: int) -> dict:
    """Analytic FLOPs of one ranker request as served (matrix products only, multiply-add = 2 FLOP; softmax,
    LayerNorm, masking, activations and gathers are left out: about 1 %). Notation: S = seq_len, d = action_dim +
    2 item_dim (early fusion width), ds = action_dim + item_dim (sequence part), E = item table dim, F = DCN input.
    For a single head (TransAct's default and the shipped config; the torch FlopCounterMode cross-check counts any
    config). Layer 0 runs factorized (seqrank.models.inference.factorized_first_layer):

    per request    : 2 S E item_dim (sequence item projection) + 3 x 2 S ds d (Qs, Ks, Vs) + 2 S^2 d (A = Qs Ks^T)
                     + 2 S d^2 (Us = Vs Wo^T)
    per candidate  : 2 E item_dim (candidate projection)
                     + layer 0: 2 x 2 item_dim d (qc, vc) + 2 S d (b_c) + 2 d^2 (uc) + 2 S^2 d (P_c Us)
                                + 4 S d d_ff (FF)
                     + (layers - 1) x [2 S d^2 (x M) + 2 S^2 d (scores) + 2 S d^2 (x N) + 2 S^2 d (attention)
                                       + 4 S d d_ff (FF)]    (query-key and value-output products merged:
                                       seqrank.models.inference.MergedSingleHead)
                     + cross_layers x 4 F rank (DCN v2, low rank) + MLP 2 sum(in x out) + heads 2 last H
    total          = per request + N x per candidate
    """
    S, a, i = cfg.seq_len, cfg.action_dim, cfg.item_dim
    d, ds, E = a + 2 * i, a + i, item_table_dim
    L, dff = cfg.n_layers, cfg.d_ff
    F = (cfg.top_k_rows + 1) * d + ds * int(cfg.sequence_mean) + user_dim + i + n_context
    per_request = 2 * S * E * i + 3 * 2 * S * ds * d + 2 * S * S * d + 2 * S * d * d
    first = 2 * 2 * i * d + 2 * S * d + 2 * d * d + 2 * S * S * d + 4 * S * d * dff
    later = 2 * 2 * S * d * d + 2 * S * S * d * 2 + 4 * S * d * dff
    per_cand = 2 * E * i + first + (L - 1) * later
    per_cand += cfg.cross_layers * 4 * F * cfg.cross_rank
    prev = F
    for w in cfg.mlp:
        per_cand += 2 * prev * w
        prev = w
    per_cand += 2 * prev * n_heads
    return {"per_request": per_request, "per_candidate": per_cand, "n_candidates": n_cand,
            "total": per_request + n_cand * per_cand, "F": F, "d": d}


def flop_counter_check(model, tensors: dict) -> int:
    """torch.utils.flop_counter on the same tensors (cross-check of the analytic count; a failure is a bug)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    args = [torch.from_numpy(np.ascontiguousarray(tensors[n])) for n in RANKER_INPUTS]
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(*args)
    return int(fc.get_total_flops())


def dedup_bytes(tensors: dict, n_real: int) -> dict:
    """Bytes per request crossing into the ranker: user-side tensors once per request (as served) vs repeated for
    every candidate row (the layout without request-level de-duplication). The headline counts the request's
    ``n_real`` candidates, what a duplicating layout would need; ``ratio_bucket`` counts the bucket-padded tensor
    preprocess actually sends (its padding rows would be repeated too)."""
    user_side = {n: tensors[n][0] for n in ("seq_item", "seq_action", "seq_mask", "user_emb", "context")}
    cand = tensors["cand_item"][0]
    user_bytes = sum(v.nbytes for v in user_side.values())

    def ratio(rows: int) -> tuple[int, int, float]:
        cand_bytes = rows * cand.itemsize
        dedup, repeated = user_bytes + cand_bytes, rows * user_bytes + cand_bytes
        return dedup, repeated, repeated / dedup

    dedup, repeated, r = ratio(n_real)
    _, repeated_bucket, r_bucket = ratio(cand.shape[0])
    return {"user_side_bytes": int(user_bytes), "candidate_rows": int(n_real), "bucket_rows": int(cand.shape[0]),
            "shapes": {n: [list(v.shape), str(v.dtype)] for n, v in user_side.items()} | {
                "cand_item": [list(cand.shape), str(cand.dtype)]},
            "bytes_dedup": int(dedup), "bytes_repeated": int(repeated), "ratio": r,
            "bytes_repeated_bucket": int(repeated_bucket), "ratio_bucket": r_bucket}


# ----------------------------------------------------------------------------------------------------------------------
# bare ONNX Runtime, peak, ORT operator profile
# ----------------------------------------------------------------------------------------------------------------------


def ort_session(onnx: Path, threads: int = 2, spinning: bool = True, profile_prefix: str | None = None):
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.enable_mem_pattern = False  # as model_cpu.py
    if not spinning:
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        o.enable_profiling = True
        o.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(onnx), o, providers=["CPUExecutionProvider"])


# The exact inference rewrites of the ranker, each as the option of seqrank.models.inference.ranker_for_serving that
# switches it (on = served)
REWRITES = {
    "first_layer_factorization": ("TransAct's first layer factorized (seqrank.models.inference.factorized_first_layer) "
                                  "vs the direct form", "factorize_first_layer"),
    "merged_attention": ("one head's query-key and value-output products merged (seqrank.models.inference."
                         "MergedSingleHead) vs four separate projections", "merge_single_head"),
}


def rewrite_speedup(model, sess, tensors: dict, work: Path, seconds: float, name: str, rounds: int = 3) -> dict:
    """The served ranker (``sess``) against the same weights exported with the rewrite ``name`` (REWRITES) switched
    off, the same CPU graph on both sides, in alternating rounds on the same tensors: what it buys on this machine."""
    from seqrank.exporting import export_cpu_graph, export_ranker_onnx
    without_onnx = work / f"ranker_without_{name}.onnx"
    off = {REWRITES[name][1]: False}
    export_ranker_onnx(model, without_onnx, **off)
    export_cpu_graph(model, without_onnx, without_onnx, **off)
    without = ort_session(without_onnx, threads=2)
    feed = {n: tensors[n] for n in RANKER_INPUTS}
    max_diff = float(np.abs(sess.run(None, feed)[0] - without.run(None, feed)[0]).max())
    runs = {"served": [], "without": []}
    for _ in range(rounds):
        runs["served"].append(bare_point(sess, tensors, 1, seconds)["throughput"])
        runs["without"].append(bare_point(without, tensors, 1, seconds)["throughput"])
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {"throughput_rps": runs, "median_rps": med, "speedup": med["served"] / med["without"],
            "max_abs_diff": max_diff}


def paired_ms(cases: dict, rounds: int) -> dict:
    """``cases``: name -> (session, [feeds]), the same number of feeds each. Each round runs feed i of every case back
    to back, for every i: drift on a shared VM hits the cases alike. Per case: the median over rounds of each feed's
    time, and their sum (ms): what one pass over the feeds costs."""
    names = list(cases)
    n = len(cases[names[0]][1])
    times = {name: np.zeros((rounds, n)) for name in names}
    for sess, feeds in cases.values():
        for f in feeds[:3]:
            sess.run(None, f)
    for r in range(rounds):
        for i in range(n):
            for name in names:
                sess, feeds = cases[name]
                t0 = time.perf_counter()
                sess.run(None, feeds[i])
                times[name][r, i] = time.perf_counter() - t0
    medians = {name: np.median(t, axis=0) * 1e3 for name, t in times.items()}
    return {"per_feed_median_ms": medians, "total_ms": {k: float(v.sum()) for k, v in medians.items()},
            "round_totals_ms": {k: (t.sum(axis=1) * 1e3).round(2).tolist() for k, t in times.items()}}


def cpu_graph_speedup(repo: Path, cpu_sess, tensors: dict, work: Path, rounds: int = 8) -> dict:
    """The CPU ranker's graph (``cpu_sess``: residual + LayerNorm fused and the full-history branch,
    seqrank/serving/cpu_graph.py, one thread) against the portable model.onnx and against the fused graph without
    the branch, single-threaded on the same 1 x 100 tensors (a full history: the branch runs), call by call in turn."""
    feed = {n: tensors[n] for n in RANKER_INPUTS}
    portable = repo / "ranker" / "1" / "model.onnx"
    masked_only = work / "ranker_fused_masked_only.onnx"
    write_cpu_graph(portable, masked_only)
    sessions = {"portable": ort_session(portable, threads=1), "fused_masked_only": ort_session(masked_only, threads=1),
                "cpu_graph": cpu_sess}
    want = sessions["portable"].run(None, feed)[0]
    diff = max(float(np.abs(want - s.run(None, feed)[0]).max()) for s in sessions.values())
    res = paired_ms({k: (sess, [feed] * 6) for k, sess in sessions.items()}, rounds)
    ms = {k: v / 6 for k, v in res["total_ms"].items()}  # per call
    return {"median_ms": ms, "round_totals_ms": res["round_totals_ms"],
            "speedup": ms["portable"] / ms["cpu_graph"],
            "full_history_branch_speedup": ms["fused_masked_only"] / ms["cpu_graph"], "max_abs_diff": diff}


def history_trimming(sess, tensors: list[dict], rounds: int = 9) -> dict:
    """The log's requests (real candidate counts and history lengths) scored on histories padded to seq_len and on
    their real width (seqrank.serving.batching.trim_history_padding, what the CPU ranker and the naive service do),
    single-threaded, each request's two forms back to back: what trimming buys on real traffic (the fixed 1 x 100
    request has a full history, so the target ratios do not show it). Also on the requests with a short history."""
    padded = []
    for t in tensors:
        width = int(real_widths(t["cand_item"])[0])
        if width:
            padded.append({**{n: t[n] for n in RANKER_INPUTS}, "cand_item": t["cand_item"][:, :width]})
    trimmed = [trim_history_padding(f) for f in padded]
    diff = max(float(np.abs(sess.run(None, a)[0] - sess.run(None, b)[0]).max()) for a, b in zip(padded, trimmed))
    res = paired_ms({"padded": (sess, padded), "trimmed": (sess, trimmed)}, rounds)
    med = res["per_feed_median_ms"]
    short = np.array([f["seq_mask"].shape[1] < p["seq_mask"].shape[1] for f, p in zip(trimmed, padded)])
    return {"requests": len(padded), "short_history_requests": int(short.sum()),
            "median_ms": {k: v / len(padded) for k, v in res["total_ms"].items()},
            "round_totals_ms": res["round_totals_ms"],
            "speedup": res["total_ms"]["padded"] / res["total_ms"]["trimmed"],
            "speedup_short_histories": (float(med["padded"][short].sum() / med["trimmed"][short].sum())
                                        if short.any() else None),
            "history_mean": float(np.mean([f["seq_mask"].sum() for f in padded])),
            "scored_width_mean": float(np.mean([f["seq_mask"].shape[1] for f in trimmed])), "max_abs_diff": diff}


def bare_point(sess, tensors: dict, batch: int, seconds: float, callers: int = 1) -> dict:
    """``callers`` threads call the session in a closed loop, each with ``batch`` copies of the request per call
    (ONNX Runtime releases the GIL in run; with intra_op 1 each caller computes on its own core): load = callers x
    batch requests in flight."""
    feed = {n: np.ascontiguousarray(np.repeat(tensors[n], batch, axis=0)) for n in RANKER_INPUTS}
    for _ in range(2):
        sess.run(None, feed)
    lats: list[list[float]] = [[] for _ in range(callers)]
    cpu0 = time.process_time()
    t_start = time.perf_counter()

    def call_loop(lat: list[float]):
        while True:
            t0 = time.perf_counter()
            sess.run(None, feed)
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t1 - t_start >= seconds and len(lat) >= 5:
                break

    threads = [threading.Thread(target=call_loop, args=(lat,)) for lat in lats[1:]]
    for t in threads:
        t.start()
    call_loop(lats[0])
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    lat = [x for part in lats for x in part]
    us = np.asarray(lat) * 1e6
    row = {"Batch": batch, "Callers": callers, "Inferences/Second": batch * len(lat) / wall,
           **{f"p{q} latency": float(np.percentile(us, q)) for q in (50, 90, 95, 99)}, "Avg latency": float(us.mean()),
           "calls": len(lat)}
    return {"csv_row": row, "load": batch * callers, "callers": callers, "throughput": batch * len(lat) / wall,
            "p50_ms": float(np.percentile(us, 50)) / 1e3,
            "p90_ms": float(np.percentile(us, 90)) / 1e3, "p95_ms": float(np.percentile(us, 95)) / 1e3,
            "p99_ms": float(np.percentile(us, 99)) / 1e3, "avg_ms": float(us.mean()) / 1e3, "calls": len(lat),
            "cpu_per_request_ms": (time.process_time() - cpu0) / (batch * len(lat)) * 1e3}


def best_matmul_gflops(n: int, seconds: float, use_torch: bool = True) -> float:
    """The best single-call GFLOP/s of an n x n fp32 matmul over ``seconds`` (torch.mm on 2 threads, or numpy)."""
    import torch
    if use_torch:
        a, b = torch.randn(n, n), torch.randn(n, n)
        call = lambda: torch.mm(a, b)  # noqa: E731
    else:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        call = lambda: a @ a  # noqa: E731
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        call()
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            call()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(prev)
    return best / 1e9


def matmul_peak(seconds: float) -> dict:
    """fp32 matmul peak of this machine on 2 threads: the best of torch.mm and numpy matmul on large squares."""
    out = {f"torch_mm_{n}": best_matmul_gflops(n, seconds) for n in (1024, 2048)}
    out["numpy_matmul_1024"] = best_matmul_gflops(1024, seconds, use_torch=False)
    out["peak_gflops"] = max(v for k, v in out.items())
    out["method"] = ("best single-call GFLOP/s of a square fp32 matmul (torch.mm 1024/2048, numpy 1024) on 2 threads, "
                     f"repeated for {seconds}s each")
    return out


def roofline_paired(sess1, tensors: dict, flops: float, rounds: int = 5, bare_s: float = 2.0,
                    peak_s: float = 0.5) -> dict:
    """The roofline's two terms measured back to back, ``rounds`` times: the fp32 matmul peak (``matmul_peak``, as
    the headline measures it, ``peak_s`` per kernel) and the bare ranker's saturated rate (two single-threaded
    callers on ``sess1``, the best bare load in every full run so far, over ``bare_s``). On a shared VM both drift;
    a round's ratio sees one moment's machine, and the median over rounds is steadier than one peak against one
    sweep."""
    peaks, rates = [], []
    for _ in range(rounds):
        peaks.append(matmul_peak(peak_s)["peak_gflops"])  # the headline's definition of the peak, every round
        rates.append(bare_point(sess1, tensors, 1, bare_s, callers=2)["throughput"])
    ratios = [flops * r / (p * 1e9) for r, p in zip(rates, peaks)]
    return {"peak_gflops": peaks, "bare_rps": rates, "fractions": ratios, "median_fraction": float(np.median(ratios)),
            "method": f"{rounds} rounds of: matmul_peak ({peak_s}s per kernel); bare ranker, "
                      f"2 single-threaded callers x batch 1 over {bare_s}s"}


def paired_vs_bare(server, ensemble_data: Path, ranker_data: Path, sess1, tensors: dict, st: "Settings",
                   csvdir: Path, rounds: int = 3, loads: tuple = (2, 4, 8), callers: int = 2) -> dict:
    """ensemble_vs_bare measured back to back, ``rounds`` times: in each round the bare ranker (``callers``
    single-threaded callers on ``sess1``, load = callers x batch), the ranker alone through Triton and the tuned
    ensemble, each at every load in ``loads``, and the round's ratios at the same p99 budget (``ratio_at_budget``).
    The sweep's ratio compares one system's best of 4 points with bare's best of 8, measured minutes apart on a
    machine whose speed drifts by a quarter (two identical bare points of one run: 66.6 and 58.8 req/s); a round sees
    one moment's machine, and the order alternates so a trend favours neither side."""
    per_round = []
    for r in range(rounds):
        def bare():
            return [{**bare_point(sess1, tensors, max(1, load // callers), st.bare_s, callers=callers), "ok": True}
                    for load in loads]

        def triton(model: str, data: Path):
            return [pa_point(server, model, data, csvdir / f"paired_{model}_{r}_c{c}.csv", st, concurrency=c)
                    for c in loads]

        if r % 2 == 0:
            b, ranker, ens = bare(), triton("ranker", ranker_data), triton("seqrank", ensemble_data)
        else:
            ens, ranker, b = triton("seqrank", ensemble_data), triton("ranker", ranker_data), bare()
        per_round.append({
            "ensemble_vs_bare": ratio_at_budget(ens, b), "ranker_only_vs_bare": ratio_at_budget(ranker, b),
            "ensemble_vs_ranker_only": ratio_at_budget(ens, ranker),
            "throughput": {name: [p.get("throughput") for p in pts]
                           for name, pts in (("bare", b), ("ranker_only", ranker), ("ensemble", ens))}})
    out = {"rounds": per_round, "loads": list(loads),
           "method": f"{rounds} rounds, order alternating, of: bare ({callers} single-threaded callers), the ranker "
                     f"alone through Triton and the tuned ensemble at loads {list(loads)}; ratio at the same p99 "
                     "budget per round, median over rounds"}
    for key in ("ensemble_vs_bare", "ranker_only_vs_bare", "ensemble_vs_ranker_only"):
        ratios = [x[key]["ratio"] for x in per_round]
        out[key] = {"ratios": ratios, "median": float(np.median(ratios))}
    return out


def ort_op_profile(onnx: Path, tensors: dict, workdir: Path, runs: int = 20) -> list[dict]:
    """Share of the ranker's ONNX Runtime time per operator type (ORT's own profiler, 2 threads)."""
    sess = ort_session(onnx, profile_prefix=str(workdir / "ort_profile"))
    feed = {n: tensors[n] for n in RANKER_INPUTS}
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    by_op: Counter = Counter()
    for e in events:
        op = e.get("args", {}).get("op_name", "?")
        # a control-flow node's time is its subgraph's nodes' time, which are counted themselves (the CPU graph's If)
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and op not in ("If", "Loop", "Scan"):
            by_op[op] += int(e.get("dur", 0))
    total = sum(by_op.values()) or 1
    return [{"op": op, "share": us / total, "us_per_run": us / runs} for op, us in by_op.most_common(12)]


# ----------------------------------------------------------------------------------------------------------------------
# Triton: servers, perf_analyzer, statistics, py-spy
# ----------------------------------------------------------------------------------------------------------------------


def untuned_copy(src: Path, dst: Path) -> list[str]:
    """Copy the repository; remove every dynamic_batching block, one instance per model (seqrank.triton_config)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))

    def untuned(cfg) -> None:
        if cfg.WhichOneof("scheduling_choice") == "dynamic_batching":
            cfg.ClearField("dynamic_batching")
        if cfg.instance_group:
            cfg.instance_group[0].count = 1
    return [str(cfg.relative_to(dst)) for cfg in sorted(dst.rglob("*.pbtxt")) if triton_config.edit(cfg, untuned)]


# Diagnostic layouts of the CPU ranker on the same cores (not part of the metrics; they explain the shipped
# one, configs/cpu.pbtxt: one instance per core, each splitting a batch's candidates over run_threads = 2
# single-threaded runs; research/ab_layouts.py compares more layouts):
# name -> (label, parameters, instances; None = one per core)
RANKER_LAYOUTS = {
    "tuned_inst2": ("one single-threaded ranker instance per core (the naive service's layout)",
                    {"intra_op_threads": 1, "run_threads": 1}, None),
    "tuned_intra2": ("1 ranker instance, ONNX Runtime intra_op 2 threads",
                     {"intra_op_threads": 2, "run_threads": 1}, 1),
}


def ranker_variant_copy(src: Path, dst: Path, params: dict[str, int], instances: int | None = None) -> list[str]:
    """Copy the repository with the CPU ranker's parameters (intra_op_threads, run_threads) set to ``params`` and,
    when given, ``instances`` ranker instances: diagnostic layouts of the same two cores."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = dst / "ranker" / "configs" / "cpu.pbtxt"

    def variant(config) -> None:
        for key, value in params.items():
            triton_config.set_parameter(config, key, value, cfg)
        if instances is not None:
            triton_config.set_instance_count(config, instances, cfg)
    return [str(cfg.relative_to(dst))] if triton_config.edit(cfg, variant) else []


def start_triton(repo: Path, store_url: str | None, log_path: Path):
    from seqrank.server.triton import ServerOptions, TritonServer
    env = {"SEQRANK_STORE": store_url} if store_url else {}
    server = TritonServer(ServerOptions(model_repository=repo, http_port=0, grpc_port=0, metrics_port=0,
                                        model_config_name="cpu", env=env), log_path=log_path)
    server.start(timeout_s=180)
    return server


def triton_version(server) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=5) as r:
            return json.loads(r.read()).get("version")
    except Exception:  # noqa: BLE001
        return None


def model_stats(server) -> dict:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/stats", timeout=5) as r:
            raw = json.loads(r.read())
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for m in raw.get("model_stats", []):
        s = m.get("inference_stats", {})
        out[m["name"]] = {"inference_count": int(m.get("inference_count", 0)),
                          "execution_count": int(m.get("execution_count", 0)),
                          **{k: int(s.get(k, {}).get("ns", 0)) for k in
                             ("success", "queue", "compute_input", "compute_infer", "compute_output")}}
    return out


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        d = {k: a[k] - b.get(k, 0) for k in a}
        inf, ex = d["inference_count"], d["execution_count"]
        if inf <= 0:
            continue
        out[name] = {"requests": inf, "executions": ex, "avg_batch": inf / ex if ex else None,
                     "queue_ms_per_request": d["queue"] / inf / 1e6,
                     "compute_ms_per_execution": (d["compute_input"] + d["compute_infer"] + d["compute_output"])
                     / max(ex, 1) / 1e6,
                     "infer_ms_per_execution": d["compute_infer"] / max(ex, 1) / 1e6}
    return out


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def parse_pa_csv(path: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [r for r in rows if r.get("Inferences/Second")]


def store_fallbacks(urls: list[str]) -> float | None:
    """Rankings served without the store's sequence so far (seqrank_store_fallback_total on a Triton metrics port,
    ``fallbacks`` of the naive service's /stats), summed over ``urls``; None if one cannot be read."""
    total = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        if url.endswith("/stats"):
            total += float(json.loads(text)["fallbacks"])
        else:
            total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                         if line.startswith("seqrank_store_fallback_total"))
    return total


def _fallback_delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def pa_point(server, model: str, data: Path, out_csv: Path, st: Settings, concurrency: int | None = None,
             rate: float | None = None, logs: Path | None = None) -> dict:
    """One perf_analyzer measurement (3 windows of st.pa_window_ms, merged); returns a point record."""
    from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env
    window = st.pa_window_ms if rate is None else max(st.pa_window_ms, 1500)  # Poisson at a few req/s needs time
    cmd = [str(perf_analyzer_binary()), "-m", model, "-i", "grpc", "-u", server.grpc_url, "--input-data", str(data),
           "-b", "1", "-p", str(window), "-s", "1000", "-r", "3", "-f", str(out_csv)]
    if st.pa_count_window > 0:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(st.pa_count_window)]
    if rate is not None:
        cmd += ["--request-rate-range", f"{rate:.3f}", "--request-distribution", "poisson", "--max-threads", "16"]
    else:
        cmd += ["--concurrency-range", str(concurrency)]
    before = model_stats(server)
    metrics = [f"http://{server.metrics_url}/metrics"]
    fallbacks = store_fallbacks(metrics)
    load = os.getloadavg()[0]
    if out_csv.exists():
        out_csv.unlink()
    cpu0 = _children_cpu()
    timeout = max(60, window / 1000 * 12 + 30)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=perf_analyzer_env(), timeout=timeout)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = -1, f"timeout after {timeout}s: {e}"
    cpu = _children_cpu() - cpu0
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / (out_csv.stem + ".log")).write_text(" ".join(cmd) + "\n\n" + text[-6000:])
    point = {"model": model, "mode": "rate" if rate is not None else "concurrency",
             "load": rate if rate is not None else concurrency, "loadavg": load, "ok": False}
    if rc == 0 and out_csv.exists():
        rows = parse_pa_csv(out_csv)
        if rows:
            row = rows[-1]
            thr = float(row["Inferences/Second"])
            n = thr * 3 * window / 1000 if st.pa_count_window <= 0 else 3 * st.pa_count_window
            point.update(ok=True, throughput=thr, p50_ms=float(row["p50 latency"]) / 1e3,
                         p90_ms=float(row["p90 latency"]) / 1e3, p95_ms=float(row["p95 latency"]) / 1e3,
                         p99_ms=float(row["p99 latency"]) / 1e3, requests_measured=round(n),
                         server_queue_ms=float(row.get("Server Queue", 0) or 0) / 1e3,
                         server_compute_infer_ms=float(row.get("Server Compute Infer", 0) or 0) / 1e3,
                         client_cpu_ms_per_request=cpu * 1e3 / max(n, 1), csv_row=row)
    if not point["ok"]:
        point["error"] = text[-800:]
    point["model_stats"] = stats_delta(before, model_stats(server))
    point["store_fallbacks"] = _fallback_delta(fallbacks, store_fallbacks(metrics))
    return point


def stub_models(server) -> dict[int, str]:
    """pid -> model name, for every Python backend stub process of the server (each instance has its own)."""
    out = {}
    for pid in server.group_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"triton_python_backend_stub") and len(cmd) > 1:
            out[pid] = Path(cmd[1].decode()).parent.parent.name
    return out


def stub_pids(server) -> dict:
    """model name -> the pid of one of its stubs (the models that have a live stub)."""
    return {model: pid for pid, model in stub_models(server).items()}


def parse_collapsed(path: Path, top: int = 12) -> dict:
    """py-spy raw (collapsed) stacks -> top self frames and top inclusive frames, as shares of the samples."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    fmt = lambda c: [{"frame": f, "share": k / total} for f, k in c.most_common(top)] if total else []  # noqa: E731
    return {"samples": total, "self": fmt(self_c), "inclusive": fmt(incl)}


def background_load(server, model: str, data: Path, concurrency: int, seconds: float,
                    keep_output: bool = False) -> subprocess.Popen:
    """perf_analyzer holding ``concurrency`` requests in flight on ``model`` in the background, for three windows of
    ``seconds`` + 3 s each (no stability check), i.e. ~3 x (``seconds`` + 3) s: the load under which a profile or a
    CPU sample of ``seconds`` is taken. ``keep_output``: its report (the rate over all three windows, not over the
    sample) can be read from stdout (text) when it exits."""
    from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env
    out = subprocess.PIPE if keep_output else subprocess.DEVNULL
    return subprocess.Popen([str(perf_analyzer_binary()), "-m", model, "-i", "grpc", "-u", server.grpc_url,
                             "--input-data", str(data), "-b", "1", "--concurrency-range", str(concurrency),
                             "-p", str(int(seconds * 1000 + 3000)), "-s", "1000", "-r", "3"],
                            stdout=out, stderr=subprocess.STDOUT if keep_output else subprocess.DEVNULL,
                            env=perf_analyzer_env(), text=True)


def profile_stubs(server, data: Path, concurrency: int, seconds: float, outdir: Path, st: Settings) -> dict:
    """py-spy record (raw, non-blocking) of every Python backend stub while perf_analyzer loads the ensemble."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        spy = Path(shutil.which("py-spy") or "py-spy")
    pids = stub_pids(server)
    outdir.mkdir(parents=True, exist_ok=True)
    load = background_load(server, "seqrank", data, concurrency, seconds)
    result = {"concurrency": concurrency, "seconds": seconds, "stubs": {}}
    try:
        time.sleep(1.0)
        dumps = {}
        for name, pid in pids.items():
            dumps[name] = _cmd_out([str(spy), "dump", "--pid", str(pid), "--nonblocking"])[:3000]
        procs = {name: subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                         "--rate", "50", "--format", "raw", "--nonblocking",
                                         "-o", str(outdir / f"pyspy_{name}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for name, pid in pids.items()}
        for name, p in procs.items():
            try:
                _, err = p.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                err = b"timeout"
            f = outdir / f"pyspy_{name}.txt"
            entry = {"pid": pids[name], "dump": dumps.get(name, "")}
            if f.exists():
                entry.update(parse_collapsed(f))
            else:
                entry["error"] = err.decode(errors="replace")[-500:]
            result["stubs"][name] = entry
    finally:
        load.terminate()
        try:
            load.wait(timeout=10)
        except subprocess.TimeoutExpired:
            load.kill()
    return result


def write_ranker_json(tensors: dict, path: Path) -> None:
    """perf_analyzer input for the ranker model alone: the fixed request's real tensors."""
    entry = {}
    for n in RANKER_INPUTS:
        v = tensors[n][0]
        entry[n] = {"content": v.reshape(-1).tolist(), "shape": list(v.shape)}
    path.write_text(json.dumps({"data": [entry]}))


# ----------------------------------------------------------------------------------------------------------------------
# naive FastAPI service
# ----------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NaiveService:
    """``workers`` single-worker uvicorn processes, one per core, each on its own port; the load generator spreads
    its connections round-robin over them (a client-side balancer). This is the baseline's best case: with
    ``uvicorn --workers 2`` on one port the kernel handed 3 of 4 keep-alive connections to one worker (measured:
    1 x 16 at concurrency 4 ran at one worker's throughput, 80 req/s)."""

    def __init__(self, run: Path, tables: Path, store_url: str | None, workers: int, log_path: Path):
        self.ports = [_free_port() for _ in range(workers)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.url = self.urls[0]
        env = dict(os.environ, SEQRANK_NAIVE_RUN=str(run.resolve()), SEQRANK_NAIVE_TABLES=str(tables.resolve()),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if store_url:
            env["SEQRANK_STORE"] = store_url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "naive_service:app", "--app-dir", str(PERF), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log",
             "--http", "naive_service:NoDelayHTTPProtocol"],  # Nagle off (see naive_service.py)
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
            start_new_session=True) for port in self.ports]

    def rank_urls(self) -> list[str]:
        return [u + "/rank" for u in self.urls]

    def wait_ready(self, body: dict, timeout_s: float = 180) -> None:
        """Ready when every process answers /rank with 200 (each loads the model at startup)."""
        import httpx
        deadline = time.monotonic() + timeout_s
        pending = list(self.urls)
        while pending and time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"uvicorn exited with {proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with httpx.Client(timeout=30) as c:
                    if c.post(pending[0] + "/rank", json=body).status_code == 200:
                        pending.pop(0)
                        continue
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.3)
        if pending:
            raise TimeoutError(f"naive service not ready after {timeout_s}s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def naive_point(svc: NaiveService, bodies: list[dict], concurrency: int, st: Settings) -> dict:
    load = os.getloadavg()[0]
    stats = [u + "/stats" for u in svc.urls]
    fallbacks = store_fallbacks(stats)
    try:
        r = closed_loop(svc.rank_urls(), bodies, concurrency, warmup_s=st.lg_warmup_s, window_s=st.lg_window_s,
                        windows=3)
    except Exception as e:  # noqa: BLE001
        return {"mode": "concurrency", "load": concurrency, "loadavg": load, "ok": False, "error": repr(e)}
    ok = r["requests"] > 0 and r["errors"] == 0
    return {"mode": "concurrency", "load": concurrency, "loadavg": load, "ok": ok, "throughput": r["Inferences/Second"],
            "store_fallbacks": _fallback_delta(fallbacks, store_fallbacks(stats)),
            "p50_ms": r["p50 latency"] / 1e3, "p90_ms": r["p90 latency"] / 1e3, "p95_ms": r["p95 latency"] / 1e3,
            "p99_ms": r["p99 latency"] / 1e3, "requests_measured": r["requests"], "errors": r["errors"],
            "client_cpu_ms_per_request": r["client_cpu_s"] * 1e3 / max(r["requests"], 1), "csv_row": r}


# ----------------------------------------------------------------------------------------------------------------------
# freshness (Redis)
# ----------------------------------------------------------------------------------------------------------------------


def freshness(repo: Path, ev, run: Path, req: dict, n: int, workdir: Path, vocab_items: list[str],
              actions: list[str], skip_actions=()) -> dict:
    """Time from ``store.append`` of a new action to the first ensemble response computed with it.

    A real redis-server (tests/redis_server.py) holds the log; the ensemble runs with SEQRANK_STORE=redis://...
    For probe i, at time T (now, strictly increasing): (1) rank (user, 16 candidates, request_time_ms = T + 1) with
    the store path -> reference utilities U0 (the action is not stored yet); (2) t0; append (user, item_i, action_i,
    T) with a separate RedisStore client (as an ingest process would); (3) re-send the identical request until the
    response's sequence_source is "store" and its utilities differ from U0 (the new action is the newest row of the
    sequence and changes every candidate's score); t1. Sample = t1 - t0: the write, the preprocess step's store read
    and one full ensemble round trip (the last poll), i.e. action-to-visible-in-a-ranking.
    """
    from redis_server import RedisServer
    import tritonclient.grpc as grpcclient

    from seqrank.client import build_inputs
    from seqrank.ingest import measure_freshness
    from seqrank.store import open_store
    from seqrank.store.base import Action

    result = {"store": "redis", "n": n}
    if not RedisServer.available():
        result["error"] = "redis-server not installed"
        return result
    srv = RedisServer(appendonly=False).start()
    server = None
    try:
        loaded = load_store(srv.url, ev, run, skip_actions)
        result["load"] = loaded
        server = start_triton(repo, srv.url, workdir / "tritonserver-redis.log")
        writer = open_store(srv.url, timeout_s=1.0, write_timeout_s=5.0)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        cands = req["candidate_ids"][:16]
        user = req["user_id"]

        def rank(t_req: int):
            inputs = build_inputs(grpcclient, user, cands, request_time=t_req)
            r = client.infer("seqrank", inputs, outputs=[grpcclient.InferRequestedOutput(k)
                                                         for k in ("ranked_ids", "utility", "sequence_source")])
            ids = [x.decode() for x in r.as_numpy("ranked_ids").reshape(-1)]
            util = dict(zip(ids, r.as_numpy("utility").reshape(-1).tolist()))
            return util, r.as_numpy("sequence_source").reshape(-1)[0].decode()

        samples, polls, failures = [], [], 0
        last_t = 0
        for i in range(n):
            t_act = max(int(time.time() * 1000), last_t + 1)
            last_t = t_act
            ref, _ = rank(t_act + 1)
            a = Action(user, vocab_items[(7 * i + 3) % len(vocab_items)], actions[i % len(actions)], t_act)
            t0 = time.perf_counter()
            stats = writer.append([a])
            if stats.accepted != 1:
                failures += 1
                continue
            k = 0
            while True:
                util, source = rank(t_act + 1)
                k += 1
                if source == "store" and any(abs(util[c] - ref[c]) > 0 for c in ref):
                    samples.append((time.perf_counter() - t0) * 1e3)
                    polls.append(k)
                    break
                if time.perf_counter() - t0 > 10.0:
                    failures += 1
                    break
        client.close()
        store_only = measure_freshness(writer, n=min(n, 100))
        writer.close()
        s = np.asarray(samples)
        result.update(
            samples=len(samples), failures=failures,
            p50_ms=float(np.percentile(s, 50)) if len(s) else float("nan"),
            p99_ms=float(np.percentile(s, 99)) if len(s) else float("nan"),
            max_ms=float(s.max()) if len(s) else float("nan"), polls_mean=float(np.mean(polls)) if polls else None,
            samples_ms=[round(x, 3) for x in samples],
            store_only_p50_ms=float(np.percentile(store_only, 50)), store_only_p99_ms=float(np.percentile(store_only, 99)),
            measured=("store.append of a new action (RedisStore client) -> first response of the seqrank ensemble "
                      "(gRPC, 1 user x 16 candidates, request_time_ms = action time + 1 ms, sequence from the "
                      "store) whose utilities differ from the reference computed just before the append"))
    finally:
        if server is not None:
            server.stop()
        srv.cleanup()
    return result


# ----------------------------------------------------------------------------------------------------------------------
# ratios, summary, report, plots
# ----------------------------------------------------------------------------------------------------------------------


SATURATION_BAND = 0.05  # points within 5% of a system's highest throughput count as its saturated plateau


def ratio_at_budget(a: list[dict], b: list[dict]) -> dict:
    """Throughput ratio A / B at the same p99 budget.

    Each system's best point is the lowest-p99 point on its saturated plateau (the points within 5% of its highest
    throughput: near saturation the rate is flat while p99 grows, so the single highest point is picked by noise).
    The slower system is the one whose best throughput is lower; the budget is that system's p99 at its best point.
    Each system is then credited with the highest throughput among its points whose p99 <= budget. A system with no
    point inside the budget is credited with its lowest-p99 point and flagged ``outside_budget``; such a ratio never
    counts as a met target."""
    a = [p for p in a if p.get("ok")]
    b = [p for p in b if p.get("ok")]
    if not a or not b:
        return {"ratio": float("nan"), "error": "no successful points"}

    def best(points):
        top = max(p["throughput"] for p in points)
        return min((p for p in points if p["throughput"] >= (1 - SATURATION_BAND) * top), key=lambda p: p["p99_ms"])

    best_a, best_b = best(a), best(b)
    slower = best_a if best_a["throughput"] <= best_b["throughput"] else best_b
    budget = slower["p99_ms"]

    def within(points):
        ok = [p for p in points if p["p99_ms"] <= budget * (1 + 1e-9)]
        if ok:
            return max(ok, key=lambda p: p["throughput"]), False
        return min(points, key=lambda p: p["p99_ms"]), True

    pa, oa = within(a)
    pb, ob = within(b)
    return {"ratio": pa["throughput"] / pb["throughput"], "p99_budget_ms": budget, "outside_budget": oa or ob,
            "a": {"load": pa["load"], "throughput": pa["throughput"], "p99_ms": pa["p99_ms"], "outside_budget": oa},
            "b": {"load": pb["load"], "throughput": pb["throughput"], "p99_ms": pb["p99_ms"], "outside_budget": ob}}


def _met(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        return False
    return value >= target if op == ">=" else value <= target


def write_csvs(points: dict, outdir: Path) -> list[str]:
    """One CSV per (system, request set, mode), perf_analyzer's -f columns (the naive system's from loadgen)."""
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    for (system, rset, mode), pts in sorted(points.items()):
        rows = [p["csv_row"] for p in pts if p.get("ok") and "csv_row" in p]
        if not rows:
            continue
        cols = list(rows[0].keys())
        if system == "naive":
            cols = ["Concurrency", "Inferences/Second", "p50 latency", "p90 latency", "p95 latency", "p99 latency",
                    "Avg latency", "requests", "errors"]
        path = outdir / f"{system}_{rset}_{mode}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
        files.append(str(path))
    return files


def plots(points: dict, summary: dict, outdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    style = {"bare": ("k", "s"), "tuned": ("tab:green", "o"), "untuned": ("tab:red", "^"),
             "naive": ("tab:blue", "D"), "ranker_only": ("tab:gray", "x"), "tuned_inst2": ("tab:olive", "v"),
             "tuned_intra2": ("tab:cyan", "P")}
    for rset in ("fixed_1x100", "fixed_1x16"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (system, s, mode), pts in sorted(points.items()):
            if s != rset or mode not in ("concurrency", "batch", "callers"):
                continue
            pts = sorted([p for p in pts if p.get("ok")], key=lambda p: p["load"])
            if not pts:
                continue
            c, m = style.get(system, ("tab:purple", "."))
            m = "*" if mode == "callers" else m
            ax.plot([p["throughput"] for p in pts], [p["p99_ms"] for p in pts], marker=m, color=c,
                    label=f"{system} ({mode} "
                          f"{','.join(str(p['load']) for p in pts)})")
            for p in pts:
                ax.annotate(str(p["load"]), (p["throughput"], p["p99_ms"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{rset.replace('fixed_', '')} (1 user x {rset.split('x')[-1]} candidates): p99 vs throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = outdir / f"latency_throughput_{rset}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    rate = sorted([p for p in points.get(("tuned", "fixed_1x100", "rate"), []) if p.get("ok")],
                  key=lambda p: p["load"])
    if rate:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot([p["load"] for p in rate], [p["p50_ms"] for p in rate], "o-", label="p50")
        ax.plot([p["load"] for p in rate], [p["p99_ms"] for p in rate], "s-", label="p99")
        ax2 = ax.twinx()
        ax2.plot([p["load"] for p in rate], [p["throughput"] for p in rate], "^--", color="gray", label="achieved")
        ax.set_xlabel("offered Poisson request rate (requests/s)")
        ax.set_ylabel("latency (ms)")
        ax2.set_ylabel("achieved throughput (requests/s)")
        ax.set_title("tuned ensemble, 1 x 100, Poisson arrivals")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        path = outdir / "poisson_rate_sweep.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    fr = summary.get("details", {}).get("freshness", {}).get("samples_ms")
    if fr:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = np.sort(fr)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
        ax.set_xscale("log")
        ax.set_xlabel("append -> visible in an ensemble ranking (ms)")
        ax.set_ylabel("CDF")
        ax.set_title("feature-store freshness through the ensemble (Redis)")
        ax.grid(alpha=0.3)
        path = outdir / "freshness_cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    fig, ax = plt.subplots(figsize=(8, 4))
    keys = [k for k in TARGETS]
    vals, cols, labels = [], [], []
    for k in keys:
        op, t = TARGETS[k]
        v = summary.get(k, float("nan"))
        frac = (v / t) if op == ">=" else (t / v if v else float("nan"))
        vals.append(frac)
        cols.append("tab:green" if summary["targets"][k]["met"] else "tab:red")
        labels.append(k.replace("_throughput", "").replace("_", "\n"))
    ax.bar(range(len(keys)), vals, color=cols)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("measured / target (>= 1 is met)")
    ax.set_yscale("log")
    ax.set_title("issue #4 targets on this machine")
    path = outdir / "targets.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    return files


def _fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.{nd}f}"
    return str(x)


def points_table(pts: list[dict], load_name: str) -> str:
    lines = [f"| {load_name} | throughput (req/s) | p50 ms | p90 ms | p99 ms | requests | loadavg |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(pts, key=lambda p: p["load"]):
        if not p.get("ok"):
            lines.append(f"| {p['load']} | failed | | | | | |")
            continue
        lines.append(f"| {_fmt(p['load'], 2) if isinstance(p['load'], float) else p['load']} | "
                     f"{_fmt(p['throughput'], 2)} | {_fmt(p['p50_ms'])} | {_fmt(p['p90_ms'])} | {_fmt(p['p99_ms'])} | "
                     f"{p.get('requests_measured', p.get('calls', '-'))} | {_fmt(p.get('loadavg'), 2)} |")
    return "\n".join(lines)


def report_md(summary: dict, points: dict, extra: dict) -> str:
    d = summary["details"]
    m = summary["machine"]
    out = ["# seqrank serving benchmark", "",
           f"Run: `{summary['run']}`, mode: {'quick (CI smoke: tiny windows, numbers are not meaningful)' if summary['quick'] else 'full'}, "
           f"started {summary['started']}, {summary['wall_s']:.0f} s wall.", "",
           "## Machine", "",
           f"- CPU: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['cpus_available']} available), "
           f"SIMD {', '.join(m['simd'])}, {'virtualised' if m['virtualized'] else 'bare metal'}, {m['memory_mib']} MiB",
           f"- load average at start {m['loadavg_at_start']}, at end {m.get('loadavg_at_end')}: **a shared, noisy "
           "machine** (other jobs run next to the bench); every point records the 1-minute load average",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), "",
           "## Results against the targets of issue #4", "",
           "| metric | measured | target | met |", "|---|---|---|---|"]
    for k in SUMMARY_KEYS:
        t = summary["targets"].get(k)
        tgt = f"{t['op']} {t['target']}" if t else "(reported)"
        met = ("yes" if t["met"] else "**no**") if t else "-"
        out.append(f"| {k} | {_fmt(summary[k], 3)} | {tgt} | {met} |")
    out += ["", f"freshness_store: {summary['freshness_store']}", ""]
    out += ["## Method", "",
            "- **Same requests everywhere** (perf/make_inputs.py): held-out requests of the shipped log (a user's "
            "impressions within 60 s); the fixed 1 x 100 request is the user with the longest history (S = 100 real "
            "actions) with its request's items the "
            "model knows, then other vocabulary items, 100 distinct candidates (1 x 16 = its first 16). The ensemble "
            "and the naive "
            "service read the sequence from the same SQLite store; bare runs the exact tensors preprocess builds for "
            "that request, as the CPU ranker stub scores them (the 100 real candidates: the stub drops the bucket "
            "padding preprocess adds for the GPU engines), in two layouts: one caller with intra_op 2 threads and "
            "batch b, and one single-threaded caller per core (load = callers x batch).",
            "- **Throughput ratios at the same p99 budget**: each system's best point = the lowest-p99 point within "
            f"{SATURATION_BAND:.0%} of its highest throughput (its saturated plateau); the budget = the p99 of the "
            "slower system at its best point; each system is credited with its best throughput among points with "
            "p99 <= budget (bare: both layouts' points, one call = b requests; Triton/naive: closed-loop "
            "concurrency). A ratio for which a system had no point within the budget is never counted as met.",
            "- **Store fallbacks under load** (a ranking answered without the sequence because the store read missed "
            "its 50 ms deadline costs less, and would flatter the system that had more): "
            f"{d.get('store_fallbacks_under_load')} (per system, over all its measured points).",
            f"- perf_analyzer over gRPC, `-b 1`, 3 windows of {summary['settings']['pa_window_ms']} ms merged "
            "(`-s 1000 -r 3`: always reports; a noisy machine never passes a tight stability check); naive: "
            "perf/loadgen.py, warm-up then 3 windows of the same length, same statistics.",
            "- **Interleaved rounds**: for each load level every system is measured once before the next level, so "
            "the background load drifts over all systems alike.",
            f"- FLOPs: analytic (formula in `ranker_flops`, bench.py); per request at N = {d['flops']['n_candidates']} "
            f"scored rows: {d['flops']['total'] / 1e9:.3f} GFLOP ({d['flops']['per_candidate'] / 1e6:.2f} MFLOP per "
            f"candidate + {d['flops']['per_request'] / 1e6:.2f} MFLOP per request); torch FlopCounterMode on the same "
            f"tensors: {_fmt((d['flops'].get('flop_counter') or 0) / 1e9, 3)} GFLOP. roofline_fraction = FLOPs x bare "
            f"throughput at saturation / fp32 matmul peak ({_fmt(d['peak']['peak_gflops'])} GFLOP/s, "
            f"{d['peak']['method']})." + (
                f" Paired ({d['roofline_paired']['method']}): median "
                f"{d['roofline_paired']['median_fraction']:.3f}, per round "
                f"{', '.join(f'{x:.3f}' for x in d['roofline_paired']['fractions'])}."
                if d.get("roofline_paired") else ""),
            f"- dedup_bytes_ratio: {d['dedup']['bytes_repeated']} B (user-side {d['dedup']['user_side_bytes']} B "
            f"repeated for each of the request's {d['dedup']['candidate_rows']} candidates + their ids) / "
            f"{d['dedup']['bytes_dedup']} B (user-side once + the ids); over the {d['dedup']['bucket_rows']}-row "
            f"bucket preprocess sends: {_fmt(d['dedup']['ratio_bucket'])}; shapes/dtypes {d['dedup']['shapes']}.",
            f"- p99_ms: the tuned ensemble, 1 x 100, at the chosen load = {d['p99_load']}.",
            f"- freshness: {d['freshness'].get('measured', d['freshness'].get('error'))}.", ""]
    out += ["## Points", ""]
    names = {"batch": "batch", "concurrency": "concurrency", "rate": "Poisson rate (req/s)",
             "callers": "in flight (callers x batch)"}
    for (system, rset, mode), pts in sorted(points.items()):
        out += [f"### {system} / {rset} / {mode}", "", points_table(pts, names.get(mode, mode)), ""]
    out += ["## Ratio details", "", "```json", json.dumps({k: d[k] for k in d if "_vs_" in k}, indent=1), "```", ""]
    out += extra.get("bounds_md", [])
    return "\n".join(out) + "\n"


def bounds_md(summary: dict, extra: dict) -> list[str]:
    """What bounds the missed targets: the evidence this run collected."""
    d = summary["details"]
    out = ["## What bounds the results (evidence from this run)", ""]
    for inc in d.get("stub_incidents") or []:
        out += [f"**Incident**: {inc['system']}: a Python backend stub was gone at {inc['time']} (stubs alive: "
                f"{inc['stubs_alive']}, server alive: {inc['server_alive']}); the bench restarted that server. "
                "Last lines of its log:", "", "```", inc["log_tail"][-800:], "```", ""]
    ops = extra.get("ort_ops") or []
    if ops:
        out += ["ONNX Runtime operator profile of the bare ranker (1 x 100, share of kernel time):", "",
                "| op | share | us per run |", "|---|---|---|"]
        out += [f"| {o['op']} | {o['share'] * 100:.1f} % | {o['us_per_run']:.0f} |" for o in ops[:10]]
        out.append("")
    for name, (what, _) in REWRITES.items():
        fl = d.get(name)
        if fl:
            out += [f"{what[0].upper()}{what[1:]}, bare ranker 1 x 100, {len(fl['throughput_rps']['without'])} alternating "
                    f"rounds: **{fl['speedup']:.2f}x** throughput (median {_fmt(fl['median_rps']['served'], 2)} vs "
                    f"{_fmt(fl['median_rps']['without'], 2)} req/s), max |probability difference| "
                    f"{fl['max_abs_diff']:.1e}.", ""]
    cg, ht = d.get("cpu_graph"), d.get("history_trimming")
    if cg:
        out += [f"CPU ranker graph (residual + LayerNorm fused into SkipLayerNormalization, and the unmasked branch for "
                f"full histories) vs the portable model.onnx, 1 x 100 (a full history), one thread, call by call in turn, "
                f"{len(cg['round_totals_ms']['portable'])} rounds: **{cg['speedup']:.2f}x** "
                f"({_fmt(cg['median_ms']['cpu_graph'])} vs {_fmt(cg['median_ms']['portable'])} ms per call, medians); "
                f"the branch alone (vs the fused graph without it, {_fmt(cg['median_ms']['fused_masked_only'])} ms): "
                f"**{cg['full_history_branch_speedup']:.2f}x**; max |probability difference| {cg['max_abs_diff']:.1e}.",
                ""]
    if ht:
        short = ht.get("speedup_short_histories")
        out += [f"History trimming on the log's {ht['requests']} requests (mean history {_fmt(ht['history_mean'])}, "
                f"scored width {_fmt(ht['scored_width_mean'])}; each request padded then trimmed, "
                f"{len(ht['round_totals_ms']['padded'])} rounds, per-request medians): **{ht['speedup']:.2f}x** "
                f"({_fmt(ht['median_ms']['trimmed'], 2)} vs {_fmt(ht['median_ms']['padded'], 2)} ms per request, one "
                f"thread); on the {ht['short_history_requests']} requests with a short history "
                f"{'-' if short is None else f'{short:.2f}x'}; max |probability difference| {ht['max_abs_diff']:.1e}.",
                ""]
    pvb = d.get("paired_vs_bare")
    if pvb:
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        out += [f"Ensemble vs bare measured back to back ({pvb['method']}): ensemble / bare "
                f"**{pvb['ensemble_vs_bare']['median']:.2f}** (rounds {fmt(pvb['ensemble_vs_bare']['ratios'])}); the "
                f"ranker alone through Triton / bare {pvb['ranker_only_vs_bare']['median']:.2f} "
                f"({fmt(pvb['ranker_only_vs_bare']['ratios'])}); ensemble / ranker alone "
                f"{pvb['ensemble_vs_ranker_only']['median']:.2f} ({fmt(pvb['ensemble_vs_ranker_only']['ratios'])}).",
                "", "| round | bare req/s | ranker alone req/s | ensemble req/s (at loads "
                + ", ".join(map(str, pvb["loads"])) + ") |", "|---|---|---|---|"]
        out += [f"| {i} | {fmt(r['throughput']['bare'])} | {fmt(r['throughput']['ranker_only'])} | "
                f"{fmt(r['throughput']['ensemble'])} |" for i, r in enumerate(pvb["rounds"])]
        out.append("")
    bv = d.get("bare_variants")
    if bv:
        out += ["Bare ranker, batch 1, other ONNX Runtime thread settings (same tensors):", "",
                "| setting | req/s | p99 ms |", "|---|---|---|"]
        out += [f"| {k} | {_fmt(v['throughput'], 2)} | {_fmt(v['p99_ms'])} |" for k, v in bv.items()]
        out.append("")
    for label, key in (("tuned ensemble", "tuned_stats"), ("untuned ensemble", "untuned_stats"),
                       ("tuned ensemble", "tuned_stats_16"), ("untuned ensemble", "untuned_stats_16"),
                       *((f"tuned ensemble, {label}", f"{name}{suffix}")
                         for name, (label, _, _) in RANKER_LAYOUTS.items() for suffix in ("_stats", "_stats_16"))):
        st = extra.get(key)
        if st:
            out += [f"Triton per-model statistics, {label}, {st['at']}:", "",
                    "| model | requests | avg batch | queue ms/request | compute ms/execution |", "|---|---|---|---|---|"]
            for name, s in sorted(st["stats"].items()):
                out.append(f"| {name} | {s['requests']} | {_fmt(s['avg_batch'], 2)} | "
                           f"{_fmt(s['queue_ms_per_request'], 2)} | {_fmt(s['compute_ms_per_execution'], 2)} |")
            out.append("")
    for prof in (extra.get("profile"), extra.get("profile_16")):
        if not prof or not prof.get("stubs"):
            continue
        out += [f"py-spy (non-blocking, 50 Hz, {prof['seconds']} s) of the Python backend stubs under "
                f"concurrency {prof['concurrency']}, {prof.get('request', '')}; top frames by self time "
                "(shares of the stub's active samples; idle waiting is not sampled):", ""]
        for name, s in sorted(prof["stubs"].items()):
            out.append(f"**{name}** (pid {s.get('pid')}, {s.get('samples', 0)} active samples)")
            out.append("")
            for f in (s.get("self") or [])[:8]:
                out.append(f"- {f['share'] * 100:.1f} % `{f['frame']}`")
            if s.get("error"):
                out.append(f"- py-spy error: {s['error']}")
            out.append("")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a trained, exported run directory")
    ap.add_argument("--repository", type=Path, help="default: <run>/model_repository")
    ap.add_argument("--out", type=Path, default=PERF / "results")
    ap.add_argument("--events", help="the action log (default: the run's)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny windows, few points (< 3 minutes)")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    started = time.time()
    st = Settings.make(args.quick)
    run = args.run.resolve()
    repo = (args.repository or run / "model_repository").resolve()
    if not (repo / "ranker" / "1" / "model.onnx").is_file():
        ap.error(f"{repo} is not an exported model repository (run `seqrank export --run {args.run}`)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.png")) + list(out.glob("csv/*.csv")) + [
            out / name for name in ("summary.json", "points.json", "profile.json", "report.md")
            if (out / name).exists()]:
        old.unlink()  # a run that fails leaves no earlier run's results looking current
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="seqrank-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    log(f"run {run}, repository {repo}, results {out}, scratch {work}, {'quick' if st.quick else 'full'}")

    machine = machine_description()
    servers: list = []
    naive = None
    points: dict = defaultdict(list)
    extra: dict = {}
    details: dict = {}
    try:
        # ---- inputs, store, tensors ---------------------------------------------------------------------------
        event_log = make_inputs.load_event_log(run, args.events)
        ev, skip = event_log.events, [event_log.exposure_action]
        manifest = make_inputs.write_inputs(run, work / "inputs", args.events, st.n_requests, ev=ev)
        (out / "inputs").mkdir(exist_ok=True)
        for name in ("manifest.json", "fixed_1x100_store.json", "fixed_1x16_store.json",
                     "fixed_1x100_actions.json", "fixed_1x16_actions.json"):
            shutil.copy2(work / "inputs" / name, out / "inputs" / name)
        files = {k: Path(v) for k, v in manifest["files"].items()}
        reqs = json.loads((work / "inputs" / "requests.json").read_text())
        store_url = f"sqlite:///{work / 'store.db'}"
        details["store"] = load_store(store_url, ev, run, skip)
        log(f"inputs: {json.dumps({k: v['requests'] for k, v in manifest['sets'].items()})}; store loaded in "
            f"{details['store']['seconds']} s")

        from seqrank.exporting import load_ranker
        from seqrank.models.inference import ranker_for_serving
        model, cfg, vocab = load_ranker(run)
        pre = preprocessor(repo, store_url)
        fixed100 = reqs["fixed_1x100"][0]
        t100 = request_tensors(pre, fixed100)
        t100_actions = request_tensors(pre, fixed100, with_actions=True)
        same = all(np.array_equal(t100[n], t100_actions[n]) for n in RANKER_INPUTS)
        details["fixed_request"] = {"user_id": fixed100["user_id"], "request_time_ms": fixed100["request_time_ms"],
                                    "candidates": len(fixed100["candidate_ids"]),
                                    "sequence_length": int(t100["seq_mask"].sum()),
                                    "cand_item_width": int(t100["cand_item"].shape[1]),
                                    "sequence_source": t100["_source"], "store_and_request_paths_identical": same}
        write_ranker_json(t100, work / "inputs" / "ranker_1x100.json")
        # what the CPU ranker stub scores: the real candidates (seqrank.serving.batching drops the bucket padding)
        t100_run = {**t100, "cand_item": t100["cand_item"][:, : int(real_widths(t100["cand_item"])[0])]}
        details["fixed_request"]["scored_width"] = int(t100_run["cand_item"].shape[1])
        if len(np.unique(t100_run["cand_item"][0])) != t100_run["cand_item"].shape[1]:
            raise SystemExit("the fixed request repeats a candidate id (several unknown items are one OOV id): the "
                             "CPU ranker scores each distinct id once, bare and naive per column; rebuild the inputs "
                             "with perf/make_inputs.py")
        item_dim = int(np.load(run / "item_table.npy", mmap_mode="r").shape[1])
        flops = ranker_flops(cfg.transact, int(t100_run["cand_item"].shape[1]), item_dim,
                             int(t100["user_emb"].shape[1]), int(t100["context"].shape[1]), len(vocab.heads))
        flops["flop_counter"] = flop_counter_check(ranker_for_serving(model), t100_run)
        details["flops"] = flops
        details["dedup"] = dedup_bytes(t100, int(t100_run["cand_item"].shape[1]))
        details["peak"] = matmul_peak(st.peak_s)
        log(f"FLOPs/request {flops['total'] / 1e9:.3f} G (counter {flops['flop_counter']}); peak "
            f"{details['peak']['peak_gflops']:.1f} GFLOP/s; dedup ratio {details['dedup']['ratio']:.1f}")

        onnx = cpu_graph_path(repo / "ranker" / "1")  # what the CPU ranker stub loads
        details["bare_graph"] = onnx.name
        bare_sess = ort_session(onnx, threads=2)
        bare_sess1 = ort_session(onnx, threads=1)
        if not st.quick:
            extra["ort_ops"] = ort_op_profile(onnx, t100_run, work)
            variants = {}
            for label, th, spin in (("intra_op 1 thread", 1, True), ("intra_op 2, no spinning", 2, False)):
                variants[label] = bare_point(ort_session(onnx, threads=th, spinning=spin), t100_run, 1, st.bare_s)
            details["bare_variants"] = variants
            for name in REWRITES:
                details[name] = rewrite_speedup(model, bare_sess, t100_run, work, st.bare_s, name)
                log(f"{name}: {details[name]['speedup']:.2f}x without it")

        quick = {"rounds": 1} if st.quick else {}  # the smoke run checks that both run and agree, not how fast
        details["cpu_graph"] = cpu_graph_speedup(repo, bare_sess1, t100_run, work, **quick)
        details["history_trimming"] = history_trimming(
            bare_sess1, [request_tensors(pre, r, with_actions=True) for r in reqs["log"]], **quick)
        log(f"CPU graph {details['cpu_graph']['speedup']:.2f}x the portable one (full-history branch "
            f"{details['cpu_graph']['full_history_branch_speedup']:.2f}x); history trimming "
            f"{details['history_trimming']['speedup']:.2f}x on the log's requests")
        details["roofline_paired"] = roofline_paired(bare_sess1, t100_run, details["flops"]["total"],
                                                     **({"rounds": 1, "bare_s": 0.3, "peak_s": 0.2} if st.quick else {}))
        log(f"roofline, paired rounds: median {details['roofline_paired']['median_fraction']:.3f} "
            f"({', '.join(f'{x:.3f}' for x in details['roofline_paired']['fractions'])})")
        # ---- servers -------------------------------------------------------------------------------------------
        tuned = start_triton(repo, store_url, logs / "tritonserver-tuned.log")
        servers.append(tuned)
        machine["versions"]["tritonserver"] = triton_version(tuned)
        workers_n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        untuned_repo = work / "untuned_repository"
        details["untuned_changes"] = untuned_copy(repo, untuned_repo)
        untuned = start_triton(untuned_repo, store_url, logs / "tritonserver-untuned.log")
        servers.append(untuned)
        variants = {}
        for name, (label, params, instances) in (() if st.quick else RANKER_LAYOUTS.items()):
            vrepo = work / f"{name}_repository"
            instances = instances or workers_n
            details[f"{name}_changes"] = {"files": ranker_variant_copy(repo, vrepo, params, instances),
                                          "layout": label, **params, "ranker_instances": instances}
            variants[name] = start_triton(vrepo, store_url, logs / f"tritonserver-{name}.log")
            servers.append(variants[name])
        tri = {"tuned": tuned, "untuned": untuned, **variants}
        tri_repos = {"tuned": repo, "untuned": untuned_repo,
                     **{name: work / f"{name}_repository" for name in variants}}
        incidents: list = []
        details["stub_incidents"] = incidents

        def ensure(name: str):
            """The named Triton system, restarted (and the incident recorded) if a Python backend stub died."""
            srv = tri[name]
            alive = stub_pids(srv)
            if srv.is_alive() and len(alive) >= 3:
                return srv
            incidents.append({"system": name, "time": time.strftime("%H:%M:%S"), "server_alive": srv.is_alive(),
                              "stubs_alive": sorted(alive), "log_tail": srv.log_text()[-1500:]})
            log(f"WARNING: {name}: a Python backend stub is gone (alive: {sorted(alive)}); restarting the server")
            srv.stop()
            servers.remove(srv)
            new = start_triton(tri_repos[name], store_url, logs / f"tritonserver-{name}-restart{len(incidents)}.log")
            servers.append(new)
            tri[name] = new
            return new

        workers = workers_n
        naive = NaiveService(run, repo / "preprocess" / "1" / "tables", store_url, workers, logs / "naive.log")
        body100 = {"user_id": fixed100["user_id"], "candidate_ids": fixed100["candidate_ids"],
                   "request_time_ms": fixed100["request_time_ms"]}
        fixed16 = reqs["fixed_1x16"][0]
        body16 = {"user_id": fixed16["user_id"], "candidate_ids": fixed16["candidate_ids"],
                  "request_time_ms": fixed16["request_time_ms"]}
        naive.wait_ready(body100)
        details["naive_workers"] = workers
        log(f"servers up: tuned {tuned.grpc_url}, untuned {untuned.grpc_url}, naive {naive.url} ({workers} workers)")

        # parity: the ensemble and the naive service rank the fixed request alike (ONNX Runtime vs torch eager)
        try:
            import httpx
            from seqrank.client import RankingClient
            with RankingClient(tuned.grpc_url, timeout_s=30) as c:
                ens = c.rank(fixed100["user_id"], fixed100["candidate_ids"], request_time=fixed100["request_time_ms"])
            nv = httpx.post(naive.url + "/rank", json=body100, timeout=60).json()
            eu = {i.item_id: i.utility for i in ens.items}
            nu = dict(zip(nv["ranked_ids"], nv["utility"]))
            details["parity"] = {"max_abs_utility_diff": max(abs(eu[k] - nu[k]) for k in eu),
                                 "same_top10": ens.item_ids[:10] == nv["ranked_ids"][:10],
                                 "ensemble_source": ens.sequence_source, "naive_source": nv["sequence_source"]}
        except Exception as e:  # noqa: BLE001
            details["parity"] = {"error": repr(e)}
        log(f"parity {details['parity']}")
        # every candidate's utility agrees (the orders can then differ only by swaps of near-equal utilities)
        if not details["parity"].get("max_abs_utility_diff", 1.0) < 1e-4:
            raise RuntimeError(f"the ensemble and the naive service do not score alike: {details['parity']}")

        csvdir = work / "pa"
        csvdir.mkdir(exist_ok=True)
        # warm every system once
        for srv in (tuned, untuned, *variants.values()):
            for s in ("fixed_1x100_store", "fixed_1x16_store"):
                pa_point(srv, "seqrank", files[s], csvdir / "warm.csv", Settings(True, pa_window_ms=300))
        closed_loop(naive.rank_urls(), [body100], 2, warmup_s=0.2, window_s=0.3, windows=1)

        # ---- interleaved rounds ---------------------------------------------------------------------------------
        cmax = max(st.concurrencies)
        for c in st.concurrencies:
            log(f"round: concurrency {c} (bare: batch {c}; {workers_n} callers x batch {max(1, c // workers_n)})")
            p = bare_point(bare_sess, t100_run, c, st.bare_s)
            p.update(ok=True, mode="batch", loadavg=os.getloadavg()[0])
            points[("bare", "fixed_1x100", "batch")].append(p)
            p = bare_point(bare_sess1, t100_run, max(1, c // workers_n), st.bare_s, callers=workers_n)
            p.update(ok=True, mode="callers", loadavg=os.getloadavg()[0])
            points[("bare", "fixed_1x100", "callers")].append(p)
            for system in tri:
                for rset in ("fixed_1x100", "fixed_1x16"):
                    p = pa_point(ensure(system), "seqrank", files[f"{rset}_store"],
                                 csvdir / f"{system}_{rset}_c{c}.csv", st, concurrency=c, logs=logs)
                    points[(system, rset, "concurrency")].append(p)
                    if c == cmax and rset == "fixed_1x100":
                        extra[f"{system}_stats"] = {"at": f"1 x 100, concurrency {c}", "stats": p["model_stats"]}
                    if c == cmax and rset == "fixed_1x16":
                        extra[f"{system}_stats_16"] = {"at": f"1 x 16, concurrency {c}", "stats": p["model_stats"]}
            for rset, body in (("fixed_1x100", body100), ("fixed_1x16", body16)):
                points[("naive", rset, "concurrency")].append(naive_point(naive, [body], c, st))
            for key in (("tuned", "fixed_1x100", "concurrency"), ("tuned", "fixed_1x16", "concurrency"),
                        ("untuned", "fixed_1x16", "concurrency"), ("naive", "fixed_1x100", "concurrency"),
                        *((name, "fixed_1x100", "concurrency") for name in RANKER_LAYOUTS)):
                if not points.get(key):
                    continue
                q = points[key][-1]
                log(f"  {key[0]:8s} {key[1]}: " + (f"{q['throughput']:.2f} req/s p99 {q['p99_ms']:.1f} ms"
                                                   if q.get("ok") else f"FAILED {q.get('error', '')[-200:]}"))
        naive.stop()
        naive = None
        for name in [n for n in tri if n != "tuned"]:
            tri[name].stop()
            servers.remove(tri[name])
        log("ensemble vs bare, paired rounds (the tuned ensemble, the ranker alone through Triton, bare)")
        details["paired_vs_bare"] = paired_vs_bare(
            ensure("tuned"), files["fixed_1x100_store"], work / "inputs" / "ranker_1x100.json", bare_sess1, t100_run,
            st, csvdir, **({"rounds": 1} if st.quick else {}))
        log("  ensemble/bare per round " + ", ".join(
            f"{x:.2f}" for x in details["paired_vs_bare"]["ensemble_vs_bare"]["ratios"]) + "; ranker alone/bare "
            + ", ".join(f"{x:.2f}" for x in details["paired_vs_bare"]["ranker_only_vs_bare"]["ratios"]))

        # ---- tuned only: log-drawn requests, raw actions, ranker alone, Poisson sweep, profile ----------------
        for rset in ("log_store", "log_actions"):
            for c in st.log_concurrencies:
                points[("tuned", rset, "concurrency")].append(
                    pa_point(ensure("tuned"), "seqrank", files[rset], csvdir / f"tuned_{rset}_c{c}.csv", st, concurrency=c,
                             logs=logs))
        points[("tuned", "fixed_1x100_actions", "concurrency")].append(
            pa_point(ensure("tuned"), "seqrank", files["fixed_1x100_actions"], csvdir / f"tuned_fixed_1x100_actions_c{cmax}.csv",
                     st, concurrency=cmax, logs=logs))
        for c in sorted({1, cmax}):
            points[("ranker_only", "fixed_1x100", "concurrency")].append(
                pa_point(ensure("tuned"), "ranker", work / "inputs" / "ranker_1x100.json", csvdir / f"ranker_c{c}.csv", st,
                         concurrency=c, logs=logs))
        sat = max((p["throughput"] for p in points[("tuned", "fixed_1x100", "concurrency")] if p.get("ok")),
                  default=1.0)
        for frac in st.rate_fractions:
            rate = max(0.2, frac * sat)
            p = pa_point(ensure("tuned"), "seqrank", files["fixed_1x100_store"], csvdir / f"tuned_rate_{frac}.csv", st,
                         rate=rate, logs=logs)
            p["fraction_of_saturation"] = frac
            points[("tuned", "fixed_1x100", "rate")].append(p)
        log("profiling the Python backend stubs with py-spy")
        for key, rset in (("profile", "fixed_1x100"), ("profile_16", "fixed_1x16")):
            try:
                extra[key] = profile_stubs(ensure("tuned"), files[f"{rset}_store"], cmax, st.profile_s, logs / key, st)
                extra[key]["request"] = rset
            except Exception as e:  # noqa: BLE001
                extra[key] = {"error": repr(e)}
        tri["tuned"].stop()
        servers.remove(tri["tuned"])

        # ---- freshness (Redis) --------------------------------------------------------------------------------
        log("freshness through the ensemble with Redis")
        vocab_items = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(vocab.items).tolist()]
        try:
            details["freshness"] = freshness(repo, ev, run, fixed16, st.freshness_n, logs, vocab_items,
                                             list(vocab.actions), skip)
        except Exception as e:  # noqa: BLE001
            details["freshness"] = {"error": repr(e), "traceback": traceback.format_exc()[-2000:]}
        log(f"freshness p99 {details['freshness'].get('p99_ms')} ms")
    finally:
        if naive is not None:
            naive.stop()
        for s in servers:
            s.stop()

    # ---- summary ----------------------------------------------------------------------------------------------------
    bare_pts = points[("bare", "fixed_1x100", "batch")] + points[("bare", "fixed_1x100", "callers")]
    tuned100 = points[("tuned", "fixed_1x100", "concurrency")]
    details["ensemble_vs_bare"] = ratio_at_budget(tuned100, bare_pts)
    details["tuned_vs_untuned"] = ratio_at_budget(points[("tuned", "fixed_1x16", "concurrency")],
                                                  points[("untuned", "fixed_1x16", "concurrency")])
    details["tuned_vs_untuned_1x100"] = ratio_at_budget(tuned100, points[("untuned", "fixed_1x100", "concurrency")])
    details["ensemble_vs_naive"] = ratio_at_budget(tuned100, points[("naive", "fixed_1x100", "concurrency")])
    details["ensemble_vs_naive_1x16"] = ratio_at_budget(points[("tuned", "fixed_1x16", "concurrency")],
                                                        points[("naive", "fixed_1x16", "concurrency")])
    for v in (v for v in RANKER_LAYOUTS if points.get((v, "fixed_1x100", "concurrency"))):
        details[f"{v}_vs_bare"] = ratio_at_budget(points[(v, "fixed_1x100", "concurrency")], bare_pts)
        details[f"{v}_vs_naive"] = ratio_at_budget(points[(v, "fixed_1x100", "concurrency")],
                                                   points[("naive", "fixed_1x100", "concurrency")])
        details[f"{v}_vs_untuned_1x16"] = ratio_at_budget(points[(v, "fixed_1x16", "concurrency")],
                                                          points[("untuned", "fixed_1x16", "concurrency")])
    fallbacks = defaultdict(float)
    for (system, _, _), pts in points.items():
        for p in pts:
            if p.get("store_fallbacks") is not None:
                fallbacks[system] += p["store_fallbacks"]
    details["store_fallbacks_under_load"] = dict(fallbacks)
    if any(fallbacks.values()):
        log(f"WARNING: rankings served without the store's sequence under load: {dict(fallbacks)}")
    bare_sat = max((p["throughput"] for p in bare_pts if p.get("ok")), default=float("nan"))
    roofline = details["flops"]["total"] * bare_sat / (details["peak"]["peak_gflops"] * 1e9)
    details["roofline"] = {"bare_saturation_rps": bare_sat, "achieved_gflops": details["flops"]["total"] * bare_sat / 1e9,
                           "peak_gflops": details["peak"]["peak_gflops"]}
    # p99 at the chosen load: the Poisson point at half the saturated throughput (else the c=1 point)
    rate_pts = [p for p in points[("tuned", "fixed_1x100", "rate")] if p.get("ok")]
    chosen = min(rate_pts, key=lambda p: abs(p.get("fraction_of_saturation", 0) - 0.5)) if rate_pts else None
    if chosen is None:
        ok = [p for p in tuned100 if p.get("ok")]
        chosen = min(ok, key=lambda p: p["load"]) if ok else {"p99_ms": float("nan"), "load": None, "mode": "-"}
        details["p99_load"] = f"concurrency {chosen['load']} (no Poisson point succeeded)"
    else:
        sat100 = max((p["throughput"] for p in tuned100 if p.get("ok")), default=float("nan"))
        details["p99_load"] = (f"Poisson arrivals asked at {chosen['load']:.2f} req/s = "
                               f"{chosen['fraction_of_saturation']:.0%} of the saturated throughput, delivered "
                               f"{chosen['throughput']:.2f} req/s = {chosen['throughput'] / sat100:.0%}")
    fresh = details.get("freshness", {})
    summary = {
        "ensemble_vs_bare_throughput": details["ensemble_vs_bare"]["ratio"],
        "tuned_vs_untuned_throughput": details["tuned_vs_untuned"]["ratio"],
        "ensemble_vs_naive_throughput": details["ensemble_vs_naive"]["ratio"],
        "dedup_bytes_ratio": details["dedup"]["ratio"],
        "roofline_fraction": roofline,
        "roofline_fraction_paired": details.get("roofline_paired", {}).get("median_fraction"),
        "ensemble_vs_bare_paired": details.get("paired_vs_bare", {}).get("ensemble_vs_bare", {}).get("median"),
        "p99_ms": chosen["p99_ms"],
        "freshness_p99_ms": fresh.get("p99_ms", float("nan")),
        "freshness_store": fresh.get("store", "redis") if "p99_ms" in fresh else "unavailable",
        "first_layer_factorization_speedup": details.get("first_layer_factorization", {}).get("speedup"),
        "merged_attention_speedup": details.get("merged_attention", {}).get("speedup"),
        "cpu_graph_speedup": details.get("cpu_graph", {}).get("speedup"),
        "full_history_branch_speedup": details.get("cpu_graph", {}).get("full_history_branch_speedup"),
        "history_trimming_speedup": details.get("history_trimming", {}).get("speedup"),
    }
    summary["targets"] = {k: {"op": op, "target": t, "value": summary[k], "met": _met(k, summary[k])}
                          for k, (op, t) in TARGETS.items()}
    for key, detail in (("ensemble_vs_bare_throughput", "ensemble_vs_bare"),
                        ("tuned_vs_untuned_throughput", "tuned_vs_untuned"),
                        ("ensemble_vs_naive_throughput", "ensemble_vs_naive")):
        if details[detail].get("outside_budget"):  # a point beyond the budget is not a ratio at that budget
            summary["targets"][key].update(met=False, note="a system had no point within the p99 budget")
    machine["loadavg_at_end"] = list(os.getloadavg())
    summary.update(run=str(args.run), quick=st.quick, started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                   wall_s=time.time() - started, machine=machine, settings=st.__dict__, details=details,
                   method={
                       "ratios": ratio_at_budget.__doc__.strip(),
                       "flops": ranker_flops.__doc__.strip(),
                       "freshness": freshness.__doc__.strip(),
                       "p99_ms": "tuned ensemble, fixed 1 x 100 request, p99 at " + details["p99_load"],
                   })
    extra["bounds_md"] = bounds_md(summary, extra)
    csv_files = write_csvs(points, out / "csv")
    summary["csv_files"] = [str(Path(f).relative_to(out)) for f in csv_files]
    try:
        summary["plots"] = [str(Path(f).relative_to(out)) for f in plots(points, summary, out)]
    except Exception as e:  # noqa: BLE001
        summary["plots_error"] = repr(e)
    summary["wall_s"] = time.time() - started
    (out / "points.json").write_text(json.dumps({"|".join(k): v for k, v in points.items()}, indent=1, default=str))
    (out / "profile.json").write_text(json.dumps({k: v for k, v in extra.items() if k != "bounds_md"}, indent=1,
                                                 default=str))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(report_md(summary, points, extra))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    log("summary: " + json.dumps({k: summary[k] for k in SUMMARY_KEYS}))
    log(f"met: {json.dumps({k: v['met'] for k, v in summary['targets'].items()})}; {summary['wall_s']:.0f} s; "
        f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
