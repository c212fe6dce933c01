"""TransAct's two defining mechanisms, tested where they act: early fusion (the candidate inside every sequence row,
so what the encoder reads of the sequence depends on the candidate) and the training-only random time-window mask
(recent actions hidden from attention as keys, never every key of a row)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seqrank.config import TransActConfig
from seqrank.models.transact import TransActRanker, time_window_mask

CFG = dict(seq_len=6, action_dim=4, item_dim=4, n_layers=2, n_heads=1, d_ff=8, top_k_rows=3, cross_layers=1,
           cross_rank=4, mlp=[8], dropout=0.0)


def ranker(seed: int = 0) -> TransActRanker:
    torch.manual_seed(seed)
    table = np.random.default_rng(seed).normal(size=(20, 8)).astype(np.float32)
    return TransActRanker(TransActConfig(**CFG), table, n_actions=5, user_dim=4, n_context=4, n_heads=2).eval()


def rows_of(model, seq, key_mask, cand):
    """The encoder's output as [B, N, K + 1, d]: the K newest rows, then the max-pool row."""
    out = model.encoder(seq, key_mask, torch.ones_like(key_mask), cand)
    return out.view(*out.shape[:2], model.encoder.k + 1, -1)


def test_early_fusion_makes_the_sequence_part_of_every_row_depend_on_the_candidate():
    """Rows are [s_j | c] from the first layer on, so attention over the actions, and with it the sequence columns
    of every output row, differ between two candidates of one request. Were the candidate left out of the rows
    (and only fed to DCN v2 beside them), the encoder's output would be the same for every candidate."""
    model = ranker()
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(1, 6, model.encoder.d_seq, generator=g)
    cand = torch.randn(1, 2, CFG["item_dim"], generator=g)
    with torch.no_grad():
        out = rows_of(model, seq, torch.ones(1, 6, dtype=torch.bool), cand)
    seq_cols = out[..., : model.encoder.d_seq]
    assert (seq_cols[0, 0] - seq_cols[0, 1]).abs().amax(dim=-1).min() > 1e-3   # every row, pooled one included
    # the same candidate twice gives the same rows: the difference comes from the candidate alone
    with torch.no_grad():
        same = rows_of(model, seq, torch.ones(1, 6, dtype=torch.bool), cand[:, [0, 0]])
    torch.testing.assert_close(same[0, 0], same[0, 1])


def test_a_masked_key_reaches_no_other_row_but_keeps_its_own():
    """The time-window mask hides an action as a key in every layer; its own row is still computed and output."""
    model = ranker(1)
    g = torch.Generator().manual_seed(1)
    seq = torch.randn(1, 6, model.encoder.d_seq, generator=g)
    other = seq.clone()
    other[0, 1] = torch.randn(model.encoder.d_seq, generator=g)          # change the action at position 1
    cand = torch.randn(1, 1, CFG["item_dim"], generator=g)
    hidden = torch.tensor([[True, False, True, True, True, True]])
    visible = torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        a, b = rows_of(model, seq, hidden, cand), rows_of(model, other, hidden, cand)
        a_vis, b_vis = rows_of(model, seq, visible, cand), rows_of(model, other, visible, cand)
    torch.testing.assert_close(a[0, 0, [0, 2]], b[0, 0, [0, 2]])          # rows 0 and 2 never saw position 1
    assert (a[0, 0, 1] - b[0, 0, 1]).abs().max() > 1e-3                   # its own row did
    assert (a_vis[0, 0, [0, 2]] - b_vis[0, 0, [0, 2]]).abs().max() > 1e-3  # unmasked, it reaches every row


def test_time_window_mask_hides_keys_of_the_last_minutes_at_the_window_rate_and_never_a_whole_row():
    """T ~ U[0, 1 h]: an action 2 minutes old is hidden in 1 - 2/60 of the draws, one 20 minutes old in 2/3, one
    3 hours old never; a row whose every action is younger than T keeps them all."""
    n = 4000
    ages = torch.tensor([120.0, 1200.0, 3 * 3600.0]).repeat(n, 1)            # seconds before the request
    mask = torch.ones(n, 3, dtype=torch.bool)
    keys = time_window_mask(mask, ages, 1.0, torch.Generator().manual_seed(0))
    hidden = (~keys).float().mean(0)
    assert hidden[0].item() == pytest.approx(1 - 2 / 60, abs=0.02)
    assert hidden[1].item() == pytest.approx(2 / 3, abs=0.03)
    assert hidden[2].item() == 0.0
    recent = time_window_mask(mask[:, :2], ages[:, :2], 1.0, torch.Generator().manual_seed(1))
    assert recent.any(1).all()                                             # never every key of a row
    # a draw that would hide both recent actions keeps both (not one of them)
    assert ((recent.sum(1) == 2) | (recent[:, 1] & ~recent[:, 0])).all()
    padded = torch.tensor([[True, True, False]])                          # padding is never made a key
    assert not time_window_mask(padded, torch.tensor([[10.0, 20.0, 0.0]]), 0.0)[0, 2]
    assert torch.equal(time_window_mask(mask, ages, 0.0), mask)            # W = 0: no mask
