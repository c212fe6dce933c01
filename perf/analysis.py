"""What the measurements mean, as pure functions of them: throughput at a p99 budget over repeats with its interval,
the ratio of two systems at a budget from paired repeats, the roofline fraction, the de-duplication byte count,
the overload verdict."""
from __future__ import annotations

import math

import numpy as np

from seqrank.models.transact import INPUT_NAMES

USER_SIDE = tuple(n for n in INPUT_NAMES if n != "cand_item")  # the tensors de-duplication sends once per request


def interval(values: list[float]) -> dict:
    """min / median / max of repeated measurements (with 3 repeats, the range is the interval: no distribution
    assumed, and a t-interval on 3 samples would be wider than the data)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"n": 0, "min": float("nan"), "median": float("nan"), "max": float("nan"), "values": []}
    return {"n": len(v), "min": min(v), "median": float(np.median(v)), "max": max(v), "values": v}


def budget_throughput(searches: list[dict]) -> dict:
    """One system at one budget over its repeats: the throughput perf_analyzer's search found (0 = not even
    concurrency 1 within the budget) and the concurrency and p99 of each."""
    out = interval([s["throughput"] for s in searches if s.get("ok")])
    out.update(concurrency=[s.get("concurrency") for s in searches], p99_ms=[s.get("p99_ms") for s in searches],
               failed=sum(not s.get("ok") for s in searches))
    return out


def paired_ratio(a: list[dict], b: list[dict]) -> dict:
    """A / B at one budget from repeats measured back to back (repeat i of A against repeat i of B: the machine's
    drift hits both alike): median [min, max] over the repeats. A repeat where only B found nothing within the
    budget counts as an infinite ratio (A serves the budget, B cannot); one where neither did is left out, and
    ``note`` says so. ``defined`` is False when no repeat gives a ratio."""
    pairs = [(x["throughput"], y["throughput"]) for x, y in zip(a, b) if x.get("ok") and y.get("ok")]
    values = [x / y if y > 0 else math.inf for x, y in pairs if x > 0 or y > 0]
    notes = []
    if len(pairs) < min(len(a), len(b)):
        notes.append(f"{min(len(a), len(b)) - len(pairs)} repeat(s) where a search failed")
    if len(values) < len(pairs):
        notes.append(f"neither system has a load level within the budget in {len(pairs) - len(values)} repeat(s)")
    if any(v == math.inf for v in values):
        notes.append(f"only the first system has one in {sum(v == math.inf for v in values)} repeat(s)")
    out = {"defined": bool(values), "pairs": pairs, "note": "; ".join(notes) or None, "n": len(values),
           "values": values}
    if values:
        out.update(min=min(values), median=float(np.median(values)), max=max(values))
    else:
        out.update(min=float("nan"), median=float("nan"), max=float("nan"))
    return out


def compare(results: dict, a: str, b: str) -> dict:
    """``results[system][budget] -> [searches]``: A / B at every budget both were searched at."""
    return {budget: paired_ratio(results[a][budget], results[b][budget])
            for budget in results.get(a, {}) if budget in results.get(b, {})}


def worst_budget(ratios: dict) -> dict:
    """Over the budgets where the ratio is defined: the lowest median and the lowest lower bound (the 'at every
    budget' reading of a target), with the budgets they come from."""
    defined = {b: r for b, r in ratios.items() if r.get("defined")}
    if not defined:
        return {"median": float("nan"), "lower": float("nan"), "budget": None, "lower_budget": None}
    b_med = min(defined, key=lambda b: defined[b]["median"])
    b_low = min(defined, key=lambda b: defined[b]["min"])
    return {"median": defined[b_med]["median"], "budget": b_med, "lower": defined[b_low]["min"],
            "lower_budget": b_low}


def dedup_bytes(tensors: dict, n_real: int) -> dict:
    """Bytes per request crossing into the ranker: user-side tensors once per request (as served) vs repeated for
    every candidate row (the layout without request-level de-duplication). The headline counts the request's
    ``n_real`` candidates, what a duplicating layout would need; ``ratio_bucket`` counts the bucket-padded tensor
    preprocess actually sends (its padding rows would be repeated too)."""
    user_side = {n: tensors[n][0] for n in USER_SIDE}
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


def roofline(flops_per_request: float, rate_rps: float, peak_gflops: float) -> dict:
    """Achieved FLOP rate of the ranker at ``rate_rps`` as a fraction of the machine's matmul peak."""
    achieved = flops_per_request * rate_rps / 1e9
    return {"bare_saturation_rps": rate_rps, "achieved_gflops": achieved, "peak_gflops": peak_gflops,
            "fraction": achieved / peak_gflops if peak_gflops else float("nan")}


def overload_verdict(result: dict, budget_ms: float) -> dict:
    """An open-loop overload run meets the target when its successes' p99 is at most 2x the budget and every failed
    request is an explicit queue-policy rejection (no other error, none left unanswered)."""
    outcomes = result.get("outcomes", {})
    other = {k: v for k, v in outcomes.items() if k != "ok" and not k.startswith("rejected_")}
    p99 = result.get("p99_ms", float("nan"))
    return {"p99_within_2x_budget": bool(math.isfinite(p99) and p99 <= 2 * budget_ms),
            "only_explicit_rejections": not other and not result.get("unfinished"),
            "other_errors": other, "rejected": sum(v for k, v in outcomes.items() if k.startswith("rejected_")),
            "met": bool(math.isfinite(p99) and p99 <= 2 * budget_ms and not other and not result.get("unfinished"))}
