"""The CPU ranker's bounded runs (seqrank/serving/batching.py): a dynamic batch of requests with different
candidate buckets scored in runs of at most max_rows candidate rows gives what scoring each request on its own
gives, with no run above the bound and no request padded beyond its own width."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seqrank.serving.batching import score_in_runs, warmup_feeds
from test_models import make_ranker, ranker_inputs

S = 7
NAMES = ("seq_item", "seq_action", "seq_mask", "user_emb", "context")


def _requests(widths_rows, seed=0):
    """Per request (user-side dict [n, ...], cand [n, w]) from the test model's input builder; the last quarter of
    each candidate row is padding (id 0), as preprocess pads to a bucket."""
    out = []
    for k, (w, n) in enumerate(widths_rows):
        *user, cand = ranker_inputs([S - k % S] * n, S, w, seed=seed + k)
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
        np.testing.assert_allclose(probs, want, atol=1e-6)
    assert all(k * p <= max_rows for k, p in shapes)  # a run, and so each piece, within the bound
    # no padding beyond a request's own bucket: when every width is a multiple of its piece width, the runs score
    # exactly the candidate rows that arrived
    if all(c.shape[1] % max(1, min(c.shape[1], max_rows)) == 0 for _, c in requests):
        assert sum(k * p for k, p in shapes) == sum(c.shape[0] * c.shape[1] for _, c in requests)


def test_runs_group_equal_widths_and_fill_up_to_the_bound():
    requests = _requests([(16, 1)] * 20 + [(64, 1)] * 3)
    shapes = []

    def run(feeds):
        shapes.append(feeds["cand_item"].shape)
        return np.zeros((*feeds["cand_item"].shape, 2), dtype=np.float32)

    user_side = {n: np.concatenate([u[n] for u, _ in requests]) for n in NAMES}
    score_in_runs(run, user_side, [c for _, c in requests], 128)
    assert sorted(shapes) == sorted([(8, 16), (8, 16), (4, 16), (2, 64), (1, 64)])


def test_mismatched_user_rows_and_bad_bound_are_errors():
    (user, cand), = _requests([(16, 2)])
    with pytest.raises(ValueError, match="request rows"):
        score_in_runs(lambda f: None, {n: v[:1] for n, v in user.items()}, [cand], 128)
    with pytest.raises(ValueError, match="max_rows"):
        score_in_runs(lambda f: None, user, [cand], 0)


def test_warmup_covers_the_largest_runs():
    (user, _), = _requests([(16, 1)])
    feeds = warmup_feeds(user, 128)
    assert [f["cand_item"].shape for f in feeds] == [(128, 1), (1, 128)]
    model = make_ranker()
    for f in feeds:  # valid inputs for the model (an empty history is a cold start)
        with torch.inference_mode():
            out = model(*(torch.from_numpy(f[n]) for n in (*NAMES, "cand_item")))
        assert torch.isfinite(out).all()
