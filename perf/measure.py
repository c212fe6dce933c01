"""The measurement plan: which system is measured when, on which requests, from which cores. Each phase returns
plain records (dicts) that perf/analysis.py and perf/report.py turn into ratios and pages."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import bare
import load
from analysis import dedup_bytes
from features import request_tensors, write_ranker_json
from flops import flop_counter_check, ranker_flops
from machine import pinned
from settings import Settings, log
from systems import RATE_LIMIT_ARGS, TritonSystem, guarded_copy, model_stats, prometheus
from seqrank.models.transact import INPUT_NAMES
from seqrank.serving.batching import real_widths
from seqrank.serving.cpu_graph import cpu_graph_path

# the systems of the fixed-budget comparisons: (name, Triton system or naive, model, perf_analyzer input form)
BUDGET_SYSTEMS = (("ensemble", "tuned", "seqrank", "store"), ("ranker", "tuned", "ranker", "ranker"),
                  ("naive", "naive", "seqrank", "store"), ("untuned", "untuned", "seqrank", "store"))
UNTUNED_BUDGETS = (50,)  # the tuned-vs-untuned target is at 50 ms; the other systems are searched at every budget


def fixed_request(pre, reqs: dict, run: Path) -> tuple[dict, dict, dict]:
    """The fixed 1 x 100 request's tensors (as preprocess builds them, and as the CPU ranker scores them: the real
    candidates only), with what describes it."""
    fixed100 = reqs["fixed_1x100"][0]
    t100 = request_tensors(pre, fixed100)
    t100_actions = request_tensors(pre, fixed100, with_actions=True)
    t100_run = {**t100, "cand_item": t100["cand_item"][:, : int(real_widths(t100["cand_item"])[0])]}
    if len(np.unique(t100_run["cand_item"][0])) != t100_run["cand_item"].shape[1]:
        raise SystemExit("the fixed request repeats a candidate id (several unknown items are one OOV id): the "
                         "CPU ranker scores each distinct id once, bare and naive per column; rebuild the inputs "
                         "with perf/make_inputs.py")
    info = {"user_id": fixed100["user_id"], "request_time_ms": fixed100["request_time_ms"],
            "candidates": len(fixed100["candidate_ids"]), "sequence_length": int(t100["seq_mask"].sum()),
            "cand_item_width": int(t100["cand_item"].shape[1]), "scored_width": int(t100_run["cand_item"].shape[1]),
            "sequence_source": t100["_source"],
            "store_and_request_paths_identical": all(np.array_equal(t100[n], t100_actions[n]) for n in INPUT_NAMES)}
    return t100, t100_run, info


def in_process(run: Path, repo: Path, pre, reqs: dict, t100: dict, t100_run: dict, work: Path,
               st: Settings) -> tuple[dict, dict]:
    """The ranker without a server: FLOPs, bytes, the matmul peak, the rewrites, the CPU graph, history trimming,
    the roofline's paired rounds, the operator profile. Returns (details, extra)."""
    from seqrank.exporting import load_ranker
    from seqrank.models.inference import ranker_for_serving
    model, cfg, vocab = load_ranker(run)
    details, extra = {}, {}
    item_dim = int(np.load(run / "item_table.npy", mmap_mode="r").shape[1])
    flops = ranker_flops(cfg.transact, int(t100_run["cand_item"].shape[1]), item_dim, int(t100["user_emb"].shape[1]),
                         int(t100["context"].shape[1]), len(vocab.heads))
    flops["flop_counter"] = flop_counter_check(ranker_for_serving(model), t100_run)
    details["flops"] = flops
    details["dedup_analytic"] = dedup_bytes(t100, int(t100_run["cand_item"].shape[1]))
    details["peak"] = bare.matmul_peak(st.peak_s)
    log(f"FLOPs/request {flops['total'] / 1e9:.3f} G (counter {flops['flop_counter']}); peak "
        f"{details['peak']['peak_gflops']:.1f} GFLOP/s; dedup ratio {details['dedup_analytic']['ratio']:.1f}")
    onnx = cpu_graph_path(repo / "ranker" / "1")  # what the CPU ranker stub loads
    details["bare_graph"] = onnx.name
    sess2, sess1 = bare.ort_session(onnx, threads=2), bare.ort_session(onnx, threads=1)
    if not st.quick:
        extra["ort_ops"] = bare.ort_op_profile(onnx, t100_run, work)
        details["bare_variants"] = {
            label: bare.bare_point(bare.ort_session(onnx, threads=th, spinning=spin), t100_run, 1, st.bare_s)
            for label, th, spin in (("intra_op 1 thread", 1, True), ("intra_op 2, no spinning", 2, False))}
        for name in bare.REWRITES:
            details[name] = bare.rewrite_speedup(model, sess2, t100_run, work, st.bare_s, name)
            log(f"{name}: {details[name]['speedup']:.2f}x without it")
    quick = {"rounds": 1} if st.quick else {}  # the smoke run checks that both run and agree, not how fast
    details["cpu_graph"] = bare.cpu_graph_speedup(repo, sess1, t100_run, work, **quick)
    details["history_trimming"] = bare.history_trimming(
        sess1, [request_tensors(pre, r, with_actions=True) for r in reqs["log"]], **quick)
    log(f"CPU graph {details['cpu_graph']['speedup']:.2f}x the portable one; history trimming "
        f"{details['history_trimming']['speedup']:.2f}x on the log's requests")
    details["bare_saturation"] = max(
        (bare.bare_point(sess1, t100_run, 1, st.bare_s, callers=2), bare.bare_point(sess2, t100_run, 1, st.bare_s)),
        key=lambda p: p["throughput"])
    details["roofline_paired"] = bare.roofline_paired(
        sess1, t100_run, flops["total"], **({"rounds": 1, "bare_s": 0.3, "peak_s": 0.2} if st.quick else {}))
    log(f"roofline, paired rounds: median {details['roofline_paired']['median_fraction']:.3f}")
    return details, extra


def budget_inputs(pre, reqs: dict, files: dict, work: Path, sets: tuple) -> dict:
    """perf_analyzer input files per (request set, form): the ensemble's and the naive service's requests ("store":
    the sequence from the feature store) and the ranker model's tensors for the same requests ("ranker")."""
    out = {}
    for rset in sets:
        out[(rset, "store")] = Path(files[f"{rset}_store"])
        path = work / "inputs" / f"ranker_{rset}.json"
        write_ranker_json([request_tensors(pre, r) for r in reqs[rset]], path)
        out[(rset, "ranker")] = path
    return out


def budget_searches(targets: dict, inputs: dict, st: Settings, client: frozenset[int], csvdir: Path,
                    logs: Path) -> dict:
    """The fixed-budget search (load.pa_search, every budget from one set of load points) for every (request set,
    system), ``st.repeats`` times; in each repeat every system is searched once per set before the next, in an
    order that rotates, so the machine's drift hits all systems alike. ``targets``: system name -> its http_url. Returns
    results[set][system][budget] = [search per repeat]."""
    results: dict = {rset: {name: {} for name, *_ in BUDGET_SYSTEMS} for rset in st.request_sets}
    for rep in range(st.repeats):
        for rset in st.request_sets:
            shift = rep % len(BUDGET_SYSTEMS)
            for name, target, model, form in BUDGET_SYSTEMS[shift:] + BUDGET_SYSTEMS[:shift]:
                budgets = [b for b in st.budgets_ms if name != "untuned" or b in UNTUNED_BUDGETS]
                found = load.pa_search(targets[target], model, inputs[(rset, form)], budgets,
                                       csvdir / f"search_{rset}_{name}_r{rep}.csv", st, client, logs)
                for budget, r in found.items():
                    results[rset][name].setdefault(budget, []).append(r)
                    log(f"  r{rep} {rset} {budget} ms {name:8s}: " + (
                        f"{r['throughput']:.1f} req/s at concurrency {r['concurrency']} (p99 {r['p99_ms']:.1f} ms)"
                        if r["throughput"] else ("nothing within the budget" if r["ok"] else
                                                 f"FAILED {r.get('error', '')[-200:]}")) + f"; visited {r['visited']}")
    return results


def failures(metrics_url: str) -> dict[str, float]:
    """Triton's failed-request counters by model and reason (nv_inference_request_failure)."""
    page = prometheus(metrics_url) or {}
    return {k: v for k, v in page.items() if k.startswith("nv_inference_request_failure")}


GUARD_TURNS = ("preprocess", "ranker", "postprocess")  # the steps that take turns on the server core when guarded
GUARD_UNBATCHED = ("ranker",)  # one request per ranker execution when guarded (systems.guarded_copy)


def overload(tuned: TritonSystem, repo: Path, store_url: str, reqs: list[dict], data: Path, st: Settings,
             client: frozenset[int], server: frozenset[int], work: Path, logs: Path, incidents: list) -> dict:
    """2x the saturating load (closed loop at ``st.saturation_concurrency``), open loop, on the shipped ensemble and
    on a guarded copy (systems.guarded_copy): preprocess and the ranker reject a request that queued longer than a
    share of the budget, the ranker runs one request at a time, and the three steps take turns on the server core
    (Triton's rate limiter). p99 of the answered requests and every failure by kind (the client's view and
    Triton's failure counters). perf_analyzer cannot load the guarded copy: it ends its run at the first rejection
    ("Thread [n] had error: in ensemble 'seqrank', Request timeout expired")."""
    budget = st.overload_budget_ms
    timeouts = {model: int(share * budget * 1000) for model, share in st.queue_shares}
    sat = load.pa_point(tuned.http_url, "seqrank", data, work / "pa" / "saturation.csv", st,
                        concurrency=st.saturation_concurrency, cores=client, logs=logs)
    rate = st.overload_factor * sat.get("throughput", 0.0)
    out = {"budget_ms": budget, "request_set": st.overload_set, "saturation": {k: sat.get(k) for k in ("throughput", "p99_ms", "load", "ok")},
           "saturation_stats": sat.get("model_stats"),
           "offered_rate": rate, "queue_timeouts_us": timeouts, "runs": {}}
    if not sat.get("ok"):
        out["error"] = f"no saturation point: {sat.get('error', '')[-300:]}"
        return out
    out["guarded_config"] = guarded_copy(repo, work / "guarded_repository", timeouts, GUARD_TURNS, GUARD_UNBATCHED)
    out["server_args"] = list(RATE_LIMIT_ARGS)
    guarded = TritonSystem("guarded", work / "guarded_repository", store_url, logs, server, incidents, RATE_LIMIT_ARGS)
    try:
        pa = load.pa_point(guarded.http_url, "seqrank", data, work / "pa" / "overload_pa.csv", st, rate=rate,
                           cores=client, logs=logs)
        out["perf_analyzer_at_2x"] = {"ok": pa["ok"], "error": pa.get("error", "")[-300:]}
        for name, system in (("shipped", tuned), ("guarded", guarded)):
            before = failures(system.metrics_url), model_stats(system.http_url)
            with pinned(client):
                result = load.open_loop(system.http_url, "seqrank", reqs, rate, st.overload_s)
            result["triton_failures"] = {k: v - before[0].get(k, 0.0) for k, v in failures(system.metrics_url).items()
                                         if v - before[0].get(k, 0.0)}
            out["runs"][name] = result
            log(f"  overload {name}: {result['outcomes']} p99 {result['p99_ms']:.0f} ms, goodput "
                f"{result['goodput_rps']:.1f} req/s of {rate:.1f} offered")
    finally:
        guarded.stop()
    return out
