"""perf/bench.py's REWRITES, which the full bench uses to measure each exact inference rewrite against the same
weights without it: every switch must really take its rewrite off and put it back (a renamed model attribute would
make the switch set a new, unused one, and the bench would report ~1.0x for a comparison that never happened)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import bench  # noqa: E402
from test_models import make_ranker, ranker_inputs  # noqa: E402


def _run(model, inputs) -> tuple[torch.Tensor, frozenset]:
    """The output and the names of the encoder's submodules whose forward ran."""
    ran: set[str] = set()
    hooks = [m.register_forward_hook(lambda *a, name=name: ran.add(name))
             for name, m in model.encoder.named_modules() if name]
    try:
        with torch.no_grad():
            return model(*inputs), frozenset(ran)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", list(bench.REWRITES))
def test_each_rewrite_switch_changes_the_path_not_the_scores(name):
    model = make_ranker("transact", seed=2, n_heads=1, n_layers=2)
    inputs = ranker_inputs([6, 3, 0], 6, 5, seed=3)
    switch = bench.REWRITES[name][1]
    served, served_path = _run(model, inputs)
    switch(model, False)
    without, without_path = _run(model, inputs)
    switch(model, True)
    again, again_path = _run(model, inputs)
    assert without_path != served_path, f"{name}: switching it off ran the same modules"
    assert again_path == served_path
    torch.testing.assert_close(without, served, rtol=0, atol=2e-6)
    torch.testing.assert_close(again, served, rtol=0, atol=0)
