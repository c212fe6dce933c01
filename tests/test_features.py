"""Tests for the one feature-building path (seqrank.features) and the example builder (seqrank.dataset).

Everything here runs on hand-made timelines whose expected features are written out by hand: the leakage guarantee
(nothing at or after the request time enters a feature), newest-first layout, padding, truncation, the
impression/request construction and the vocabulary's OOV handling.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from seqrank.config import RunConfig
from seqrank.data.loaders import EventLog
from seqrank.dataset import build_impressions, prepare, sequences_for
from seqrank.features import (FIRST_ID, N_CONTEXT, OOV, PAD, UNAVAILABLE, History, Vocabulary, build_sequences,
                              index_histories, index_histories_of, index_history)

HOUR_MS = 3_600_000
EXPOSURE = "impression"


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.build(["a", "b", "c", "d", "e"], ["click", "like", "hate", EXPOSURE],
                            negative_actions=["hate"], exposure_action=EXPOSURE)


def idx(vocab: Vocabulary, *items: str) -> list[int]:
    return vocab.item_index(list(items)).tolist()


def act(vocab: Vocabulary, *names: str) -> list[int]:
    return vocab.action_index(list(names)).tolist()


# ------------------------------------------------------------------------------------------------ build_sequences

# user u1: a known timeline; the request is made at T_REQ
T_REQ = 10 * HOUR_MS + 5_000
U1 = [  # (item, action, ts) -- given out of time order on purpose
    ("c", "click", 10 * HOUR_MS + 3_000),
    ("a", "click", 10 * HOUR_MS + 1_000),
    ("b", "like", 10 * HOUR_MS + 2_000),
    ("e", EXPOSURE, 10 * HOUR_MS + 2_500),     # an exposure: never a sequence row
    ("d", "like", T_REQ),                      # two actions at exactly the request time: excluded
    ("a", "hate", T_REQ),
    ("b", "click", T_REQ + 1_000),             # after the request: excluded
]


def u1_history(vocab: Vocabulary) -> History:
    items, actions, ts = zip(*U1)
    return index_history(vocab, list(items), list(actions), list(ts))


def test_index_history_sorts_by_time_and_drops_exposures(vocab):
    h = u1_history(vocab)
    assert h.ts.tolist() == [10 * HOUR_MS + 1_000, 10 * HOUR_MS + 2_000, 10 * HOUR_MS + 3_000,
                             T_REQ, T_REQ, T_REQ + 1_000]
    # equal timestamps keep their given order (d before a)
    assert h.item.tolist() == idx(vocab, "a", "b", "c", "d", "a", "b")
    assert h.action.tolist() == act(vocab, "click", "like", "click", "like", "hate", "click")
    assert (h.action >= FIRST_ID).all()


def test_index_histories_indexes_each_user_on_its_own_in_one_pass(vocab):
    """Many users in one lookup (the store's batch): each user's rows stay its own, in its own time order, with the
    exposures dropped, whatever form the ids come in (str lists from a store, bytes from a request)."""
    items, actions, ts = zip(*U1)
    hs = index_histories(vocab, [
        (list(items), list(actions), list(ts)),                             # str ids, unsorted, an exposure
        ([b"e", b"zzz", b"a"], [b"like", b"click", b"dance"], [300, 100, 200]),  # bytes; unknown item and action
        ([], [], []),                                                       # no actions
        (["b"], [EXPOSURE], [5]),                                           # only an exposure
    ])
    assert len(hs) == 4
    u1 = u1_history(vocab)
    assert [h.tolist() for h in (hs[0].item, hs[0].action, hs[0].ts)] == [
        u1.item.tolist(), u1.action.tolist(), u1.ts.tolist()]
    assert hs[1].item.tolist() == [OOV] + idx(vocab, "a", "e")
    assert hs[1].action.tolist() == act(vocab, "click") + [OOV] + act(vocab, "like")
    assert hs[1].ts.tolist() == [100, 200, 300]
    assert len(hs[2].ts) == len(hs[3].ts) == 0
    assert index_histories(vocab, []) == []
    by_user = index_histories_of(vocab, {"u1": (list(items), list(actions), list(ts)), "new": ([], [], [])})
    assert list(by_user) == ["u1", "new"] and by_user["u1"].ts.tolist() == u1.ts.tolist() and not len(by_user["new"].ts)
    with pytest.raises(ValueError, match="differ in length: 2, 1, 2"):
        index_histories(vocab, [(["a", "b"], ["click"], [1, 2])])


def test_only_actions_strictly_before_request_newest_first_then_padding(vocab):
    S = 6
    batch = build_sequences([u1_history(vocab)], [T_REQ], S)
    assert batch.seq_item.shape == batch.seq_action.shape == batch.seq_mask.shape == batch.seq_ts.shape == (1, S)
    assert batch.seq_item[0].tolist() == idx(vocab, "c", "b", "a") + [PAD] * 3
    assert batch.seq_action[0].tolist() == act(vocab, "click", "like", "click") + [PAD] * 3
    assert batch.seq_ts[0].tolist() == [10 * HOUR_MS + 3_000, 10 * HOUR_MS + 2_000, 10 * HOUR_MS + 1_000, 0, 0, 0]
    assert batch.seq_mask[0].tolist() == [True, True, True, False, False, False]
    assert batch.seq_mask.dtype == bool
    # nothing at or after the request time
    assert (batch.seq_ts[batch.seq_mask] < T_REQ).all()


def test_context_features_by_hand(vocab):
    batch = build_sequences([u1_history(vocab)], [T_REQ], 6)
    assert batch.context.shape == (1, N_CONTEXT) and batch.context.dtype == np.float32
    hour = 10 * 2 * math.pi / 24  # the request is at 10:00:05 UTC
    expected = [math.log1p(3), math.log1p(2_000 / 3.6e6), math.sin(hour), math.cos(hour), 0.0]  # 0: history read
    np.testing.assert_allclose(batch.context[0], expected, rtol=1e-5, atol=1e-6)


def test_an_unavailable_history_is_flagged_not_a_new_user(vocab):
    """A request whose history could not be read (the store is down) gets no sequence, as a new user does, but its
    context says so: the ranker can learn to rank it as a model without the sequence would."""
    h = u1_history(vocab)
    batch = build_sequences([h, h, History.empty()], [T_REQ] * 3, 6, unavailable=[True, False, False])
    assert not batch.seq_mask[0].any() and (batch.seq_item[0] == PAD).all()
    assert batch.context[0, 0] == 0.0 and batch.context[0, 1] == 0.0
    assert batch.context[:, UNAVAILABLE].tolist() == [1.0, 0.0, 0.0]  # a new user (row 2) is not flagged
    np.testing.assert_array_equal(batch.context[0, 2:UNAVAILABLE], batch.context[1, 2:UNAVAILABLE])  # hour of day
    assert batch.seq_item[1, :3].tolist() == idx(vocab, "c", "b", "a")


def test_request_one_ms_later_sees_the_actions_at_the_old_request_time(vocab):
    """The boundary is strict: at T_REQ + 1 the two actions at T_REQ become visible (newest first, and among equal
    timestamps the later-given one first)."""
    batch = build_sequences([u1_history(vocab)], [T_REQ + 1], 6)
    assert batch.seq_item[0, :5].tolist() == idx(vocab, "a", "d", "c", "b", "a")
    assert batch.seq_mask[0].tolist() == [True] * 5 + [False]
    assert T_REQ + 1_000 not in batch.seq_ts[0].tolist()


def test_truncation_keeps_the_newest(vocab):
    batch = build_sequences([u1_history(vocab)], [T_REQ], 2)
    assert batch.seq_item[0].tolist() == idx(vocab, "c", "b")
    assert batch.seq_ts[0].tolist() == [10 * HOUR_MS + 3_000, 10 * HOUR_MS + 2_000]
    assert batch.seq_mask[0].all()
    # the history count in the context is not truncated: 3 actions were before the request
    assert batch.context[0, 0] == pytest.approx(math.log1p(3))


def test_empty_history_and_request_before_any_action(vocab):
    S = 4
    h = u1_history(vocab)
    batch = build_sequences([History.empty(), h, h], [T_REQ, 10 * HOUR_MS + 1_000, T_REQ], S)
    for row in (0, 1):  # no history at all; a request at the time of the very first action
        assert not batch.seq_mask[row].any()
        assert (batch.seq_item[row] == 0).all() and (batch.seq_action[row] == 0).all()
        assert (batch.seq_ts[row] == 0).all()
        assert batch.context[row, 0] == 0.0 and batch.context[row, 1] == 0.0
    assert np.isfinite(batch.context).all()
    # rows of one batch are independent: the third row is u1's normal sequence
    assert batch.seq_item[2, :3].tolist() == idx(vocab, "c", "b", "a")


def test_several_users_each_with_their_own_request_time(vocab):
    u2 = index_history(vocab, ["e", "d", "zzz"], ["like", "click", "like"], [100, 200, 300])
    batch = build_sequences([u2, u1_history(vocab), u2], [250, T_REQ, 10**13], 3)
    assert batch.seq_item[0].tolist() == idx(vocab, "d", "e") + [PAD]
    assert batch.seq_item[1].tolist() == idx(vocab, "c", "b", "a")
    assert batch.seq_item[2].tolist() == [OOV] + idx(vocab, "d", "e")   # an unknown item is OOV, not dropped
    assert batch.seq_mask.sum(1).tolist() == [2, 3, 3]
    assert np.isfinite(batch.context).all()


def test_no_leakage_on_random_timelines(vocab):
    rng = np.random.default_rng(3)
    names = np.array(["a", "b", "c", "d", "e", "unknown"])
    acts = np.array(["click", "like", "hate", EXPOSURE])
    histories, times = [], []
    for _ in range(40):
        n = int(rng.integers(0, 30))
        ts = rng.integers(0, 50, n) * 1000  # many ties
        histories.append(index_history(vocab, names[rng.integers(0, 6, n)], acts[rng.integers(0, 4, n)], ts))
        times.append(int(rng.integers(0, 55)) * 1000)
    S = 8
    batch = build_sequences(histories, times, S)
    for e, (h, t) in enumerate(zip(histories, times)):
        m = batch.seq_mask[e]
        n_before = int((h.ts < t).sum())
        assert m.sum() == min(S, n_before)
        assert m.tolist() == sorted(m.tolist(), reverse=True)       # real actions first, padding after
        assert (batch.seq_ts[e, m] < t).all()
        assert (np.diff(batch.seq_ts[e, m]) <= 0).all()             # newest first
        assert (batch.seq_item[e, ~m] == PAD).all() and (batch.seq_action[e, ~m] == PAD).all()
        # exactly the newest min(S, n_before) actions before t
        assert sorted(batch.seq_ts[e, m].tolist()) == h.ts[h.ts < t][-S:].tolist()
    assert np.isfinite(batch.context).all()


def test_features_from_the_stores_newest_actions_equal_those_from_the_whole_log(vocab):
    """Serving reads at most the store's newest DEFAULT_MAX_LEN actions, training the whole log: every feature,
    the history count included (capped at HISTORY_COUNT_CAP), must be the same from either."""
    from seqrank.features import HISTORY_COUNT_CAP
    from seqrank.store.base import DEFAULT_MAX_LEN
    assert HISTORY_COUNT_CAP <= DEFAULT_MAX_LEN
    n = DEFAULT_MAX_LEN + 300
    names = np.array(["a", "b", "c", "d", "e"])[np.arange(n) % 5]
    kinds = np.array(["click", "like", "hate"])[np.arange(n) % 3]
    ts = np.arange(n, dtype=np.int64) * 1000
    whole = index_history(vocab, names, kinds, ts)
    store = index_history(vocab, names[-DEFAULT_MAX_LEN:], kinds[-DEFAULT_MAX_LEN:], ts[-DEFAULT_MAX_LEN:])
    t = int(ts[-1]) + 5000
    a, b = build_sequences([whole], [t], 100), build_sequences([store], [t], 100)
    for field in ("seq_item", "seq_action", "seq_mask", "seq_ts", "context"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.context[0, 0] == np.float32(np.log1p(HISTORY_COUNT_CAP))
    # below the cap the count is exact
    few = build_sequences([whole], [int(ts[9]) + 1], 100)
    assert few.context[0, 0] == np.float32(np.log1p(10))


# ---------------------------------------------------------------------------------------------- build_impressions

MIN = 60_000
GAP_S = 60.0


def hand_events() -> pd.DataFrame:
    rows = [
        # u1, request 1
        ("u1", "a", "click", 0),
        ("u1", "a", "like", 0),           # same (user, item, ts) as above: one impression, two labels
        ("u1", "b", EXPOSURE, 1 * MIN),   # shown, not engaged; exactly 60 s after the request's start: same request
        # u1, request 2
        ("u1", "c", "like", 31 * MIN),
        # u1, request 3
        ("u1", "d", "hate", 61 * MIN + 1),
        ("u1", "a", "click", 61 * MIN + 1),  # same ts, other item: another impression, same request
        # u2, its own requests though its time is between u1's
        ("u2", "a", "hate", 5 * MIN),
        ("u2", "a", "click", 5 * MIN),
        ("u2", "e", "like", 6 * MIN + 1),  # 60 s + 1 ms after u2's request: the next request
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]).astype({"timestamp": np.int64})


def test_build_impressions_by_hand():
    heads = ["click", "hate", "like"]
    imp, labels = build_impressions(hand_events(), heads, GAP_S)
    got = list(zip(imp.user_id, imp.item_id, imp.timestamp))
    assert got == [("u1", "a", 0), ("u1", "b", MIN), ("u1", "c", 31 * MIN),
                   ("u1", "a", 61 * MIN + 1), ("u1", "d", 61 * MIN + 1),
                   ("u2", "a", 5 * MIN), ("u2", "e", 6 * MIN + 1)]
    assert labels.dtype == np.float32 and labels.shape == (7, 3)
    assert labels.tolist() == [[1, 0, 1],   # click + like: one multi-hot impression
                               [0, 0, 0],   # exposure only
                               [0, 0, 1],
                               [1, 0, 0],
                               [0, 1, 0],
                               [1, 1, 0],
                               [0, 0, 1]]
    r = imp.request.to_numpy()
    assert r[0] == r[1] != r[2]              # exactly 60 s after the request's first impression: the same request
    assert r[3] == r[4] != r[2]
    assert r[5] != r[6] and len(set(r)) == 5  # 60 s + 1 ms starts the next; requests never span users
    assert imp.request_time.tolist() == [0, 0, 31 * MIN, 61 * MIN + 1, 61 * MIN + 1, 5 * MIN, 6 * MIN + 1]
    assert (imp.request_time <= imp.timestamp).all()


def test_a_request_window_is_measured_from_its_first_impression():
    """Impressions 40 s apart for 3 minutes: a gap rule would chain them into one request frozen at the start; a
    request holds the impressions up to request_gap_s after its first one."""
    ev = pd.DataFrame({"user_id": "u", "item_id": [f"i{k}" for k in range(5)], "action": "click",
                       "timestamp": np.arange(5, dtype=np.int64) * 40_000})
    imp, _ = build_impressions(ev, ["click"], 60.0)
    assert imp.request_time.tolist() == [0, 0, 80_000, 80_000, 160_000]
    imp, _ = build_impressions(ev, ["click"], 30.0)
    assert imp.request_time.tolist() == imp.timestamp.tolist()


def test_an_engagement_minutes_earlier_in_the_same_sitting_is_in_the_sequence():
    """The real-time claim: an impression 5 minutes after a like in the same sitting (no 30-minute break) is
    scored with that like in its sequence, and with nothing at or after its own request time (the impression
    shown 20 s after it in the same request, and its own click, are not there)."""
    rows = [("u", "old", "click", 0),                         # yesterday
            ("u", "a", "like", 86_400_000),                   # today, t0
            ("u", "b", "click", 86_400_000 + 5 * MIN),        # 5 minutes later, same sitting
            ("u", "c", "click", 86_400_000 + 5 * MIN + 20_000),  # same page as b
            ("v", "a", "click", 0), ("v", "b", "click", 86_400_000 + 7 * MIN)]
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]).astype({"timestamp": np.int64})
    log = EventLog(events=ev, source="hand", fmt="canonical", duplicates_dropped=0, negative_actions=(),
                   exposure_action=None)
    cfg = RunConfig()
    prep = prepare(log, cfg)
    imp = prep.impressions
    b, c = (int(np.flatnonzero((imp.user_id == "u") & (imp.item_id == x))[0]) for x in ("b", "c"))
    seq = sequences_for(prep, imp.user_id.to_numpy()[[b, c]], imp.request_time.to_numpy()[[b, c]], 10)
    a_item = prep.vocab.item_index(["a"])[0]
    for row in range(2):
        k = int(seq.seq_mask[row].sum())
        assert k == 2 and seq.seq_item[row, 0] == a_item              # the like of 5 minutes ago, newest first
        assert seq.seq_ts[row, 0] == 86_400_000
        assert (seq.seq_ts[row, :k] < 86_400_000 + 5 * MIN).all()   # nothing of its own request
    assert imp.request_time.iloc[c] == imp.timestamp.iloc[b]          # c is on b's page


def tiny_log(seed: int = 0, n_users: int = 6) -> EventLog:
    """A random canonical event log: sittings of impressions, each with 1-3 actions or only an exposure."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = int(rng.integers(0, 3 * HOUR_MS))
        for _ in range(int(rng.integers(6, 12))):            # sittings
            for _ in range(int(rng.integers(1, 6))):          # impressions of the sitting
                item = f"i{int(rng.integers(0, 25))}"
                kinds = rng.choice(["click", "like", "hate", EXPOSURE], size=int(rng.integers(1, 4)), replace=False)
                for a in kinds:
                    rows.append((f"user{u}", item, str(a), t))
                t += int(rng.integers(1, 5)) * MIN * int(rng.integers(0, 2)) + int(rng.integers(0, 3)) * 1000
            t += int(rng.integers(1, 20)) * HOUR_MS
    last = max(r[3] for r in rows)
    rows.append(("user0", "only_in_test", "like", last + 1))  # an item first seen after the split: OOV
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]).drop_duplicates()
    ev = ev.sort_values(["user_id", "timestamp", "item_id", "action"], kind="mergesort").reset_index(drop=True)
    ev["timestamp"] = ev.timestamp.astype(np.int64)
    return EventLog(events=ev, source="tiny", fmt="canonical", duplicates_dropped=0,
                    negative_actions=("hate",), exposure_action=EXPOSURE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_prepared_example_sees_only_the_past(seed):
    log = tiny_log(seed)
    cfg = RunConfig()
    prep = prepare(log, cfg)
    ev = log.events
    assert EXPOSURE not in prep.vocab.actions and prep.vocab.heads == ["click", "hate", "like"]
    imp = prep.impressions
    assert len(imp) == len(ev[["user_id", "item_id", "timestamp"]].drop_duplicates())
    # every impression belongs to a request whose time is its first timestamp, within request_gap_s of it
    assert (imp.groupby("request").timestamp.min() == imp.groupby("request").request_time.first()).all()
    assert (imp.groupby("request").user_id.nunique() == 1).all()
    assert ((imp.timestamp - imp.request_time) <= cfg.data.request_gap_s * 1000).all()
    S = 5
    seq = sequences_for(prep, imp.user_id.to_numpy(), imp.request_time.to_numpy(), S)
    req = imp.request_time.to_numpy()
    # the leakage guarantee, checked for every example: no action at or after the request time
    assert (np.where(seq.seq_mask, seq.seq_ts, np.iinfo(np.int64).min) < req[:, None]).all()
    # ...and in particular never the impression's own actions (which are at its timestamp >= request time)
    assert (np.where(seq.seq_mask, seq.seq_ts, np.iinfo(np.int64).min) < imp.timestamp.to_numpy()[:, None]).all()
    # exactly the newest S non-exposure actions before the request, rebuilt by brute force from the raw log
    actions = ev[ev.action != EXPOSURE]
    for e, (u, t) in enumerate(zip(imp.user_id, req)):
        past = actions[(actions.user_id == u) & (actions.timestamp < t)].iloc[-S:][::-1]
        k = len(past)
        assert seq.seq_mask[e].sum() == k
        assert seq.seq_ts[e, :k].tolist() == past.timestamp.tolist()
        assert seq.seq_item[e, :k].tolist() == prep.vocab.item_index(past.item_id.to_numpy()).tolist()
        assert seq.seq_action[e, :k].tolist() == prep.vocab.action_index(past.action.to_numpy()).tolist()
    # labels: one multi-hot row per impression, from the raw actions at that (user, item, ts)
    for e in range(0, len(imp), 7):
        r = imp.iloc[e]
        raw = set(ev[(ev.user_id == r.user_id) & (ev.item_id == r.item_id) & (ev.timestamp == r.timestamp)].action)
        assert [h for j, h in enumerate(prep.vocab.heads) if prep.labels[e, j]] == sorted(raw - {EXPOSURE})
    # the vocabulary only knows items seen before the split (test-only items are OOV)
    train_items = set(ev[ev.timestamp < prep.split_time].item_id)
    test_only = sorted(set(ev.item_id) - train_items)
    assert (prep.vocab.item_index(sorted(train_items)) >= FIRST_ID).all()
    assert "only_in_test" in test_only
    assert (prep.vocab.item_index(test_only) == OOV).all()
    assert np.isfinite(seq.context).all()


def _hand_log(rows) -> EventLog:
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]).astype({"timestamp": np.int64})
    return EventLog(events=ev, source="hand", fmt="canonical", duplicates_dropped=0, negative_actions=("hate",),
                    exposure_action=None)


def test_the_test_period_is_the_last_share_of_the_events_not_of_the_time_span():
    """Activity concentrated early with a long sparse tail: 90 events in the first 10 h, 10 over the next 90 h. The
    last 20% of the span would hold 2 events; the last 20% of the events are 20."""
    H = HOUR_MS
    times = list(np.linspace(0, 10 * H, 90, dtype=np.int64)) + list(np.linspace(11 * H, 100 * H, 10, dtype=np.int64))
    log = _hand_log([(f"u{k % 7}", f"i{k % 11}", "click", int(t)) for k, t in enumerate(times)])
    prep = prepare(log, RunConfig())
    assert prep.impressions.is_test.sum() == 20
    assert prep.split_time == sorted(times)[80]


def test_the_validation_split_never_reads_the_test_period_and_selection_holds_out_the_newest_training_rows():
    H = HOUR_MS
    log = _hand_log([(f"u{k % 5}", f"i{k}", "click", k * H) for k in range(100)])
    test = prepare(log, RunConfig())
    assert test.split_time == 80 * H and test.impressions.is_test.sum() == 20
    rows, sel = test.ranker_train_rows(), test.selection_rows()
    assert len(rows) == 72 and len(sel) == 8 and not set(rows) & set(sel)   # the newest 10% of 80 training rows
    assert test.impressions.timestamp.iloc[rows].max() < test.impressions.timestamp.iloc[sel].min()
    cfg = RunConfig.from_dict({"data": {"split": "validation"}})
    val = prepare(log, cfg)
    assert val.impressions.timestamp.max() < test.split_time            # the test period is gone
    assert val.split_time == 64 * H and val.impressions.is_test.sum() == 16
    assert (val.vocab.item_index([f"i{k}" for k in range(64, 100)]) == OOV).all()
    none = prepare(log, RunConfig.from_dict({"data": {"selection_fraction": 0.0}}))
    assert len(none.selection_rows()) == 0 and len(none.ranker_train_rows()) == 80
    for bad, field in (({"split": "train"}, "data.split"), ({"test_fraction": 1.0}, "data.test_fraction"),
                       ({"selection_fraction": 1.0}, "data.selection_fraction")):
        with pytest.raises(ValueError, match=field):
            prepare(log, RunConfig.from_dict({"data": bad}))


# ------------------------------------------------------------------------------------------------------ Vocabulary

def test_item_index_known_unknown_and_too_long():
    known = ["10", "2", "abc", "abd", "é"]
    v = Vocabulary.build(known, ["click"], [], None)
    got = v.item_index(known)
    assert (got >= FIRST_ID).all() and len(set(got.tolist())) == len(known)
    # the index points back at the same id
    assert [v.items[i - FIRST_ID].decode() for i in got] == known
    assert v.n_items == len(known) + FIRST_ID
    # bytes and str ids are the same id
    assert v.item_index([b"abc", "abc"]).tolist() == [got[2], got[2]]
    unknown = ["zzz", "1", "ab", "", "abc" + "x" * 300, "abcd", "10 ", "abd\x01"]
    assert v.item_index(unknown).tolist() == [OOV] * len(unknown)
    # mixing known and too-long ids keeps every position right
    mixed = v.item_index(["abc" + "x" * 300, "abc", "abdd", "abd"])
    assert mixed.tolist() == [OOV, got[2], OOV, got[3]]
    assert v.item_index([]).tolist() == []


def test_item_index_on_an_empty_vocabulary_is_all_oov():
    v = Vocabulary.build([], ["click"], [], None)
    assert v.item_index(["a", "b"]).tolist() == [OOV, OOV]


def test_action_index(vocab):
    assert vocab.actions == ["click", "hate", "like"]
    assert vocab.heads == ["click", "hate", "like"]
    assert vocab.negative_actions == ["hate"]
    assert vocab.n_actions == 3 + FIRST_ID
    assert vocab.action_index(["click", "hate", "like"]).tolist() == [FIRST_ID, FIRST_ID + 1, FIRST_ID + 2]
    assert vocab.action_index([EXPOSURE]).tolist() == [-1]
    assert vocab.action_index(["purchase", b"like"]).tolist() == [OOV, FIRST_ID + 2]


@pytest.mark.parametrize("mmap", [True, False])
def test_vocabulary_save_load_round_trip(tmp_path, vocab, mmap):
    vocab.save(tmp_path / "v")
    loaded = Vocabulary.load(tmp_path / "v", mmap=mmap)
    assert isinstance(loaded.items, np.memmap) == mmap
    assert loaded.items.tolist() == vocab.items.tolist() and loaded.items.dtype == vocab.items.dtype
    assert (loaded.actions, loaded.heads, loaded.negative_actions, loaded.exposure_action) == \
        (vocab.actions, vocab.heads, vocab.negative_actions, vocab.exposure_action)
    ids = ["a", "e", "zz", "a" + "x" * 300, "b"]
    assert loaded.item_index(ids).tolist() == vocab.item_index(ids).tolist() == \
        [FIRST_ID, FIRST_ID + 4, OOV, OOV, FIRST_ID + 1]
    assert loaded.action_index([EXPOSURE, "like"]).tolist() == [-1, FIRST_ID + 2]


def test_item_known_from_is_the_day_after_the_first_action_the_refresh_learns_from():
    """Training sees an item as the daily refresh served it: its own row from the day start after its first
    sequence action (not an exposure), known from the start when first acted on in the log's first day, never
    when only shown; before that moment it is the OOV row, as the candidate and in the sequence."""
    import torch

    from seqrank.dataset import DAY_MS, item_known_from
    from seqrank.training import as_served
    H = HOUR_MS
    rows = [("u1", "a", "click", 2 * H),                                   # the log's first day
            ("u2", "b", "like", DAY_MS + 5 * H), ("u1", "b", "click", DAY_MS + 10 * H),
            ("u2", "c", EXPOSURE, 3 * DAY_MS + H), ("u2", "c", "click", 4 * DAY_MS + 2 * H),
            ("u1", "e", EXPOSURE, DAY_MS), ("u1", "e", "hate", 8 * DAY_MS)]  # e: acted on in the test period only
    rows += [("u1", "a", "click", 4 * DAY_MS + h * H) for h in range(1, 12)]
    rows += [("u2", "a", "like", 8 * DAY_MS + h * H) for h in range(1, 5)]   # the test period
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"])
    log = EventLog(events=ev, source="hand", fmt="canonical", duplicates_dropped=0,
                   negative_actions=("hate",), exposure_action=EXPOSURE)
    prep = prepare(log, RunConfig())
    assert 4 * DAY_MS + 12 * H <= prep.split_time <= 8 * DAY_MS
    known = item_known_from(prep)
    row = {i: int(prep.vocab.item_index([i])[0]) for i in "abce"}
    assert known[row["a"]] < 0 and known[OOV] < 0 and known[PAD] < 0
    assert known[row["b"]] == 2 * DAY_MS  # first acted on in day 1, refreshed at day 2's start
    assert known[row["c"]] == 5 * DAY_MS  # its exposure on day 3 taught the refresh nothing
    assert known[row["e"]] >= 2 ** 62     # only shown in the training period: no refresh learns it
    # a batch at day 1, 20 h and one at day 2, 1 h: b is OOV first (candidate and sequence row), its own row then
    seq_item = torch.tensor([[row["b"], row["a"], PAD], [row["b"], row["a"], PAD]])
    cand = torch.tensor([[row["b"]], [row["b"]]])
    inputs = (seq_item, seq_item * 0 + FIRST_ID, seq_item != PAD, torch.zeros(2, 4), torch.zeros(2, N_CONTEXT), cand)
    out = as_served(torch.as_tensor(known), np.array([DAY_MS + 20 * H, 2 * DAY_MS + H]), inputs)
    assert out[0].tolist() == [[OOV, row["a"], PAD], [row["b"], row["a"], PAD]]
    assert out[5].tolist() == [[OOV], [row["b"]]]
    assert all(a is b for a, b in zip(out[1:5], inputs[1:5]))


def test_training_blanks_a_row_exactly_as_a_store_outage_serves_it(vocab):
    """training.store_outage (the rows a training batch serves as in an outage) gives the tensors that serving's
    build_sequences(unavailable=...) gives: one definition of "history unavailable" for training and serving."""
    import torch

    from seqrank.training import store_outage
    h, S = u1_history(vocab), 6
    served = build_sequences([h, h], [T_REQ, T_REQ + 1], S)
    outage = build_sequences([h, h], [T_REQ, T_REQ + 1], S, unavailable=[True, False])
    inputs = (torch.as_tensor(served.seq_item), torch.as_tensor(served.seq_action), torch.as_tensor(served.seq_mask),
              torch.zeros(2, 4), torch.as_tensor(served.context), torch.tensor([[FIRST_ID], [FIRST_ID + 1]]))
    out = store_outage(inputs, torch.tensor([True, False]))
    for got, want in zip(out[:3], (outage.seq_item, outage.seq_action, outage.seq_mask)):
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(out[4].numpy(), outage.context)
    assert out[3] is inputs[3] and out[5] is inputs[5]   # the daily embedding and the candidate stay as served
    assert inputs[2][0].any() and inputs[4][0, 0] > 0     # the batch it was given is not changed
