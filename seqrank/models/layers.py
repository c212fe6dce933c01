"""Transformer pieces shared by PinnerFormer and TransAct, written out so export to ONNX/TensorRT stays plain.

Masks use a finite large negative (fp16-safe) instead of -inf, and callers never pass a fully masked row.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MASK_FILL = -1e4  # finite: -inf turns a fully masked softmax into NaN, and overflows fp16 engines


class Dropout(nn.Module):
    """nn.Dropout, with the keep-mask of a CPU tensor drawn by numpy's PCG64 generator. PyTorch's CPU dropout draws
    its random numbers one at a time: 26-35 ms for the 2.5M of one [256, 100, 96] activation, and dropout was 28 % of
    a TransAct training step (py-spy); numpy draws them several times faster (docs/results/README.md). Seeded from
    torch's generator, so torch.manual_seed still makes training deterministic. Other devices use PyTorch's kernel."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        seed = int(torch.randint(0, 2**62, (1,)))
        bits = np.random.default_rng(seed).integers(0, 65536, size=tuple(x.shape), dtype=np.uint16)
        keep = torch.from_numpy(bits >= round(self.p * 65536))  # P(keep) = 1 - p, to 1/65536
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, causal: bool = False,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., L, d]; key_mask [..., L] bool (True = may be attended); qkv: precomputed projection of x.
        causal: sequences are newest first, so position i sees itself and the older positions j >= i."""
        lead, (L, d) = x.shape[:-2], x.shape[-2:]
        qkv = self.qkv(x) if qkv is None else qkv.expand(*lead, L, 3 * d)
        q, k, v = qkv.reshape(-1, L, 3 * d).split(d, dim=-1)                   # each [M, L, d]
        return self.out(attend(q, k, v, key_mask, causal, lead, self.n_heads, self.dropout))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool,
           lead: torch.Size, n_heads: int, dropout: nn.Module | None = None) -> torch.Tensor:
    """Scaled dot-product attention of q, k, v [M, L, d] (M = the flattened leading dims ``lead``) -> [*lead, L, d].
    A head axis and explicit permutations only with several heads: a single head (TransAct's default) needs no
    transposes or copies of the [M, L, d] activations (ONNX/TensorRT friendly)."""
    L, d = q.shape[-2:]
    h = n_heads
    if h > 1:
        q, k, v = (t.reshape(-1, L, h, d // h).permute(0, 2, 1, 3) for t in (q, k, v))  # each [M, h, L, dh]
    scores = mask_scores(q @ k.transpose(-2, -1) / math.sqrt(d // h), key_mask, causal, lead)  # [M, (h,) L, L]
    attn = scores.softmax(-1)
    y = (attn if dropout is None else dropout(attn)) @ v
    return (y.permute(0, 2, 1, 3) if h > 1 else y).reshape(*lead, L, d)


def mask_scores(scores: torch.Tensor, key_mask: torch.Tensor | None, causal: bool, lead: torch.Size) -> torch.Tensor:
    """scores [M, (h,) L, L] with the hidden keys (key_mask [..., L] False) and, if causal, the newer positions
    (j < i: sequences are newest first) at MASK_FILL."""
    L = scores.shape[-1]
    if key_mask is not None:
        allowed = key_mask.expand(*lead, L).reshape(-1, *([1] * (scores.dim() - 2)), L)
        scores = scores.masked_fill(~allowed, MASK_FILL)
    if causal:
        newer = torch.ones(L, L, dtype=torch.bool, device=scores.device).tril(-1)
        scores = scores.masked_fill(newer, MASK_FILL)
    return scores


class Block(nn.Module):
    """One transformer encoder layer. norm_first=False is nn.TransformerEncoderLayer's post-norm (TransAct);
    norm_first=True is the PreNorm layer of PinnerFormer."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), Dropout(dropout), nn.Linear(d_ff, d_model))
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = Dropout(dropout)

    def forward(self, x, key_mask=None, causal=False, qkv=None):
        if self.norm_first:
            x = x + self.drop(self.attn(self.norm1(x), key_mask, causal))
            return x + self.drop(self.ff(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, key_mask, causal, qkv)))
        return self.norm2(x + self.drop(self.ff(x)))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)
