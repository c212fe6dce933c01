"""PinnerFormer (Pancha et al., KDD 2022): a long-term user embedding trained with the dense all-action loss.

    last M actions: item emb + action emb + time features + learned position (counted from the oldest action)
        -> causal PreNorm transformer -> output at every position -> L2-normalised user embedding
    item tower: MLP over the item embedding -> L2-normalised
Dense all-action loss: random positions each predict one positive sampled from the window after that position;
sampled softmax with a learned temperature, logQ correction, in-batch + random negatives.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..config import PinnerFormerConfig
from .layers import MASK_FILL, Block, l2_normalize

N_TIME_FEATURES = 3  # log1p(hours since the previous action), sin/cos hour of day


def time_features(ts_ms: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ts_ms [B,L] newest first (padding after), mask [B,L] -> [B,L,3] float32."""
    gap_h = np.zeros(ts_ms.shape, dtype=np.float64)
    gap_h[:, :-1] = np.maximum(ts_ms[:, :-1] - ts_ms[:, 1:], 0) / 3.6e6
    # a gap only to an older real action: the oldest one in view has none (padding's time is 0, and how much
    # padding follows depends on the batch), so a user's features do not depend on who shares the batch
    gap_h[:, :-1] *= mask[:, 1:]
    gap_h *= mask
    hour = (ts_ms // 3_600_000) % 24 * (2 * np.pi / 24)
    feats = np.stack([np.log1p(gap_h), np.sin(hour), np.cos(hour)], axis=-1) * mask[..., None]
    return feats.astype(np.float32)


class PinnerFormer(nn.Module):
    def __init__(self, cfg: PinnerFormerConfig, n_items: int, n_actions: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_emb = nn.Embedding(n_items, d, padding_idx=0)
        self.action_emb = nn.Embedding(n_actions, d, padding_idx=0)
        self.time_proj = nn.Linear(N_TIME_FEATURES, d)
        # learned positions, counted from the oldest action in the window (see encode)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.d_ff, cfg.dropout, norm_first=True)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.user_head = nn.Linear(d, cfg.dim)
        self.item_tower = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature_init)))  # learned temperature

    @property
    def temperature(self):
        return self.log_temperature.exp().clamp(0.01, 1.0)

    def encode(self, item, action, tfeat, mask):
        """Newest-first sequences [B,L] (padding after) -> L2-normalised user embeddings at every position [B,L,D].
        Position i's output summarises the actions at i and older: what the user looked like at that time, and
        exactly what a request made right after action i gets at position 0 (prefix invariance). Training queries
        every position, serving only position 0, so positions are counted from the oldest action: counted from the
        newest, position i's input would say how many actions came after it, which the serving output never sees."""
        L = item.shape[1]
        newest_first = torch.arange(L, device=item.device).unsqueeze(0)               # [1,L]
        pos = (mask.sum(1, keepdim=True) - 1 - newest_first).clamp(0, self.cfg.max_len - 1)  # padding clamps to 0
        x = self.item_emb(item) + self.action_emb(action) + self.time_proj(tfeat) + self.pos_emb(pos)
        # causal attention: a position only sees itself and older actions, never the padding after them
        attend = mask | ~mask.any(1, keepdim=True)
        for block in self.blocks:
            x = block(x, attend, causal=True)
        return l2_normalize(self.user_head(self.norm(x)))

    def forward(self, item, action, tfeat, mask):
        """User embedding = output at the most recent position, 0 (zeros for an empty history)."""
        return self.encode(item, action, tfeat, mask)[:, 0] * mask[:, :1]

    def item_embeddings(self, idx=None):
        w = self.item_emb.weight if idx is None else self.item_emb(idx)
        return l2_normalize(self.item_tower(w))


def sampled_softmax_loss(query, target_emb, target_ids, target_user, random_emb, random_ids,
                         log_q_target, log_q_random, temperature, query_index=None):
    """Mixed-negative sampled softmax with logQ correction: one softmax over [positive | in-batch negatives] and one
    over [positive | random negatives], summed (the in-batch one corrects the popularity bias of in-batch sampling,
    the random one keeps rare items honest).

    target_emb [Q,D] (the positive of each of the batch's Q queries; together they are the in-batch negatives),
    target_ids/target_user [Q], random_emb [R,D], random_ids [R], log_q_target [Q] = log sampling probability of
    each target as an in-batch negative, log_q_random [R] = that of each random negative.
    query [P,D]: the queries scored here; query_index [P]: the position of each one's own target (default: all Q
    queries, in order). The loss is their share of the batch's mean loss (their sum / Q), so data-parallel ranks that
    each hold some of the queries, and every target, add up to the loss of the whole batch (seqrank/distributed.py).
    Masked out of the negatives: the user's own positives (other queries' targets of the same user) and accidental
    hits (a column holding the query's own target item).
    """
    Q = target_emb.shape[0]
    if query_index is None:
        query_index = torch.arange(Q, device=query.device)
    own_target = target_ids[query_index]
    eye = query_index[:, None] == torch.arange(Q, device=query.device)[None, :]
    in_batch = query @ target_emb.T / temperature - log_q_target[None, :]
    own = ((target_user[query_index][:, None] == target_user[None, :])
           | (own_target[:, None] == target_ids[None, :])) & ~eye
    in_batch = in_batch.masked_fill(own, MASK_FILL)
    loss_in_batch = nn.functional.cross_entropy(in_batch, query_index, reduction="sum") / Q

    positive = (query * target_emb[query_index]).sum(-1, keepdim=True) / temperature
    rand = query @ random_emb.T / temperature - log_q_random[None, :]
    rand = rand.masked_fill(random_ids[None, :] == own_target[:, None], MASK_FILL)
    # the positive competes with the random negatives under the same (uniform) correction
    logits = torch.cat([positive - log_q_random.mean(), rand], dim=1)
    zeros = torch.zeros(len(query_index), dtype=torch.long, device=query.device)
    loss_random = nn.functional.cross_entropy(logits, zeros, reduction="sum") / Q
    return loss_in_batch + loss_random
