"""What does real time earn? The same trained rankers scored on a run's held-out period with a feature store that
lags the log: each request's sequence holds only the actions before its cut, while everything else is as served
(the count and hours-since-last-action context computed at the request's time from what the store holds, the daily
user embedding, the item rows the replayed refresh learned). Nothing is trained beyond the run's own rankers
(`evaluation.ranker_path`, trained here if missing or stale) and no choice is made from it.

Cuts: the request time itself (as served: every action strictly before the request), the request time minus 1 min,
10 min and 1 h (a streaming store that lags), the start of the request's sitting (its user's impressions with gaps
under 30 min: the construction this project used before real-time requests), the request's day start (a sequence
refreshed once a day, as the user embedding is) and no sequence at all (the store is down: preprocess's fallback,
RefreshedTest.store_down, which also flags the history "unavailable" in the context).

    seqrank train --events data/kuairand/events.tsv.gz --out runs/val --set data.split=validation
    python research/sequence_lag.py --run runs/val --seeds 0,1,2,3,4      # ~15 min, most of it training the rankers

Prints, per ranker and cut, pooled AUC and moment GAUC (metrics.moments: one request's ranking) per counted head
(>= 100 positives, one head of a complement pair; mean over seeds), and each cut minus as-served with a 95%
interval over users and seeds; RUN/variants/sequence_lag.json holds the same.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from seqrank import metrics as M
from seqrank.daily_items import RefreshedTest, replay_refreshes
from seqrank.dataset import day_start
from seqrank.evaluation import ranker_path
from seqrank.features import History, build_sequences
from seqrank.pipeline import fit_ranker, load_ranker_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from within_user import fmt_interval  # noqa: E402

MINUTE_MS = 60_000
SITTING_GAP_MS = 30 * MINUTE_MS
ENCODERS = ("transact", "avg_pool")  # the two that read the sequence; no_sequence is the floor
CUTS = ("as served", "1 min", "10 min", "1 h", "sitting start", "day start", "no sequence")
LAGS_MS = {"as served": 0, "1 min": MINUTE_MS, "10 min": 10 * MINUTE_MS, "1 h": 60 * MINUTE_MS}


def sitting_starts(users: np.ndarray, times: np.ndarray, gap_ms: int = SITTING_GAP_MS) -> np.ndarray:
    """Per impression, the first time of its sitting: its user's run of impressions with gaps under ``gap_ms``."""
    order = np.lexsort((times, users))
    u, t = users[order], np.asarray(times, dtype=np.int64)[order]
    new = np.ones(len(t), dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (t[1:] - t[:-1] >= gap_ms)
    start = t[np.flatnonzero(new)[np.cumsum(new) - 1]]
    out = np.empty_like(start)
    out[order] = start
    return out


def cut_times(cut: str, request_time: np.ndarray, sitting_start: np.ndarray) -> np.ndarray:
    """The time before which a store lagging by ``cut`` holds a request's actions."""
    if cut in LAGS_MS:
        return request_time - LAGS_MS[cut]
    if cut == "sitting start":
        return np.minimum(sitting_start, request_time)
    if cut == "day start":
        return day_start(request_time)
    raise ValueError(f"unknown cut {cut!r}; known: {CUTS}")


def lagged_sequences(histories: dict, users, request_times: np.ndarray, cuts: np.ndarray, max_len: int):
    """build_sequences at each request's time from the actions before its cut: what a store holding only those
    serves (so the context's count and last-action gap also see only them)."""
    empty = History.empty()
    held = []
    for user, cut in zip(users, cuts):
        h = histories.get(user, empty)
        k = int(np.searchsorted(h.ts, cut, side="left"))
        held.append(History(h.item[:k], h.action[:k], h.ts[:k]))
    return build_sequences(held, request_times, max_len)


def part_histories(served: RefreshedTest, prep, rows: np.ndarray) -> list[dict]:
    """Each part's users' histories in the part's own vocabulary (a refreshed state indexes the same log anew)."""
    users = set(prep.impressions.user_id.to_numpy()[rows])
    return [(prep if vocab is prep.vocab else prep.with_vocabulary(vocab, users)).histories
            for _, _, _, vocab in served.parts]


def lagged_parts(served: RefreshedTest, histories: list[dict], sitting: np.ndarray, cut: str, max_len: int):
    """RefreshedTest.parts with every part's sequences rebuilt from the actions before ``cut``."""
    parts = []
    for (positions, ex, table, vocab), held in zip(served.parts, histories):
        lagged = copy.copy(ex)
        lagged.seq = lagged_sequences(held, ex.user, ex.request_time,
                                      cut_times(cut, ex.request_time, sitting[positions]), max_len)
        parts.append((positions, lagged, table, vocab))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a trained run (data.split validation or test)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--refreshes", type=int, default=8, help="as seqrank evaluate --refreshes")
    parser.add_argument("--min-positives", type=int, default=100, help="heads counted, as in evaluate")
    args = parser.parse_args()
    cfg, _, prep, table, data = load_ranker_examples(args.run)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, ex = prep.test_rows(), data.test
    imp = prep.impressions
    sitting = sitting_starts(imp.user_id.to_numpy(), imp.timestamp.to_numpy())[rows]
    served = RefreshedTest(cfg, prep, rows, replay_refreshes(args.run, prep, rows, args.refreshes))
    feature, candidate, moment = M.moments(ex.user_day, ex.request, ex.request_time)
    repeated = M.complement_of(M.complement_pairs(ex.labels, prep.vocab.heads), prep.vocab.negative_actions)
    heads = [h for j, h in enumerate(prep.vocab.heads)
             if ex.labels[:, j].sum() >= args.min_positives and h not in repeated]
    histories, views = part_histories(served, prep, rows), {}
    for cut in CUTS[:-1]:
        views[cut] = copy.copy(served)
        views[cut].parts = lagged_parts(served, histories, sitting, cut, cfg.transact.seq_len)
    views[CUTS[-1]] = served.store_down()
    lag_s = (ex.request_time - sitting) / 1000
    print(f"{args.run} ({cfg.data.split} period): {len(rows)} impressions, {len(np.unique(ex.request))} requests, "
          f"{len(np.unique(ex.user))} users; request time after its sitting's start: median {np.median(lag_s):.0f} s, "
          f"{np.mean(lag_s > 0):.0%} later than the start; {len(np.unique(moment))} moments; heads {heads}")

    scores = {}  # (encoder, cut) -> [per seed: (impression probs, moment pair probs)]
    for encoder in ENCODERS + ("no_sequence",):
        for seed in seeds:
            model = fit_ranker(args.run, replace(cfg, seed=seed), prep, table, data, encoder,
                               ranker_path(args.run, cfg, encoder, seed))
            for cut in (CUTS if encoder in ENCODERS else (CUTS[0], CUTS[-1])):
                view = views[cut]
                scores.setdefault((encoder, cut), []).append((view.predict(model),
                                                              view.predict_pairs(model, feature, candidate)))
    report = {"run": str(args.run), "split": cfg.data.split, "seeds": seeds, "heads": heads,
              "requests_after_sitting_start": float(np.mean(lag_s > 0)), "table": {}}
    for (encoder, cut), per_seed in scores.items():
        row = {}
        for h in heads:
            j = prep.vocab.heads.index(h)
            y, ym = ex.labels[:, j], ex.labels[candidate, j]
            cell = {"auc": float(np.mean([M.auc(y, p[:, j]) for p, _ in per_seed])),
                    "moment_gauc": float(np.mean([M.gauc(ym, q[:, j], moment) for _, q in per_seed]))}
            if cut != CUTS[0]:
                base = scores[(encoder, CUTS[0])]
                cell["auc_minus_served"] = M.auc_difference_ci(
                    y, [p[:, j] for p, _ in per_seed], [p[:, j] for p, _ in base], ex.user, n_boot=500)
                cell["moment_gauc_minus_served"] = M.gauc_difference_ci(
                    ym, [q[:, j] for _, q in per_seed], [q[:, j] for _, q in base], ex.user[feature], n_boot=500,
                    groups=moment)
            row[h] = cell
        report["table"][f"{encoder} | {cut}"] = row
    (args.run / "variants").mkdir(exist_ok=True)
    (args.run / "variants" / "sequence_lag.json").write_text(json.dumps(report, indent=2))
    print(f"\npooled AUC / moment GAUC, mean over seeds {seeds}; below: the cut minus as served [95%, users x seeds]")
    print("| ranker | sequence cut | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    for key, row in report["table"].items():
        cells = [f"{row[h]['auc']:.3f} / {row[h]['moment_gauc']:.3f}" for h in heads]
        print(f"| {key} | " + " | ".join(cells) + " |")
        if "auc_minus_served" in row[heads[0]]:
            cells = [f"{fmt_interval(row[h]['auc_minus_served'])} / "
                     f"{fmt_interval(row[h]['moment_gauc_minus_served'])}" for h in heads]
            print("| | minus as served | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
