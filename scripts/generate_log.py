"""Generate a large synthetic event log straight into an events dataset (seqrank.data.parquet_events).

For measuring the streamed data path at sizes the shipped sample cannot reach (docs/training-at-scale.md). The shape
follows the shipped KuaiRand sample (data/kuairand/events.tsv.gz): 14 days; every impression is a like (81%) or a
hate (19%) with optional click, long_view, profile_enter, comment, forward and follow flags at the sample's rates
(about 2.2 events per impression); users' activity is log-normal (a few heavy users, many light ones) in sittings of
closely spaced impressions; items are Zipf-distributed (exponent 1.1) over the catalogue. It is written bucket by
bucket, so memory holds one bucket, never the log. Deterministic for a seed and bucket count.

    python scripts/generate_log.py --out /tmp/events-10m --events 10000000 [--buckets 64] [--seed 0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from seqrank.data.loaders import drop_duplicates_and_sort
from seqrank.data.parquet_events import DEFAULT_BUCKETS, EventsDatasetWriter, user_buckets

START_MS = 1_649_346_288_441      # the shipped sample's first event (2022-04-07)
SPAN_MS = 14 * 86_400_000         # and its span
# the shipped sample's rates per impression (tests/test_loaders.py counts / 41,704 impressions)
LIKE_RATE = 0.81                  # else hate
FLAG_RATES = {"click": 0.66, "long_view": 0.46, "profile_enter": 0.053, "comment": 0.030, "forward": 0.0077,
              "follow": 0.0072}
EVENTS_PER_IMPRESSION = 1.0 + sum(FLAG_RATES.values())
IMPRESSIONS_PER_SITTING = 8
SITTING_MS = 20 * 60_000          # a sitting's impressions fall within 20 minutes
ZIPF_EXPONENT = 1.1
EVENTS_PER_USER = 50              # users = events / 50 (the sample: 139 per user, over fewer users)
EVENTS_PER_ITEM = 10              # catalogue = events / 10 (the sample: 10 per item)


def impressions_per_user(n_users: int, n_events: int, rng) -> np.ndarray:
    """Log-normal activity scaled to about n_events events in all; every user has at least 2 impressions."""
    weight = rng.lognormal(0.0, 1.2, n_users)
    target = n_events / EVENTS_PER_IMPRESSION
    return np.maximum(2, np.round(weight / weight.sum() * target)).astype(np.int64)


def bucket_events(user_ids: np.ndarray, counts: np.ndarray, item_cdf: np.ndarray, rng) -> pd.DataFrame:
    """The events of these users: sittings at uniform times, Zipf items, like/hate plus flags per impression."""
    n = int(counts.sum())
    user = np.repeat(np.arange(len(user_ids)), counts)
    sittings = np.maximum(1, counts // IMPRESSIONS_PER_SITTING)
    first_sitting = np.concatenate([[0], np.cumsum(sittings)[:-1]])
    sitting_start = rng.integers(START_MS, START_MS + SPAN_MS - SITTING_MS, int(sittings.sum()))
    sitting = first_sitting[user] + (rng.random(n) * sittings[user]).astype(np.int64)
    ts = sitting_start[sitting] + rng.integers(0, SITTING_MS, n)
    item = np.searchsorted(item_cdf, rng.random(n) * item_cdf[-1])
    masks = [("like", rng.random(n) < LIKE_RATE)]
    masks.append(("hate", ~masks[0][1]))
    masks += [(action, rng.random(n) < rate) for action, rate in FLAG_RATES.items()]
    rows = np.concatenate([np.flatnonzero(m) for _, m in masks])
    actions = np.concatenate([np.full(int(m.sum()), a, dtype=object) for a, m in masks])
    frame = pd.DataFrame({"user_id": user_ids[user[rows]], "item_id": pd.Series(item[rows]).astype(str).to_numpy(),
                          "action": actions, "timestamp": ts[rows]})
    return drop_duplicates_and_sort(frame)[0]


def generate(out: Path, n_events: int, n_buckets: int, seed: int) -> dict:
    """About n_events events of n_events / 50 users over n_events / 10 items into the dataset `out`; its manifest."""
    n_users, n_items = max(10, n_events // EVENTS_PER_USER), max(10, n_events // EVENTS_PER_ITEM)
    rng = np.random.default_rng(seed)
    user_ids = np.array([f"u{i}" for i in range(n_users)], dtype=object)
    counts = impressions_per_user(n_users, n_events, rng)
    bucket = user_buckets(user_ids, n_buckets)
    item_cdf = np.cumsum(1.0 / np.arange(1, n_items + 1) ** ZIPF_EXPONENT)
    source = f"scripts/generate_log.py --events {n_events} --buckets {n_buckets} --seed {seed}"
    writer = EventsDatasetWriter(out, n_buckets, source, "kuairand", None)  # KuaiRand's actions: hate is negative
    try:
        for b in range(n_buckets):
            mine = np.flatnonzero(bucket == b)
            writer.write_bucket(b, bucket_events(user_ids[mine], counts[mine], item_cdf,
                                                 np.random.default_rng([seed, b])))
        return writer.close().meta  # the rare (user, item, time, action) drawn twice is one event
    except BaseException:
        writer.abort()
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the dataset directory (new or empty)")
    parser.add_argument("--events", type=int, default=10_000_000, help="about this many events (default 10M)")
    parser.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    meta = generate(args.out, args.events, args.buckets, args.seed)
    print(f"{meta['n_events']} events, {meta['n_users']} users -> {args.out} ({time.time() - started:.1f} s)")


if __name__ == "__main__":
    main()
