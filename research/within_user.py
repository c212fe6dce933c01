"""Why is a sequence model's per-user AUC (GAUC) on a sparse head below the ranker without a sequence, while its
pooled AUC is far above? Two measurements on a validation run (the test period is never read):

1. The data. For each head: how much more often an impression carries the head's action when that action is among
   the user's newest actions before the request (pooled), and the same association within users (the GAUC of that
   one bit). A rare action that marks a user who does it (pooled ratio > 1) while, within that user, impressions
   after one are less often positive (GAUC < 0.5) is Simpson's paradox: a model that raises its estimate after each
   such action is right across users and is scored below 0.5 within them. Nothing about the candidate enters.
2. The models. GAUC groups a user's impressions from different moments, so it also scores how the model's
   user-level estimate moves with time. A ranker serves one moment: it orders the candidates of one request, all
   with the same sequence. "Moment GAUC" scores exactly that: at each request of a user-day group (the HIT@3
   groups), the group's impressions from that request on are ranked with that request's features (sequence, daily
   embedding, context; nothing at or after the request's time, so no later impression's own action) and labelled
   with what the user did to each; the AUC of each moment is averaged with its candidate count as weight. Its
   interval resamples users and seeds, as evaluate's.

    seqrank train --events data/kuairand/events.tsv.gz --out runs/val --set data.split=validation
    python research/within_user.py --run runs/val --seeds 0,1,2,3,4

The rankers are research/ranker_variants.py's (same files under RUN/variants/: trained once, then reused).
Candidates are scored with the training vocabulary (`--refreshes 0`, the default here) for every model and both
metrics; `seqrank evaluate` reports moment GAUC on the test period with the replayed refreshes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from seqrank import metrics as M
from seqrank.daily_items import RefreshedTest, replay_refreshes
from seqrank.features import FIRST_ID
from seqrank.pipeline import load_ranker_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ranker_variants import variant_ranker  # noqa: E402  (the same files under RUN/variants/)

ENCODERS = ("transact", "no_sequence", "avg_pool")


def simpson(ex, vocab, newest: int) -> dict:
    """Per head: P(y | the head's action among the newest `newest` rows) / P(y | not), and that bit's GAUC."""
    out = {}
    for j, head in enumerate(vocab.heads):
        y = ex.labels[:, j].astype(int)
        x = (ex.seq.seq_action[:, :newest] == vocab.actions.index(head) + FIRST_ID).any(1)
        if not x.any() or x.all():
            continue
        tie_break = 1e-6 * np.random.default_rng(0).random(len(x))  # ties at random, not by row order
        out[head] = {"share_with": float(x.mean()), "rate_with": float(y[x].mean()), "rate_without": float(y[~x].mean()),
                     "pooled_ratio": float(y[x].mean() / max(y[~x].mean(), 1e-12)),
                     "gauc_of_bit": M.gauc(y, x + tie_break, ex.user)}
    return out


def stationary_null(train, ex, j: int, window: int, draws: int = 5, seed: int = 0) -> float:
    """The bit's GAUC on the slice when nothing within a user depends on the past: each user's labels of head j
    redrawn independently at the user's own rate (over the training period and the slice), and the bit set when a
    redrawn positive is among the user's previous `window` impressions. Mean over `draws` redraws."""
    user = np.r_[train.user, ex.user]
    y = np.r_[train.labels[:, j], ex.labels[:, j]].astype(float)
    in_slice = np.r_[np.zeros(len(train.user), bool), np.ones(len(ex.user), bool)]
    order = np.lexsort((np.r_[train.request_time, ex.request_time], user))
    user, y, in_slice = user[order], y[order], in_slice[order]
    _, inverse, counts = np.unique(user, return_inverse=True, return_counts=True)
    rate = np.bincount(inverse, y) / counts
    first = np.r_[0, np.cumsum(counts)[:-1]][inverse]
    pos = np.arange(len(y))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        drawn = (rng.random(len(y)) < rate[inverse]).astype(int)
        before = np.r_[0, np.cumsum(drawn)]
        bit = before[pos] - before[np.maximum(first, pos - window)] > 0
        values.append(M.gauc(drawn[in_slice], bit[in_slice] + 1e-6 * rng.random(in_slice.sum()), user[in_slice]))
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a run trained with data.split validation")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--refreshes", type=int, default=0, help="as seqrank evaluate --refreshes (0: the training "
                        "vocabulary throughout)")
    parser.add_argument("--newest", type=int, default=100, help="rows of the sequence the data check looks at")
    parser.add_argument("--null-window", type=int, default=45, help="impressions those rows cover, for the "
                        "stationary users (45 on KuaiRand, where an impression is about 2.2 rows; 100 on MovieLens)")
    args = parser.parse_args()
    cfg, _, prep, table, data = load_ranker_examples(args.run)
    if cfg.data.split != "validation":
        raise SystemExit(f"{args.run} was trained on the test split; this diagnosis runs on data.split validation")
    seeds = [int(s) for s in args.seeds.split(",")]
    ex, heads = data.test, prep.vocab.heads
    report = {"data": {"training": simpson(data.train, prep.vocab, args.newest),
                       "validation slice": simpson(ex, prep.vocab, args.newest)}}
    for h, r in report["data"]["validation slice"].items():
        r["gauc_of_bit_stationary"] = stationary_null(data.train, ex, heads.index(h), args.null_window)
    for part, rows in report["data"].items():
        print(f"\nthe head's action among the newest {args.newest} rows, {part}:")
        for h, r in rows.items():
            null = (f" (stationary users: {r['gauc_of_bit_stationary']:.3f})" if "gauc_of_bit_stationary" in r else "")
            print(f"  {h:<14} rate {r['rate_with']:.3f} with, {r['rate_without']:.3f} without ({r['pooled_ratio']:.1f}x; "
                  f"{r['share_with']:.0%} of impressions with); GAUC of the bit {r['gauc_of_bit']:.3f}{null}")

    feature, candidate, moment = M.moments(ex.user_day, ex.request, ex.request_time)
    served = RefreshedTest(cfg, prep, prep.test_rows(), replay_refreshes(args.run, prep, prep.test_rows(),
                                                                         args.refreshes))
    print(f"\n{len(np.unique(moment))} moments, {len(candidate)} (moment, candidate) pairs, "
          f"{len(np.unique(ex.user[feature]))} users")
    time_mixed, at_moment = {}, {}
    for encoder in ENCODERS:
        spec = "{}" if encoder == "transact" else json.dumps({"encoder": encoder})
        time_mixed[encoder], at_moment[encoder] = [], []
        for seed in seeds:
            model = variant_ranker(args.run, cfg, prep, table, data, spec, seed)
            time_mixed[encoder].append(served.predict(model))
            at_moment[encoder].append(served.predict_pairs(model, feature, candidate))
    report["models"] = {}
    for j, h in enumerate(heads):
        y, ym = ex.labels[:, j], ex.labels[candidate, j]
        row = {e: {"gauc": float(np.mean([M.gauc(y, p[:, j], ex.user) for p in time_mixed[e]])),
                   "moment_gauc": float(np.mean([M.gauc(ym, p[:, j], moment) for p in at_moment[e]]))}
               for e in ENCODERS}
        for base in ENCODERS[1:]:
            row[f"transact - {base}"] = {
                "gauc": M.gauc_difference_ci(y, [p[:, j] for p in time_mixed["transact"]],
                                             [p[:, j] for p in time_mixed[base]], ex.user, n_boot=500),
                "moment_gauc": M.gauc_difference_ci(ym, [p[:, j] for p in at_moment["transact"]],
                                                    [p[:, j] for p in at_moment[base]], ex.user[feature],
                                                    n_boot=500, groups=moment)}
        report["models"][h] = row
    (args.run / "variants").mkdir(exist_ok=True)
    (args.run / "variants" / "within_user.json").write_text(json.dumps(report, indent=2))
    print(f"\nGAUC (a user's impressions across moments) and moment GAUC (one moment's candidates), mean over seeds "
          f"{seeds}; TransAct minus each baseline [95%, users x seeds]")
    for h, row in report["models"].items():
        cells = "  ".join(f"{e} {row[e]['gauc']:.3f}/{row[e]['moment_gauc']:.3f}" for e in ENCODERS)
        diffs = "  ".join(f"vs {b}: GAUC {fmt_interval(row[f'transact - {b}']['gauc'])}, moment "
                          f"{fmt_interval(row[f'transact - {b}']['moment_gauc'])}" for b in ENCODERS[1:])
        print(f"  {h:<14} {cells}\n  {'':<14} {diffs}")


def fmt_interval(d: dict) -> str:
    """A difference with its 95% interval, as the research scripts print it."""
    return f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d.get("ci") else f"{d['value']:+.3f}"


if __name__ == "__main__":
    main()
