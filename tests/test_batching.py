"""The CPU ranker's bounded runs (seqrank/serving/batching.py): a dynamic batch of requests with different
candidate buckets scored in runs of at most max_rows candidate rows gives, for every real candidate, what scoring
each request on its own gives; no run is above the bound, no padding is scored (padding columns are 0) and each
distinct id of a request row is scored once."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from seqrank.features import FIRST_ID
from seqrank.serving.batching import real_widths, score_in_runs, trim_history_padding, warmup_feeds
from test_models import make_ranker as _make_ranker
from test_models import ranker_inputs

S = 7
NAMES = ("seq_item", "seq_action", "seq_mask", "user_emb", "context")
ITEMS = 300  # more items than the widest request, so a row's candidates can all be distinct


def make_ranker():
    return _make_ranker(n_items=ITEMS)


def _requests(widths_rows, seed=0):
    """Per request (user-side dict [n, ...], cand [n, w]) from the test model's input builder, each row's candidates
    distinct; the last quarter of each candidate row is padding (id 0), as preprocess pads to a bucket."""
    out = []
    rng = np.random.default_rng(seed)
    for k, (w, n) in enumerate(widths_rows):
        *user, cand = ranker_inputs([S - k % S] * n, S, w, seed=seed + k)
        cand = torch.stack([torch.from_numpy(rng.permutation(np.arange(FIRST_ID, ITEMS))[:w]) for _ in range(n)])
        cand[:, w - w // 4:] = 0
        out.append(({name: t.numpy() for name, t in zip(NAMES, user)}, cand.numpy()))
    return out


@pytest.mark.parametrize("max_rows", [128, 32, 5])
def test_bounded_runs_equal_scoring_each_request_alone(max_rows):
    model = make_ranker()
    requests = _requests([(16, 1), (128, 1), (256, 2), (16, 1), (64, 1), (16, 3), (1, 1), (0, 1)])  # (width, rows)
    shapes = []

    def run(feeds):
        shapes.append(feeds["cand_item"].shape)
        assert all(len(v) == len(feeds["cand_item"]) for v in feeds.values())
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in (*NAMES, "cand_item"))).numpy()

    user_side = {n: np.concatenate([u[n] for u, _ in requests]) for n in NAMES}
    got = score_in_runs(run, user_side, [c for _, c in requests], max_rows)
    for (user, cand), probs in zip(requests, got):
        with torch.inference_mode():
            want = model(*(torch.from_numpy(user[n]) for n in NAMES), torch.from_numpy(cand)).numpy()
        assert probs.shape == want.shape
        real = cand != 0
        np.testing.assert_allclose(probs[real], want[real], atol=1e-6)
        assert not probs[~real].any()  # the trailing padding is not scored
    assert all(k * p <= max_rows for k, p in shapes)  # a run, and so each piece, within the bound
    # the runs score exactly the real candidates: no bucket padding, no padding to a wider request
    assert sum(k * p for k, p in shapes) == sum(int((c != 0).sum()) for _, c in requests)


def test_runs_group_equal_widths_and_fill_up_to_the_bound():
    requests = _requests([(16, 1)] * 20 + [(64, 1)] * 3)
    shapes = []

    def run(feeds):
        shapes.append(feeds["cand_item"].shape)
        return np.zeros((*feeds["cand_item"].shape, 2), dtype=np.float32)

    user_side = {n: np.concatenate([u[n] for u, _ in requests]) for n in NAMES}
    score_in_runs(run, user_side, [c for _, c in requests], 128)
    # 12 and 48 real candidates (the last quarter of each bucket is padding): 10 x 12 rows fit in 128, 2 x 48
    assert sorted(shapes) == sorted([(10, 12), (10, 12), (2, 48), (1, 48)])


def test_a_pool_splits_even_one_request_over_its_threads_exactly():
    model = make_ranker()
    requests = _requests([(128, 1)])  # 96 real candidates
    shapes = []

    def run(feeds):
        shapes.append(feeds["cand_item"].shape)
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in (*NAMES, "cand_item"))).numpy()

    (user, cand), = requests
    with ThreadPoolExecutor(2) as pool:
        probs, = score_in_runs(run, user, [cand], 128, pool, ways=2)
        assert sorted(shapes) == [(1, 48), (1, 48)]
        shapes.clear()
        score_in_runs(run, user, [cand[:, :10]], 128, pool, ways=2)
        assert sorted(shapes) == [(1, 2), (1, 8)]  # never below min_rows per run (8)
        shapes.clear()
        user3 = {n: np.repeat(v, 3, axis=0) for n, v in user.items()}
        score_in_runs(run, user3, [cand] * 3, 128, pool, ways=2)
        assert sorted(k * p for k, p in shapes) == [72, 72, 72, 72]  # 3 x 96 balanced: 4 runs of 72, not 3 of 96
    with torch.inference_mode():
        want = model(*(torch.from_numpy(user[n]) for n in NAMES), torch.from_numpy(cand)).numpy()
    real = cand != 0
    np.testing.assert_allclose(probs[real], want[real], atol=1e-6)


def test_a_one_run_batch_runs_on_the_calling_thread_and_scores_what_the_pool_does():
    """A batch the plan leaves as one run is scored on the caller's thread (the pool would add two thread switches
    and no parallelism); a batch of several runs still goes to the pool's threads. Both score what the model does."""
    model = make_ranker()
    (user, cand), = _requests([(128, 1)])  # 96 real candidates: 2 runs of 48 on 2 threads
    threads = []

    def run(feeds):
        threads.append((threading.get_ident(), feeds["cand_item"].shape))
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in (*NAMES, "cand_item"))).numpy()

    small = cand[:, :6]  # 6 real candidates: one run (at least min_rows = 8 rows per run)
    with ThreadPoolExecutor(2) as pool:
        inline, = score_in_runs(run, user, [small], 128, pool, ways=2)
        assert threads == [(threading.get_ident(), (1, 6))]
        threads.clear()
        pooled, = score_in_runs(run, user, [small], 128, pool, ways=2, min_rows=1)  # 2 runs of 3: the pool
        assert sorted(shape for _, shape in threads) == [(1, 3), (1, 3)]
        assert threading.get_ident() not in {t for t, _ in threads}
    with torch.inference_mode():
        want = model(*(torch.from_numpy(user[n]) for n in NAMES), torch.from_numpy(small)).numpy()
    np.testing.assert_allclose(inline, want, atol=1e-6)
    np.testing.assert_allclose(pooled, want, atol=1e-6)


def test_every_pool_run_has_finished_when_one_fails():
    """The caller's thread reuses a pool thread's session for one-run batches (model_cpu.py), which is one run at a
    time only if no pool run outlives the call: a failed run must not return while another is still running."""
    (user, cand), = _requests([(128, 1)])  # 2 runs of 48 on 2 threads
    first = int(cand[cand != 0].min())  # the first run's first id (a row's ids are scored in sorted order)
    finished = []

    def run(feeds):
        if int(feeds["cand_item"][0, 0]) == first:
            raise RuntimeError("this run fails at once")
        time.sleep(0.3)
        finished.append(feeds["cand_item"].shape)
        return np.zeros((*feeds["cand_item"].shape, 2), dtype=np.float32)

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(RuntimeError, match="fails at once"):
            score_in_runs(run, user, [cand], 128, pool, ways=2)
        assert finished == [(1, 48)]  # the other run had finished before the error reached the caller


def test_only_trailing_padding_is_dropped():
    cand = np.array([[5, 0, 7, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])
    assert real_widths(cand).tolist() == [3, 0, 5]  # a PAD between real candidates is scored like any id
    assert real_widths(np.zeros((2, 0), dtype=np.int64)).tolist() == [0, 0]
    (user, _), = _requests([(16, 3)])
    shapes = []

    def run(feeds):
        shapes.append(feeds["cand_item"].shape)
        return np.ones((*feeds["cand_item"].shape, 2), dtype=np.float32)

    probs, = score_in_runs(run, user, [cand], 128)
    assert sorted(shapes) == [(1, 0), (1, 3), (1, 5)]  # an all-padding row: one empty run, for the head count
    assert probs.shape == (3, 5, 2)
    assert probs[:, :, 0].tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_mismatched_user_rows_and_bad_bound_are_errors():
    (user, cand), = _requests([(16, 2)])
    with pytest.raises(ValueError, match="request rows"):
        score_in_runs(lambda f: None, {n: v[:1] for n, v in user.items()}, [cand], 128)
    with pytest.raises(ValueError, match="max_rows"):
        score_in_runs(lambda f: None, user, [cand], 0)


def test_warmup_covers_the_largest_runs():
    (user, _), = _requests([(16, 1)])
    user["seq_mask"][:, 3:] = False  # a short history: the masked branch; the warm-up adds a full one
    feeds = warmup_feeds(user, 128)
    assert [f["cand_item"].shape for f in feeds] == [(128, 1), (128, 1), (1, 128), (1, 128)]
    assert [bool(f["seq_mask"].all()) for f in feeds] == [False, True, False, True]
    model = make_ranker()
    for f in feeds:  # valid inputs for the model (an empty history is a cold start)
        with torch.inference_mode():
            out = model(*(torch.from_numpy(f[n]) for n in (*NAMES, "cand_item")))
        assert torch.isfinite(out).all()


def test_each_distinct_id_is_scored_once_and_equal_ids_score_bitwise_equal():
    """A row naming an item twice, and items the model does not know (all the one OOV id, 1), costs one row per
    distinct id; equal ids get identical scores even when the row is split over runs of different widths (which
    round differently in the last bit and used to reorder tied candidates between calls)."""
    model = make_ranker()
    (user, _), = _requests([(16, 1)])
    cand = np.array([[7, 1, 9, 1, 7, 12, 1, 1, 30, 1, 9, 44, 1, 0, 0, 0]])  # 13 real: 6 distinct ids
    scored = []

    def run(feeds):
        scored.append(feeds["cand_item"].copy())
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in (*NAMES, "cand_item"))).numpy()

    with ThreadPoolExecutor(2) as pool:
        probs, = score_in_runs(run, user, [cand], 128, pool, ways=2, min_rows=1)
    ids = np.concatenate([c.reshape(-1) for c in scored])
    assert sorted(ids.tolist()) == [1, 7, 9, 12, 30, 44]  # each distinct id once, over two runs
    assert len(scored) == 2 and {c.shape[1] for c in scored} == {3}
    for value in (1, 7, 9):
        cols = np.flatnonzero(cand[0] == value)
        assert all(np.array_equal(probs[0, cols[0]], probs[0, c]) for c in cols[1:]), value
    with torch.inference_mode():
        want = model(*(torch.from_numpy(user[n]) for n in NAMES), torch.from_numpy(cand)).numpy()
    real = cand != 0
    np.testing.assert_allclose(probs[real], want[real], atol=1e-6)
    assert not probs[~real].any()


# ------------------------------------------------------------------------------------------- history trimming

def _user_side(lengths, n_cand=3, seed=0):
    *user, cand = ranker_inputs(lengths, S, n_cand, seed=seed)
    return {**{name: t.numpy() for name, t in zip(NAMES, user)}, "cand_item": cand.numpy()}


@pytest.mark.parametrize("lengths,width", [([0, 3, 2], 3), ([0, 0], 1), ([S, 1], S), ([1], 1), ([5, 5, 4], 5)])
def test_history_is_trimmed_to_the_longest_real_one_of_the_run(lengths, width):
    feeds = _user_side(lengths)
    trimmed = trim_history_padding(feeds)
    assert trimmed["seq_mask"].shape == trimmed["seq_item"].shape == trimmed["seq_action"].shape == (len(lengths),
                                                                                                       width)
    assert trimmed["seq_mask"].sum(1).tolist() == lengths  # no real action is dropped
    for name in ("seq_item", "seq_action", "seq_mask"):
        np.testing.assert_array_equal(trimmed[name], feeds[name][:, :width])
        assert not feeds[name][:, width:].any()  # what was cut is padding only (ids and mask 0 here)
    for name in ("user_emb", "context", "cand_item"):
        assert trimmed[name] is feeds[name]


@pytest.mark.parametrize("extra", [{}, {"sequence_mean": True}])
def test_trimmed_history_scores_what_the_padded_one_scores(extra):
    """Exact up to rounding: padding is never attended or pooled, so the columns every row pads can go. With K = 4
    newest rows and histories shorter than K, the trimmed sequence is narrower than the output rows it fills."""
    model = _make_ranker(n_items=ITEMS, top_k_rows=4, **extra)
    feeds = _user_side([0, 1, 3, 2], n_cand=5, seed=4)
    trimmed = trim_history_padding(feeds)
    assert trimmed["seq_mask"].shape[1] == 3 < 4
    with torch.inference_mode():
        full, cut = (model(*(torch.from_numpy(f[n]) for n in (*NAMES, "cand_item"))).numpy()
                     for f in (feeds, trimmed))
    np.testing.assert_allclose(cut, full, rtol=0, atol=1e-6)
    # the check can fail: hiding a real action (cutting one column too many) changes the scores
    short = {n: v[:, :2] if n in ("seq_item", "seq_action", "seq_mask") else v for n, v in feeds.items()}
    with torch.inference_mode():
        wrong = model(*(torch.from_numpy(short[n]) for n in (*NAMES, "cand_item"))).numpy()
    assert np.abs(wrong - full).max() > 1e-4


def test_runs_are_scored_on_their_real_history_width():
    model = make_ranker()
    widths = []

    def run(feeds):
        widths.append(feeds["seq_mask"].shape[1])
        with torch.inference_mode():
            return model(*(torch.from_numpy(feeds[n]) for n in (*NAMES, "cand_item"))).numpy()

    for lengths, width in (([S], S), ([3], 3), ([2, 4], 4), ([0], 1)):
        user = _user_side(lengths, n_cand=6)
        user.pop("cand_item")
        cand = np.tile(np.arange(FIRST_ID, FIRST_ID + 6), (len(lengths), 1))  # distinct ids: one piece width
        widths.clear()
        score_in_runs(run, user, [cand], max_rows=128)
        assert widths == [width], lengths  # one run, as wide as its longest real history (an empty one: 1)
