"""scripts/results_table.py: the seed-spread line says how far a few seeds can bound TransAct's sd ratio."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("results_table",
                                               Path(__file__).resolve().parents[1] / "scripts" / "results_table.py")
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)


def test_sd_ratio_interval_is_the_f_distribution_s():
    lo, hi = results_table.sd_ratio_interval(1.0, 5, 5)
    assert abs(hi - 3.099) < 0.06 and abs(lo - 1 / 3.099) < 0.01   # sqrt of F(4, 4)'s 97.5% quantile, 9.605
    lo, hi = results_table.sd_ratio_interval(2.0, 41, 41)
    assert 1.4 < lo < 2.0 < hi < 2.9                               # 40 degrees of freedom: about x/÷ 1.9


def _metrics(transact_values, baseline_values):
    seeds = {m: {"h": {"auc": {"values": v, "sd": float(np.std(v, ddof=1))}}}
             for m, v in (("transact", transact_values), ("no_sequence", baseline_values),
                          ("avg_pool", baseline_values))}
    return {"ranker": {"transact": {"h": {}}}, "ranker_seeds": seeds}


def test_seed_spread_line_says_which_ratio_five_seeds_can_place_above_one_and_a_half():
    base = [0.700, 0.701, 0.699, 0.7005, 0.6995]
    near = _metrics([0.700, 0.702, 0.698, 0.701, 0.699], base)       # 2x the baselines' sd
    far = _metrics([0.70, 0.72, 0.68, 0.71, 0.69], base)             # 20x
    assert "above 1.5x on h 2.0x" in results_table.seed_spread_line(near)
    assert "above 1.5x at 95% on no head" in results_table.seed_spread_line(near)
    assert "above 1.5x at 95% on h." in results_table.seed_spread_line(far)
