"""perf/bare.py's REWRITES, which the full bench uses to measure each exact inference rewrite against the same
weights without it: every option must really take its rewrite off (otherwise the bench would report ~1.0x for a
comparison that never happened)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import bare  # noqa: E402
from seqrank.models.inference import ranker_for_serving  # noqa: E402
from test_models import make_ranker, ranker_inputs  # noqa: E402


def _run(model, inputs) -> tuple[torch.Tensor, frozenset]:
    """The output and the names and kinds of the encoder's submodules whose forward ran."""
    ran: set[tuple[str, str]] = set()
    hooks = [m.register_forward_hook(lambda *a, name=name, m=m: ran.add((name, type(m).__name__)))
             for name, m in model.encoder.named_modules() if name]
    try:
        with torch.no_grad():
            return model(*inputs), frozenset(ran)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", list(bare.REWRITES))
def test_each_rewrite_switch_changes_the_path_not_the_scores(name):
    model = make_ranker("transact", seed=2, n_heads=1, n_layers=2)
    inputs = ranker_inputs([6, 3, 0], 6, 5, seed=3)
    option = bare.REWRITES[name][1]
    served, served_path = _run(ranker_for_serving(model), inputs)
    without, without_path = _run(ranker_for_serving(model, **{option: False}), inputs)
    again, again_path = _run(ranker_for_serving(model, **{option: True}), inputs)
    assert without_path != served_path, f"{name}: switching it off ran the same modules"
    assert again_path == served_path
    torch.testing.assert_close(without, served, rtol=0, atol=2e-6)
    torch.testing.assert_close(again, served, rtol=0, atol=0)
