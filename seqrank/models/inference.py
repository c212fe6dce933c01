"""The exact rewrites that serving runs instead of the paper form (transact.py, pinnerformer.py).

Each takes a trained paper-form model and gives a module with the same inputs and outputs that computes the same
function (up to rounding) in fewer operations. The modules share the trained parameters (no copy of the weights);
they are for inference only: no dropout, no time-window mask. Export traces them (exporting.py, serving/cpu_graph.py);
tests/test_inference_rewrites.py checks each against the paper form.

    ranker_for_serving(model)           TransAct ranker as exported:
        factorize_first_layer=True        layer 0 (one head) without per-candidate Q/K/V, QK^T, output projection
                                          or residual rows (factorized_first_layer)
        merge_single_head=True            later layers with one head: query-key and value-output products merged
                                          (MergedSingleHead); otherwise three separate projections (SplitProjections)
        full_history=False                True: no masking at all, valid only where every sequence position is a real
                                          action (the CPU graph's branch, serving/cpu_graph.py)
    user_tower_for_serving(model)       PinnerFormer with the same attention rewrites
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MASK_FILL, Block, SelfAttention, attend, mask_scores
from .pinnerformer import PinnerFormer
from .transact import TransActEncoder, TransActRanker, newest_rows_and_pool


def ranker_for_serving(model: TransActRanker, factorize_first_layer: bool = True, merge_single_head: bool = True,
                       full_history: bool = False) -> TransActRanker:
    """The ranker as served: ``model`` with its TransAct encoder replaced by ServedTransActEncoder (the other
    modules are ``model``'s own). Puts ``model`` in eval mode (they share every module)."""
    model.eval()
    if model.cfg.sequence_encoder != "transact":
        return _sharing(model)
    return _sharing(model, encoder=ServedTransActEncoder(model.encoder, factorize_first_layer, merge_single_head,
                                                         full_history))


def user_tower_for_serving(model: PinnerFormer, merge_single_head: bool = True) -> PinnerFormer:
    """The PinnerFormer user tower as exported: each block's attention rewritten (served_attention). Puts ``model``
    in eval mode."""
    model.eval()
    return _sharing(model, blocks=nn.ModuleList(served_block(b, merge_single_head) for b in model.blocks))


def served_block(block: Block, merge_single_head: bool = True) -> Block:
    """``block`` with its attention as served: MergedSingleHead for one head, else SplitProjections."""
    attn = block.attn
    served = MergedSingleHead(attn) if attn.n_heads == 1 and merge_single_head else SplitProjections(attn)
    return _sharing(block, attn=served)


def _sharing(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow copy of ``module``: the same parameters, buffers and submodules, except the named ``children``."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, **children}
    return clone


class ServedTransActEncoder(TransActEncoder):
    """TransActEncoder.forward with the first layer factorized (or the paper's early fusion), the later layers'
    attention rewritten (served_block), and, with ``full_history``, no masks at all: on a history whose every
    position is a real action, masking the keys and the output rows changes nothing, and its Where passes over every
    candidate's [S, S] scores and [S, d] rows go (~12 % of the CPU ranker's time, serving/cpu_graph.py)."""

    def __init__(self, encoder: TransActEncoder, factorize_first_layer: bool, merge_single_head: bool,
                 full_history: bool):
        nn.Module.__init__(self)
        self.d_seq, self.k, self.out_dim = encoder.d_seq, encoder.k, encoder.out_dim
        # the factorization is written for one head (TransAct's); with several, layer 0 keeps the early fusion
        self.factorize_first_layer = factorize_first_layer and encoder.layers[0].attn.n_heads == 1
        self.full_history = full_history
        self.layers = nn.ModuleList([encoder.layers[0], *(served_block(b, merge_single_head)
                                                          for b in encoder.layers[1:])])

    def forward(self, seq: torch.Tensor, key_mask: torch.Tensor, row_mask: torch.Tensor,
                cand: torch.Tensor) -> torch.Tensor:
        keys = None if self.full_history else key_mask.unsqueeze(1)
        if self.factorize_first_layer:
            x = factorized_first_layer(self.layers[0], seq, keys, cand)
        else:
            x = self.early_fusion(seq, cand, keys)
        for layer in self.layers[1:]:
            x = layer(x, keys)
        if self.full_history:
            return newest_rows_and_pool(x, x.amax(dim=2, keepdim=True), self.k)
        return self.readout(x, row_mask)


def factorized_first_layer(layer: Block, seq: torch.Tensor, keys: torch.Tensor | None,
                           cand: torch.Tensor) -> torch.Tensor:
    """TransAct's layer 0 (post-norm, one head) over the early-fused rows [s_j | c], exactly, without forming them.
    Every row of candidate c is [s_j | c], so q_i = qs_i + qc, k_j = ks_j + kc, v_j = vs_j + vc. In the score
    (qs_i + qc).(ks_j + kc) the terms that do not depend on j cancel in the softmax over j, leaving
        P_c = softmax_j(A_ij + b_cj),  A = Qs Ks^T (once per request),  b_c = Ks qc (one vector per candidate),
    and since each softmax row sums to 1 the output projection of the value is
        sum_j P_cij vs_j Wo + (vc Wo + bo) = (P_c Us)_i + uc,   Us = Vs Wo^T (once per request).
    So no per-candidate Q, K, V, QK^T product or output projection; the residual input x = [s_i | c] is never
    formed either: x + attention = P_c Us + ([s_i | 0] + [0 | c] + uc), one row per position plus one per candidate.

    fp16: P_c is a plain softmax over the scores A_i + b_c, which subtracts its own row maximum, so no exp
    overflows and the largest term of every row is exp(0) = 1: the normaliser is >= 1 and nothing underflows that
    matters (a key more than ~17 logits below its row's best gets weight < 6e-8, in any form). The earlier form
    normalised E = exp(A - max A) and w_c = exp(b_c - max b_c) separately and summed their products, which all
    underflow (0/0) as soon as the two maxima sit on different keys ~17 logits apart in fp16 (~100 in fp32).
    Cost against that form: the [B,N,S,S] scores and probabilities are formed (the direct form and the later,
    merged layers form them anyway, so the peak activation does not grow), one add and a softmax over them
    (~5 N S^2 elementwise operations) replace the normaliser product z = w E^T (2 N S^2 multiply-adds) and the
    scaling of Us by w_c (N S d): +~3 N S^2, about 1.5 % of the layer's 2 N S^2 d matrix products at d = 96.
    Against the direct form it still saves the per-candidate QK^T product (2 N S^2 d), the Q/K/V and output
    projections of every row (8 N S d^2) and the [B,N,S,d] residual input."""
    attn = layer.attn
    d = attn.out.in_features
    ds = seq.shape[-1]
    wq, wk, wv = attn.qkv.weight.chunk(3, dim=0)
    bq, _, bv = attn.qkv.bias.chunk(3)                    # the key bias cancels like kc
    scale = d ** -0.5
    qs, ks, vs = seq @ wq[:, :ds].T, seq @ wk[:, :ds].T, seq @ wv[:, :ds].T          # [B,S,d]
    qc, vc = cand @ wq[:, ds:].T + bq, cand @ wv[:, ds:].T + bv                      # [B,N,d]
    a = (qs @ ks.transpose(1, 2)) * scale                                            # [B,S,S]
    b = (qc @ ks.transpose(1, 2)) * scale                                            # [B,N,S]
    if keys is not None:                                                             # keys [B,1,S]
        a, b = a.masked_fill(~keys, MASK_FILL), b.masked_fill(~keys, MASK_FILL)
    p = (a.unsqueeze(1) + b.unsqueeze(2)).softmax(-1)                                # [B,N,S_i,S_j]
    us = vs @ attn.out.weight.T                                                      # [B,S,d]
    uc = vc @ attn.out.weight.T + attn.out.bias                                      # [B,N,d]
    residual = F.pad(seq, (0, d - ds)).unsqueeze(1) + (uc + F.pad(cand, (ds, 0))).unsqueeze(2)  # [B,N,S,d]
    x = layer.norm1(p @ us.unsqueeze(1) + residual)
    return layer.norm2(x + layer.ff(x))


class MergedSingleHead(nn.Module):
    """One head, exactly, with two [d, d] products per position instead of four. With q = x Wq^T + bq and
    k = x Wk^T + bk, the score q_i.k_j = (x_i M + u).x_j + (terms constant in j, which the softmax cancels),
    M = Wq^T Wk / sqrt(d), u = Wk^T bq / sqrt(d); and since each softmax row sums to 1 the value and output
    projections compose: sum_j P_ij (x_j Wv^T + bv) Wo^T + bo = (P (x N))_i + c with N = (Wo Wv)^T,
    c = Wo bv + bo. The key and output projections and the scaling pass are gone (~30 % fewer FLOPs in TransAct's
    second layer at S = 100, d = 96); M, u, N and c depend on the weights only, so ONNX Runtime and TensorRT fold
    them into constants when they load the graph. Only for one head: per head, M and N would be [d, d] instead of
    [d, d/h], more work, not less. Training keeps the separate projections (dropout acts on the probabilities)."""

    def __init__(self, attn: SelfAttention):
        super().__init__()
        assert attn.n_heads == 1
        self.qkv, self.out = attn.qkv, attn.out

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, causal: bool = False,
                qkv: None = None) -> torch.Tensor:
        """SelfAttention.forward's contract; qkv (a precomputed projection) is the paper form's first layer's only."""
        assert qkv is None
        lead, L, d = x.shape[:-2], x.shape[-2], self.out.in_features  # d an int, not a traced shape: foldable
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, _, bv = self.qkv.bias.chunk(3)
        scale = d ** -0.5
        m, u = (wq.T @ wk) * scale, (wk.T @ bq) * scale
        n, c = (self.out.weight @ wv).T, self.out.weight @ bv + self.out.bias
        xf = x.reshape(-1, L, d)
        scores = mask_scores(F.linear(xf, m.T, u) @ xf.transpose(-2, -1), key_mask, causal, lead)  # [M, L, L]
        y = scores.softmax(-1) @ (xf @ n)
        return y.reshape(*lead, L, d) + c


class SplitProjections(nn.Module):
    """Attention with the query, key and value projections as three products instead of one and a Split (a view
    in PyTorch, a copy of the whole activation in ONNX Runtime: ~1.07x on the CPU ranker); no key bias (it adds
    q_i.b_k to every score of row i, which the softmax cancels); the value bias after the output projection (each
    softmax row sums to 1, so it passes through unchanged)."""

    def __init__(self, attn: SelfAttention):
        super().__init__()
        self.n_heads, self.qkv, self.out = attn.n_heads, attn.qkv, attn.out

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, causal: bool = False,
                qkv: None = None) -> torch.Tensor:
        assert qkv is None
        lead, (L, d) = x.shape[:-2], x.shape[-2:]
        w, b = self.qkv.weight.chunk(3), self.qkv.bias.chunk(3)
        q, k, v = (t.reshape(-1, L, d) for t in (F.linear(x, w[0], b[0]), x @ w[1].T, x @ w[2].T))
        return F.linear(attend(q, k, v, key_mask, causal, lead, self.n_heads), self.out.weight,
                        self.out.bias + self.out.weight @ b[2])

