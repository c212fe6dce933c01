"""Offline metrics: per-head AUC, HIT@3 on shuffled sessions, Recall@k of future positives."""
from __future__ import annotations

import numpy as np
import pandas as pd


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (a tie counts one half); NaN when one class is absent. weighted_auc with every weight 1."""
    return float(weighted_auc(labels, scores, np.ones((1, len(scores)), dtype=np.float32))[0])


def utility(probs: np.ndarray, heads: list[str], negative: list[str], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of heads; negative heads subtract. probs [..., H] -> [...]."""
    w = np.array([weights.get(h, 1.0) * (-1.0 if h in negative else 1.0) for h in heads], dtype=np.float32)
    return probs @ w


def _counted_groups(groups: np.ndarray, min_size: int):
    """Row indices (ascending) of each group with at least min_size rows: the groups HIT@k counts."""
    for idx in pd.Series(np.arange(len(groups))).groupby(groups).indices.values():
        if len(idx) >= min_size:
            yield idx


def hits_per_group(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int = 3, min_size: int = 4,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per group with >= min_size impressions: the positives of each head ranked in its top k. Returns (the row of
    each group's first impression [G], hits [G,H]). Groups are shuffled before ranking so the logged order can never
    break ties."""
    rng = np.random.default_rng(seed)
    first, hits = [], []
    for idx in _counted_groups(groups, min_size):
        first.append(idx[0])
        idx = rng.permutation(idx)
        top = idx[np.argsort(-scores[idx], kind="stable")[:k]]
        hits.append(labels[top].sum(0))
    return np.asarray(first, dtype=np.int64), np.asarray(hits, dtype=np.float64).reshape(-1, labels.shape[1])


MOMENT_CANDIDATES = 32  # a moment ranks at most this many of its group's impressions (bounds the pairs scored)


def moments(groups: np.ndarray, requests: np.ndarray, request_times: np.ndarray, min_size: int = 4,
            max_candidates: int = MOMENT_CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rankings of moment GAUC: at each request of a group with >= min_size impressions (the HIT@k groups), the
    group's impressions from that request's time on (its own included, at most max_candidates, nearest first),
    to be scored with that request's features. Nothing at or after a request's time is in its features, so no
    candidate's own action is; a request with a single such impression ranks nothing and is left out. Returns, per
    (moment, candidate) pair: the row whose features score it, the candidate's row, and the moment's id."""
    order = np.lexsort((request_times, groups))
    feature, candidate, moment = [], [], []
    for group in np.split(order, np.flatnonzero(np.diff(groups[order])) + 1):
        if len(group) < min_size:
            continue
        t = request_times[group]
        for k in np.flatnonzero(np.r_[True, requests[group][1:] != requests[group][:-1]]):  # each request once
            later = group[k:][t[k:] >= t[k]][:max_candidates]
            if len(later) < 2:
                continue
            feature.append(np.full(len(later), group[k])), candidate.append(later)
            moment.append(np.full(len(later), len(moment)))
    if not moment:
        return (np.zeros(0, np.int64),) * 3
    return np.concatenate(feature), np.concatenate(candidate), np.concatenate(moment)


def hit_at_k_bounds(groups: np.ndarray, labels: np.ndarray, k: int = 3, min_size: int = 4) -> dict[str, np.ndarray]:
    """What HIT@k can be on these groups whatever the model, per head (binary labels), over the groups
    hits_per_group counts: "random" (the expectation under a random order: k/n of a group's positives), "most"
    (an oracle that puts the head's positives first: min(k, positives)) and "fewest" (one that puts them last:
    max(0, k - negatives)).
    A lift target beyond most/baseline - 1 cannot be met on this log."""
    labels = np.asarray(labels) > 0
    sums, sizes = [], []
    for idx in _counted_groups(groups, min_size):
        sums.append(labels[idx].sum(0))
        sizes.append(len(idx))
    if not sums:
        nan = np.full(labels.shape[1], np.nan)
        return {"random": nan, "most": nan, "fewest": nan}
    pos, n = np.asarray(sums, dtype=np.float64), np.asarray(sizes, dtype=np.float64)[:, None]
    return {"random": (np.minimum(k, n) / n * pos).mean(0), "most": np.minimum(k, pos).mean(0),
            "fewest": np.maximum(0.0, np.minimum(k, n) - (n - pos)).mean(0)}


def recall_per_user(user_emb: np.ndarray, item_table: np.ndarray, future: list[set[int]], k: int = 10,
                    first_id: int = 2) -> np.ndarray:
    """|top-k retrieved ∩ future positives| / |future positives| for each user with a future positive, in order
    (padding/OOV rows are never retrieved)."""
    scores = user_emb @ item_table[first_id:].T
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k] + first_id
    return np.array([len(set(t.tolist()) & f) / len(f) for t, f in zip(top, future) if f], dtype=np.float64)


def lift(value: float, baseline: float) -> float:
    return float((value - baseline) / baseline) if baseline else float("nan")


# --- Uncertainty of a comparison: a paired bootstrap over test users ----------------------------------------------
# Rare heads have a few dozen test positives, so which users the test period happens to hold moves their AUC by more
# than the models differ. Resampling whole users (all their impressions together, the same draw for every model and
# seed) keeps the pairing and the within-user correlation that a per-impression bootstrap would ignore.

def user_bootstrap_counts(users: np.ndarray, n_boot: int, seed: int = 0, chunk: int = 100):
    """Yields (counts [b, U] float32, inverse [n]) with b <= chunk, n_boot rows in all: each row resamples the U
    distinct users with replacement (how often each was drawn); inverse maps each example to its user. Chunked so
    memory stays chunk x n floats whatever n_boot is; the draws depend on `seed` only."""
    _, inverse = np.unique(users, return_inverse=True)
    n_users = int(inverse.max()) + 1 if len(inverse) else 0
    if n_users == 0:  # nothing to resample
        return
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        yield rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=b).astype(np.float32), inverse


def user_bootstrap_weights(users: np.ndarray, n_boot: int, seed: int = 0, chunk: int = 100):
    """Yields [b, n] float32 example weights: user_bootstrap_counts with every example weighed by how often its user
    was drawn."""
    for counts, inverse in user_bootstrap_counts(users, n_boot, seed, chunk):
        yield counts[:, inverse]


def seed_resampled_mean(per_seed: np.ndarray, rng) -> np.ndarray:
    """[S, b] replicates of a statistic, one row per training seed (the same user draws in every row) -> [b]: the
    mean over S seeds drawn with replacement, a fresh draw per replicate. So an interval covers which seeds were
    trained as well as which users were tested; with one seed it is the user bootstrap alone."""
    n_seeds, b = per_seed.shape
    counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=b)  # [b, S]
    with np.errstate(invalid="ignore"):
        return (counts * per_seed.T).sum(1) / n_seeds


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one score vector under each row of example weights [b, n] -> [b] (ties count one half, as in
    auc(); integer weights give the AUC of the data with each example repeated that many times). NaN where a row
    weighs no positive or no negative."""
    order = np.argsort(scores, kind="stable")
    s, y, w = np.asarray(scores)[order], np.asarray(labels)[order] > 0, weights[:, order].astype(np.float64)
    first_of_tie = np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(first_of_tie) - 1
    starts = np.flatnonzero(first_of_tie)
    ends = np.r_[starts[1:], len(s)] - 1
    neg, pos = w * ~y, w * y
    cum = np.cumsum(neg, axis=1)
    below = cum[:, starts] - neg[:, starts]               # negative weight strictly below each tie group
    tied = cum[:, ends] - below                           # negative weight inside it
    num = (pos * (below + 0.5 * tied)[:, tie_id]).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def per_user_auc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUC of each distinct user's own impressions [U] (NaN for a user with one class only), impressions [U]),
    users in np.unique order."""
    _, inverse = np.unique(users, return_inverse=True)
    rows = pd.Series(np.arange(len(inverse))).groupby(inverse).indices
    aucs = np.array([auc(labels[idx], scores[idx]) for _, idx in sorted(rows.items())], dtype=np.float64)
    return aucs, np.bincount(inverse).astype(np.float64)


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Group AUC: each user's AUC over their own impressions, averaged with their impression counts as weights,
    over the users that have both a positive and a negative. It asks how well a user's own candidates are ordered,
    which is what a ranker serves; pooled AUC also rewards telling users apart."""
    aucs, n = per_user_auc(labels, scores, users)
    ok = np.isfinite(aucs)
    return float((aucs[ok] * n[ok]).sum() / n[ok].sum()) if ok.any() else float("nan")


def _interval(samples: np.ndarray, point: float, level: float) -> dict:
    samples = samples[np.isfinite(samples)]
    if not len(samples) or not np.isfinite(point):
        return {"value": None if not np.isfinite(point) else float(point), "ci": None, "share_at_or_below_0": None}
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return {"value": float(point), "ci": [float(lo), float(hi)],
            "share_at_or_below_0": float((samples <= 0).mean())}


def _per_seed(scores) -> list[np.ndarray]:
    return [scores] if isinstance(scores, np.ndarray) and scores.ndim == 1 else list(scores)


def auc_difference_ci(labels: np.ndarray, scores_a: list[np.ndarray], scores_b: list[np.ndarray],
                      users: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean over seeds of AUC(a_s) - AUC(b_s) (one score vector per training seed and model, paired by position),
    with the percentile interval of a bootstrap over test users and training seeds together
    (seed_resampled_mean)."""
    scores_a, scores_b = _per_seed(scores_a), _per_seed(scores_b)
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("scores_a and scores_b need one score vector per seed each, as many of both")
    if len(labels) == 0:
        return _interval(np.array([]), float("nan"), level)
    point = float(np.mean([auc(labels, a) - auc(labels, b) for a, b in zip(scores_a, scores_b)]))
    rng = np.random.default_rng([seed, 1])
    samples = [seed_resampled_mean(np.stack([weighted_auc(labels, a, w) - weighted_auc(labels, b, w)
                                             for a, b in zip(scores_a, scores_b)]), rng)
               for w in user_bootstrap_weights(users, n_boot, seed)]
    return _interval(np.concatenate(samples) if samples else np.array([]), point, level)


def gauc_difference_ci(labels: np.ndarray, scores_a: list[np.ndarray], scores_b: list[np.ndarray],
                       users: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                       groups: np.ndarray | None = None) -> dict:
    """auc_difference_ci for GAUC: the per-group AUCs are computed once per seed and model, and each replicate
    re-weighs groups by how often it drew their users (and resamples the seeds). Groups are the users by default;
    `groups` (each within one user, e.g. moment GAUC's moments) are averaged the same way and resampled with their
    user."""
    scores_a, scores_b = _per_seed(scores_a), _per_seed(scores_b)
    groups = users if groups is None else groups
    per_a = [per_user_auc(labels, a, groups) for a in scores_a]
    per_b = [per_user_auc(labels, b, groups) for b in scores_b]
    n = per_a[0][1]
    ok = np.isfinite(per_a[0][0])  # which groups have both classes depends on the labels only
    if not ok.any():
        return _interval(np.array([]), float("nan"), level)
    point = float(np.mean([gauc(labels, a, groups) - gauc(labels, b, groups) for a, b in zip(scores_a, scores_b)]))
    _, first_row = np.unique(groups, return_index=True)      # per_user_auc's order
    user_of_group = np.unique(users, return_inverse=True)[1][first_row]
    rng = np.random.default_rng([seed, 2])
    samples = []
    for counts, _ in user_bootstrap_counts(users, n_boot, seed):
        w = counts[:, user_of_group[ok]] * n[ok]            # [b, groups with both classes]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.stack([(w @ a[ok] - w @ b[ok]) / w.sum(1) for (a, _), (b, _) in zip(per_a, per_b)])
        samples.append(seed_resampled_mean(d, rng))
    return _interval(np.concatenate(samples), point, level)


def ratio_lift_ci(values_a, values_b, users: np.ndarray, n_boot: int = 1000,
                  level: float = 0.95, seed: int = 0) -> dict:
    """mean(a) / mean(b) - 1 over paired units (e.g. HIT@3 per user-day group), a and b each one array or a list
    of one array per training seed (the means are then taken over the seeds too), with a bootstrap interval over
    users and seeds."""
    values_a, values_b = _per_seed(values_a), _per_seed(values_b)
    point = (lift(float(np.mean(values_a)), float(np.mean(values_b))) if len(values_a[0]) else float("nan"))
    rng = np.random.default_rng([seed, 3])
    samples = []
    for w in user_bootstrap_weights(users, n_boot, seed):
        a = seed_resampled_mean(np.stack([w @ v for v in values_a]), rng)
        b = seed_resampled_mean(np.stack([w @ v for v in values_b]), rng)
        with np.errstate(invalid="ignore", divide="ignore"):
            samples.append(np.where(b > 0, a / np.where(b > 0, b, 1.0) - 1.0, np.nan))
    return _interval(np.concatenate(samples) if samples else np.array([]), point, level)


def complement_pairs(labels: np.ndarray, heads: list[str]) -> list[list[str]]:
    """Pairs of heads whose labels are exact complements on every row (KuaiRand's like and hate): one fact counted
    twice, so a comparison counts such a pair as one piece of evidence."""
    y = np.asarray(labels) > 0
    return [[heads[i], heads[j]] for i in range(len(heads)) for j in range(i + 1, len(heads))
            if len(y) and (y[:, i] ^ y[:, j]).all()]


def complement_of(pairs: list[list[str]], negative: list[str]) -> dict[str, str]:
    """For each complement pair, the head left uncounted -> the head counted: the negative one is dropped (hate =
    1 - like), or the second when neither or both are negative."""
    out = {}
    for a, b in pairs:
        drop, keep = (a, b) if a in negative and b not in negative else (b, a)
        out[drop] = keep
    return out
