"""Peak memory (max RSS) and time of the streamed data path on an events dataset (docs/training-at-scale.md).

    python scripts/measure_prepare.py DIR                       # the streaming pass over the whole log (scan_events)
    python scripts/measure_prepare.py DIR --part 0 --parts 16   # that pass, then one partition's examples
    python scripts/measure_prepare.py FILE                      # the in-memory path: load_log + prepare

One JSON line: each step's seconds and the process's peak RSS (ru_maxrss) after the imports and after each step.
Run each in a fresh process: the peak never goes down. The negative action is hate (the generated log's and the
shipped sample's), so a canonical export of a generated log needs no sampled negatives.
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
    parser.add_argument("path", help="an events dataset (seqrank convert, scripts/generate_log.py) or events file")
    parser.add_argument("--part", type=int, default=None, help="also prepare this partition")
    parser.add_argument("--parts", type=int, default=None, help="of this many (it must divide the buckets)")
    args = parser.parse_args()
    if (args.part is None) != (args.parts is None):
        parser.error("--part and --parts go together")
    from seqrank.config import RunConfig
    from seqrank.data.parquet_events import is_events_dataset, open_events_dataset
    from seqrank.dataset import load_log, prepare
    from seqrank.streamed import prepare_partition, scan_events
    out = {"peak_rss_mb_imports": round(peak_mb())}
    cfg = RunConfig.from_dict({"data": {"negative_actions": ["hate"]}})
    if not is_events_dataset(args.path):
        if args.part is not None:
            parser.error("--part needs a dataset directory")
        started = time.perf_counter()
        log = load_log(args.path, cfg)
        out.update(events=len(log.events), load_s=round(time.perf_counter() - started, 1),
                   peak_rss_mb_load=round(peak_mb()))
        started = time.perf_counter()
        prep = prepare(log, cfg)
        out.update(impressions=len(prep.impressions), prepare_s=round(time.perf_counter() - started, 1),
                   peak_rss_mb_prepare=round(peak_mb()))
        print(json.dumps(out))
        return
    ds = open_events_dataset(args.path)
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
