"""The ranker in-process in ONNX Runtime, no server: its rate on the fixed request, what each exact rewrite buys,
the CPU graph and history trimming on real requests, the operator profile, and the machine's matmul peak (the
roofline's two terms, measured back to back)."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from seqrank.models.transact import INPUT_NAMES
from seqrank.serving.batching import real_widths, trim_history_padding
from seqrank.serving.cpu_graph import write_cpu_graph


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
    feed = {n: tensors[n] for n in INPUT_NAMES}
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
    feed = {n: tensors[n] for n in INPUT_NAMES}
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
            padded.append({**{n: t[n] for n in INPUT_NAMES}, "cand_item": t["cand_item"][:, :width]})
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
    feed = {n: np.ascontiguousarray(np.repeat(tensors[n], batch, axis=0)) for n in INPUT_NAMES}
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


def ort_op_profile(onnx: Path, tensors: dict, workdir: Path, runs: int = 20) -> list[dict]:
    """Share of the ranker's ONNX Runtime time per operator type (ORT's own profiler, 2 threads)."""
    sess = ort_session(onnx, profile_prefix=str(workdir / "ort_profile"))
    feed = {n: tensors[n] for n in INPUT_NAMES}
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
