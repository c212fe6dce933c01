"""Fit diagnosis of a trained and evaluated run: each ranker's AUC per head on a sample of *training* impressions and on
the test period, side by side (a big gap: overfitting; a low training AUC: the model does not fit).

    python scripts/train_test_auc.py --run runs/k2 [--sample 15000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seqrank import metrics as M
from seqrank.pipeline import EmbeddingCache, _fit_ranker, _load_pinnerformer, load_run
from seqrank.train import RankerExamples, predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--sample", type=int, default=15_000, help="training impressions scored (random, seed 0)")
    args = parser.parse_args()
    cfg, _, prep = load_run(args.run)
    embeddings = EmbeddingCache(_load_pinnerformer(args.run, cfg.pinnerformer, prep), prep)
    table = np.load(args.run / "item_table.npy")
    train_rows = prep.ranker_train_rows()
    sample = np.sort(np.random.default_rng(0).choice(train_rows, min(args.sample, len(train_rows)), replace=False))
    sets = {"train": RankerExamples(prep, sample, embeddings, cfg.transact.seq_len),
            "test": RankerExamples(prep, prep.test_rows(), embeddings, cfg.transact.seq_len)}
    out = {}
    for encoder in ("transact", "no_sequence", "avg_pool"):
        path = args.run / ("ranker.safetensors" if encoder == cfg.transact.sequence_encoder
                           else f"baselines/ranker_{encoder}.safetensors")
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `seqrank evaluate --run {args.run}` first")
        model = _fit_ranker(args.run, cfg, prep, table, sets["train"], encoder, path)  # loads, never trains
        for name, ex in sets.items():
            probs = predict(model, ex)
            out.setdefault(encoder, {})[name] = {h: round(M.auc(ex.labels[:, j], probs[:, j]), 4)
                                                 for j, h in enumerate(prep.vocab.heads)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
