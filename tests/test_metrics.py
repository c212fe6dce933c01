"""Offline metrics on hand-made cases: AUC with ties, HIT@k, the user bootstrap behind the evaluation's intervals."""
from __future__ import annotations

import numpy as np
import pytest

from seqrank import metrics as M


def test_auc_by_hand_with_ties():
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.9, 0.5, 0.1, 0.7])
    # positive 0.9: beats 0.1, 0.7, ties 0.9 -> 2.5 of 3; positive 0.5: beats 0.1 -> 1 of 3
    assert M.auc(labels, scores) == pytest.approx(3.5 / 6)
    assert np.isnan(M.auc(np.zeros(3), np.arange(3.0)))


def test_weighted_auc_equals_the_auc_of_the_data_repeated():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.2
    scores = np.round(rng.random(200), 1)  # many ties
    weights = rng.integers(0, 4, size=(3, 200))
    got = M.weighted_auc(labels, scores, weights.astype(np.float32))
    for row, w in zip(got, weights):
        assert row == pytest.approx(M.auc(np.repeat(labels, w), np.repeat(scores, w)), abs=1e-12)
    assert M.weighted_auc(labels, scores, np.ones((1, 200)))[0] == pytest.approx(M.auc(labels, scores), abs=1e-12)
    # and auc against every positive-negative pair counted directly (a tie counts one half)
    diff = scores[labels][:, None] - scores[~labels][None, :]
    assert M.auc(labels, scores) == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean(), abs=1e-12)
    assert np.isnan(M.weighted_auc(labels, scores, (~labels)[None].astype(float))[0])  # no positive weighed


def test_user_bootstrap_resamples_whole_users_and_depends_on_the_seed_only():
    users = np.array([7, 7, 7, 3, 3, 9])
    chunks = list(M.user_bootstrap_weights(users, n_boot=250, seed=1, chunk=100))
    assert [c.shape for c in chunks] == [(100, 6), (100, 6), (50, 6)]
    w = np.concatenate(chunks)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 3] == w[:, 4]).all()
    assert (w[:, [0, 3, 5]].sum(1) == 3).all()  # 3 distinct users drawn 3 times in all
    assert len({tuple(r) for r in w}) > 1
    again = np.concatenate(list(M.user_bootstrap_weights(users, n_boot=250, seed=1, chunk=100)))
    assert (again == w).all()


def test_auc_difference_interval_separates_a_better_model_and_not_an_equal_one():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(100), 10)
    labels = rng.random(1000) < 0.3
    noise = rng.normal(size=1000)
    weak, strong = noise + 0.3 * labels, noise + 1.5 * labels
    same = M.auc_difference_ci(labels, [weak], [weak], users, n_boot=200)
    assert same["value"] == 0 and same["ci"] == [0.0, 0.0]
    better = M.auc_difference_ci(labels, [strong, strong], [weak, weak], users, n_boot=200)
    assert better["value"] == pytest.approx(M.auc(labels, strong) - M.auc(labels, weak))
    assert 0 < better["ci"][0] < better["value"] < better["ci"][1] and better["share_at_or_below_0"] == 0
    # two equally good models that disagree, on a head with 8 positives: the interval straddles 0 and is wide
    few = np.zeros(1000, bool)
    few[rng.choice(1000, 8, replace=False)] = True
    close = M.auc_difference_ci(few, [rng.normal(size=1000) + few], [rng.normal(size=1000) + few], users, n_boot=200)
    assert close["ci"][0] < 0 < close["ci"][1] and close["ci"][1] - close["ci"][0] > 0.1
    with pytest.raises(ValueError, match="one score vector per seed"):
        M.auc_difference_ci(labels, [weak], [], users)


def test_hits_per_group_ranks_within_groups_and_shuffles_ties():
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])  # group 2 is too small
    labels = np.array([[1], [0], [0], [1], [0], [0], [0], [1], [1], [1]])
    scores = np.array([4.0, 3, 2, 1, 1, 1, 1, 1, 9, 9])
    rows, hits = M.hits_per_group(groups, labels, scores, k=3, min_size=4)
    assert rows.tolist() == [0, 4] and hits[0, 0] == 1  # the positive at score 1 is 4th
    # group 1 is all tied: over shuffle seeds its positive lands in the top 3 about 3 times in 4
    share = np.mean([M.hits_per_group(groups, labels, scores, k=3, seed=s)[1][1, 0] for s in range(400)])
    assert 0.65 < share < 0.85
    # no group large enough: no rows, one column per head (evaluate's mean over groups is then NaN)
    rows, hits = M.hits_per_group(groups[8:], labels[8:], scores[8:], k=3, min_size=4)
    assert rows.shape == (0,) and hits.shape == (0, 1)


def test_ratio_lift_interval_is_paired_over_users():
    users = np.arange(50)
    b = np.random.default_rng(0).random(50) + 0.5
    a = 2.0 * b  # each unit doubles: only a paired resampling gives exactly +100% every time
    out = M.ratio_lift_ci(a, b, users, n_boot=100)
    assert out["value"] == pytest.approx(1.0) and out["ci"] == pytest.approx([1.0, 1.0])
    assert M.ratio_lift_ci(a, np.zeros(50), users, n_boot=10)["ci"] is None  # no baseline hits: no lift
    empty = M.ratio_lift_ci(np.array([]), np.array([]), np.array([]), n_boot=10)  # e.g. no held-out user: no interval
    assert empty["ci"] is None and empty["value"] is None
    none = M.auc_difference_ci(np.array([]), [np.array([])], [np.array([])], np.array([]), n_boot=10)
    assert none["ci"] is None


def test_hit_at_k_bounds_by_hand():
    groups = np.array([0] * 5 + [1] * 4 + [2] * 2)  # group 2 is too small to count
    labels = np.array([[1], [1], [0], [0], [0], [1], [1], [1], [1], [1], [1]])
    b = M.hit_at_k_bounds(groups, labels, k=3, min_size=4)
    # group 0: 2 positives of 5; group 1: 4 of 4
    assert b["random"][0] == pytest.approx((3 / 5 * 2 + 3) / 2)
    assert b["most"][0] == pytest.approx((2 + 3) / 2) and b["fewest"][0] == pytest.approx((0 + 3) / 2)
    # and no ranking escapes them
    for seed in range(20):
        scores = np.random.default_rng(seed).random(len(groups))
        assert b["fewest"][0] <= M.hits_per_group(groups, labels, scores, k=3)[1][:, 0].mean() <= b["most"][0]


def test_recall_per_user_by_hand():
    table = np.array([[0, 0], [0, 0], [1, 0], [0, 1], [0.9, 0.1]], dtype=np.float32)  # rows 0/1: padding, OOV
    users = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    future = [{2, 3}, {2}, set()]  # the third user has no future positive: not counted
    got = M.recall_per_user(users, table, future, k=2)
    assert got.tolist() == [0.5, 0.0]  # user 0 retrieves 2 and 4; user 1 retrieves 3 and 4
    assert got.mean() == 0.25  # the Recall@10 evaluate reports is this mean


def test_gauc_by_hand_weighs_each_users_own_auc_by_their_impressions():
    # user a: 4 impressions, ordered perfectly (AUC 1); user b: 2 impressions, reversed (AUC 0); user c: one class
    users = np.array(["a"] * 4 + ["b"] * 2 + ["c"] * 3)
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.2, 0.1, 0.1, 0.9, 0.5, 0.5, 0.5])
    assert M.gauc(labels, scores, users) == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)
    aucs, n = M.per_user_auc(labels, scores, users)
    assert aucs[:2].tolist() == [1.0, 0.0] and np.isnan(aucs[2]) and n.tolist() == [4, 2, 3]
    # a score that only tells users apart (every impression of a gets 1, of b 0) has pooled AUC above 0.5 and GAUC 0.5
    users2, labels2 = np.array(["a"] * 4 + ["b"] * 4), np.array([1, 1, 1, 0, 1, 0, 0, 0])
    apart = np.where(users2 == "a", 1.0, 0.0)
    assert M.auc(labels2, apart) == pytest.approx(0.75) and M.gauc(labels2, apart, users2) == 0.5


def test_intervals_resample_training_seeds_as_well_as_users():
    """Two seeds of model a: one far better than b, one level with it. A user bootstrap alone on their mean gives a
    narrow interval; resampling the seeds too must widen it to cover both seeds' differences."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(300), 10)
    labels = rng.random(3000) < 0.3
    noise = rng.normal(size=3000)
    b = noise + 0.5 * labels
    good, level = noise + 2.0 * labels, noise + 0.5 * labels + 0.01 * rng.normal(size=3000)
    d = M.auc_difference_ci(labels, [good, level], [b, b], users, n_boot=400)
    good_alone = M.auc_difference_ci(labels, [good], [b], users, n_boot=400)
    assert d["ci"][0] < 0.05 and d["ci"][1] > 0.9 * good_alone["value"]   # spans from "level" to "much better"
    g = M.gauc_difference_ci(labels, [good, level], [b, b], users, n_boot=400)
    assert g["value"] == pytest.approx(np.mean([M.gauc(labels, x, users) - M.gauc(labels, b, users)
                                                for x in (good, level)]))
    assert g["ci"][0] < 0.05 and g["ci"][1] > 0.1
    one_seed = M.gauc_difference_ci(labels, [good], [b], users, n_boot=400)
    assert one_seed["ci"][0] > 0.1                                          # one seed: only users vary
    lift = M.ratio_lift_ci([2.0 * np.ones(300), np.ones(300)], [np.ones(300), np.ones(300)], np.arange(300), 400)
    assert lift["value"] == pytest.approx(0.5) and lift["ci"][0] == pytest.approx(0.0) and lift["ci"][1] == 1.0
    counts = np.random.default_rng(1)
    per_seed = np.array([[1.0] * 50, [3.0] * 50])
    assert set(np.round(M.seed_resampled_mean(per_seed, counts), 6)) <= {1.0, 2.0, 3.0}


def test_complement_pairs_finds_heads_that_are_one_fact():
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0]])
    assert M.complement_pairs(labels, ["like", "hate", "click"]) == [["like", "hate"]]
    assert M.complement_pairs(labels[:, [0, 2]], ["like", "click"]) == []


def test_complement_of_drops_the_negative_head_of_a_pair_whichever_comes_first():
    assert M.complement_of([["like", "hate"]], ["hate"]) == {"hate": "like"}
    assert M.complement_of([["hate", "like"]], ["hate"]) == {"hate": "like"}
    assert M.complement_of([["a", "b"]], []) == {"b": "a"}


def test_moments_rank_a_requests_own_impressions_and_the_groups_later_ones_each_request_once():
    # group 0: requests 10 (two impressions at t=0), 11 (t=5), 12 (t=9); group 1 has 3 impressions (< 4)
    groups = np.array([0, 0, 0, 0, 1, 1, 1])
    requests = np.array([10, 11, 10, 12, 20, 21, 22])
    times = np.array([0, 5, 0, 9, 0, 1, 2])
    feature, candidate, moment = M.moments(groups, requests, times)
    got = {m: (set(feature[moment == m]), set(candidate[moment == m])) for m in np.unique(moment)}
    # request 10 ranks all four; request 11 ranks itself and request 12; request 12 alone ranks nothing
    assert got == {0: ({0}, {0, 1, 2, 3}), 1: ({1}, {1, 3})}
    assert (times[candidate] >= times[feature]).all()  # never a candidate whose action is in the features
    assert [len(x) for x in M.moments(groups, requests, times, max_candidates=2)] == [4, 4, 4]


def test_gauc_interval_over_groups_resamples_each_group_with_its_user():
    """Groups inside users (moment GAUC): the point is the groups' AUCs weighted by size, and the interval draws
    users, so a user's groups move together: with one user there is nothing to resample."""
    rng = np.random.default_rng(0)
    n_users, per_user = 60, 40
    users = np.repeat([f"u{i}" for i in range(n_users)], per_user)
    groups = np.repeat(np.arange(n_users * 4), per_user // 4)  # four groups per user
    labels = rng.random(len(users)) < 0.3
    good = labels + rng.normal(0, 1.0, len(users))       # informative within every group
    noise = rng.normal(0, 1.0, len(users))
    d = M.gauc_difference_ci(labels.astype(int), [good], [noise], users, n_boot=300, groups=groups)
    assert d["value"] == pytest.approx(M.gauc(labels.astype(int), good, groups) - M.gauc(labels.astype(int), noise, groups))
    assert d["ci"][0] > 0
    one = users == "u0"
    single = M.gauc_difference_ci(labels[one].astype(int), [good[one]], [noise[one]], users[one], n_boot=50,
                                  groups=groups[one])
    assert single["ci"][0] == pytest.approx(single["ci"][1])
    # groups = users is the plain per-user GAUC interval
    assert M.gauc_difference_ci(labels.astype(int), [good], [noise], users, n_boot=100, groups=users) == \
        M.gauc_difference_ci(labels.astype(int), [good], [noise], users, n_boot=100)
