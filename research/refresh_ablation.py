"""What in the replayed daily refresh moves the test tables? Scores a run's already trained rankers (every seed the
evaluation trained; nothing is trained here) on its test period four ways, and prints pooled AUC and GAUC per head
and ranker (mean over seeds):

  training vocabulary   every request with the run's own vocabulary (`seqrank evaluate --refreshes 0`)
  refreshed             as `seqrank evaluate` scores by default: each request with the newest refresh before it
  refreshed, new candidates OOV
                        the refresh for the sequence and the user embedding, but a candidate the training vocabulary
                        lacks stays the out-of-vocabulary row
  refreshed candidates only
                        the candidate's refreshed row, with the training vocabulary's sequence and user embedding

The refresh appends rows (a row never moves), so an item of the training vocabulary has the same index and row in
every state and the four differ only where the refresh reaches. A diagnostic of the reported tables: no choice is
made from it.

    python research/refresh_ablation.py --run runs/kuairand --seeds 0,1,2,3,4
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from seqrank import metrics as M
from seqrank.daily_items import RefreshedTest, replay_refreshes
from seqrank.evaluation import RANKERS, ranker_path
from seqrank.examples import EmbeddingCache, RankerExamples
from seqrank.features import OOV
from seqrank.pipeline import fit_ranker, load_pinnerformer, load_ranker_examples

HEADS = ("like", "click", "long_view", "profile_enter", "comment")


def variants(cfg, prep, run: Path, rows: np.ndarray, plain: RankerExamples, table: np.ndarray,
             served: RefreshedTest) -> dict[str, list]:
    """Per variant: (positions in the test rows, examples, item table, vocabulary) parts, as RefreshedTest.parts;
    `plain`: the test examples with the training vocabulary, `table` its item table."""
    trained_items = prep.vocab.n_items
    embeddings = EmbeddingCache(load_pinnerformer(run, cfg.pinnerformer, prep), prep)  # the training vocabulary's
    out = {"training vocabulary": [(np.arange(len(plain)), plain, torch.as_tensor(table), prep.vocab)],
           "refreshed": served.parts,
           "refreshed, new candidates OOV": [], "refreshed candidates only": []}
    for positions, ex, state_table, vocab in served.parts:
        masked = copy.copy(ex)
        masked.cand_item = np.where(ex.cand_item >= trained_items, OOV, ex.cand_item)
        out["refreshed, new candidates OOV"].append((positions, masked, state_table, vocab))
        only = RankerExamples(prep, rows[positions], embeddings, cfg.transact.seq_len)
        only.cand_item = ex.cand_item
        out["refreshed candidates only"].append((positions, only, state_table, vocab))
    return out


def score(model, served: RefreshedTest, parts) -> np.ndarray:
    """The model's probabilities with `parts` in place of the served ones (RefreshedTest.predict swaps the tables)."""
    view = copy.copy(served)
    view.parts = parts
    return view.predict(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="an evaluated run (seqrank evaluate --seeds ...)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds whose rankers the run holds")
    parser.add_argument("--refreshes", type=int, default=8, help="as seqrank evaluate --refreshes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, _, prep, table, data = load_ranker_examples(args.run)
    rows = prep.test_rows()
    served = RefreshedTest(cfg, prep, rows, replay_refreshes(args.run, prep, rows, args.refreshes))
    ways = variants(cfg, prep, args.run, rows, data.test, table, served)
    labels, users = data.test.labels, data.test.user
    seeds = [int(s) for s in args.seeds.split(",")]
    new_candidate = served.cand_item >= prep.vocab.n_items
    print(f"{len(rows)} test impressions; candidates the refresh reaches: {new_candidate.mean():.1%}; "
          f"still out of vocabulary: {(served.cand_item == OOV).mean():.1%}")
    results = {}
    for encoder in RANKERS:
        for seed in seeds:
            path = ranker_path(args.run, cfg, encoder, seed)
            if not path.exists():
                raise SystemExit(f"{path} is missing: evaluate the run with --seeds {args.seeds} first")
            model = fit_ranker(args.run, replace(cfg, seed=seed), prep, table, data, encoder, path)
            for way, parts in ways.items():
                probs = score(model, served, parts)
                for h in HEADS:
                    j = prep.vocab.heads.index(h)
                    results.setdefault((encoder, way, h), []).append(
                        (M.auc(labels[:, j], probs[:, j]), M.gauc(labels[:, j], probs[:, j], users)))
    print("| ranker | scored with | " + " | ".join(f"{h} AUC / GAUC" for h in HEADS) + " |")
    print("|---|---|" + "---|" * len(HEADS))
    for encoder in RANKERS:
        for way in ways:
            cells = [" / ".join(f"{v:.3f}" for v in np.mean(results[(encoder, way, h)], axis=0)) for h in HEADS]
            print(f"| {encoder} | {way} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
