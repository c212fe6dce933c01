"""Each inference rewrite of seqrank/models/inference.py against the paper form it replaces (transact.py,
pinnerformer.py): the same scores up to rounding on full, short, one-action and empty histories, also with the
attention logits scaled up; the rewrite really runs (the paper form's module does not); the served module shares the
trained weights and leaves the paper model as it was."""
from __future__ import annotations

import copy

import pytest
import torch

from seqrank.models.inference import (MergedSingleHead, SplitProjections, ranker_for_serving, served_block,
                                      user_tower_for_serving)
from seqrank.models.layers import Block, SelfAttention
from seqrank.models.pinnerformer import PinnerFormer
from seqrank.models.transact import TransActEncoder
from test_models import N_ACTIONS, N_ITEMS, make_ranker, pf_history, ranker_inputs, small_pf_cfg

HISTORIES = [7, 3, 1, 0]  # full, short, one action, empty


def _scale_logits(modules, scale: float):
    with torch.no_grad():
        for attn in modules:
            attn.qkv.weight.mul_(scale)


def _calls(module):
    calls = []
    return calls, module.register_forward_pre_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize("logit_scale", [1.0, 8.0, 40.0])
def test_factorized_first_layer_equals_the_early_fusion_layer(logit_scale):
    """Layer 0 without per-candidate attention (factorized_first_layer) scores what the paper's early fusion scores.
    At 40x the logits span hundreds: the form it replaced (exp(A - max A) times exp(b - max b)) was off by 0.04."""
    model = make_ranker("transact", n_heads=1)
    _scale_logits([model.encoder.layers[0].attn], logit_scale)
    inputs = ranker_inputs(HISTORIES, 7, 9, seed=4)
    calls, hook = _calls(model.encoder.layers[0].attn)
    try:
        with torch.no_grad():
            served = ranker_for_serving(model, merge_single_head=False)(*inputs)
            assert not calls  # the paper form's layer-0 attention never ran
            paper = model(*inputs)
            assert calls
    finally:
        hook.remove()
    assert torch.isfinite(served).all()
    torch.testing.assert_close(served, paper, rtol=0, atol=2e-6)


@pytest.mark.parametrize("logit_scale", [1.0, 8.0])
def test_merged_single_head_equals_the_separate_projections(logit_scale):
    """One head's query-key and value-output products merged (MergedSingleHead): TransAct's later layers (the first
    one as the paper computes it) and a causal PinnerFormer-style block score what the paper forms score."""
    model = make_ranker("transact", n_heads=1, n_layers=3)
    block = Block(12, 1, 8, 0.1, norm_first=True).eval()
    _scale_logits([layer.attn for layer in model.encoder.layers] + [block.attn], logit_scale)
    inputs = ranker_inputs(HISTORIES, 7, 9, seed=4)
    seq = torch.randn(3, 6, 12, generator=torch.Generator().manual_seed(1))
    seq_mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4, [True] + [False] * 5])
    projections = [layer.attn.qkv.register_forward_hook(lambda *a: calls.append(1))
                   for layer in model.encoder.layers[1:]]
    calls: list[int] = []
    try:
        with torch.no_grad():
            served = ranker_for_serving(model, factorize_first_layer=False)(*inputs)
            merged_block = served_block(block)
            assert isinstance(merged_block.attn, MergedSingleHead)
            served_pf = merged_block(seq, seq_mask, causal=True)
            assert not calls  # the later layers' qkv projection never ran
            paper, paper_pf = model(*inputs), block(seq, seq_mask, causal=True)
            assert len(calls) == 2
    finally:
        for h in projections:
            h.remove()
    torch.testing.assert_close(served, paper, rtol=0, atol=2e-6)
    torch.testing.assert_close(served_pf, paper_pf, rtol=0, atol=2e-5 * logit_scale)


def test_split_projections_equal_the_fused_projection_with_several_heads():
    """Several heads: three projections and the key bias dropped (SplitProjections) score what one qkv projection
    and a Split score; layer 0 keeps the paper's early fusion (the factorization is written for one head)."""
    model = make_ranker("transact", seed=1, n_heads=2, n_layers=2)
    inputs = ranker_inputs(HISTORIES, 7, 9, seed=4)
    served = ranker_for_serving(model)
    assert not served.encoder.factorize_first_layer and isinstance(served.encoder.layers[1].attn, SplitProjections)
    with torch.no_grad():
        torch.testing.assert_close(served(*inputs), model(*inputs), rtol=0, atol=2e-6)


@pytest.mark.parametrize("heads", [1, 2])
def test_user_tower_for_serving_equals_pinnerformer(heads):
    torch.manual_seed(0)
    model = PinnerFormer(small_pf_cfg(n_heads=heads), N_ITEMS, N_ACTIONS).eval()
    item, action, tfeat, mask = pf_history(torch.Generator().manual_seed(2))
    mask[1, 3:] = False  # a short history too
    served = user_tower_for_serving(model)
    kind = MergedSingleHead if heads == 1 else SplitProjections
    assert all(isinstance(b.attn, kind) for b in served.blocks)
    with torch.no_grad():
        torch.testing.assert_close(served(item, action, tfeat, mask), model(item, action, tfeat, mask),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"n_heads": 2}, {"sequence_mean": True}], ids=["default", "2-heads", "mean"])
def test_full_history_form_equals_the_masked_form_only_on_full_histories(extra):
    """full_history (the CPU graph's unmasked branch) drops every mask: on histories with no padding it scores what
    the paper form scores, with the first layer factorized or not; with padding it would attend it, which is why the
    CPU graph takes it only when seq_mask is all True."""
    model = make_ranker("transact", seed=5, **extra)
    full = ranker_inputs([6, 6, 6], 6, 5, seed=2)
    padded = ranker_inputs([6, 2, 4], 6, 5, seed=2)
    with torch.no_grad():
        want_full, want_padded = model(*full), model(*padded)
        for factorize in (True, False):
            unmasked = ranker_for_serving(model, factorize_first_layer=factorize, full_history=True)
            torch.testing.assert_close(unmasked(*full), want_full, rtol=0, atol=2e-6)
            assert (unmasked(*padded)[1:] - want_padded[1:]).abs().max() > 1e-4  # the padding now counts


def test_served_ranker_shares_the_trained_weights_and_leaves_the_paper_model_alone():
    model = make_ranker("transact", seed=2, n_heads=1)
    served = ranker_for_serving(model)
    paper_state, served_state = model.state_dict(), served.state_dict()
    assert paper_state.keys() == served_state.keys()  # the same parameters under the same names ...
    assert all(served_state[k].data_ptr() == v.data_ptr() for k, v in paper_state.items())  # ... not copies
    assert type(model.encoder) is TransActEncoder
    assert all(type(layer.attn) is SelfAttention for layer in model.encoder.layers)
    with torch.no_grad():
        model.heads.bias.add_(1.0)  # a weight change reaches the served form
        inputs = ranker_inputs(HISTORIES, 7, 4, seed=3)
        torch.testing.assert_close(served(*inputs), model(*inputs), rtol=0, atol=2e-6)


@pytest.mark.parametrize("encoder", ["avg_pool", "no_sequence"])
def test_baselines_are_served_as_they_are(encoder):
    model = make_ranker(encoder, seed=2)
    inputs = ranker_inputs(HISTORIES, 7, 4, seed=3)
    with torch.no_grad():
        assert torch.equal(ranker_for_serving(model)(*inputs), model(*inputs))


def test_merged_single_head_is_as_precise_in_half_precision():
    """A TensorRT fp16 engine runs the merged products (folded M and N) in half precision: their error against fp32
    stays that of the separate projections."""
    model = make_ranker("transact", seed=6, n_heads=1, n_layers=2)
    item, action, mask, user, ctx, cand = ranker_inputs([7, 4, 1], 7, 6, seed=5)
    with torch.no_grad():
        want = model(item, action, mask, user, ctx, cand)
        err = {}
        for merge in (True, False):
            half = ranker_for_serving(copy.deepcopy(model).half(), merge_single_head=merge)
            got = half(item, action, mask, user.half(), ctx.half(), cand).float()
            assert torch.isfinite(got).all()
            err[merge] = (got - want).abs().max().item()
    assert err[True] <= 2 * err[False] + 1e-4, err
