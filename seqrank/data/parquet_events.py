"""An event log as a Parquet dataset partitioned by user: the form of a log larger than memory.

DIR/
  _seqrank_events.json         what wrote it: source, format, exposure action, actions, counts, buckets, user hash
  bucket=0/part-0.parquet      one file per bucket (hive partitioning), canonical columns user_id, item_id,
  bucket=1/part-0.parquet      action, timestamp; exact duplicate rows dropped; sorted by (user_id, timestamp,
  ...                          item_id, action); row groups of ROW_GROUP_ROWS rows

A user's events all lie in one bucket, chosen by a stable hash of the user id (user_buckets), so whoever owns a
bucket sees whole timelines: a worker of a data-parallel job reads its own buckets and nothing else. Inside a bucket
the rows are in the order EventLog.events has, so a bucket read back is a slice of the in-memory log.

`seqrank convert --events FILE --out DIR` writes one from any file load_events reads, in chunks: the file is read
and validated by the same loaders (seqrank.data.loaders.read_event_chunks), each chunk spooled to its buckets, then
each bucket on its own de-duplicated and sorted, so memory holds one chunk, then one bucket, never the log.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .loaders import EVENT_COLUMNS, DataError, drop_duplicates_and_sort, read_event_chunks

MANIFEST = "_seqrank_events.json"   # '_' prefix: pyarrow.dataset skips it when it lists the Parquet files
LAYOUT_VERSION = 1
DEFAULT_BUCKETS = 64                # a worker count that divides it can split the log evenly (1, 2, 4, ..., 64)
ROW_GROUP_ROWS = 1 << 17            # rows per row group: the unit a streaming pass reads
CHUNK_ROWS = 250_000                # source rows per chunk while converting (~170 MB of pandas objects)
# SipHash-2-4 of the UTF-8 user id with this key (pandas.util.hash_array): the same bucket on every machine and run
USER_HASH_KEY = "seqrank-user-key"
SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("action", pa.string()),
                    ("timestamp", pa.int64())])
SPOOL_SCHEMA = SCHEMA.append(pa.field("_row", pa.int64()))


def user_buckets(user_ids, n_buckets: int) -> np.ndarray:
    """The bucket (0 .. n_buckets-1, int64) of each user id: SipHash of its UTF-8 bytes, modulo n_buckets."""
    ids = np.asarray(user_ids, dtype=object).reshape(-1)
    hashes = pd.util.hash_array(ids, encoding="utf8", hash_key=USER_HASH_KEY, categorize=True)
    return (hashes % np.uint64(n_buckets)).astype(np.int64)


def _require_new(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory: choose a new --out")


def _bucket_file(directory: Path, bucket: int) -> Path:
    return directory / f"bucket={bucket}" / "part-0.parquet"


class EventsDatasetWriter:
    """Writes a dataset bucket by bucket into DIR.tmp, then renames it to DIR, so a failed run leaves no DIR."""

    def __init__(self, out, n_buckets: int, source: str, fmt: str, exposure_action: str | None):
        if n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
        self.out = Path(out)
        _require_new(self.out)
        self.tmp = self.out.with_name(self.out.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.n_buckets = n_buckets
        self.meta = {"layout_version": LAYOUT_VERSION, "source": source, "fmt": fmt,
                     "exposure_action": exposure_action, "n_buckets": n_buckets,
                     "user_hash": f"siphash-2-4(utf-8 user_id, key {USER_HASH_KEY!r}) mod n_buckets"}
        self.actions: set[str] = set()
        self.n_users = self.n_events = 0
        self.written: set[int] = set()

    def write_bucket(self, bucket: int, events: pd.DataFrame) -> None:
        """One bucket's events: canonical columns, exact duplicates dropped, sorted (drop_duplicates_and_sort)."""
        users = pd.unique(events["user_id"])
        wrong = user_buckets(users, self.n_buckets) != bucket
        if wrong.any():
            raise ValueError(f"user {users[np.argmax(wrong)]!r} does not hash to bucket {bucket}")
        path = _bucket_file(self.tmp, bucket)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(events[list(EVENT_COLUMNS)], schema=SCHEMA, preserve_index=False)
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        self.actions.update(pd.unique(events["action"]).tolist())
        self.n_users += len(users)   # buckets hold disjoint users
        self.n_events += len(events)
        self.written.add(bucket)

    def close(self, duplicates_dropped: int = 0) -> "EventsDataset":
        """Empty buckets get an empty file, the manifest is written, DIR.tmp becomes DIR."""
        for bucket in set(range(self.n_buckets)) - self.written:
            self.write_bucket(bucket, pd.DataFrame({c: pd.Series(dtype=SCHEMA.field(c).type.to_pandas_dtype())
                                                    for c in EVENT_COLUMNS}))
        self.meta.update(actions=sorted(self.actions), n_users=self.n_users, n_events=self.n_events,
                         duplicates_dropped=int(duplicates_dropped))
        (self.tmp / MANIFEST).write_text(json.dumps(self.meta, indent=2))
        if self.out.exists():
            self.out.rmdir()  # empty (checked in __init__)
        self.tmp.rename(self.out)
        return open_events_dataset(self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def convert_events(events, out, n_buckets: int = DEFAULT_BUCKETS, fmt: str | None = None,
                   chunk_rows: int = CHUNK_ROWS) -> "EventsDataset":
    """Convert an events file (any format load_events reads) into a dataset in `out`, in bounded memory.

    Pass 1 reads `chunk_rows` source rows at a time through the loaders (same checks, same DataError naming the
    file, row and column) and appends each chunk's rows to one spool file per bucket. Pass 2 takes one bucket at a
    time: drops exact duplicates (they share a user, hence a bucket), sorts, writes it in row groups. Peak memory:
    one chunk, then the largest bucket. A DataError leaves no `out` behind.
    """
    _require_new(Path(out))
    chunks = read_event_chunks(events, fmt, chunk_rows)
    first = next(chunks)
    writer = EventsDatasetWriter(out, n_buckets, str(events), first.fmt, first.exposure_action)
    spool = writer.tmp / ".spool"
    spool.mkdir()
    spool_writers: dict[int, pq.ParquetWriter] = {}

    def to_spool(frame: pd.DataFrame) -> None:
        buckets = user_buckets(frame["user_id"].to_numpy(), n_buckets)
        order = np.argsort(buckets, kind="stable")   # keeps file order inside a bucket: "keep first" holds
        bounds = np.searchsorted(buckets[order], np.arange(n_buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            if b not in spool_writers:
                spool_writers[b] = pq.ParquetWriter(spool / f"{b}.parquet", SPOOL_SCHEMA)
            part = frame.iloc[order[bounds[b]:bounds[b + 1]]]
            spool_writers[b].write_table(pa.Table.from_pandas(part, schema=SPOOL_SCHEMA, preserve_index=False))

    try:
        to_spool(first.frame)
        del first  # one chunk in memory at a time: not this one while the next is read
        for chunk in chunks:
            to_spool(chunk.frame)
            del chunk
        for w in spool_writers.values():
            w.close()
        dropped = 0
        for b in sorted(spool_writers):
            bucket_events, n_dropped = drop_duplicates_and_sort(pq.read_table(spool / f"{b}.parquet").to_pandas())
            dropped += n_dropped
            writer.write_bucket(int(b), bucket_events)
            del bucket_events
            (spool / f"{b}.parquet").unlink()
        spool.rmdir()
        return writer.close(dropped)
    except BaseException:
        writer.abort()
        raise


@dataclass
class EventsDataset:
    """An opened dataset: its manifest and the pyarrow dataset over its buckets (hive partition column `bucket`)."""

    directory: Path
    meta: dict
    arrow: pads.Dataset

    @property
    def n_buckets(self) -> int:
        return int(self.meta["n_buckets"])

    def buckets_of(self, part: int, n_parts: int) -> list[int]:
        """The buckets of worker `part` of `n_parts`: those b with b % n_parts == part, i.e. the users whose hash
        is part modulo n_parts. n_parts must divide the dataset's bucket count, so every part is a set of
        buckets."""
        if n_parts < 1 or self.n_buckets % n_parts:
            raise ValueError(f"n_parts {n_parts} must divide the dataset's {self.n_buckets} buckets "
                             f"({self.directory})")
        if not 0 <= part < n_parts:
            raise ValueError(f"part {part} is not in 0..{n_parts - 1}")
        return list(range(part, self.n_buckets, n_parts))

    def timestamps(self, batch_rows: int = ROW_GROUP_ROWS) -> np.ndarray:
        """Every event's time (int64 ms), read a batch of row groups at a time from the timestamp column alone:
        8 bytes per event."""
        out = np.empty(int(self.meta["n_events"]), dtype=np.int64)
        at = 0
        # little read-ahead: the pass holds this array and a few batches, not the scanner's default queue
        for batch in self.arrow.to_batches(columns=["timestamp"], batch_size=batch_rows, batch_readahead=2,
                                           fragment_readahead=1):
            n = batch.num_rows
            out[at:at + n] = batch.column(0).to_numpy()
            at += n
        if at != len(out):
            raise DataError(f"holds {at} events, its manifest says {len(out)} (a bucket file was changed)",
                            file=str(self.directory))
        return out

    def read(self, buckets, before: int | None = None) -> pd.DataFrame:
        """The events of these buckets (with times before `before`, if given) as an EventLog.events frame: sorted
        by user, then time, item and action, the index reset."""
        where = pads.field("bucket").isin(list(buckets))
        if before is not None:
            where &= pads.field("timestamp") < before
        table = self.arrow.to_table(columns=list(EVENT_COLUMNS), filter=where)
        events = table.to_pandas()
        # a user lies in one bucket, already sorted there: ordering the users across buckets sorts everything
        return events.sort_values("user_id", kind="stable").reset_index(drop=True)


def is_events_dataset(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_events_dataset(directory) -> EventsDataset:
    """Open a dataset written by convert_events (or EventsDatasetWriter)."""
    directory = Path(directory)
    if not is_events_dataset(directory):
        raise DataError(f"not an events dataset (no {MANIFEST}; write one with seqrank convert)",
                        file=str(directory))
    meta = json.loads((directory / MANIFEST).read_text())
    if meta.get("layout_version") != LAYOUT_VERSION:
        raise DataError(f"layout version {meta.get('layout_version')} is not {LAYOUT_VERSION}: convert it again",
                        file=str(directory))
    arrow = pads.dataset(directory, format="parquet", schema=SCHEMA.append(pa.field("bucket", pa.int32())),
                         partitioning=pads.partitioning(pa.schema([("bucket", pa.int32())]), flavor="hive"))
    return EventsDataset(directory, meta, arrow)
