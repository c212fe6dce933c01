"""research/sequence_lag.py: a store that lags the log serves the actions before the cut only, with the context
computed at the request's own time; sittings split at 30-minute gaps."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from seqrank.features import History

_spec = importlib.util.spec_from_file_location("sequence_lag",
                                               Path(__file__).resolve().parents[1] / "research" / "sequence_lag.py")
sequence_lag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sequence_lag)
MIN = 60_000
T0 = 1_600_000_000_000  # a day start plus 6 h 40 min (ms)


def test_sittings_split_at_thirty_minute_gaps_per_user_in_any_row_order():
    users = np.array(["b", "a", "a", "a", "b", "a"])
    times = np.array([5, 0, 10, 45, 50, 70]) * MIN
    starts = sequence_lag.sitting_starts(users, times)
    # a: 0, 10 (gap 10) | 45 (gap 35), 70 (gap 25); b: 5 | 50 (gap 45)
    assert (starts // MIN).tolist() == [5, 0, 0, 45, 50, 45]


def test_a_lagging_store_serves_only_the_actions_before_the_cut_and_the_gap_from_the_request_time():
    ts = T0 + np.array([0, 20, 28]) * MIN
    histories = {"u": History(np.array([5, 6, 7]), np.array([1, 2, 1]), ts)}
    request = np.array([T0 + 30 * MIN])
    fresh = sequence_lag.lagged_sequences(histories, ["u"], request,
                                          sequence_lag.cut_times("as served", request, request), max_len=4)
    lagged = sequence_lag.lagged_sequences(histories, ["u"], request,
                                           sequence_lag.cut_times("10 min", request, request), max_len=4)
    assert fresh.seq_item[0].tolist() == [7, 6, 5, 0]          # newest first
    assert lagged.seq_item[0].tolist() == [5, 0, 0, 0]         # the two actions of the last 10 min are not held yet
    assert lagged.seq_mask[0].tolist() == [True, False, False, False]
    # context: log1p(count held), log1p(hours from the newest held action to the request)
    np.testing.assert_allclose(lagged.context[0, :2], [np.log1p(1), np.log1p(0.5)], rtol=1e-6)
    np.testing.assert_allclose(fresh.context[0, :2], [np.log1p(3), np.log1p(2 / 60)], rtol=1e-6)


def test_sitting_and_day_cuts():
    request = np.array([T0 + 30 * MIN])
    sitting = np.array([T0 + 12 * MIN])
    assert sequence_lag.cut_times("sitting start", request, sitting).tolist() == sitting.tolist()
    day = sequence_lag.cut_times("day start", request, sitting)[0]
    assert day % 86_400_000 == 0 and 0 < request[0] - day < 86_400_000
