"""perf/gpu_check.py's report: the targets it is checked against, results.json kept strict JSON and rewritten
atomically after every point, and the results.md table. Plain Python and numpy (no torch), like the lent machine."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# (name, candidates, p99 bound in ms, what it is)
TARGETS = [("transact_8ms_p99_at_512", 512, 8.0, "TransAct (KDD 2023): 8 ms; here p99 <= 8 ms"),
           ("transact_v2_p99_at_128", 128, 15.0, "TransAct V2: p99 15 ms at 128 candidates, beaten"),
           ("transact_v2_p99_at_256", 256, 29.0, "TransAct V2: p99 29 ms at 256 candidates, beaten"),
           ("transact_v2_p99_at_512", 512, 41.0, "TransAct V2: p99 41 ms at 512 candidates, beaten")]
TARGET_POINT = {"dtype": "fp16", "mode": "cuda_graph", "batch": 1}


def finite(obj):
    """NaN / inf -> None, so that results.json is strict JSON whatever a point measured."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evaluate_targets(points: list[dict], on_gpu: bool) -> list[dict]:
    out = []
    for name, n_cand, bound, what in TARGETS:
        p = next((p for p in points if p.get("candidates") == n_cand and "p99_ms" in p
                  and all(p.get(k) == v for k, v in TARGET_POINT.items())), None)
        entry = {"name": name, "what": what, "p99_ms_bound": bound, "candidates": n_cand, **TARGET_POINT}
        if p is None:
            entry["status"] = "not_measured"
        else:
            entry["p99_ms"] = p["p99_ms"]
            ok = p["p99_ms"] <= bound and not p["parity"]["nan_count"]
            entry["status"] = ("met" if ok else "missed") if on_gpu else "not_applicable (not a GPU)"
            if p["parity"]["nan_count"]:
                entry["note"] = "NaN in the fp16 probabilities"
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    lines = [f"# GPU check: {result['device']['name']}", "",
             f"torch {result['device']['torch']}, CUDA {result['device']['cuda']}; {result['model']['weights']}; "
             f"status {result['status']}, {result['elapsed_s']} s.", "",
             "| dtype | mode | batch | candidates | p50 ms | p99 ms | mean ms | candidates/s | pipelined cand/s "
             "| max abs dp | NaN | top-10 overlap (min) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        key = f"| {p['dtype']} | {p['mode']} | {p['batch']} | {p['candidates']} "
        if "error" in p:
            lines.append(key + f"| error: {p['error'][:80]} | | | | | | | |")
            continue
        q = p["parity"]
        dp = "n/a" if q["max_abs_dp"] is None else f"{q['max_abs_dp']:.2e}"
        lines.append(key + f"| {p['p50_ms']:.3f} | {p['p99_ms']:.3f} | {p['mean_ms']:.3f} | "
                     f"{p['candidates_per_s']:.0f} | {p.get('pipelined_candidates_per_s', 0):.0f} | {dp} | "
                     f"{q['nan_count']} | {q['top10_overlap_min']:.2f} |")
    lines += ["", "| target | p99 ms | bound | status |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t.get('p99_ms', float('nan')):.3f} | {t['p99_ms_bound']} | {t['status']} |"
              for t in result["targets"]]
    return "\n".join(lines) + "\n"
