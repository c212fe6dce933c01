"""Do the item embeddings carry the ranker's training labels? The AUC of one feature, the cosine between a candidate's
item embedding and the user (the mean of the history's item embeddings; the long-term user embedding), for each
head, on the ranker's training impressions and on the test period, candidates seen by the vocabulary only.

    python scripts/embedding_leak.py --run runs/k6

A pretrained table learned on the same period as the ranker's examples has seen their outcomes (PinnerFormer pulls
an engaged item towards its user), so the cosine predicts a training label better than a test label. A ranker
learns to lean on it, early fusion most directly (attention between the candidate and every history row), and
carries the habit into a test period where it does not hold. `data.embedding_period` < 1 (README, session 12) or
`data.ranker_users` "held_out" (session 13) removes the overlap, though on KuaiRand neither closes TransAct's gap
to average pooling. Reads the run; trains nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seqrank import metrics as M
from seqrank.features import FIRST_ID, OOV
from seqrank.pipeline import load_ranker_examples


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosines(ex, table: np.ndarray) -> dict[str, np.ndarray]:
    t = unit(table)
    real = ex.seq.seq_mask & (ex.seq.seq_item >= FIRST_ID)
    history = (t[ex.seq.seq_item] * real[..., None]).sum(1) / np.maximum(real.sum(1, keepdims=True), 1)
    cand = t[ex.cand_item]
    return {"history_mean": (unit(history) * cand).sum(1), "user_embedding": (unit(ex.user_emb) * cand).sum(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--heads", default="like,click,long_view", help="comma-separated heads (default: %(default)s)")
    args = parser.parse_args()
    _, _, prep, table, train_ex, test_ex = load_ranker_examples(args.run)
    heads = [h for h in args.heads.split(",") if h in prep.vocab.heads]
    out = {}
    for name, ex in (("ranker_training", train_ex), ("test", test_ex)):
        seen = ex.cand_item != OOV
        feats = cosines(ex, table)
        out[name] = {"impressions_with_seen_candidate": int(seen.sum()),
                     **{f"{h}/{f}": round(M.auc(ex.labels[seen, prep.vocab.heads.index(h)], v[seen]), 4)
                        for h in heads for f, v in feats.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
