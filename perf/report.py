"""summary.json (the headline keys, their targets, every detail) and report.md (today's run, how to read it)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from analysis import budget_throughput, compare, overload_verdict, roofline, worst_budget
from bare import REWRITES
from measure import BUDGET_SYSTEMS

HEADLINE_SET = "fixed_1x100"
LOG_SET = "log"
HEADLINE_BUDGET = 50
SUMMARY_KEYS = ("ensemble_vs_bare_throughput", "ensemble_vs_bare_paired", "tuned_vs_untuned_throughput",
                "ensemble_vs_naive_throughput", "dedup_bytes_ratio", "roofline_fraction", "roofline_fraction_paired",
                "p99_ms", "freshness_p99_ms", "overload_p99_ms", "ensemble_vs_bare_throughput_log",
                "ensemble_vs_bare_paired_log", "tuned_vs_untuned_throughput_log", "ensemble_vs_naive_throughput_log")
TARGETS = {  # issues #4 and #26
    "ensemble_vs_bare_throughput": (">=", 0.9),    # the ensemble / the ranker alone behind Triton, every budget
    "ensemble_vs_bare_paired": (">=", 0.85),       # ... the lower end of its interval, every budget
    "tuned_vs_untuned_throughput": (">=", 1.3),    # at 50 ms
    "ensemble_vs_naive_throughput": (">=", 1.5),   # at 50 ms
    "dedup_bytes_ratio": (">=", 10.0),
    "roofline_fraction": (">=", 0.5),
    "freshness_p99_ms": ("<=", 1000.0),
    "overload_p99_ms": ("<=", None),               # 2x the overload budget, and only explicit rejections
}
RATIOS = (("ensemble_vs_bare", "ensemble", "ranker"), ("ensemble_vs_naive", "ensemble", "naive"),
          ("tuned_vs_untuned", "ensemble", "untuned"))


def _met(op: str, target: float, value) -> bool:
    """A measured value against its target; an infinite ratio (only the first system serves the budget) meets a
    lower bound, an undefined one (NaN) meets nothing."""
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isnan(target):
        return False
    return value >= target if op == ">=" else value <= target


def ratios(budgets: dict) -> dict:
    """Per request set: each comparison at every budget (paired repeats) and its worst budget."""
    out = {}
    for rset, results in budgets.items():
        out[rset] = {}
        for key, a, b in RATIOS:
            per_budget = compare(results, a, b)
            out[rset][key] = {"per_budget": per_budget, "worst": worst_budget(per_budget)}
    return out


def ratio_keys(rat: dict, rset: str, suffix: str) -> tuple[dict, dict]:
    """The budget-ratio summary keys of one request set (``suffix`` tells the set apart) and their target notes:
    ensemble / bare at its worst budget (median, and the lowest lower end), the others at 50 ms."""
    per_set = rat.get(rset, {})
    bare = per_set.get("ensemble_vs_bare", {})
    worst = bare.get("worst", {})
    undefined = [b for b, r in bare.get("per_budget", {}).items() if not r["defined"]]
    note = f"neither system serves {', '.join(map(str, undefined))} ms" if undefined else None
    values = {f"ensemble_vs_bare_throughput{suffix}": worst.get("median", float("nan")),
              f"ensemble_vs_bare_paired{suffix}": worst.get("lower", float("nan"))}
    notes = {f"ensemble_vs_bare_throughput{suffix}": {"budget_ms": worst.get("budget"), "note": note},
             f"ensemble_vs_bare_paired{suffix}": {"budget_ms": worst.get("lower_budget"), "note": note}}
    for key in ("tuned_vs_untuned", "ensemble_vs_naive"):
        r = per_set.get(key, {}).get("per_budget", {}).get(HEADLINE_BUDGET, {})
        values[f"{key}_throughput{suffix}"] = r.get("median", float("nan"))
        notes[f"{key}_throughput{suffix}"] = {"interval": [r.get("min"), r.get("max")], "budget_ms": HEADLINE_BUDGET,
                                              "note": r.get("note")}
    return values, notes


def summarize(details: dict, budgets: dict, st, machine: dict, run: str, started: str, wall_s: float) -> dict:
    """summary.json: headline keys (1 x 100; ratios at 50 ms, ensemble / bare at its worst budget; the same on the
    log-drawn requests with ``_log``), targets, details."""
    details["budget_throughput"] = {rset: {name: {b: budget_throughput(s) for b, s in per.items()}
                                           for name, per in res.items()} for rset, res in budgets.items()}
    details["ratios"] = rat = ratios(budgets)
    head, head_notes = ratio_keys(rat, HEADLINE_SET, "")
    mix, mix_notes = ratio_keys(rat, LOG_SET, "_log") if LOG_SET in rat else ({}, {})
    details["roofline"] = roofline(details["flops"]["total"], details["bare_saturation"]["throughput"],
                                   details["peak"]["peak_gflops"])
    over = details.get("overload", {})
    guarded = over.get("runs", {}).get("guarded", {})
    verdict = overload_verdict(guarded, over.get("budget_ms", float("nan"))) if guarded else {"met": False}
    details["overload_verdict"] = verdict
    fresh = details.get("freshness", {})
    summary = {
        **head,
        "dedup_bytes_ratio": details.get("wire", {}).get("ratio", float("nan")),
        "roofline_fraction": details["roofline"]["fraction"],
        "roofline_fraction_paired": details["roofline_paired"]["median_fraction"],
        "p99_ms": details.get("p99_point", {}).get("p99_ms", float("nan")),
        "freshness_p99_ms": fresh.get("p99_ms", float("nan")),
        "freshness_store": fresh.get("store", "redis") if "p99_ms" in fresh else "unavailable",
        "overload_p99_ms": guarded.get("p99_ms", float("nan")),
        **mix,
        **{f"{name}_speedup": details.get(name, {}).get("speedup") for name in REWRITES},
        "cpu_graph_speedup": details["cpu_graph"]["speedup"],
        "full_history_branch_speedup": details["cpu_graph"]["full_history_branch_speedup"],
        "history_trimming_speedup": details["history_trimming"]["speedup"],
    }
    targets = {}
    for key, (op, target) in TARGETS.items():
        target = 2 * over.get("budget_ms", float("nan")) if key == "overload_p99_ms" else target
        for k in (key, f"{key}_log"):
            if k in summary:
                targets[k] = {"op": op, "target": target, "value": summary[k], "met": _met(op, target, summary[k]),
                              **head_notes.get(k, {}), **mix_notes.get(k, {})}
    targets["overload_p99_ms"].update(met=bool(verdict["met"]), only_explicit_rejections=verdict.get(
        "only_explicit_rejections"))
    summary["targets"] = targets
    summary.update(run=run, quick=st.quick, started=started, wall_s=wall_s, machine=machine, settings=st.__dict__,
                   details=details, method={
                       "budgets": "concurrency 1, 2, 4, ... until a level's p99 misses the budget, then bisection; "
                                  "each level one perf_analyzer run (--concurrency-range N --percentile=99, -i http, "
                                  "-b 1, three merged windows); the highest throughput among the levels within the "
                                  "budget; repeats interleaved over systems",
                       "ratios": "repeat i of A / repeat i of B at the same budget; median [min, max] over repeats",
                       "ensemble_vs_bare": "the ensemble / the ranker model alone behind the same Triton, request "
                                           "set 1 x 100, at the budget where the ratio is lowest",
                       "p99_ms": "tuned ensemble, 1 x 100, Poisson arrivals at half its saturated throughput",
                       "dedup_bytes_ratio": "bytes received by Triton's HTTP port: user tensors per candidate row / "
                                            "once per request (perf/wire.py)"})
    return summary


def write_csvs(budgets: dict, outdir: Path) -> list[str]:
    """One CSV per (request set, system): every load level a search found within its budget, perf_analyzer's
    columns plus the budget and the repeat."""
    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    for rset, results in budgets.items():
        for name, per_budget in results.items():
            rows = [{"budget_ms": b, "repeat": i, "Concurrency": p["concurrency"], "Inferences/Second": p["throughput"],
                     **{f"p{q} latency": p[f"p{q}_ms"] * 1e3 for q in (50, 90, 95, 99)}}
                    for b, searches in per_budget.items() for i, s in enumerate(searches) for p in s["within_budget"]]
            if not rows:
                continue
            path = outdir / f"{name}_{rset}_budgets.csv"
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            files.append(str(path))
    return files


def _fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if math.isfinite(x) else ("inf" if x > 0 and math.isinf(x) else "n/a")
    return str(x)


def _iv(r: dict, nd=2) -> str:
    return f"{_fmt(r['median'], nd)} [{_fmt(r['min'], nd)}, {_fmt(r['max'], nd)}]" if r.get("n") else "-"


def _target_row(key: str, value, t: dict | None) -> str:
    if not t:
        return f"| {key} | {_fmt(value, 3)} | - | (reported) | - | |"
    iv = t.get("interval")
    note = "; ".join(x for x in (f"at {t['budget_ms']} ms" if t.get("budget_ms") else "", t.get("note") or "") if x)
    return (f"| {key} | {_fmt(value, 3)} | {f'[{_fmt(iv[0], 2)}, {_fmt(iv[1], 2)}]' if iv else '-'} | "
            f"{t['op']} {_fmt(t['target'], 2)} | {'yes' if t['met'] else '**no**'} | {note} |")


def _ratio_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if not r["defined"]:
        return r["note"]
    return _iv(r) + (f" ({r['note']})" if r.get("note") else "")


def budget_tables(details: dict, manifest: dict) -> list[str]:
    out = []
    for rset, per_system in details["budget_throughput"].items():
        mix = manifest["sets"][rset]
        c = mix["candidates"]
        out += [f"### {rset}: {mix['requests']} request(s), candidates per request min {c['min']:.0f} / p50 "
                f"{c['p50']:.0f} / p90 {c['p90']:.0f} / max {c['max']:.0f} (mean {c['mean']:.1f}), sequence "
                f"length p50 {mix['sequence_length']['p50']:.0f}", "",
                "Throughput within the p99 budget, req/s, median [min, max] over repeats (0: not even concurrency "
                "1 within the budget); concurrency found in brackets:", "",
                "| budget | " + " | ".join(name for name, *_ in BUDGET_SYSTEMS) + " |",
                "|---" * (len(BUDGET_SYSTEMS) + 1) + "|"]
        budgets = sorted({b for per in per_system.values() for b in per})
        for b in budgets:
            cells = []
            for name, *_ in BUDGET_SYSTEMS:
                t = per_system.get(name, {}).get(b)
                conc = ",".join("-" if c is None else str(c) for c in t["concurrency"]) if t else ""
                cells.append(f"{_iv(t, 1)} ({conc})" if t else "not searched")
            out.append(f"| {b} ms | " + " | ".join(cells) + " |")
        out += ["", "| ratio | " + " | ".join(f"{b} ms" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
        for key, _, _ in RATIOS:
            per = details["ratios"][rset][key]["per_budget"]
            out.append(f"| {key} | " + " | ".join(_ratio_cell(per.get(b)) for b in budgets) + " |")
        out.append("")
    return out


def overload_md(over: dict, verdict: dict) -> list[str]:
    if not over.get("runs"):
        return [f"Overload: not measured ({over.get('error', 'no saturation point')}).", ""]
    out = [f"Open loop, Poisson arrivals at {_fmt(over['offered_rate'])} req/s = 2x the shipped ensemble's saturated "
           f"throughput ({_fmt(over['saturation']['throughput'])} req/s at concurrency {over['saturation']['load']}), "
           f"request set {over['request_set']}, {over['runs'].get('shipped', {}).get('sent')} requests per system. "
           f"The guarded copy (budget {over['budget_ms']} ms; server flag `{' '.join(over['server_args'])}`): "
           + "; ".join(f"`{k}`: `{v}`" for k, v in over["guarded_config"].items()), "",
           "| system | outcomes | goodput req/s | p50 ms | p99 ms | client lag p99 ms | Triton failure counters |",
           "|---|---|---|---|---|---|---|"]
    for name, r in over["runs"].items():
        out.append(f"| {name} | {r['outcomes']} | {_fmt(r['goodput_rps'])} | {_fmt(r['p50_ms'])} | "
                   f"{_fmt(r['p99_ms'])} | {_fmt(r.get('client_lag_p99_ms'))} | {r.get('triton_failures') or '-'} |")
    out += ["", "Latency counts from each request's scheduled send (open loop: a late server does not slow the "
            "sender); client lag is how late the client itself sent. Goodput = answered requests / the time until "
            "the last answer."]
    out += ["", f"Guarded: p99 <= 2 x {over['budget_ms']} ms: {verdict.get('p99_within_2x_budget')}; only explicit "
            f"rejections: {verdict.get('only_explicit_rejections')} (other errors: {verdict.get('other_errors')})", ""]
    pa = over.get("perf_analyzer_at_2x")
    if pa:
        last = [line for line in pa["error"].splitlines() if line.strip()][-1:] or ["-"]
        out += ["perf_analyzer at the same rate on the guarded copy: " + (
            "completed (no request failed in its windows)." if pa["ok"] else
            f"stopped at the first failed request (`{last[0].strip()}`); that is why the open-loop client "
            "(perf/load.py `open_loop`) measures overload."), ""]
    return out


def report_md(summary: dict, manifest: dict, extra: dict) -> str:
    d, m = summary["details"], summary["machine"]
    out = ["# seqrank serving benchmark", "",
           f"Run: `{summary['run']}`, mode: {'quick (CI smoke: tiny windows, numbers are not meaningful)' if summary['quick'] else 'full'}, "
           f"started {summary['started']}, {summary['wall_s']:.0f} s wall.", "", "## Machine", "",
           f"- CPU: {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['cpus_available']} available), "
           f"SIMD {', '.join(m['simd'])}, {'virtualised' if m['virtualized'] else 'bare metal'}, {m['memory_mib']} MiB",
           f"- cores: load generator on {m['pinning']['client_cores']}, systems under test on "
           f"{m['pinning']['server_cores']} ({m['pinning']['how']}); checked in /proc: " + ", ".join(
               f"{name} {sorted({c for cpus in pids.values() for c in cpus or []})} ({len(pids)} processes)"
               for name, pids in m["pinning"].get("checked", {}).items()),
           f"- load average at start {m['loadavg_at_start']}, at end {m.get('loadavg_at_end')}: **a shared, noisy "
           "machine** (other jobs run next to the bench); every search records the 1-minute load average",
           "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), "",
           "## Results against the targets", "", "| metric | measured | interval | target | met | note |",
           "|---|---|---|---|---|---|"]
    for k in SUMMARY_KEYS:
        out.append(_target_row(k, summary[k], summary["targets"].get(k)))
    out += ["", f"freshness_store: {summary['freshness_store']}; store fallbacks during the p99 point: "
            f"{d.get('p99_point', {}).get('store_fallbacks')}", "",
            "## Throughput at fixed p99 budgets (perf_analyzer load points, searched per budget)", ""]
    out += budget_tables(d, manifest)
    out += ["## Overload: 2x the saturating load", ""] + overload_md(d.get("overload", {}), d["overload_verdict"])
    w, a = d.get("wire", {}), d["dedup_analytic"]
    out += ["## De-duplication on the wire", "",
            f"The ranker alone, the fixed request's {w.get('candidates')} candidates, through a counting TCP proxy: "
            f"{w.get('bytes_repeated')} B in {w.get('requests_repeated')} request(s) with the user tensors per "
            f"candidate row vs {w.get('bytes_dedup')} B in one request with them once: **{_fmt(w.get('ratio'))}x** "
            f"(same probabilities within {_fmt(w.get('max_abs_prob_diff'), 7)}). Tensor bytes alone: "
            f"{a['bytes_repeated']} / {a['bytes_dedup']} = {_fmt(a['ratio'])}x; over the {a['bucket_rows']}-row "
            f"bucket preprocess pads to: {_fmt(a['ratio_bucket'])}x.", ""]
    fl, rf = d["flops"], d["roofline"]
    out += ["## The ranker in-process (no server)", "",
            f"- FLOPs per 1 x {fl['n_candidates']} request: {fl['total'] / 1e9:.3f} G ({fl['per_candidate'] / 1e6:.2f} M "
            f"per candidate + {fl['per_request'] / 1e6:.2f} M per request; torch's counter "
            f"{_fmt((fl.get('flop_counter') or 0) / 1e9, 3)} G). roofline_fraction = {fl['total'] / 1e9:.3f} G x "
            f"{_fmt(rf['bare_saturation_rps'])} req/s (bare, saturated, both cores) / {_fmt(rf['peak_gflops'])} "
            f"GFLOP/s ({d['peak']['method']}); paired rounds: "
            + ", ".join(f"{x:.3f}" for x in d["roofline_paired"]["fractions"]) + ".", ""]
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
    bv = d.get("bare_variants")
    if bv:
        out += ["Bare ranker, batch 1, other ONNX Runtime thread settings (same tensors):", "",
                "| setting | req/s | p99 ms |", "|---|---|---|"]
        out += [f"| {k} | {_fmt(v['throughput'], 2)} | {_fmt(v['p99_ms'])} |" for k, v in bv.items()]
        out.append("")
    st = d.get("overload", {}).get("saturation_stats")
    if st:
        out += [f"Triton per-model statistics of the shipped ensemble at its saturation point "
                f"({d['overload']['request_set']}, concurrency {d['overload']['saturation']['load']}):", "",
                "| model | requests | avg batch | queue ms/request | compute ms/execution |", "|---|---|---|---|---|"]
        for name, s in sorted(st.items()):
            out.append(f"| {name} | {s['requests']} | {_fmt(s['avg_batch'], 2)} | "
                       f"{_fmt(s['queue_ms_per_request'], 2)} | {_fmt(s['compute_ms_per_execution'], 2)} |")
        out.append("")
    for prof in (v for k, v in sorted(extra.items()) if k.startswith("profile_")):
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


def write(out: Path, summary: dict, manifest: dict, extra: dict, budgets: dict) -> None:
    (out / "points.json").write_text(json.dumps(budgets, indent=1, default=str))
    (out / "profile.json").write_text(json.dumps({k: v for k, v in extra.items() if k != "bounds_md"}, indent=1,
                                                 default=str))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(report_md(summary, manifest, extra))
