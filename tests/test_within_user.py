"""research/within_user.py: the diagnosis behind the GAUC rows of docs/results.md. A log whose users do not depend
on their past still gives "did it recently" a GAUC below 0.5 for a rare action (its moments are
seqrank.metrics.moments, tested in tests/test_metrics.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from seqrank import metrics as M

_spec = importlib.util.spec_from_file_location("within_user",
                                               Path(__file__).resolve().parents[1] / "research" / "within_user.py")
within_user = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(within_user)


def _impressions(rows):
    user, _, _, t = map(np.array, zip(*rows))
    return SimpleNamespace(user=user, request_time=t)


def test_users_with_no_dependence_on_their_past_give_the_recent_action_bit_a_gauc_below_half():
    """Each user's labels i.i.d. at the user's own rate: the bit "a positive among the previous impressions" triples
    the pooled rate and is still below 0.5 within users, because a user's first positive never has it."""
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for u in range(400):
        rate = rng.beta(0.3, 8)
        for k in range(60):
            rows.append((f"u{u}", u, u * 100 + k, k))
            labels.append(rng.random() < rate)
    ex = _impressions(rows)
    ex.labels = np.array(labels, dtype=int)[:, None]
    half = np.arange(len(rows)) % 60 >= 30
    train = SimpleNamespace(user=ex.user[~half], request_time=ex.request_time[~half], labels=ex.labels[~half])
    test = SimpleNamespace(user=ex.user[half], request_time=ex.request_time[half], labels=ex.labels[half])
    null = within_user.stationary_null(train, test, 0, window=45, draws=3)
    assert 0.35 < null < 0.47
    # the real labels are such a log, so their own bit tells the same story
    y = ex.labels[:, 0]
    before = np.r_[0, np.cumsum(y)]
    bit = np.array([before[i] - before[i - (i % 60)] > 0 for i in range(len(y))])
    assert y[bit].mean() > 2 * y[~bit].mean()
    assert M.gauc(y[half], bit[half] + 1e-6 * rng.random(half.sum()), ex.user[half]) < 0.47
