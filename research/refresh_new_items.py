"""Do the rows `seqrank refresh` learns rank new items better than the out-of-vocabulary row?

A trained run's test period is split in two halves by time. The refresh learns rows from every action before the
midpoint (the training period and the first half: "today"), exactly as `seqrank refresh` does
(seqrank.refresh.learn_new_items, same budget defaults). The trained ranker then scores the second half's
impressions twice: with the training vocabulary (an item first seen after training is the OOV row, in the
candidate and in the sequence) and with the refreshed vocabulary and item table. Same user embeddings both times
(the daily batch of the training run), so only the item rows differ. Reported per head: AUC and GAUC of both on the
second-half impressions whose candidate the refresh added (heads with 20 or more positives and negatives), and
their difference with a 95% user-bootstrap interval.

    python research/refresh_new_items.py --run runs/demo [--out runs/demo/refresh_new_items.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from seqrank import metrics as M
from seqrank.exporting import load_ranker, load_user_tower
from seqrank.features import OOV
from seqrank.dataset import actions_by_user
from seqrank.examples import EmbeddingCache, RankerExamples
from seqrank.pipeline import load_run
from seqrank.refresh import learn_new_items
from seqrank.training import predict

MIN_CLASS = 20  # a head is reported with at least this many positives and negatives among the impressions


def _fmt(interval: dict) -> str:
    if interval["value"] is None or interval["ci"] is None:
        return "n/a"
    lo, hi = interval["ci"]
    return f"{interval['value']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default RUN/refresh_new_items.json)")
    args = parser.parse_args(argv)
    run = args.run
    cfg, _, prep = load_run(run)
    torch.set_num_threads(cfg.threads)
    test = prep.test_rows()
    times = prep.impressions.timestamp.to_numpy()
    mid = int(np.median(times[test]))
    ev = prep.log.events
    today = ev[ev.timestamp < mid]
    learned = learn_new_items(run, run, actions_by_user(today))
    if learned is None:
        raise SystemExit("the refresh found no item to learn before the midpoint of the test period")

    later = test[times[test] >= mid]
    items = prep.impressions.item_id.to_numpy()[later]
    added = (prep.vocab.item_index(items) == OOV) & (learned.vocab.item_index(items) != OOV)
    rows = later[added]
    model, _, _ = load_ranker(run)
    embeddings = EmbeddingCache(load_user_tower(run, cfg, prep.vocab), prep)
    as_oov = RankerExamples(prep, rows, embeddings, cfg.transact.seq_len)
    refreshed = RankerExamples(prep.with_vocabulary(learned.vocab), rows, embeddings, cfg.transact.seq_len)
    p_oov = predict(model, as_oov)
    model.item_table = torch.as_tensor(learned.table)
    p_new = predict(model, refreshed)

    heads = prep.vocab.heads
    result = {"run": str(run), "midpoint_ms": mid, "new_items_learned": int(learned.new_ids.size),
              "learning_users": learned.users, "steps": learned.steps, "train_seconds": round(learned.seconds, 1),
              "second_half_impressions": int(len(later)), "of_which_refreshed_items": int(len(rows)),
              "users": int(len(set(as_oov.user))), "heads": {}}
    for h, name in enumerate(heads):
        y = as_oov.labels[:, h]
        if min(y.sum(), len(y) - y.sum()) < MIN_CLASS:
            continue  # too few positives or negatives for an AUC
        result["heads"][name] = {
            "positives": int(y.sum()),
            "auc_oov": M.auc(y, p_oov[:, h]), "auc_refreshed": M.auc(y, p_new[:, h]),
            "auc_difference": M.auc_difference_ci(y, p_new[:, h], p_oov[:, h], as_oov.user),
            "gauc_oov": M.gauc(y, p_oov[:, h], as_oov.user), "gauc_refreshed": M.gauc(y, p_new[:, h], as_oov.user),
            "gauc_difference": M.gauc_difference_ci(y, p_new[:, h], p_oov[:, h], as_oov.user)}
    out = args.out or run / "refresh_new_items.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "heads"}))
    for name, r in result["heads"].items():
        d, g = r["auc_difference"], r["gauc_difference"]
        print(f"{name:>14}: AUC {r['auc_oov']:.4f} (OOV row) -> {r['auc_refreshed']:.4f} (refreshed), "
              f"difference {_fmt(d)}; GAUC {r['gauc_oov']:.4f} -> {r['gauc_refreshed']:.4f}, difference {_fmt(g)}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
