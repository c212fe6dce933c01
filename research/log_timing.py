"""Does a log's order mean anything? How its users' actions are spread in time.

Sequence models (TransAct's ordered history, PinnerFormer's "what comes after this action") assume a timestamp is
when the user acted. A log whose actions arrive in bursts -- MovieLens ratings are typed in one sitting, half of
consecutive ratings in the same second -- has no order within a burst and no "later" for most users. This prints,
for any events file the loaders read (one action per impression): the median gap between a user's consecutive
actions, the share of gaps under a minute and of exactly zero, the share of users whose whole history spans under a
day, and the share of actions on a user's first day.

    python research/log_timing.py --events data/external/movielens-100k/ratings.csv
"""
from __future__ import annotations

import argparse
import json

from seqrank.data.loaders import load_events

DAY_MS = 86_400_000


def log_timing(events) -> dict:
    # rows sharing (user, item, timestamp) are one impression with several labels: one action here
    ev = events.drop_duplicates(["user_id", "item_id", "timestamp"]).sort_values(["user_id", "timestamp"],
                                                                                  kind="stable")
    by_user = ev.groupby("user_id").timestamp
    gaps = by_user.diff().dropna()
    span = by_user.max() - by_user.min()
    first_day = (ev.timestamp - by_user.transform("min")) < DAY_MS
    return {"actions": len(ev), "users": int(span.size),
            "median_gap_s": float(gaps.median() / 1000),
            "gaps_under_60s": float((gaps < 60_000).mean()), "gaps_of_0s": float((gaps == 0).mean()),
            "users_spanning_under_a_day": float((span < DAY_MS).mean()),
            "actions_on_the_users_first_day": float(first_day.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", required=True)
    args = ap.parse_args()
    print(json.dumps(log_timing(load_events(args.events).events), indent=1))


if __name__ == "__main__":
    main()
