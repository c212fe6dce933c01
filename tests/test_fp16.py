"""The ranker in half precision (issue #26): what a TensorRT fp16 engine or ONNX Runtime's CUDA provider in fp16
computes from the exported graph, run here with PyTorch in float16 on the CPU (onnxconverter-common, which would
convert the ONNX file itself, is not in requirements.lock). Both the paper form (transact.py) and the form export
traces (models/inference.py's ranker_for_serving: factorized first layer, merged head) are run in fp16 and
compared with the paper form in fp32, at the shipped sizes (S = 100, d = 96, K = 3, 2 layers, 1 head) on stress
inputs: empty histories, one dominant attention key (one item embedding of huge norm), 1024 candidates (one request
whose history serving trims to its 24 real actions: PyTorch has no fast fp16 matrix product on the CPU, and every
candidate's computation is independent of the others'), and the extreme ages the context features can encode.
No NaN or inf, and every probability within MAX_DELTA_P."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from seqrank.config import TransActConfig
from seqrank.features import FIRST_ID, HISTORY_COUNT_CAP, N_CONTEXT
from seqrank.models.inference import ranker_for_serving
from seqrank.models.transact import TransActRanker

N_ITEMS, N_ACTIONS, USER_DIM, N_HEADS, TABLE_DIM = 300, 8, 64, 4, 64
MAX_DELTA_P = 5e-3     # max |p_fp16 - p_fp32| on any head of any candidate
DOMINANT_NORM = 60.0   # the dominant item's embedding, in multiples of a typical item's norm
DOMINANT = FIRST_ID    # its id


def _ranker() -> TransActRanker:
    """The shipped shape (TransActConfig defaults) with random weights, attention logits scaled up 4x as training
    sharpens them, and one item of DOMINANT_NORM times the typical norm."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(N_ITEMS, TABLE_DIM)).astype(np.float32)
    table[0] = 0.0
    table[DOMINANT] *= DOMINANT_NORM
    model = TransActRanker(TransActConfig(), table, N_ACTIONS, USER_DIM, N_CONTEXT, N_HEADS).eval()
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.attn.qkv.weight[: 2 * layer.attn.out.in_features].mul_(2.0)  # q and k: logits x 4
    return model


def _context(hours_since_last: float, n_before: int, hour: float, unavailable: bool = False) -> list[float]:
    """The context features (seqrank.features) of a request."""
    angle = hour * 2 * np.pi / 24
    return [np.log1p(min(n_before, HISTORY_COUNT_CAP)), np.log1p(hours_since_last), np.sin(angle), np.cos(angle),
            float(unavailable)]


def stress_inputs(case: str, seq_len: int = 100) -> tuple[torch.Tensor, ...]:
    """Ranker inputs for one stress case (batch of 4 requests unless stated)."""
    g = torch.Generator().manual_seed(7)
    n_cand, lengths = 16, [seq_len, 37, 5, 1]
    if case == "empty_history":
        n_cand, lengths = 4, [0, 0, 0, 0]
    if case == "candidates_1024":
        n_cand, seq_len, lengths = 1024, 24, [24]
    B = len(lengths)
    mask = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]
    seq_item = torch.randint(FIRST_ID + 1, N_ITEMS, (B, seq_len), generator=g) * mask
    seq_action = torch.randint(FIRST_ID, N_ACTIONS, (B, seq_len), generator=g) * mask
    cand = torch.randint(FIRST_ID + 1, N_ITEMS, (B, n_cand), generator=g)
    if case == "dominant_key":  # the huge item in every history (newest, middle, oldest) and among the candidates
        for b, n in enumerate(lengths):
            seq_item[b, [0, n // 2, n - 1]] = DOMINANT
        cand[:, ::7] = DOMINANT
    user = torch.nn.functional.normalize(torch.randn(B, USER_DIM, generator=g), dim=-1)
    ctx = [_context(1.0, 40, 13.5)] * B
    if case == "empty_history":  # new users and store outages (the fallback's "history unavailable" flag)
        ctx = [_context(0.0, 0, 13.5, unavailable=b % 2 == 1) for b in range(B)]
    if case == "extreme_context":  # a just-now action after a huge history; a first action in 100 years; midnight
        ctx = [_context(0.0, 10**9, 0.0), _context(100 * 365 * 24, 0, 23.99), _context(1e-9, 1, 6.0),
               _context(1e7, HISTORY_COUNT_CAP, 18.0)]
    return seq_item, seq_action, mask, user, torch.tensor(ctx, dtype=torch.float32), cand


def fp16_delta(model: TransActRanker, half: TransActRanker, inputs) -> tuple[float, int]:
    """(max |p_fp16 - p_fp32|, number of non-finite fp16 outputs): ``half`` (a form of ``model`` in fp16) against
    ``model``'s paper form in fp32."""
    seq_item, seq_action, mask, user, ctx, cand = inputs
    with torch.no_grad():
        want = model(*inputs)
        got = half(seq_item, seq_action, mask, user.half(), ctx.half(), cand).float()
    bad = int((~torch.isfinite(got)).sum())
    return float((got - want).abs().nan_to_num(nan=1.0).max()), bad


def half_forms(model: TransActRanker) -> dict[str, TransActRanker]:
    half = copy.deepcopy(model).half()
    return {"paper": half, "served": ranker_for_serving(half)}


@pytest.fixture(scope="module")
def model():
    return _ranker()


@pytest.fixture(scope="module")
def halves(model):
    return half_forms(model)


@pytest.mark.parametrize("form", ["paper", "served"])
@pytest.mark.parametrize("case", ["empty_history", "dominant_key", "candidates_1024", "extreme_context"])
def test_fp16_ranker_matches_fp32(model, halves, form, case):
    delta, bad = fp16_delta(model, halves[form], stress_inputs(case))
    assert bad == 0, f"{bad} NaN/inf probabilities in fp16 ({form}, {case})"
    assert delta <= MAX_DELTA_P, f"max |delta p| {delta:.3g} > {MAX_DELTA_P} ({form}, {case})"


def test_the_dominant_key_dominates(model):
    """The stress is real: in fp32 the huge item takes almost all of layer 0's attention of the rows that see it, so
    its logits stand tens above the others'."""
    seq_item, seq_action, mask, user, ctx, cand = stress_inputs("dominant_key")
    with torch.no_grad():
        seq = torch.cat([model.action_emb(seq_action), model.item_embedding(seq_item)], dim=-1)
        attn = model.encoder.layers[0].attn
        d = attn.out.in_features
        wq, wk, _ = attn.qkv.weight.chunk(3)
        ds = seq.shape[-1]
        keys = seq[0] @ wk[:, :ds].T
        logits = (seq[0] @ wq[:, :ds].T) @ keys.T / d ** 0.5  # the sequence part of layer 0's logits, request 0
    spread = logits.max(1).values - logits.min(1).values
    assert spread.max() > 50, spread.max()
