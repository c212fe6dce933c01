r"""TransAct ranker (Xia et al., KDD 2023) inside the multi-task DCN v2 ranker of the seed paper.

    real-time sequence (newest first)      candidate
    [action emb | item emb] per action     item emb
                 \___ early fusion: candidate concatenated to every row (d = 96) ___/
                       TransformerEncoder (2 layers, 1 head, ff 32, no positions)
                       first K rows + max-pool row -> flatten ((K + 1) x 96)
    [TransAct | raw sequence mean | PinnerFormer user emb | candidate emb | context] -> DCN v2 -> MLP -> one sigmoid
    per action. Beyond the paper, chosen on the validation split (config.py, README): the raw sequence mean (what the
    avg_pool baseline sees) and K = 3; optional: a learned gate on TransAct's output, a mean-pool row, a bottleneck.

Request-level de-duplication: user-side inputs are [B, ...] (one row per request) and are broadcast over the
request's N candidates inside the model, so they cross the wire and the host-to-device copy once per request.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransActConfig
from .layers import MASK_FILL, Block, Dropout

INPUT_NAMES = ["seq_item", "seq_action", "seq_mask", "user_emb", "context", "cand_item"]
OUTPUT_NAMES = ["probs"]


class TransActEncoder(nn.Module):
    def __init__(self, cfg: TransActConfig):
        super().__init__()
        self.d_seq = cfg.action_dim + cfg.item_dim
        d = self.d_seq + cfg.item_dim
        self.k = cfg.top_k_rows
        self.mean_pool = cfg.mean_pool_row
        self.layers = nn.ModuleList(Block(d, cfg.n_heads, cfg.d_ff, cfg.dropout, norm_first=False)
                                    for _ in range(cfg.n_layers))
        self.out_dim = (self.k + 1 + int(self.mean_pool)) * d
        self.factorize_first_layer = True  # inference only (see first_layer_factorized); False = the direct form

    def forward(self, seq: torch.Tensor, key_mask: torch.Tensor | None, row_mask: torch.Tensor | None,
                cand: torch.Tensor) -> torch.Tensor:
        """seq [B,S,ds], cand [B,N,dc] -> [B,N,(K+1[+1])*d].
        key_mask [B,S]: positions that may be attended (never all False); row_mask [B,S]: real actions, the only
        rows that reach the output and the pooling (padding never does). None for both: every position is a real
        action (TransActRanker.full_history), so nothing is masked."""
        B, S, _ = seq.shape
        N = cand.shape[1]
        keys = None if key_mask is None else key_mask.unsqueeze(1)  # [B,1,S] broadcast over candidates
        first = self.layers[0]
        if self.factorize_first_layer and not self.training and first.attn.n_heads == 1:
            x = self.first_layer_factorized(seq, key_mask, cand)
        else:
            x = torch.cat([seq.unsqueeze(1).expand(B, N, S, -1), cand.unsqueeze(2).expand(B, N, S, -1)], dim=-1)
            # The first layer's QKV projection is linear in [seq | cand]: compute the sequence part once per
            # request and the candidate part once per candidate, instead of once per (candidate, position).
            w, b = first.attn.qkv.weight, first.attn.qkv.bias
            qkv = (seq @ w[:, : self.d_seq].T).unsqueeze(1) + (cand @ w[:, self.d_seq:].T + b).unsqueeze(2)
            x = first(x, keys, qkv=qkv)
        for layer in self.layers[1:]:
            x = layer(x, keys)
        if row_mask is None:  # every row real
            pooled = x.amax(dim=2, keepdim=True)
            mean = x.mean(dim=2, keepdim=True) if self.mean_pool else None
        else:
            valid = row_mask.unsqueeze(1).unsqueeze(-1)  # [B,1,S,1]
            x = x * valid  # padding rows are never part of the output
            pooled = x.masked_fill(~valid, MASK_FILL).amax(dim=2, keepdim=True)
            pooled = pooled * valid.any(dim=2, keepdim=True)  # an empty history pools to zeros
            mean = x.sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1) if self.mean_pool else None
        if mean is not None:  # our addition: the mean row carries rates (e.g. how often this user hides)
            pooled = torch.cat([pooled, mean], dim=2)
        # the K newest rows; a sequence shorter than K gets zero rows (shape-agnostic for ONNX export; sliced before
        # the padding, so only K rows are copied, not the whole [B,N,S,d] activation)
        rows = torch.cat([x[:, :, : self.k], x.new_zeros(B, N, self.k, x.shape[-1])], dim=2)[:, :, : self.k]
        return torch.cat([rows, pooled], dim=2).flatten(2)

    def first_layer_factorized(self, seq: torch.Tensor, key_mask: torch.Tensor | None,
                               cand: torch.Tensor) -> torch.Tensor:
        """Layer 0 at inference, exactly, without forming per-candidate attention. Early fusion makes every row of
        candidate c equal to [s_j | c], so q_i = qs_i + qc, k_j = ks_j + kc, v_j = vs_j + vc. In the score
        (qs_i + qc).(ks_j + kc) the terms that do not depend on j cancel in the softmax over j, leaving
            softmax_j(A_ij + b_cj),  A = Qs Ks^T (once per request),  b_c = Ks qc (one vector per candidate),
        and since each softmax row sums to 1 the output projection of the value is
            sum_j P_cij vs_j Wo + (vc Wo + bo) = (E diag(w_c) Us)_i / z_ci + uc,   Us = Vs Wo^T,
        with E = exp(A - max), w_c = exp(b_c - max), z_c = E w_c: one [S,S] x [S,d] product per candidate with the
        request's E, no per-candidate QK^T, [N,S,S] softmax or output projection (18% fewer ranker FLOPs, 1.39x ONNX
        Runtime throughput at 1 x 100 on CPU: docs/performance.md), written out in [B,N,S,d] order (no transpose).
        The residual input x = [s_i | c] is never formed either: x + attention = y/z + ([s_i | 0] + [0 | c] + uc),
        the bracket a broadcast sum of one row per position and one per candidate.
        Exact up to rounding while, per row, max_j A_ij + max_j b_cj - max_j (A_ij + b_cj) stays below ~80 (fp32
        exp range): trained attention logits are far inside that; tests check parity with the direct form."""
        layer, d = self.layers[0], self.layers[0].attn.out.in_features
        B, S, ds = seq.shape
        wq, wk, wv = layer.attn.qkv.weight.chunk(3, dim=0)
        bq, _, bv = layer.attn.qkv.bias.chunk(3)            # the key bias cancels like kc
        scale = d ** -0.5
        qs, ks, vs = seq @ wq[:, :ds].T, seq @ wk[:, :ds].T, seq @ wv[:, :ds].T          # [B,S,d]
        qc, vc = cand @ wq[:, ds:].T + bq, cand @ wv[:, ds:].T + bv                      # [B,N,d]
        a = (qs @ ks.transpose(1, 2)) * scale                                            # [B,S,S]
        b = (qc @ ks.transpose(1, 2)) * scale                                            # [B,N,S]
        if key_mask is not None:
            hidden = ~key_mask.unsqueeze(1)                                              # [B,1,S]
            a, b = a.masked_fill(hidden, MASK_FILL), b.masked_fill(hidden, MASK_FILL)
        e = torch.exp(a - a.amax(-1, keepdim=True))                                      # hidden keys -> 0
        w = torch.exp(b - b.amax(-1, keepdim=True))
        z = (w @ e.transpose(1, 2)).clamp_min(1e-30)                                     # [B,N,S_i]
        us = vs @ layer.attn.out.weight.T                                                # [B,S,d]
        uc = vc @ layer.attn.out.weight.T + layer.attn.out.bias                          # [B,N,d]
        y = e.unsqueeze(1) @ (w.unsqueeze(-1) * us.unsqueeze(1))                         # [B,N,S_i,d]
        residual = F.pad(seq, (0, d - ds)).unsqueeze(1) + (uc + F.pad(cand, (ds, 0))).unsqueeze(2)  # [B,N,S,d]
        x = layer.norm1(y / z.unsqueeze(-1) + residual)
        return layer.norm2(x + layer.ff(x))


class CrossNetworkV2(nn.Module):
    """DCN v2 with low-rank cross matrices: x_{l+1} = x0 * (U_l V_l x_l + b_l) + x_l."""

    def __init__(self, dim: int, layers: int, rank: int):
        super().__init__()
        self.v = nn.ModuleList(nn.Linear(dim, rank, bias=False) for _ in range(layers))
        self.u = nn.ModuleList(nn.Linear(rank, dim) for _ in range(layers))

    def forward(self, x0):
        x = x0
        for v, u in zip(self.v, self.u):
            x = x0 * u(v(x)) + x
        return x


class TransActRanker(nn.Module):
    def __init__(self, cfg: TransActConfig, item_table: np.ndarray, n_actions: int, user_dim: int,
                 n_context: int, n_heads: int):
        super().__init__()
        self.cfg = cfg
        self.user_dim, self.n_context = user_dim, n_context
        # Frozen pretrained item embeddings (the PinnerFormer item tower plays PinSage's role), projected per model.
        self.register_buffer("item_table", torch.as_tensor(np.asarray(item_table), dtype=torch.float32))
        self.item_proj = nn.Linear(self.item_table.shape[1], cfg.item_dim)
        self.action_emb = nn.Embedding(n_actions, cfg.action_dim, padding_idx=0)
        kind = cfg.sequence_encoder
        if kind not in ("transact", "avg_pool", "no_sequence"):
            raise ValueError(f"sequence_encoder must be transact, avg_pool or no_sequence, got {kind!r}")
        # the mean of the raw action rows: the avg_pool baseline's whole sequence feature, and optionally TransAct's too
        self.sequence_mean = kind == "avg_pool" or (kind == "transact" and cfg.sequence_mean)
        seq_dim = (cfg.action_dim + cfg.item_dim) * int(self.sequence_mean)
        self.compress = None
        self.register_parameter("output_gate", None)
        if kind == "transact":
            self.encoder = TransActEncoder(cfg)
            seq_dim += cfg.output_dim or self.encoder.out_dim
            if cfg.output_dim:  # our addition: a normalised bottleneck between TransAct and DCN v2
                self.compress = nn.Sequential(nn.Linear(self.encoder.out_dim, cfg.output_dim),
                                              nn.LayerNorm(cfg.output_dim))
            if cfg.output_gate_init is not None:  # our addition (ReZero-style): the sequence enters as it helps
                self.output_gate = nn.Parameter(torch.tensor(float(cfg.output_gate_init)))
        dim = seq_dim + user_dim + cfg.item_dim + n_context
        self.cross = CrossNetworkV2(dim, cfg.cross_layers, cfg.cross_rank)
        mlp, prev = [], dim
        for width in cfg.mlp:
            mlp += [nn.Linear(prev, width), nn.ReLU(), Dropout(cfg.dropout)]
            prev = width
        self.mlp = nn.Sequential(*mlp)
        self.heads = nn.Linear(prev, n_heads)  # one sigmoid head per action
        # Only for inputs whose every sequence position is a real action: the encoder without masking (exported as
        # the CPU graph's branch for runs whose seq_mask is all True, serving/cpu_graph.py; the naive baseline
        # sets it per request). Never in training.
        self.full_history = False

    def item_embedding(self, idx):
        return self.item_proj(self.item_table[idx])

    def logits(self, seq_item, seq_action, seq_mask, user_emb, context, cand_item, attn_mask=None):
        """attn_mask (training only): the time-window mask; masked actions are hidden from attention but keep
        their own rows, as in TransAct. Serving never passes it (it is not an ONNX input)."""
        B, N = cand_item.shape
        cand = self.item_embedding(cand_item)                     # [B,N,di]
        parts = []
        kind = self.cfg.sequence_encoder
        if kind != "no_sequence":
            seq = torch.cat([self.action_emb(seq_action), self.item_embedding(seq_item)], dim=-1)  # [B,S,ds]
            if kind == "transact":
                # Never a fully masked row: an empty history attends to position 0, and its output is zeroed.
                keys = seq_mask if attn_mask is None else attn_mask
                first = torch.arange(seq_mask.shape[1], device=seq_mask.device) == 0
                keys = keys | (first.unsqueeze(0) & ~keys.any(dim=1, keepdim=True))
                encoded = (self.encoder(seq, None, None, cand) if self.full_history
                           else self.encoder(seq, keys, seq_mask, cand))
                encoded = encoded if self.compress is None else self.compress(encoded)
                parts.append(encoded if self.output_gate is None else encoded * self.output_gate)
            if self.sequence_mean:  # once per request (padding excluded), broadcast over the candidates
                m = seq_mask.unsqueeze(-1).to(seq.dtype)
                avg = (seq * m).sum(1) / m.sum(1).clamp(min=1.0)
                parts.append(avg.unsqueeze(1).expand(B, N, -1))
        parts += [user_emb.unsqueeze(1).expand(B, N, -1), cand, context.unsqueeze(1).expand(B, N, -1)]
        x = self.cross(torch.cat(parts, dim=-1))
        return self.heads(self.mlp(x))                            # [B,N,H]

    def forward(self, seq_item, seq_action, seq_mask, user_emb, context, cand_item):
        return torch.sigmoid(self.logits(seq_item, seq_action, seq_mask, user_emb, context, cand_item))


def weighted_multitask_bce(logits: torch.Tensor, labels: torch.Tensor, negative_heads: torch.Tensor,
                           negative_weight: float) -> torch.Tensor:
    """Weighted BCE with the paper's label-weight matrix: an impression that carries a negative action (a hide)
    weighs `negative_weight` on every positive head, so a hidden item is a strong negative for click/repin too.
    logits/labels [E,H]; negative_heads bool [H]."""
    has_negative = (labels[:, negative_heads] > 0).any(dim=1, keepdim=True)           # [E,1]
    weight = torch.where(has_negative & ~negative_heads, negative_weight, 1.0)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * weight).sum() / weight.sum()


def time_window_mask(seq_mask: torch.Tensor, seq_age_s: torch.Tensor, max_hours: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Training only: hide the actions in (t_req - T, t_req), T ~ U[0, max_hours], so the model cannot lean on
    the last few actions alone. A row is never masked entirely: if T would hide all its actions, it keeps them."""
    T = torch.rand(seq_mask.shape[0], 1, generator=generator) * max_hours * 3600.0
    masked = seq_mask & (seq_age_s >= T)
    keep_all = seq_mask.any(1, keepdim=True) & ~masked.any(1, keepdim=True)
    return torch.where(keep_all, seq_mask, masked)
