"""Ranker examples from an events dataset larger than memory (seqrank.data.parquet_events), a partition at a time.

Two steps, each in bounded memory:
  scan_events(dataset, cfg)  the facts every user's examples share (split time, vocabularies, held-out users, ...):
                             the timestamp column alone, streamed a batch of row groups at a time (8 bytes per event,
                             sorted in place for the exact quantile), then one bucket at a time for the rest;
  prepare_partition(dataset, cfg, part, n_parts, facts)
                             the timelines and examples of the users of one partition (its buckets): a Prepared
                             like prepare()'s, holding only those users.
Both use seqrank.dataset's functions (log_facts, build_examples), so the union of the partitions is what prepare()
builds from the whole log in memory (tests/test_streamed_data.py).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import distributed
from .config import RunConfig
from .data.loaders import DataError, EventLog, require_users, resolve_negative_actions
from .data.parquet_events import EventsDataset, is_events_dataset, open_events_dataset
from .dataset import MIN_USERS, LogFacts, Prepared, build_examples, load_log, log_facts, prepare, validation_period


def _dataset(dataset: EventsDataset | str | Path) -> EventsDataset:
    return dataset if isinstance(dataset, EventsDataset) else open_events_dataset(dataset)


def negative_actions(ds: EventsDataset, cfg: RunConfig) -> tuple[str, ...]:
    """The dataset's negative actions, resolved and checked as load_log does for a file."""
    source, meta = str(ds.directory), ds.meta
    negatives = resolve_negative_actions(set(meta["actions"]), meta["fmt"], meta["exposure_action"],
                                         cfg.data.negative_actions, source)
    require_users(int(meta["n_users"]), MIN_USERS, source)
    if not negatives and meta["exposure_action"] is None:
        raise DataError("has neither negative actions nor logged exposures; the negatives such a log needs are "
                        "sampled over the whole log in memory (load_log), so train from the events file, or name "
                        "its negative actions (data.negative_actions)", file=source, column="action")
    return negatives


def scan_events(dataset: EventsDataset | str | Path, cfg: RunConfig) -> LogFacts:
    """The facts of the whole log, in a streaming pass. Memory: 8 bytes per event (its time), then one bucket, the
    distinct users and items, and 8 bytes per training impression (the selection quantile). Every worker of a
    data-parallel job may run it (it is deterministic) or receive the result from one."""
    ds = _dataset(dataset)
    negatives = negative_actions(ds, cfg)
    ts = ds.timestamps()
    ts.sort()  # in place: the exact quantiles need the sorted times, nothing more
    ts, cutoff = validation_period(ts, cfg)
    frames = (ds.read([b], before=cutoff) for b in range(ds.n_buckets))
    return log_facts(ts, frames, negatives, ds.meta["exposure_action"], cutoff, cfg, str(ds.directory))


def prepare_partition(dataset: EventsDataset | str | Path, cfg: RunConfig, part: int, n_parts: int,
                      facts: LogFacts | None = None) -> Prepared:
    """The timelines and ranker examples of the users of partition `part` of `n_parts` (the users whose stable hash
    is `part` modulo `n_parts`; n_parts must divide the dataset's bucket count), with the facts of the whole log
    (`facts`, or scan_events when None). Its log.events holds that partition's events; its users and pf_test_users
    only that partition's users. Request numbers are counted inside the partition, in the order of its users."""
    ds = _dataset(dataset)
    facts = facts or scan_events(ds, cfg)
    meta = ds.meta
    events = ds.read(ds.buckets_of(part, n_parts), before=facts.cutoff)
    log = EventLog(events=events, source=str(ds.directory), fmt=meta["fmt"],
                   duplicates_dropped=int(meta["duplicates_dropped"]), negative_actions=negative_actions(ds, cfg),
                   exposure_action=meta["exposure_action"])
    return replace(build_examples(log, facts, cfg), partition=(part, n_parts))


def prepare_events(events: str, cfg: RunConfig, part: int = 0, n_parts: int = 1) -> Prepared:
    """`seqrank train --events`: an events file, loaded whole, or an events dataset directory (seqrank convert),
    read through the streaming pass; partition `part` of `n_parts` of it (a data-parallel rank's own users), the
    whole log's facts scanned once, on rank 0, and shared. A file is always read whole."""
    if not is_events_dataset(events):
        return prepare(load_log(events, cfg), cfg)
    ds = open_events_dataset(events)
    if ds.n_buckets % n_parts:
        raise DataError(f"has {ds.n_buckets} buckets, which {n_parts} data-parallel processes cannot share (each "
                        "takes the users of every n-th bucket): run a number of processes that divides it, or "
                        "convert again with --buckets a multiple of it", file=str(ds.directory))
    facts = distributed.from_main(lambda: scan_events(ds, cfg)) if n_parts > 1 else None
    return prepare_partition(ds, cfg, part, n_parts, facts)
