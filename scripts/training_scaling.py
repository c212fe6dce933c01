"""Compare trainings of one log and config by 1 and by N processes (docs/training-at-scale.md): per run, the world
size, the median seconds per epoch of PinnerFormer and of the ranker (run.json epoch_seconds), the whole `seqrank
train` time, and what the models score on the test period: the ranker's AUC per head and PinnerFormer's Recall@10 of
the held-out users. Nothing is trained here.

    python scripts/training_scaling.py runs/scale-1 runs/scale-2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seqrank.evaluation import ranker_test_scores, recall_of_held_out_users
from seqrank.pipeline import load_run

HEADS = ("like", "hate", "click", "long_view")


def row(run: Path) -> str:
    info = json.loads((run / "run.json").read_text())
    cfg, _, prep = load_run(run)
    _, auc = ranker_test_scores(run)
    recall = recall_of_held_out_users(run, cfg, prep, cfg.pinnerformer.objective, sorted(prep.pf_test_users),
                                      run / "pinnerformer.safetensors")
    seconds = {model: f"{np.median(s):.1f}" if s else "n/a (reused)" for model, s in info["epoch_seconds"].items()}
    cells = [str(info["world_size"]), str(cfg.threads), seconds["pinnerformer"], seconds["ranker"],
             f"{info['train_seconds']:.0f}", str(info["ranker_selected_epoch"]),
             *(f"{auc[h]:.4f}" for h in HEADS), f"{recall.mean():.4f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trained run directories (seqrank train --out)")
    args = parser.parse_args()
    print("| processes | threads each | PinnerFormer s/epoch | ranker s/epoch | train s | ranker epoch kept | "
          + " | ".join(f"AUC {h}" for h in HEADS) + " | PinnerFormer Recall@10 |")
    print("|" + "---|" * (7 + len(HEADS)))
    for run in args.runs:
        print(row(run))


if __name__ == "__main__":
    main()
