"""Tests for the models (seqrank.models), their losses, training determinism and ONNX export parity.

Small randomly initialised models in eval mode; every property is checked against an explicit reference
(a hand-computed number, a plain re-computation, or the same model on a modified input).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from seqrank.config import PinnerFormerConfig, RunConfig, TransActConfig
from seqrank.data.loaders import EventLog
from seqrank.dataset import prepare
from seqrank.features import FIRST_ID, N_CONTEXT
from seqrank.models.layers import Dropout
from seqrank.models.pinnerformer import N_TIME_FEATURES, PinnerFormer, sampled_softmax_loss, time_features
from seqrank.models.transact import (INPUT_NAMES, TransActRanker, time_window_mask,
                                     weighted_multitask_bce)

N_ITEMS, N_ACTIONS, USER_DIM, N_HEADS, TABLE_DIM = 40, 6, 6, 3, 5


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_global_state():
    """seqrank.training.seed_everything switches torch to deterministic algorithms and sets the thread count for the
    process; put both back so the rest of the session is unaffected."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def small_transact_cfg(**kw) -> TransActConfig:
    # the paper's form (no raw-mean feature): every test here then sees what TransAct itself computes
    base = dict(action_dim=4, item_dim=6, n_layers=2, n_heads=2, d_ff=12, dropout=0.1, top_k_rows=3,
                cross_layers=2, cross_rank=4, mlp=[16, 8], seq_len=7, sequence_mean=False)
    return TransActConfig(**{**base, **kw})


def make_ranker(encoder: str = "transact", seed: int = 0, n_items: int = N_ITEMS, **kw) -> TransActRanker:
    torch.manual_seed(seed)
    table = np.random.default_rng(seed).normal(size=(n_items, TABLE_DIM)).astype(np.float32)
    table[0] = 0.0
    model = TransActRanker(small_transact_cfg(sequence_encoder=encoder, **kw), table, N_ACTIONS, USER_DIM,
                           N_CONTEXT, N_HEADS)
    return model.eval()


def ranker_inputs(lengths, S: int, n_cand: int, seed: int = 0, pad_item: int = 0, pad_action: int = 0):
    """Ranker inputs with the given real lengths per request; padded positions hold pad_item / pad_action."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(S)[None, :] < torch.as_tensor(lengths)[:, None]
    item = torch.where(mask, torch.randint(FIRST_ID, N_ITEMS, (B, S), generator=g), pad_item)
    action = torch.where(mask, torch.randint(FIRST_ID, N_ACTIONS, (B, S), generator=g), pad_action)
    user = torch.randn(B, USER_DIM, generator=g)
    context = torch.randn(B, N_CONTEXT, generator=g)
    cand = torch.randint(FIRST_ID, N_ITEMS, (B, n_cand), generator=g)
    return item, action, mask, user, context, cand


# ------------------------------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("encoder,extra", [("transact", {}), ("avg_pool", {}), ("transact", {"sequence_mean": True})])
def test_padded_positions_never_change_the_output(encoder, extra):
    model = make_ranker(encoder, **extra)
    S = 7
    item, action, mask, user, ctx, cand = ranker_inputs([7, 3, 1, 5], S, 4)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        ref = model(item, action, mask, user, ctx, cand)
        for _ in range(3):
            other_item = torch.where(mask, item, torch.randint(0, N_ITEMS, item.shape, generator=g))
            other_action = torch.where(mask, action, torch.randint(0, N_ACTIONS, action.shape, generator=g))
            assert not torch.equal(other_item, item)
            torch.testing.assert_close(model(other_item, other_action, mask, user, ctx, cand), ref,
                                       rtol=0, atol=1e-6)
        # ...while a real position does matter (the check above can fail)
        changed = item.clone()
        changed[1, 0] = (item[1, 0] + 1 - FIRST_ID) % (N_ITEMS - FIRST_ID) + FIRST_ID
        diff = (model(changed, action, mask, user, ctx, cand) - ref).abs()
        assert diff[1].max() > 1e-5
        assert diff[[0, 2, 3]].max() <= 1e-6  # other requests are untouched


@pytest.mark.parametrize("encoder", ["transact", "avg_pool", "no_sequence"])
def test_all_padding_history_is_finite_and_ignores_padded_ids(encoder):
    model = make_ranker(encoder)
    S = 7
    item, action, mask, user, ctx, cand = ranker_inputs([0, 0, 4], S, 5)
    g = torch.Generator().manual_seed(5)
    noisy_item = torch.where(mask, item, torch.randint(0, N_ITEMS, item.shape, generator=g))
    noisy_action = torch.where(mask, action, torch.randint(0, N_ACTIONS, action.shape, generator=g))
    with torch.no_grad():
        a = model(item, action, mask, user, ctx, cand)
        b = model(noisy_item, noisy_action, mask, user, ctx, cand)
        logits = model.logits(noisy_item, noisy_action, mask, user, ctx, cand)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(logits).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ((a > 0) & (a < 1)).all()
    if encoder == "transact":
        # an empty history contributes an all-zero block: the encoder's output is exactly zero for it
        with torch.no_grad():
            seq = torch.cat([model.action_emb(noisy_action), model.item_embedding(noisy_item)], dim=-1)
            first = (torch.arange(S) == 0).expand(3, S)
            attend = mask | (first & ~mask.any(1, keepdim=True))
            out = model.encoder(seq, attend, mask, model.item_embedding(cand))
        assert (out[:2] == 0).all() and out[2].abs().max() > 0


def test_time_window_mask_hides_only_recent_actions_and_never_a_whole_row():
    B, S, max_h = 64, 6, 24.0
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    lengths[:4] = torch.tensor([0, 1, S, 2])
    mask = torch.arange(S)[None, :] < lengths[:, None]
    # ages in seconds, increasing with position (newest first); padding ages are garbage on purpose
    age = torch.sort(torch.rand(B, S, generator=g, dtype=torch.float64) * 36 * 3600, dim=1).values
    age = torch.where(mask, age, torch.tensor(-1.0, dtype=torch.float64))
    gen = torch.Generator().manual_seed(123)
    T = torch.rand(B, 1, generator=torch.Generator().manual_seed(123)) * max_h * 3600.0  # the same draw
    out = time_window_mask(mask, age, max_h, gen)
    assert out.dtype == torch.bool and out.shape == mask.shape
    assert not (out & ~mask).any()                       # never un-masks padding
    had = mask.any(1)
    assert (out.any(1) == had).all()                     # a row with actions keeps at least one
    for b in range(B):
        if had[b] and (mask[b] & (age[b] >= T[b])).any():
            # exactly the actions younger than T are hidden
            assert out[b].tolist() == (mask[b] & (age[b] >= T[b])).tolist()
        else:
            assert out[b].tolist() == mask[b].tolist()   # would have hidden everything: keeps all
    # it does hide something somewhere, and only recent actions: every hidden action is younger than every kept one
    hidden = mask & ~out
    assert hidden.any()
    for b in range(B):
        if hidden[b].any() and out[b].any():
            assert age[b][hidden[b]].max() < age[b][out[b]].min()
    # deterministic for a generator seed
    assert torch.equal(out, time_window_mask(mask, age, max_h, torch.Generator().manual_seed(123)))


# ------------------------------------------------------------------------------------------ early fusion / dedup

@pytest.mark.parametrize("encoder", ["transact", "avg_pool", "no_sequence"])
def test_candidates_are_scored_independently(encoder):
    model = make_ranker(encoder)
    N = 6
    item, action, mask, user, ctx, cand = ranker_inputs([7, 2, 0], 7, N, seed=4)
    with torch.no_grad():
        together = model(item, action, mask, user, ctx, cand)
        assert together.shape == (3, N, N_HEADS)
        for j in range(N):
            alone = model(item, action, mask, user, ctx, cand[:, j:j + 1])
            torch.testing.assert_close(alone[:, 0], together[:, j], rtol=0, atol=1e-5)
        # reordering / replacing other candidates never changes a candidate's score
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(item, action, mask, user, ctx, cand[:, perm]), together[:, perm],
                                   rtol=0, atol=1e-5)
        # and the candidate does matter (the early fusion is not a no-op)
        assert (together[:, 0] - together[:, 1]).abs().max() > 1e-5 or torch.equal(cand[:, 0], cand[:, 1])


def test_request_level_dedup_equals_one_row_per_candidate():
    """User-side inputs broadcast over N candidates == the same user inputs repeated once per candidate."""
    model = make_ranker("transact")
    item, action, mask, user, ctx, cand = ranker_inputs([5], 7, 4, seed=8)
    with torch.no_grad():
        batched = model(item, action, mask, user, ctx, cand)[0]                    # [N,H]
        rep = lambda t: t.expand(4, *t.shape[1:])  # noqa: E731
        per_row = model(rep(item), rep(action), rep(mask), rep(user), rep(ctx), cand.T)[:, 0]
    torch.testing.assert_close(batched, per_row, rtol=0, atol=1e-5)


def test_first_layer_qkv_precompute_equals_plain_projection():
    model = make_ranker("transact")
    enc = model.encoder
    B, S, N = 3, 7, 5
    item, action, mask, user, ctx, cand = ranker_inputs([7, 3, 1], S, N, seed=2)
    with torch.no_grad():
        seq = torch.cat([model.action_emb(action), model.item_embedding(item)], dim=-1)
        cand_emb = model.item_embedding(cand)
        captured = {}

        def grab(module, args):
            captured["x"], captured["qkv"] = args[0], args[3]

        handle = enc.layers[0].attn.register_forward_pre_hook(grab)
        try:
            out = enc(seq, mask, mask, cand_emb)
        finally:
            handle.remove()
        x = torch.cat([seq.unsqueeze(1).expand(B, N, S, -1), cand_emb.unsqueeze(2).expand(B, N, S, -1)], dim=-1)
        plain = enc.layers[0].attn.qkv(x)
        assert captured["qkv"] is not None and captured["qkv"].shape == plain.shape
        torch.testing.assert_close(captured["qkv"], plain, rtol=0, atol=1e-5)
        torch.testing.assert_close(captured["x"], x, rtol=0, atol=0)
        # the whole encoder equals a plain reference without the precomputation
        h = x
        key_mask = mask.unsqueeze(1)
        for layer in enc.layers:
            h = layer(h, key_mask)
        valid = mask[:, None, :, None]
        h = h * valid
        pooled = h.masked_fill(~valid, -1e4).amax(2, keepdim=True)
        K = enc.k
        rows = torch.cat([h, h.new_zeros(B, N, K, h.shape[-1])], dim=2)[:, :, :K]
        ref = torch.cat([rows, pooled], dim=2).flatten(2)
    assert out.shape == (B, N, enc.out_dim) and enc.out_dim % x.shape[-1] == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # rows past a short sequence are zero (sequence 3 has one action; K = 3)
    assert (out[2].reshape(N, enc.out_dim // x.shape[-1], -1)[:, 1:K] == 0).all()


def test_sequence_mean_feeds_transact_exactly_the_avg_pool_feature():
    """transact.sequence_mean: TransAct's ranker also sees the mean of the raw action rows, computed like avg_pool."""
    plain, with_mean, avg = make_ranker("transact"), make_ranker("transact", sequence_mean=True), make_ranker("avg_pool")
    ds = with_mean.cfg.action_dim + with_mean.cfg.item_dim
    assert with_mean.cross.v[0].in_features == plain.cross.v[0].in_features + ds
    item, action, mask, user, ctx, cand = ranker_inputs([7, 2], 7, 3)
    captured = {}
    for name, model in (("with_mean", with_mean), ("avg", avg)):
        model.load_state_dict({k: v for k, v in with_mean.state_dict().items()
                               if k in ("item_table", "item_proj.weight", "item_proj.bias", "action_emb.weight")},
                              strict=False)
        handle = model.cross.register_forward_pre_hook(lambda m, a, name=name: captured.__setitem__(name, a[0]))
        with torch.no_grad():
            model(item, action, mask, user, ctx, cand)
        handle.remove()
    n_tail = USER_DIM + with_mean.cfg.item_dim + N_CONTEXT  # user emb, candidate, context follow the sequence part
    torch.testing.assert_close(captured["with_mean"][..., -n_tail - ds:-n_tail], captured["avg"][..., :ds])


# ------------------------------------------------------------------------------------------------------- losses

def _bce(x: float, y: float) -> float:
    p = 1.0 / (1.0 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_weighted_multitask_bce_by_hand():
    # heads: click, hate (negative), like; the second impression carries a hate
    logits = [[0.5, -1.0, 2.0], [-0.3, 0.7, 0.0]]
    labels = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    w = 3.0
    weights = [[1, 1, 1], [w, 1, w]]  # a hidden item weighs `w` on every positive head, 1 on the negative head
    num = sum(weights[e][h] * _bce(logits[e][h], labels[e][h]) for e in range(2) for h in range(3))
    expected = num / (3 + (w + 1 + w))
    # written out: (-log s(.5) - log(1-s(-1)) - log s(2) + 3*(-log(1-s(-.3))) - log s(.7) + 3*(-log s(0))) / 10
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = (-math.log(s(0.5)) - math.log(1 - s(-1.0)) - math.log(s(2.0))
               - 3 * math.log(1 - s(-0.3)) - math.log(s(0.7)) - 3 * math.log(s(0.0))) / 10
    assert expected == pytest.approx(by_hand, rel=1e-12)
    got = weighted_multitask_bce(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64),
                                 torch.tensor([False, True, False]), w)
    assert got.item() == pytest.approx(by_hand, rel=1e-9)
    # without a negative label every weight is 1: a plain mean
    got1 = weighted_multitask_bce(torch.tensor(logits[:1]), torch.tensor(labels[:1]),
                                  torch.tensor([False, True, False]), w)
    assert got1.item() == pytest.approx(sum(_bce(x, y) for x, y in zip(logits[0], labels[0])) / 3, rel=1e-6)


# sampled softmax: 3 queries in 2-d, temperature 1
Q_EMB = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
T_EMB = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
R_EMB = [[-1.0, 0.0], [0.6, -0.8]]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _log_softmax(logits: list[float], target: int, keep: list[int]) -> float:
    """log softmax of logits[target] over only the columns in keep."""
    return logits[target] - math.log(sum(math.exp(logits[j]) for j in keep))


def _expected_loss(users, target_ids, random_ids, log_q_t, log_q_r) -> float:
    Q, R = len(Q_EMB), len(R_EMB)
    in_batch = 0.0
    for i in range(Q):
        logits = [_dot(Q_EMB[i], T_EMB[j]) - log_q_t[j] for j in range(Q)]
        keep = [j for j in range(Q) if j == i or (users[j] != users[i] and target_ids[j] != target_ids[i])]
        in_batch -= _log_softmax(logits, i, keep) / Q
    rand = 0.0
    mean_q = sum(log_q_r) / R
    for i in range(Q):
        logits = [_dot(Q_EMB[i], T_EMB[i]) - mean_q] + [_dot(Q_EMB[i], R_EMB[k]) - log_q_r[k] for k in range(R)]
        keep = [0] + [1 + k for k in range(R) if random_ids[k] != target_ids[i]]
        rand -= _log_softmax(logits, 0, keep) / Q
    return in_batch + rand


def _loss(users, target_ids, random_ids, log_q_t, log_q_r):
    t = lambda x, **kw: torch.tensor(x, dtype=torch.float64, **kw)  # noqa: E731
    return sampled_softmax_loss(t(Q_EMB), t(T_EMB), torch.tensor(target_ids), torch.tensor(users), t(R_EMB),
                                torch.tensor(random_ids), t(log_q_t), t(log_q_r),
                                torch.tensor(1.0, dtype=torch.float64)).item()


def test_sampled_softmax_by_hand_without_correction():
    # all distinct users and items, no logQ: plain softmaxes, written out for query 0
    l0 = [0.8, 0.0, 1.0]   # q0 . t_j
    r0 = [0.8, -1.0, 0.6]  # [q0 . t0 | q0 . r_k]
    q0_in = -(0.8 - math.log(math.exp(0.8) + math.exp(0.0) + math.exp(1.0)))
    q0_rand = -(0.8 - math.log(math.exp(0.8) + math.exp(-1.0) + math.exp(0.6)))
    assert q0_in == pytest.approx(-_log_softmax(l0, 0, [0, 1, 2]))
    assert q0_rand == pytest.approx(-_log_softmax(r0, 0, [0, 1, 2]))
    l1, l2 = [0.6, 1.0, 0.0], [0.96, 0.8, 0.6]
    q1_in = -(1.0 - math.log(math.exp(0.6) + math.exp(1.0) + math.exp(0.0)))
    q2_in = -(0.6 - math.log(math.exp(0.96) + math.exp(0.8) + math.exp(0.6)))
    q1_rand = -(1.0 - math.log(math.exp(1.0) + math.exp(0.0) + math.exp(-0.8)))
    q2_rand = -(0.6 - math.log(math.exp(0.6) + math.exp(-0.6) + math.exp(-0.28)))
    assert q2_in == pytest.approx(-_log_softmax(l2, 2, [0, 1, 2]))
    assert q1_in == pytest.approx(-_log_softmax(l1, 1, [0, 1, 2]))
    expected = (q0_in + q1_in + q2_in) / 3 + (q0_rand + q1_rand + q2_rand) / 3
    got = _loss([0, 1, 2], [10, 11, 12], [20, 21], [0.0] * 3, [0.0] * 2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert _expected_loss([0, 1, 2], [10, 11, 12], [20, 21], [0.0] * 3, [0.0] * 2) == pytest.approx(expected)


def test_sampled_softmax_log_q_correction_by_hand():
    users, ids, rids = [0, 1, 2], [10, 11, 12], [20, 21]
    log_q_t = [math.log(0.5), math.log(0.25), math.log(0.25)]
    log_q_r = [math.log(0.25), math.log(0.25)]
    plain = _loss(users, ids, rids, [0.0] * 3, [0.0] * 2)
    corrected = _loss(users, ids, rids, log_q_t, log_q_r)
    # in-batch, query 0, by hand: logits q0.t_j - log q_j = [0.8 + log 2, 0 + log 4, 1 + log 4]
    q0 = -(0.8 + math.log(2) - math.log(math.exp(0.8 + math.log(2)) + math.exp(math.log(4))
                                        + math.exp(1 + math.log(4))))
    q1 = -(1 + math.log(4) - math.log(math.exp(0.6 + math.log(2)) + math.exp(1 + math.log(4)) + math.exp(math.log(4))))
    q2 = -(0.6 + math.log(4) - math.log(math.exp(0.96 + math.log(2)) + math.exp(0.8 + math.log(4))
                                        + math.exp(0.6 + math.log(4))))
    # the random part: a uniform log q shifts the positive and every random negative alike, so it is unchanged
    rand = (-(0.8 - math.log(math.exp(0.8) + math.exp(-1.0) + math.exp(0.6)))
            - (1.0 - math.log(math.exp(1.0) + math.exp(0.0) + math.exp(-0.8)))
            - (0.6 - math.log(math.exp(0.6) + math.exp(-0.6) + math.exp(-0.28)))) / 3
    assert corrected == pytest.approx((q0 + q1 + q2) / 3 + rand, rel=1e-9)
    assert corrected == pytest.approx(_expected_loss(users, ids, rids, log_q_t, log_q_r), rel=1e-9)
    # the correction changes the loss by exactly the in-batch difference computed by hand
    plain_in = _expected_loss(users, ids, rids, [0.0] * 3, [0.0] * 2) - rand
    assert corrected - plain == pytest.approx((q0 + q1 + q2) / 3 - plain_in, rel=1e-9)
    assert abs(corrected - plain) > 1e-3


def test_sampled_softmax_masks_the_same_users_other_targets():
    # queries 0 and 1 belong to the same user: each one's negatives exclude the other's target
    users, ids, rids = [7, 7, 3], [10, 11, 12], [20, 21]
    got = _loss(users, ids, rids, [0.0] * 3, [0.0] * 2)
    l0, l1, l2 = [0.8, 0.0, 1.0], [0.6, 1.0, 0.0], [0.96, 0.8, 0.6]
    in_batch = -(_log_softmax(l0, 0, [0, 2]) + _log_softmax(l1, 1, [1, 2]) + _log_softmax(l2, 2, [0, 1, 2])) / 3
    # query 0 by hand over the unmasked columns only
    assert -_log_softmax(l0, 0, [0, 2]) == pytest.approx(-(0.8 - math.log(math.exp(0.8) + math.exp(1.0))))
    # the random part by hand: the random negatives (items 20, 21) are nobody's target, so nothing is masked there
    rand = (-(0.8 - math.log(math.exp(0.8) + math.exp(-1.0) + math.exp(0.6)))
            - (1.0 - math.log(math.exp(1.0) + math.exp(0.0) + math.exp(-0.8)))
            - (0.6 - math.log(math.exp(0.6) + math.exp(-0.6) + math.exp(-0.28)))) / 3
    assert got == pytest.approx(in_batch + rand, rel=1e-9)
    # not what an unmasked softmax would give
    assert abs(got - _loss([0, 1, 2], ids, rids, [0.0] * 3, [0.0] * 2)) > 1e-3


def test_sampled_softmax_masks_accidental_hits():
    # (c) random negative 0 is query 0's own target item: masked for query 0 only
    users, ids = [0, 1, 2], [10, 11, 12]
    got = _loss(users, ids, [10, 21], [0.0] * 3, [0.0] * 2)
    rand = (-_log_softmax([0.8, -1.0, 0.6], 0, [0, 2])           # q0: r0 masked
            - _log_softmax([1.0, 0.0, -0.8], 0, [0, 1, 2])
            - _log_softmax([0.6, -0.6, -0.28], 0, [0, 1, 2])) / 3
    in_batch = -(_log_softmax([0.8, 0.0, 1.0], 0, [0, 1, 2]) + _log_softmax([0.6, 1.0, 0.0], 1, [0, 1, 2])
                 + _log_softmax([0.96, 0.8, 0.6], 2, [0, 1, 2])) / 3
    assert got == pytest.approx(in_batch + rand, rel=1e-9)
    assert abs(got - _loss(users, ids, [20, 21], [0.0] * 3, [0.0] * 2)) > 1e-3
    # in-batch accidental hit: queries 0 and 2 share a target item (different users): masked for each other
    got2 = _loss(users, [10, 11, 10], [20, 21], [0.0] * 3, [0.0] * 2)
    in_batch2 = -(_log_softmax([0.8, 0.0, 1.0], 0, [0, 1]) + _log_softmax([0.6, 1.0, 0.0], 1, [0, 1, 2])
                  + _log_softmax([0.96, 0.8, 0.6], 2, [1, 2])) / 3
    rand2 = -(_log_softmax([0.8, -1.0, 0.6], 0, [0, 1, 2]) + _log_softmax([1.0, 0.0, -0.8], 0, [0, 1, 2])
              + _log_softmax([0.6, -0.6, -0.28], 0, [0, 1, 2])) / 3   # no random id hits a target here
    assert got2 == pytest.approx(in_batch2 + rand2, rel=1e-9)


# -------------------------------------------------------------------------------------------------- PinnerFormer

def small_pf_cfg(**kw) -> PinnerFormerConfig:
    base = dict(max_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=16, dim=6, dropout=0.1)
    return PinnerFormerConfig(**{**base, **kw})


def pf_history(g: torch.Generator, lengths=(8, 6), L: int = 8):
    """Random newest-first PinnerFormer inputs, padding after each row's last real action."""
    B = len(lengths)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    item = torch.randint(FIRST_ID, N_ITEMS, (B, L), generator=g) * mask
    action = torch.randint(FIRST_ID, N_ACTIONS, (B, L), generator=g) * mask
    tfeat = torch.randn(B, L, N_TIME_FEATURES, generator=g) * mask[..., None]
    return item, action, tfeat, mask


def test_pinnerformer_time_features_do_not_depend_on_the_batch_width():
    """Training trims each batch to its longest history, the daily batch job pads to max_len: a user's time features
    must be the same either way. The oldest action in view has no older one to measure a gap to (0), the others the
    hours to the next older action."""
    hour = 3_600_000
    ts = np.array([[10 * hour, 7 * hour, 6 * hour]], dtype=np.int64)  # newest first
    mask = np.ones((1, 3), dtype=bool)
    narrow = time_features(ts, mask)
    wide = time_features(np.pad(ts, ((0, 0), (0, 5))), np.pad(mask, ((0, 0), (0, 5))))
    np.testing.assert_array_equal(wide[:, :3], narrow)
    assert (wide[:, 3:] == 0).all()
    np.testing.assert_allclose(narrow[0, :, 0], np.log1p([3.0, 1.0, 0.0]), rtol=1e-6)


def test_pinnerformer_is_causal_newest_first():
    torch.manual_seed(0)
    model = PinnerFormer(small_pf_cfg(), N_ITEMS, N_ACTIONS).eval()
    g = torch.Generator().manual_seed(1)
    B, L = 2, 8
    item, action, tfeat, mask = pf_history(g)
    with torch.no_grad():
        ref = model.encode(item, action, tfeat, mask)
        for i in range(1, 6):
            new_item, new_action, new_t = item.clone(), action.clone(), tfeat.clone()
            new_item[:, :i] = torch.randint(FIRST_ID, N_ITEMS, (B, i), generator=g)
            new_action[:, :i] = torch.randint(FIRST_ID, N_ACTIONS, (B, i), generator=g)
            new_t[:, :i] = torch.randn(B, i, N_TIME_FEATURES, generator=g)
            out = model.encode(new_item, new_action, new_t, mask)
            # positions i and older (j >= i) never see the newer actions
            torch.testing.assert_close(out[:, i:][mask[:, i:]], ref[:, i:][mask[:, i:]], rtol=0, atol=1e-6)
            # the newest changed position does see its own change (the check above can fail)
            assert (out[:, i - 1] - ref[:, i - 1]).abs().max() > 1e-4
        # the user embedding is the output at position 0; padding never changes it
        emb = model(item, action, tfeat, mask)
        torch.testing.assert_close(emb, ref[:, 0], rtol=0, atol=0)
        padded_item = torch.where(mask, item, torch.randint(FIRST_ID, N_ITEMS, (B, L), generator=g))
        torch.testing.assert_close(model(padded_item, action, tfeat, mask), emb, rtol=0, atol=1e-6)
        empty = model(item * 0, action * 0, tfeat * 0, torch.zeros(B, L, dtype=torch.bool))
    assert torch.isfinite(empty).all() and (empty == 0).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B), rtol=0, atol=1e-5)


def test_a_training_position_sees_what_a_request_right_after_it_would_see():
    """Training queries PinnerFormer at every position; serving at position 0 of a request made later. The output at
    position i must equal the user embedding of the history that ends at action i (the sequence with the i newer
    actions dropped): positions are counted from the oldest action, so position i's input never says how many
    actions came after it."""
    torch.manual_seed(0)
    model = PinnerFormer(small_pf_cfg(), N_ITEMS, N_ACTIONS).eval()
    item, action, tfeat, mask = pf_history(torch.Generator().manual_seed(2))
    worst = 0.0
    with torch.no_grad():
        full = model.encode(item, action, tfeat, mask)
        for i in range(1, 5):
            # drop the i newest actions: shift left, pad at the end
            shift = lambda t: torch.cat([t[:, i:], torch.zeros_like(t[:, :i])], dim=1)  # noqa: E731
            emb = model(shift(item), shift(action), shift(tfeat), shift(mask))
            worst = max(worst, float((emb - full[:, i]).abs().max()))
    assert worst < 1e-5


# ------------------------------------------------------------------------------------------- training / determinism

def synthetic_log(n_users: int = 14, seed: int = 0) -> EventLog:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        t = int(rng.integers(0, 10 * 3_600_000))
        for _ in range(int(rng.integers(6, 10))):
            for _ in range(int(rng.integers(2, 6))):
                item = f"i{int(rng.zipf(1.6)) % 30}"
                for a in rng.choice(["click", "like", "hate", "impression"], size=int(rng.integers(1, 3)),
                                    replace=False, p=[0.35, 0.3, 0.1, 0.25]):
                    rows.append((f"u{u}", item, str(a), t))
                t += int(rng.integers(1, 10)) * 60_000
            t += int(rng.integers(2, 30)) * 3_600_000
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]).drop_duplicates()
    ev = ev.sort_values(["user_id", "timestamp", "item_id", "action"], kind="mergesort").reset_index(drop=True)
    ev["timestamp"] = ev.timestamp.astype(np.int64)
    return EventLog(events=ev, source="synthetic", fmt="canonical", duplicates_dropped=0,
                    negative_actions=("hate",), exposure_action="impression")


TINY_CFG = {"seed": 0, "threads": 2,
            "pinnerformer": {"max_len": 16, "d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 16, "dim": 8,
                             "random_negatives": 16, "positions_per_user": 4, "batch_users": 4, "epochs": 1},
            "transact": {"seq_len": 8, "action_dim": 4, "item_dim": 4, "n_layers": 1, "n_heads": 1, "d_ff": 8,
                         "top_k_rows": 2, "cross_layers": 1, "cross_rank": 4, "mlp": [8], "batch_size": 32,
                         "epochs": 1}}


@pytest.fixture(scope="module")
def tiny():
    from seqrank.training import seed_everything
    cfg = RunConfig.from_dict(TINY_CFG)
    seed_everything(cfg.seed, cfg.threads)
    prep = prepare(synthetic_log(), cfg)
    return cfg, prep


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _differs(a, b) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_pinnerformer_training_is_deterministic(tiny, tmp_path):
    from seqrank.training import seed_everything, train_pinnerformer
    cfg, prep = tiny
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        seed_everything(seed, cfg.threads)   # as the pipeline does before each training
        torch.manual_seed(seed)
        init = _state(PinnerFormer(cfg.pinnerformer, prep.vocab.n_items, prep.vocab.n_actions))
        seed_everything(seed, cfg.threads)
        model = train_pinnerformer(prep, cfg.pinnerformer, seed, tmp_path / f"pf_{name}.pt")
        assert not model.training
        runs.append((init, _state(model)))
    _assert_same_state(runs[0][1], runs[1][1])
    assert _differs(runs[0][0], runs[0][1]), "one epoch of training changed no weight"
    assert _differs(runs[0][1], runs[2][1]), "another seed gave the same weights"


def test_pinnerformer_seed_argument_alone_makes_training_deterministic(tiny, tmp_path):
    from seqrank.training import train_pinnerformer
    cfg, prep = tiny
    a = _state(train_pinnerformer(prep, cfg.pinnerformer, 0, tmp_path / "a.pt"))
    b = _state(train_pinnerformer(prep, cfg.pinnerformer, 0, tmp_path / "b.pt"))
    _assert_same_state(a, b)


@pytest.fixture(scope="module")
def tiny_ranker_inputs(tiny, tmp_path_factory):
    from seqrank.examples import EmbeddingCache, RankerExamples
    from seqrank.training import item_table, seed_everything, train_pinnerformer
    cfg, prep = tiny
    seed_everything(cfg.seed, cfg.threads)
    pf = train_pinnerformer(prep, cfg.pinnerformer, cfg.seed, tmp_path_factory.mktemp("pf") / "pf.pt")
    table = item_table(pf)
    emb = EmbeddingCache(pf, prep)
    train_ex = RankerExamples(prep, prep.ranker_train_rows(), emb, cfg.transact.seq_len)
    test_ex = RankerExamples(prep, prep.test_rows(), emb, cfg.transact.seq_len)
    return cfg, prep, table, train_ex, test_ex


@pytest.mark.parametrize("encoder", ["transact", "avg_pool"])
def test_ranker_training_is_deterministic(tiny_ranker_inputs, tmp_path, encoder):
    from seqrank.training import build_ranker, seed_everything, train_ranker
    cfg, prep, table, train_ex, _ = tiny_ranker_inputs
    assert len(train_ex) > 2 * cfg.transact.batch_size  # several batches per epoch
    r_cfg = replace(cfg.transact, sequence_encoder=encoder)
    states = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        seed_everything(seed, cfg.threads)
        model = train_ranker(prep, r_cfg, table, cfg.pinnerformer.dim, train_ex, seed, tmp_path / f"{name}.pt")
        states.append(_state(model))
    _assert_same_state(states[0], states[1])
    assert _differs(states[0], states[2])
    torch.manual_seed(0)
    init = _state(build_ranker(r_cfg, prep, table, cfg.pinnerformer.dim))
    assert _differs(init, states[0])
    # the item table is a frozen buffer: training never changes it
    assert torch.equal(states[0]["item_table"], torch.as_tensor(table))


def test_ranker_resumed_training_equals_uninterrupted(tiny_ranker_inputs, tmp_path):
    from seqrank.training import seed_everything, train_ranker
    cfg, prep, table, train_ex, _ = tiny_ranker_inputs
    two, one = replace(cfg.transact, epochs=2), replace(cfg.transact, epochs=1)
    seed_everything(0, cfg.threads)
    straight = _state(train_ranker(prep, two, table, cfg.pinnerformer.dim, train_ex, 0, tmp_path / "a.pt"))
    seed_everything(0, cfg.threads)
    train_ranker(prep, one, table, cfg.pinnerformer.dim, train_ex, 0, tmp_path / "b.pt")   # "interrupted" here
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 1
    seed_everything(0, cfg.threads)
    resumed = _state(train_ranker(prep, two, table, cfg.pinnerformer.dim, train_ex, 0, tmp_path / "b.pt"))
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 2
    _assert_same_state(straight, resumed)


def test_predict_has_no_time_mask_and_is_deterministic(tiny_ranker_inputs, tmp_path):
    from seqrank.training import predict, seed_everything, train_ranker
    cfg, prep, table, train_ex, test_ex = tiny_ranker_inputs
    seed_everything(0, cfg.threads)
    model = train_ranker(prep, cfg.transact, table, cfg.pinnerformer.dim, train_ex, 0, tmp_path / "r.pt")
    model.train()  # predict must switch to eval itself (no dropout, no time-window mask)
    a = predict(model, test_ex, batch=7)
    b = predict(model, test_ex, batch=1000)
    assert not model.training
    assert a.shape == (len(test_ex), len(prep.vocab.heads)) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # deterministic, independent of batching
    np.testing.assert_array_equal(predict(model, test_ex, batch=7), a)
    # exactly the model's forward on the full, untouched sequence mask
    with torch.no_grad():
        full = model(*test_ex.tensors(np.arange(len(test_ex)), trim=False))[:, 0].numpy()
    np.testing.assert_allclose(a, full, rtol=0, atol=1e-5)
    # ...and not what a time-window-masked sequence would give (hide the newest action of rows with >= 2)
    seq_item, seq_action, seq_mask, user, ctx, cand = test_ex.tensors(np.arange(len(test_ex)), trim=False)
    masked = seq_mask.clone()
    masked[:, 0] &= seq_mask.sum(1) < 2
    assert not torch.equal(masked, seq_mask)
    with torch.no_grad():
        windowed = model(seq_item, seq_action, masked, user, ctx, cand)[:, 0].numpy()
    assert np.abs(windowed - a).max() > 1e-6


# ---------------------------------------------------------------------------------------------------- ONNX parity

@pytest.mark.parametrize("extra", [{}, {"sequence_mean": True}], ids=["paper", "shipped-default-form"])
def test_onnx_export_parity(tmp_path, extra):
    from seqrank.exporting import PARITY_TOLERANCE, check_parity, export_ranker_onnx
    model = make_ranker("transact", seed=3, top_k_rows=4, **extra)
    S = 9
    path = export_ranker_onnx(model, tmp_path / "ranker" / "model.onnx")
    assert path.exists() and path.stat().st_size > 0
    report = check_parity(model, path, S)
    assert PARITY_TOLERANCE <= 1e-4
    shapes = [(r["batch"], r["seq_len"], r["n_cand"], r.get("valid")) for r in report]
    assert (1, S, 1, None) in shapes                        # one candidate
    assert any(s[1] == 1 for s in shapes)                   # a sequence of length 1
    assert (3, S, 7, 1) in shapes                           # all padding but one position
    assert any(s[3] == 0 for s in shapes)                   # cold start
    for r in report:
        assert 0 <= r["max_abs_diff"] <= 1e-4, r
    # an independent check on other shapes: mixed lengths (cold start included) and padded ids != 0
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = ranker_inputs([0, 1, 5, 9], S, 3, seed=11, pad_item=3, pad_action=2)
    with torch.no_grad():
        expected = model(*inputs).numpy()
    got = sess.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})[0]
    assert got.shape == expected.shape == (4, 3, N_HEADS)
    assert np.abs(got - expected).max() <= 1e-4


def test_onnx_parity_check_catches_a_wrong_model(tmp_path):
    """check_parity is a real check: a graph exported from different weights fails it."""
    from seqrank.exporting import check_parity, export_ranker_onnx
    path = export_ranker_onnx(make_ranker("transact", seed=3), tmp_path / "model.onnx")
    with pytest.raises(AssertionError, match="parity"):
        check_parity(make_ranker("transact", seed=4), path, 9)


@pytest.mark.parametrize("heads", [1, 2])
def test_user_tower_onnx_parity_and_its_check_catches_a_wrong_model(tmp_path, heads):
    """The exported PinnerFormer user tower (causal attention, exported projections) scores what PyTorch scores on
    full, short, one-action and empty histories, and the check fails a graph exported from other weights."""
    from seqrank.exporting import check_user_tower_parity, export_user_tower_onnx
    cfg = small_pf_cfg(max_len=16, n_heads=heads)
    torch.manual_seed(0)
    model = PinnerFormer(cfg, N_ITEMS, N_ACTIONS).eval()
    path = export_user_tower_onnx(model, tmp_path / "user_tower.onnx")
    assert check_user_tower_parity(model, path, 10) <= 1e-5
    torch.manual_seed(1)
    with pytest.raises(AssertionError, match="parity"):
        check_user_tower_parity(PinnerFormer(cfg, N_ITEMS, N_ACTIONS).eval(), path, 10)


def test_dropout_drops_at_rate_p_scales_the_rest_and_follows_torch_seed():
    """seqrank's Dropout (numpy-drawn mask on CPU): the share dropped is p, kept values and their gradients are
    scaled by 1/(1-p), eval and p = 0 are the identity, and torch.manual_seed decides the mask."""
    x = torch.rand(400, 500) + 1.0  # no zeros of its own
    drop = Dropout(0.1).train()
    torch.manual_seed(3)
    a = drop(x)
    dropped = a == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.003  # 200k draws: sd 0.0007
    assert torch.allclose(a[~dropped], x[~dropped] / 0.9)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)            # same torch seed, same mask
    assert not torch.equal(drop(x), a)        # the generator moved on: a new mask
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    drop(leaf).sum().backward()
    assert torch.allclose(leaf.grad, (~dropped).float() / 0.9)
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


def test_best_epoch_keeps_the_weights_of_the_lowest_selection_loss_and_survives_a_resume():
    """BestEpoch after epochs whose selection losses are 3, 1, 2: the model ends with epoch 2's weights (not the
    last), and a BestEpoch restored from its state_dict (a resumed run) selects the same."""
    from seqrank.training import BestEpoch
    model = torch.nn.Linear(1, 1, bias=False)
    losses = iter([3.0, 1.0, 2.0])
    best = BestEpoch(lambda m: (next(losses), 1.0))
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        best.update(model)
    assert best.best_epoch == 2 and model.weight.item() == 3.0
    resumed = BestEpoch(lambda m: (0.0, 1.0))
    resumed.load_state_dict(best.state_dict())
    resumed.restore(model)
    assert model.weight.item() == 2.0 and resumed.best_epoch == 2


def test_training_with_outages_teaches_the_ranker_what_an_outage_means(tiny_ranker_inputs, tmp_path):
    """history_outage_share serves a share of the training rows as in a store outage (training.store_outage). A
    ranker trained so scores the test impressions, served as in an outage, with a lower log-loss than the same
    ranker trained without it, which never saw the "unavailable" flag set and reads an outage as a new user."""
    import copy

    from seqrank.features import History, build_sequences
    from seqrank.training import predict, seed_everything, train_ranker
    cfg, prep, table, train_ex, test_ex = tiny_ranker_inputs
    outage = copy.copy(test_ex)
    n = len(test_ex.request_time)
    outage.seq = build_sequences([History.empty()] * n, test_ex.request_time, cfg.transact.seq_len,
                                 unavailable=np.ones(n, dtype=bool))

    def log_loss(share):
        seed_everything(cfg.seed, cfg.threads)
        model = train_ranker(prep, replace(cfg.transact, history_outage_share=share), table, cfg.pinnerformer.dim,
                             train_ex, cfg.seed, tmp_path / f"share{share}.pt")
        p = np.clip(predict(model, outage), 1e-6, 1 - 1e-6)
        y = test_ex.labels
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    without, with_outages = log_loss(0.0), log_loss(0.3)
    print(f"outage log-loss: trained with outages {with_outages:.4f}, without {without:.4f}")
    assert with_outages < without, (with_outages, without)


def test_training_shows_items_not_yet_served_as_oov(tiny_ranker_inputs, tmp_path, monkeypatch):
    """Training sees items as served (training.as_served): with no item served yet it never sees an item id, in the
    candidate or in the sequence (the same weights however the ids are shuffled); with every item served, it does.
    Inference is untouched: the trained model still tells candidates apart."""
    import copy

    import seqrank.training as T
    cfg, prep, table, train_ex, test_ex = tiny_ranker_inputs
    shuffled = copy.copy(train_ex)
    rng = np.random.default_rng(5)
    shuffled.cand_item = rng.permutation(train_ex.cand_item)
    shuffled.seq = copy.copy(train_ex.seq)
    seq_item = train_ex.seq.seq_item
    shuffled.seq.seq_item = np.where(seq_item >= FIRST_ID, rng.integers(FIRST_ID, prep.vocab.n_items, seq_item.shape),
                                     seq_item)
    states = {}
    for served in ("none", "all"):
        known = np.full(prep.vocab.n_items, 2 ** 62 if served == "none" else -2 ** 62, dtype=np.int64)
        known[:FIRST_ID] = -2 ** 62
        monkeypatch.setattr(T, "item_known_from", lambda p, known=known: known)
        for name, ex in (("ids", train_ex), ("shuffled", shuffled)):
            T.seed_everything(cfg.seed, cfg.threads)
            model = T.train_ranker(prep, cfg.transact, table, cfg.pinnerformer.dim, ex, cfg.seed,
                                   tmp_path / f"{served}{name}.pt")
            states[served, name] = _state(model)
    _assert_same_state(states["none", "ids"], states["none", "shuffled"])
    assert _differs(states["all", "ids"], states["all", "shuffled"])
    probs = T.predict(model, test_ex)
    assert len(np.unique(probs[:, 0].round(6))) > 1
