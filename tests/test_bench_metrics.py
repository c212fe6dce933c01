"""perf/bench.py's metric definitions on hand-made points and tensors (the issue's ratios must mean what the report
says): the p99 budget, the saturated plateau, points outside the budget, the de-duplication ratio."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import bench  # noqa: E402


def _pts(*pairs):
    return [{"ok": True, "load": k, "throughput": t, "p99_ms": p} for k, (t, p) in enumerate(pairs, 1)]


def test_the_budget_comes_from_the_slower_systems_plateau_not_its_noisiest_point():
    # B saturates at ~100 req/s: 100 at 30 ms and 103 at 95 ms are the same plateau; its best point is the 30 ms one
    slow = _pts((60, 10), (100, 30), (103, 95))
    fast = _pts((80, 12), (150, 28), (200, 90))
    r = bench.ratio_at_budget(fast, slow)
    assert r["p99_budget_ms"] == 30 and not r["outside_budget"]
    # each credited with its highest throughput within 30 ms (the highest-point rule gave 200 / 103 at 95 ms)
    assert (r["a"]["throughput"], r["b"]["throughput"], r["ratio"]) == (150, 100, 1.5)


def test_a_system_with_no_point_within_the_budget_is_flagged():
    slow = _pts((50, 5))
    fast = _pts((90, 8), (120, 20))
    r = bench.ratio_at_budget(fast, slow)
    assert r["p99_budget_ms"] == 5 and r["outside_budget"] and r["a"]["outside_budget"]
    assert r["a"]["throughput"] == 90  # its lowest-p99 point, beyond the budget


def test_failed_points_are_ignored_and_no_points_give_nan():
    assert np.isnan(bench.ratio_at_budget([{"ok": False}], _pts((1, 1)))["ratio"])
    r = bench.ratio_at_budget(_pts((10, 5)) + [{"ok": False, "throughput": 1e9, "p99_ms": 1}], _pts((5, 5)))
    assert r["ratio"] == 2


def test_dedup_bytes_counts_the_requests_candidates_and_reports_the_bucket_beside():
    t = {"seq_item": np.zeros((1, 100), np.int64), "seq_action": np.zeros((1, 100), np.int64),
         "seq_mask": np.zeros((1, 100), bool), "user_emb": np.zeros((1, 64), np.float32),
         "context": np.zeros((1, 4), np.float32), "cand_item": np.zeros((1, 128), np.int64)}
    user = 800 + 800 + 100 + 256 + 16
    d = bench.dedup_bytes(t, 100)
    assert d["user_side_bytes"] == user
    assert d["bytes_dedup"] == user + 800 and d["bytes_repeated"] == 100 * user + 800
    assert d["ratio"] == pytest.approx((100 * user + 800) / (user + 800))
    assert d["ratio_bucket"] == pytest.approx((128 * user + 1024) / (user + 1024))
