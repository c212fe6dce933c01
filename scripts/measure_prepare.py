"""Peak memory (max RSS) and time of the streamed data path on an events dataset (docs/training-at-scale.md).

    python scripts/measure_prepare.py DIR                       # the streaming pass over the whole log (scan_events)
    python scripts/measure_prepare.py DIR --part 0 --parts 16   # that pass, then one partition's examples
    python scripts/measure_prepare.py DIR --part 0 --parts 1    # everything in memory, with prepare()'s code

One JSON line: the step's seconds and the process's peak RSS (ru_maxrss) after the imports, the pass, and the
partition. Run each in a fresh process: the peak never goes down.
"""
from __future__ import annotations

import argparse
import json
import resource
import time


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="an events dataset (seqrank convert, scripts/generate_log.py)")
    parser.add_argument("--part", type=int, default=None, help="also prepare this partition")
    parser.add_argument("--parts", type=int, default=None, help="of this many (it must divide the buckets)")
    args = parser.parse_args()
    if (args.part is None) != (args.parts is None):
        parser.error("--part and --parts go together")
    from seqrank.config import RunConfig
    from seqrank.data.parquet_events import open_events_dataset
    from seqrank.streamed import prepare_partition, scan_events
    out = {"peak_rss_mb_imports": round(peak_mb())}
    ds, cfg = open_events_dataset(args.dataset), RunConfig()
    out.update(events=ds.meta["n_events"], users=ds.meta["n_users"])
    started = time.perf_counter()
    facts = scan_events(ds, cfg)
    out.update(scan_s=round(time.perf_counter() - started, 1), peak_rss_mb_scan=round(peak_mb()))
    if args.part is not None:
        started = time.perf_counter()
        prep = prepare_partition(ds, cfg, args.part, args.parts, facts)
        out.update(part=f"{args.part}/{args.parts}", partition_events=len(prep.log.events),
                   partition_users=len(prep.users), partition_impressions=len(prep.impressions),
                   partition_s=round(time.perf_counter() - started, 1), peak_rss_mb_partition=round(peak_mb()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
