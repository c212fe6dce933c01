"""Write the validation log: the events of the *training* period only (timestamp < the run's split time), so model
choices are made on a validation split (the last 20% of the training period) and the test period stays unseen.

    python scripts/validation_split.py --events data/kuairand/events.tsv.gz --out /tmp/val/events.csv
    seqrank train --events /tmp/val/events.csv --out /tmp/val/run --negative-actions hate [--config variant.json]
    seqrank evaluate --run /tmp/val/run

The split time is computed exactly as seqrank.dataset.prepare does (test_fraction of the span); the output is in
the canonical shape (user_id,item_id,action,timestamp in ms), so pass the negative actions explicitly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from seqrank.config import RunConfig
from seqrank.data.loaders import load_events
from seqrank.dataset import split_time_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    cfg = RunConfig.load(args.config)
    log = load_events(args.events, negative_actions=cfg.data.negative_actions)
    if log.exposure_action is not None:
        raise SystemExit(f"{args.events}: logged exposures ({log.exposure_action!r}) do not survive the canonical "
                         "shape; split the raw log by time instead")
    ev = log.events
    train = ev[ev.timestamp < split_time_ms(ev, cfg)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train[["user_id", "item_id", "action", "timestamp"]].to_csv(args.out, index=False)
    print(f"wrote {args.out}: {len(train):,} events of {train.user_id.nunique()} users (training period only)")


if __name__ == "__main__":
    main()
