"""perf/analysis.py's metric definitions on hand-made searches and tensors (the ratios must mean what the report
says): intervals over repeats, paired ratios at a budget and when they are undefined, the worst budget, the
de-duplication byte count, the overload verdict; and perf/load.py's classification of failed requests."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import analysis  # noqa: E402
import load  # noqa: E402


def _searches(*throughputs, ok=True):
    return [{"ok": ok, "throughput": t, "concurrency": 2 if t else None, "p99_ms": 40.0 if t else None}
            for t in throughputs]


def test_interval_is_min_median_max_of_the_finite_repeats():
    iv = analysis.interval([3.0, 1.0, 2.0, float("nan"), None])
    assert (iv["n"], iv["min"], iv["median"], iv["max"]) == (3, 1.0, 2.0, 3.0)
    assert analysis.interval([])["n"] == 0 and math.isnan(analysis.interval([])["median"])


def test_ratio_pairs_repeat_i_with_repeat_i():
    r = analysis.paired_ratio(_searches(10, 30, 20), _searches(10, 10, 40))
    assert r["defined"] and r["values"] == [1.0, 3.0, 0.5]
    assert (r["min"], r["median"], r["max"]) == (0.5, 1.0, 3.0)


def test_a_budget_only_one_system_serves_is_an_infinite_ratio_and_one_neither_serves_is_left_out():
    r = analysis.paired_ratio(_searches(10, 12, 0), _searches(5, 0, 0))
    assert r["defined"] and r["values"] == [2.0, math.inf] and (r["min"], r["max"]) == (2.0, math.inf)
    assert "only the first system" in r["note"] and "neither" in r["note"]
    r = analysis.paired_ratio(_searches(0, 0), _searches(0, 0))
    assert not r["defined"] and "neither" in r["note"] and math.isnan(r["median"])
    assert analysis.paired_ratio(_searches(0), _searches(4))["values"] == [0.0]
    # a search that failed (perf_analyzer error) is left out of the pairs, not counted as zero
    r = analysis.paired_ratio(_searches(10) + _searches(99, ok=False), _searches(5, 5))
    assert r["defined"] and r["values"] == [2.0] and "failed" in r["note"]


def test_worst_budget_reads_every_budget_and_skips_undefined_ones():
    ratios = {25: analysis.paired_ratio(_searches(0), _searches(0)),
              50: analysis.paired_ratio(_searches(9, 10, 11), _searches(10, 10, 10)),
              100: analysis.paired_ratio(_searches(8, 12, 10), _searches(10, 10, 10))}
    w = analysis.worst_budget(ratios)
    assert (w["median"], w["budget"]) == (1.0, 50)  # the tie goes to the first budget with the lowest median
    assert (w["lower"], w["lower_budget"]) == (0.8, 100)
    assert math.isnan(analysis.worst_budget({25: ratios[25]})["median"])


def test_compare_runs_over_the_budgets_both_systems_were_searched_at():
    results = {"a": {50: _searches(20), 100: _searches(30)}, "b": {50: _searches(10)}}
    assert list(analysis.compare(results, "a", "b")) == [50]


def test_dedup_bytes_counts_the_requests_candidates_and_reports_the_bucket_beside():
    t = {"seq_item": np.zeros((1, 100), np.int64), "seq_action": np.zeros((1, 100), np.int64),
         "seq_mask": np.zeros((1, 100), bool), "user_emb": np.zeros((1, 64), np.float32),
         "context": np.zeros((1, 4), np.float32), "cand_item": np.zeros((1, 128), np.int64)}
    user = 800 + 800 + 100 + 256 + 16
    d = analysis.dedup_bytes(t, 100)
    assert d["user_side_bytes"] == user
    assert d["bytes_dedup"] == user + 800 and d["bytes_repeated"] == 100 * user + 800
    assert d["ratio"] == pytest.approx((100 * user + 800) / (user + 800))
    assert d["ratio_bucket"] == pytest.approx((128 * user + 1024) / (user + 1024))


def test_failed_requests_are_classified_by_triton_s_queue_policy_messages():
    assert load.error_kind("[503] Request timeout expired") == "rejected_queue_timeout"
    assert load.error_kind("Exceeds maximum queue size") == "rejected_queue_full"
    assert load.error_kind("[400] candidate_ids: is required").startswith("other: ")


def test_overload_is_met_only_with_p99_within_twice_the_budget_and_explicit_rejections():
    ok = {"outcomes": {"ok": 90, "rejected_queue_timeout": 10}, "p99_ms": 95.0, "unfinished": 0}
    assert analysis.overload_verdict(ok, 50)["met"]
    assert not analysis.overload_verdict({**ok, "p99_ms": 101.0}, 50)["met"]
    other = analysis.overload_verdict({**ok, "outcomes": {"ok": 90, "other: connection reset": 1}}, 50)
    assert not other["met"] and other["other_errors"] == {"other: connection reset": 1}
    assert not analysis.overload_verdict({**ok, "unfinished": 3}, 50)["met"]
