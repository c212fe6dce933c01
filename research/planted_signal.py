"""Write the planted-signal log (seqrank/data/planted.py): like/hate labels that depend on the order of the user's
actions and on nothing else, the positive control for the sequence models.

    python research/planted_signal.py --out runs/planted/events.csv
    seqrank train --events runs/planted/events.csv --out runs/planted/run --negative-actions hate
    seqrank evaluate --run runs/planted/run

Canonical columns (user_id,item_id,action,timestamp in ms); deterministic for a seed. Also writes the items' clusters
next to it (item_clusters.csv) for diagnostics.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from seqrank.data.planted import clusters_of, planted_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--items", type=int, default=1600)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--keep", type=float, default=0.75, help="chance the interest survives to the next session")
    parser.add_argument("--noise", type=float, default=0.1, help="share of labels flipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle", action="store_true",
                        help="also print the test-split AUC of the planted rule itself (the candidate's cluster among "
                             "the clusters liked in the last 8 actions before the request), a reference ceiling")
    args = parser.parse_args()
    log = planted_log(args.users, args.items, args.clusters, args.days, keep=args.keep, noise=args.noise,
                      seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.events.to_csv(args.out, index=False)
    pd.DataFrame({"item_id": [f"i{i}" for i in range(args.items)], "cluster": log.item_cluster}).to_csv(
        args.out.parent / "item_clusters.csv", index=False)
    ev = log.events
    print(f"wrote {args.out}: {len(ev):,} events of {ev.user_id.nunique()} users, {ev.item_id.nunique()} items, "
          f"like share {np.mean(ev.action == 'like'):.3f}")
    if args.oracle:
        print(f"planted rule on the test split: like AUC {oracle_auc(args.out, log.item_cluster):.4f}")


def oracle_auc(events: Path, item_cluster: np.ndarray, last: int = 8) -> float:
    """Score each test impression by the share of the liked items among the user's last `last` actions before the
    request that are in the candidate's cluster; the like head's AUC of that score (the pipeline's own split)."""
    from seqrank import metrics as M
    from seqrank.config import RunConfig
    from seqrank.dataset import load_log, prepare
    from seqrank.features import FIRST_ID

    cfg = RunConfig()
    prep = prepare(load_log(str(events), cfg, ["hate"]), cfg)
    cluster = clusters_of(prep.vocab.items, item_cluster)
    like = prep.vocab.actions.index("like") + FIRST_ID
    test = prep.impressions[prep.impressions.is_test]
    candidate_cluster = clusters_of(test.item_id, item_cluster)
    scores = []
    for user, request_time, candidate in zip(test.user_id, test.request_time, candidate_cluster):
        h = prep.histories[user]
        before = h.ts < request_time
        recent_item, recent_action = h.item[before][-last:], h.action[before][-last:]
        liked = recent_item[(recent_action == like) & (recent_item >= FIRST_ID)]  # out-of-vocabulary rows skipped
        scores.append(np.mean(cluster[liked - FIRST_ID] == candidate) if len(liked) else 0.0)
    labels = prep.labels[prep.impressions.is_test.to_numpy(), prep.vocab.heads.index("like")]
    return M.auc(labels, np.array(scores))


if __name__ == "__main__":
    main()
