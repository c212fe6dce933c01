r"""TransAct ranker (Xia et al., KDD 2023) inside the multi-task DCN v2 ranker of the seed paper.

    real-time sequence (newest first)      candidate
    [action emb | item emb] per action     item emb
                 \___ early fusion: candidate concatenated to every row (d = 96) ___/
                       TransformerEncoder (2 layers, 1 head, ff 32, no positions)
                       first K rows + max-pool row -> flatten ((K + 1) x 96)
    [TransAct | raw sequence mean | PinnerFormer user emb | candidate emb | context] -> DCN v2 -> MLP -> one sigmoid
    per action. Beyond the paper, chosen on the validation split (config.py): the raw sequence mean (what the
    avg_pool baseline sees) and K = 3.

Request-level de-duplication: user-side inputs are [B, ...] (one row per request) and are broadcast over the
request's N candidates inside the model, so they cross the wire and the host-to-device copy once per request.
This is the model as trained; the exact rewrites that serving runs instead (first layer factorized, merged single
head, a copy without masks) are in inference.py.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import TransActConfig
from .layers import MASK_FILL, Block, Dropout

INPUT_NAMES = ["seq_item", "seq_action", "seq_mask", "user_emb", "context", "cand_item"]
OUTPUT_NAMES = ["probs"]


class TransActEncoder(nn.Module):
    """Early fusion, a post-norm TransformerEncoder, the K newest rows and a max-pool row."""

    def __init__(self, cfg: TransActConfig):
        super().__init__()
        self.d_seq = cfg.action_dim + cfg.item_dim
        d = self.d_seq + cfg.item_dim
        self.k = cfg.top_k_rows
        self.layers = nn.ModuleList(Block(d, cfg.n_heads, cfg.d_ff, cfg.dropout, norm_first=False)
                                    for _ in range(cfg.n_layers))
        self.out_dim = (self.k + 1) * d

    def forward(self, seq: torch.Tensor, key_mask: torch.Tensor, row_mask: torch.Tensor,
                cand: torch.Tensor) -> torch.Tensor:
        """seq [B,S,ds], cand [B,N,dc] -> [B,N,(K+1)*d].
        key_mask [B,S]: positions that may be attended (never all False); row_mask [B,S]: real actions, the only
        rows that reach the output and the pooling (padding never does)."""
        keys = key_mask.unsqueeze(1)  # [B,1,S] broadcast over candidates
        x = self.early_fusion(seq, cand, keys)
        for layer in self.layers[1:]:
            x = layer(x, keys)
        return self.readout(x, row_mask)

    def early_fusion(self, seq: torch.Tensor, cand: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """Layer 0 over the rows [s_j | c]: the candidate concatenated to every action, [B,N,S,d]. Its QKV
        projection is linear in [seq | cand]: the sequence part is computed once per request and the candidate
        part once per candidate, instead of once per (candidate, position)."""
        B, S, _ = seq.shape
        N = cand.shape[1]
        first = self.layers[0]
        x = torch.cat([seq.unsqueeze(1).expand(B, N, S, -1), cand.unsqueeze(2).expand(B, N, S, -1)], dim=-1)
        w, b = first.attn.qkv.weight, first.attn.qkv.bias
        qkv = (seq @ w[:, : self.d_seq].T).unsqueeze(1) + (cand @ w[:, self.d_seq:].T + b).unsqueeze(2)
        return first(x, keys, qkv=qkv)

    def readout(self, x: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        """[B,N,S,d] -> the K newest rows + the max-pool row over the real actions, flattened; padding rows never
        reach the output, and an empty history pools to zeros."""
        valid = row_mask.unsqueeze(1).unsqueeze(-1)  # [B,1,S,1]
        x = x * valid
        pooled = x.masked_fill(~valid, MASK_FILL).amax(dim=2, keepdim=True)
        pooled = pooled * valid.any(dim=2, keepdim=True)
        return newest_rows_and_pool(x, pooled, self.k)


def newest_rows_and_pool(x: torch.Tensor, pooled: torch.Tensor, k: int) -> torch.Tensor:
    """The K newest rows of x [B,N,S,d] (a sequence shorter than K gets zero rows) and the pooled row [B,N,1,d],
    flattened to [B,N,(K+1)*d]. Shape-agnostic for ONNX export; sliced before the padding, so only K rows are
    copied, not the whole activation."""
    B, N, _, d = x.shape
    rows = torch.cat([x[:, :, :k], x.new_zeros(B, N, k, d)], dim=2)[:, :, :k]
    return torch.cat([rows, pooled], dim=2).flatten(2)


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
        if kind == "transact":
            self.encoder = TransActEncoder(cfg)
            seq_dim += self.encoder.out_dim
        dim = seq_dim + user_dim + cfg.item_dim + n_context
        self.cross = CrossNetworkV2(dim, cfg.cross_layers, cfg.cross_rank)
        mlp, prev = [], dim
        for width in cfg.mlp:
            mlp += [nn.Linear(prev, width), nn.ReLU(), Dropout(cfg.dropout)]
            prev = width
        self.mlp = nn.Sequential(*mlp)
        self.heads = nn.Linear(prev, n_heads)  # one sigmoid head per action

    def item_embedding(self, idx):
        return self.item_proj(self.item_table[idx])

    def sequence_rows(self, seq_item, seq_action):
        return torch.cat([self.action_emb(seq_action), self.item_embedding(seq_item)], dim=-1)  # [B,S,ds]

    def attention_keys(self, seq_mask, attn_mask=None):
        """Never a fully masked row: an empty history attends to position 0, and its output is zeroed."""
        keys = seq_mask if attn_mask is None else attn_mask
        first = torch.arange(seq_mask.shape[1], device=seq_mask.device) == 0
        return keys | (first.unsqueeze(0) & ~keys.any(dim=1, keepdim=True))

    def logits(self, seq_item, seq_action, seq_mask, user_emb, context, cand_item, attn_mask=None):
        """attn_mask (training only): the time-window mask; masked actions are hidden from attention but keep
        their own rows, as in TransAct. Serving never passes it (it is not an ONNX input)."""
        B, N = cand_item.shape
        cand = self.item_embedding(cand_item)                     # [B,N,di]
        parts = []
        kind = self.cfg.sequence_encoder
        if kind != "no_sequence":
            seq = self.sequence_rows(seq_item, seq_action)
            if kind == "transact":
                parts.append(self.encoder(seq, self.attention_keys(seq_mask, attn_mask), seq_mask, cand))
            if self.sequence_mean:  # once per request (padding excluded), broadcast over the candidates
                m = seq_mask.unsqueeze(-1).to(seq.dtype)
                avg = (seq * m).sum(1) / m.sum(1).clamp(min=1.0)
                parts.append(avg.unsqueeze(1).expand(B, N, -1))
        parts += [user_emb.unsqueeze(1).expand(B, N, -1), cand, context.unsqueeze(1).expand(B, N, -1)]
        x = self.cross(torch.cat(parts, dim=-1))
        return self.heads(self.mlp(x))                            # [B,N,H]

    def forward(self, seq_item, seq_action, seq_mask, user_emb, context, cand_item):
        return torch.sigmoid(self.logits(seq_item, seq_action, seq_mask, user_emb, context, cand_item))


def label_weights(labels: torch.Tensor, negative_heads: torch.Tensor, negative_weight: float) -> torch.Tensor:
    """The paper's label-weight matrix [E,H]: an impression that carries a negative action (a hide) weighs
    `negative_weight` on every positive head, so a hidden item is a strong negative for click/repin too."""
    has_negative = (labels[:, negative_heads] > 0).any(dim=1, keepdim=True)           # [E,1]
    return torch.where(has_negative & ~negative_heads, negative_weight, 1.0)


def weighted_multitask_bce(logits: torch.Tensor, labels: torch.Tensor, negative_heads: torch.Tensor,
                           negative_weight: float, total_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE with the label-weight matrix (label_weights), normalised by the sum of the weights.
    logits/labels [E,H]; negative_heads bool [H]. total_weight: when these E rows are one data-parallel rank's share
    of a batch, the batch's weight sum, so that the ranks' losses add up to the batch's (seqrank/distributed.py)."""
    weight = label_weights(labels, negative_heads, negative_weight)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (loss * weight).sum() / (weight.sum() if total_weight is None else total_weight)


def time_window_mask(seq_mask: torch.Tensor, seq_age_s: torch.Tensor, max_hours: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Training only: hide the actions in (t_req - T, t_req), T ~ U[0, max_hours], so the model cannot lean on
    the last few actions alone. A row is never masked entirely: if T would hide all its actions, it keeps them."""
    T = torch.rand(seq_mask.shape[0], 1, generator=generator) * max_hours * 3600.0
    masked = seq_mask & (seq_age_s >= T)
    keep_all = seq_mask.any(1, keepdim=True) & ~masked.any(1, keepdim=True)
    return torch.where(keep_all, seq_mask, masked)
