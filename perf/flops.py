"""The ranker's FLOPs per request as served: the analytic count and torch's counter on the same tensors.

Imports only numpy at module level (torch and seqrank lazily): perf/gpu_check.py imports it on a GPU machine that has torch and
numpy but neither Triton nor the bench's other dependencies.
"""
from __future__ import annotations

import numpy as np


def ranker_flops(cfg, n_cand: int, item_table_dim: int, user_dim: int, n_context: int, n_heads: int) -> dict:
    """Analytic FLOPs of one ranker request as served (matrix products only, multiply-add = 2 FLOP; softmax,
    LayerNorm, masking, activations and gathers are left out: about 1 %). Notation: S = seq_len, d = action_dim +
    2 item_dim (early fusion width), ds = action_dim + item_dim (sequence part), E = item table dim, F = DCN input.
    For a single head (TransAct's default and the shipped config; the torch FlopCounterMode cross-check counts any
    config). Layer 0 runs factorized (seqrank.models.inference.factorized_first_layer):

    per request    : 2 S E item_dim (sequence item projection) + 3 x 2 S ds d (Qs, Ks, Vs) + 2 S^2 d (A = Qs Ks^T)
                     + 2 S d^2 (Us = Vs Wo^T)
    per candidate  : 2 E item_dim (candidate projection)
                     + layer 0: 2 x 2 item_dim d (qc, vc) + 2 S d (b_c) + 2 d^2 (uc) + 2 S^2 d (P_c Us)
                                + 4 S d d_ff (FF)
                     + (layers - 1) x [2 S d^2 (x M) + 2 S^2 d (scores) + 2 S d^2 (x N) + 2 S^2 d (attention)
                                       + 4 S d d_ff (FF)]    (query-key and value-output products merged:
                                       seqrank.models.inference.MergedSingleHead)
                     + cross_layers x 4 F rank (DCN v2, low rank) + MLP 2 sum(in x out) + heads 2 last H
    total          = per request + N x per candidate
    """
    S, a, i = cfg.seq_len, cfg.action_dim, cfg.item_dim
    d, ds, E = a + 2 * i, a + i, item_table_dim
    L, dff = cfg.n_layers, cfg.d_ff
    F = (cfg.top_k_rows + 1) * d + ds * int(cfg.sequence_mean) + user_dim + i + n_context
    per_request = 2 * S * E * i + 3 * 2 * S * ds * d + 2 * S * S * d + 2 * S * d * d
    first = 2 * 2 * i * d + 2 * S * d + 2 * d * d + 2 * S * S * d + 4 * S * d * dff
    later = 2 * 2 * S * d * d + 2 * S * S * d * 2 + 4 * S * d * dff
    per_cand = 2 * E * i + first + (L - 1) * later
    per_cand += cfg.cross_layers * 4 * F * cfg.cross_rank
    prev = F
    for w in cfg.mlp:
        per_cand += 2 * prev * w
        prev = w
    per_cand += 2 * prev * n_heads
    return {"per_request": per_request, "per_candidate": per_cand, "n_candidates": n_cand,
            "total": per_request + n_cand * per_cand, "F": F, "d": d}


def flop_counter_check(model, tensors: dict) -> int:
    """torch.utils.flop_counter on the same tensors (cross-check of the analytic count; a failure is a bug)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from seqrank.models.transact import INPUT_NAMES
    args = [torch.from_numpy(np.ascontiguousarray(tensors[n])) for n in INPUT_NAMES]
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(*args)
    return int(fc.get_total_flops())

