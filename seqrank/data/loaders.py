"""Raw user-action log loaders.

Every supported log shape is turned into one canonical event table (:class:`EventLog`): one row per
(user, item, action, time), ids as strings, times as int64 milliseconds since the epoch (UTC).

Supported formats (``fmt``; auto-detected when ``None``):

``canonical``
    Delimited text (CSV or TSV, detected from the header line), Parquet, or JSON lines with the columns
    ``user_id, item_id, action, timestamp`` (extra columns are ignored). Rows that share (user, item, timestamp)
    are one impression with several labels and are kept as separate rows; only exact duplicate rows are dropped.

``kuairand``
    (a) The processed like/hate file (``label`` column: 1 = like, 0 = hate) and (b) the official KuaiRand
    ``log_standard_*.csv`` / ``log_random_*.csv`` logs (``is_like`` / ``is_hate`` columns). One canonical row per
    set flag (like, hate, click, long_view, comment, forward, follow, profile_enter); for (b) also an
    ``impression`` row for every log row, so exposures without engagement are kept. Time = ``time_ms``.

``otto``
    OTTO JSON lines: ``{"session": int, "events": [{"aid": int, "ts": int, "type": "clicks|carts|orders"}]}``.

``movielens``
    ``ratings.csv`` (``userId,movieId,rating,timestamp``), ``u.data`` (tab separated, no header) and
    ``ratings.dat`` (``::`` separated, no header). Explicit ratings become actions: rating >= 4 -> ``like``,
    rating <= 2 -> ``dislike``, anything in between -> ``rate``. ``dislike`` is the negative action.

Times may be integer (or fractional) seconds or milliseconds -- decided per file and column by magnitude: when every
value is below 1e11 the column holds seconds -- or ISO-8601 strings (naive strings are read as UTC). Files may be
gzip, bz2 or xz compressed (detected from the content, whatever the extension).

Every problem with the input raises :class:`DataError`, which names the file, the 1-based data row (the header is
not counted, blank lines are skipped; for JSON lines it is the line number) and the column.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "DataError",
    "EventLog",
    "FORMATS",
    "KUAIRAND_SAMPLE",
    "EVENT_COLUMNS",
    "load_events",
    "add_sampled_negatives",
]

FORMATS = ("canonical", "kuairand", "otto", "movielens")
EVENT_COLUMNS = ("user_id", "item_id", "action", "timestamp")

#: The real data sample shipped with the project (KuaiRand like/hate, CC BY-SA 4.0; see data/kuairand/).
KUAIRAND_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "kuairand" / "events.tsv.gz"

_SECONDS_BELOW = 1e11  # a time column whose values are all below this holds seconds
_SORT_KEYS = ["user_id", "timestamp", "item_id", "action"]

# KuaiRand flag column -> action name (in emission order).
_KUAIRAND_FLAGS = (
    ("is_click", "click"),
    ("long_view", "long_view"),
    ("is_comment", "comment"),
    ("is_forward", "forward"),
    ("is_follow", "follow"),
    ("is_profile_enter", "profile_enter"),
)
_MOVIELENS_USER = ("userid", "user_id")
_MOVIELENS_ITEM = ("movieid", "movie_id", "item_id", "itemid")
_MOVIELENS_HEADERLESS = ("user_id", "item_id", "rating", "timestamp")


class DataError(ValueError):
    """Bad input data. str() reads like "events.csv: row 17: column 'timestamp': cannot parse 'abc' as a time".

    Attributes: ``file`` (the path as given), ``row`` (1-based data row, header not counted; the line number for
    JSON lines; ``None`` when the problem is not one row), ``column`` (source column name or ``None``) and
    ``message`` (the bare description).
    """

    def __init__(self, message: str, *, file: str, row: int | None = None, column: str | None = None):
        self.message = message
        self.file = str(file)
        self.row = row
        self.column = column
        parts = [self.file]
        if row is not None:
            parts.append(f"row {row}")
        if column is not None:
            parts.append(f"column {column!r}")
        parts.append(message)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keyword-only arguments: make it survive pickling (multiprocessing)
        return (_rebuild_data_error, (self.message, self.file, self.row, self.column))


def _rebuild_data_error(message, file, row, column):
    return DataError(message, file=file, row=row, column=column)


@dataclass
class EventLog:
    """A loaded event log in canonical form.

    ``events`` has exactly the columns user_id (str), item_id (str), action (str), timestamp (int64 ms since the
    epoch, UTC), sorted by (user_id, timestamp, item_id, action) with the index reset.
    """

    events: pd.DataFrame
    source: str
    fmt: str
    duplicates_dropped: int
    negative_actions: tuple[str, ...]
    exposure_action: str | None
    #: True when the exposure rows were sampled by :func:`add_sampled_negatives` rather than logged.
    exposures_sampled: bool = False

    @property
    def actions(self) -> list[str]:
        """Sorted distinct action names."""
        return sorted(pd.unique(self.events["action"]).tolist())

    @property
    def n_users(self) -> int:
        return int(self.events["user_id"].nunique())

    @property
    def n_items(self) -> int:
        return int(self.events["item_id"].nunique())


# ---------------------------------------------------------------------------------------------------------------
# file access


def _compression(path: Path) -> str | None:
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic[:3] == b"BZh":
        return "bz2"
    if magic[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


def _open_text(path: Path, compression: str | None) -> IO[str]:
    if compression == "gzip":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    if compression == "bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    if compression == "xz":
        return lzma.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "rt", encoding="utf-8-sig", newline="")


def _base_name(path: Path) -> str:
    """File name without a compression suffix, lower-cased."""
    name = path.name.lower()
    for suffix in (".gz", ".gzip", ".bz2", ".xz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _first_line(path: Path, compression: str | None, file: str) -> str | None:
    """The first non-blank line (without its line break), or None for a file without one."""
    try:
        with _open_text(path, compression) as fh:
            for line in fh:
                if line.strip():
                    return line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError("is not UTF-8 text (unsupported or corrupt file)", file=file) from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"cannot read the file ({exc})", file=file) from None
    return None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# format detection


def _detect_from_columns(columns: Sequence[str]) -> str | None:
    lower = {str(c).strip().lower() for c in columns}
    if {"video_id", "time_ms"} <= lower and lower & {"label", "is_like", "is_hate"}:
        return "kuairand"
    if set(EVENT_COLUMNS) <= lower:
        return "canonical"
    if "rating" in lower and lower & set(_MOVIELENS_USER) and lower & set(_MOVIELENS_ITEM):
        return "movielens"
    # partial headers: pick the format they resemble so the error names the missing columns
    if lower & {"video_id", "time_ms", "is_like", "is_hate"}:
        return "kuairand"
    if lower & {"userid", "movieid", "rating"}:
        return "movielens"
    if lower & set(EVENT_COLUMNS):
        return "canonical"
    return None


def _column_lookup(columns: Sequence[str]) -> dict[str, str]:
    """Lower-cased name -> actual column name (first occurrence wins)."""
    out: dict[str, str] = {}
    for c in columns:
        out.setdefault(str(c).strip().lower(), c)
    return out


# ---------------------------------------------------------------------------------------------------------------
# reading raw tables: (DataFrame with the source column names, 1-based row numbers)


@dataclass
class _Raw:
    table: pd.DataFrame
    rows: np.ndarray  # 1-based row / line numbers, aligned with table
    file: str
    # Read in chunks, a file's time column is decided once: the unit the first chunk with numbers decided (_times
    # records it in decided_time_unit) is handed to the later chunks as time_unit.
    time_unit: str | None = None
    decided_time_unit: str | None = None

    def fail(self, mask: np.ndarray, column: str, describe) -> None:
        """Raise a DataError for the first row where ``mask`` is true (``describe(position) -> message``)."""
        if mask.any():
            pos = int(np.argmax(mask))
            raise DataError(describe(pos), file=self.file, row=int(self.rows[pos]), column=column)


def _numbered(table: pd.DataFrame, first_row: int, file: str) -> _Raw:
    """A table of consecutive data rows, the first of them data row ``first_row`` (1-based)."""
    return _Raw(table, np.arange(first_row, first_row + len(table), dtype=np.int64), file)


def _read_delimited(path: Path, compression: str | None, file: str, header_line: str,
                    headerless_names: Sequence[str] | None, text_columns: Sequence[str] = (),
                    chunk_rows: int | None = None) -> Iterator[_Raw]:
    """Read CSV / TSV (or '::'-separated) text: one table, or tables of ``chunk_rows`` rows.

    Columns whose lower-cased name is in ``text_columns`` (ids) are read as strings so "007" stays "007"; the
    others are left to pandas' fast type inference (a column with an unparseable or empty value comes back as
    strings and the converters report the bad row). All columns are read (``usecols`` would make pandas accept
    rows with too many fields silently).
    """
    text_columns = {c.lower() for c in text_columns}
    if "::" in header_line:
        # MovieLens ratings.dat: '::' separated. The python engine is slow, so rewrite the separator.
        with _open_text(path, compression) as fh:
            text = fh.read().replace("::", "\t")
        source, sep, comp = io.StringIO(text), "\t", None
    else:
        sep = "\t" if "\t" in header_line else ("," if "," in header_line else (";" if ";" in header_line else ","))
        source, comp = path, compression
    kwargs = dict(sep=sep, na_filter=False, encoding="utf-8-sig", compression=comp, engine="c",
                  skip_blank_lines=True, chunksize=chunk_rows)
    if headerless_names is not None:
        kwargs.update(header=None, names=list(headerless_names),
                      dtype={n: str for n in headerless_names if n.lower() in text_columns})
    else:
        header = next(csv.reader([header_line], delimiter=sep))
        kwargs["dtype"] = {h: str for h in header if h.strip().lower() in text_columns}
    first_row = 1
    try:
        tables = pd.read_csv(source, **kwargs)
        for table in ([tables] if chunk_rows is None else tables):
            table.columns = [str(c).strip() for c in table.columns]
            n = len(table)
            yield _numbered(table, first_row, file)
            del table  # not held while the next chunk is read
            first_row += n
    except pd.errors.EmptyDataError:
        raise DataError("empty file (no data rows)", file=file) from None
    except pd.errors.ParserError as exc:
        m = re.search(r"line (\d+)", str(exc))
        row = None
        if m:
            row = int(m.group(1)) - (0 if headerless_names is not None else 1)
        raise DataError(f"malformed row ({str(exc).strip().splitlines()[-1]})", file=file, row=row) from None
    except UnicodeDecodeError:
        raise DataError("is not UTF-8 text (unsupported or corrupt file)", file=file) from None


def _read_parquet(path: Path, file: str, chunk_rows: int | None = None) -> Iterator[_Raw]:
    """A Parquet file: one table, or tables of ``chunk_rows`` rows (read a row group at a time)."""
    try:
        if chunk_rows is None:
            tables = [pd.read_parquet(path)]
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            parquet = pq.ParquetFile(path)
            tables = (pa.Table.from_batches([b], schema=parquet.schema_arrow).to_pandas()
                      for b in parquet.iter_batches(batch_size=chunk_rows))
        first_row = 1
        for table in tables:
            table = table.reset_index(drop=True)
            table.columns = [str(c).strip() for c in table.columns]
            n = len(table)
            yield _numbered(table, first_row, file)
            del table  # not held while the next chunk is read
            first_row += n
    except Exception as exc:  # pyarrow raises a variety of errors for corrupt files
        raise DataError(f"cannot read as Parquet ({exc})", file=file) from None


def _read_json_lines(path: Path, compression: str | None, file: str, fmt: str | None,
                     chunk_rows: int | None = None) -> Iterator[tuple[_Raw, str]]:
    """JSON lines: OTTO sessions (flattened to session, aid, ts, type) or flat records, as (raw, fmt): one table,
    or a table per ``chunk_rows`` lines (OTTO: per ``chunk_rows`` events, whole sessions)."""
    sessions: list = []
    aids: list = []
    tss: list = []
    types: list = []
    lines: list = []
    records: list = []
    record_lines: list = []
    mode = None if fmt is None else ("otto" if fmt == "otto" else "records")
    detected = None
    columns: dict = {}  # records: every key seen so far, so a chunk without a key reports its rows as missing values

    def table() -> tuple[_Raw, str]:
        nonlocal detected
        if mode == "otto":
            frame = pd.DataFrame({"session": pd.Series(sessions, dtype=object),
                                  "aid": pd.Series(aids, dtype=object), "ts": pd.Series(tss, dtype=object),
                                  "type": pd.Series(types, dtype=object)})
            raw = _Raw(frame, np.asarray(lines, dtype=np.int64), file)
            for column in (sessions, aids, tss, types, lines):
                column.clear()
            return raw, "otto"
        frame = pd.DataFrame.from_records(records)
        columns.update(dict.fromkeys(frame.columns))
        frame = frame.reindex(columns=list(columns))
        detected = detected or fmt or _detect_from_columns(frame.columns)
        if detected is None:
            raise DataError(_cannot_detect(frame.columns), file=file)
        raw = _Raw(frame, np.asarray(record_lines, dtype=np.int64), file)
        records.clear()
        record_lines.clear()
        return raw, detected

    try:
        with _open_text(path, compression) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"not valid JSON ({exc.msg})", file=file, row=lineno) from None
                if not isinstance(obj, dict):
                    raise DataError("expected a JSON object on each line", file=file, row=lineno)
                if mode is None:
                    mode = "otto" if ("session" in obj and "events" in obj) else "records"
                if mode == "records":
                    records.append(obj)
                    record_lines.append(lineno)
                    if chunk_rows is not None and len(records) >= chunk_rows:
                        yield table()
                    continue
                if "session" not in obj:
                    raise DataError("missing key 'session'", file=file, row=lineno, column="session")
                events = obj.get("events")
                if not isinstance(events, list):
                    raise DataError("missing or not a list: 'events'", file=file, row=lineno, column="events")
                session = obj["session"]
                for ev in events:
                    if not isinstance(ev, dict):
                        raise DataError("each event must be a JSON object", file=file, row=lineno,
                                        column="events")
                    aids.append(ev.get("aid"))
                    tss.append(ev.get("ts"))
                    types.append(ev.get("type"))
                sessions.extend([session] * len(events))
                lines.extend([lineno] * len(events))
                if chunk_rows is not None and len(lines) >= chunk_rows:
                    yield table()
    except UnicodeDecodeError:
        raise DataError("is not UTF-8 text (unsupported or corrupt file)", file=file) from None
    if mode is None:
        raise DataError("empty file (no data rows)", file=file)
    if chunk_rows is None or lines or records:
        yield table()


def _cannot_detect(columns) -> str:
    shown = ", ".join(str(c) for c in list(columns)[:20])
    return (f"cannot detect the format (columns: {shown}); expected canonical columns "
            f"user_id,item_id,action,timestamp, a KuaiRand log, OTTO jsonl or MovieLens ratings, or pass fmt=")


# ---------------------------------------------------------------------------------------------------------------
# column converters (vectorised; each raises DataError for the first bad row)


def _short(value) -> str:
    text = str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _require(raw: _Raw, required: Sequence[str], hint: str = "") -> dict[str, str]:
    """Check the required columns exist (case-insensitive); return required name -> actual column name."""
    lookup = _column_lookup(raw.table.columns)
    missing = [c for c in required if c.lower() not in lookup]
    if missing:
        found = ", ".join(str(c) for c in raw.table.columns) or "none"
        names = ", ".join(repr(c) for c in missing)
        raise DataError(f"missing required column{'s' if len(missing) > 1 else ''} {names}{hint} (found: {found})",
                        file=raw.file, column=missing[0])
    return {c: lookup[c.lower()] for c in required}


def _ids(raw: _Raw, column: str) -> np.ndarray:
    """A non-empty string id column -> object array of str."""
    s = raw.table[column]
    if pd.api.types.is_bool_dtype(s.dtype):
        raw.fail(np.ones(len(s), dtype=bool), column, lambda p: f"expected an id, got boolean {s.iloc[p]!r}")
    if pd.api.types.is_integer_dtype(s.dtype) and not isinstance(s.dtype, pd.api.extensions.ExtensionDtype):
        return s.astype(str).to_numpy(dtype=object)
    if pd.api.types.is_float_dtype(s.dtype):
        missing = s.isna().to_numpy()
        raw.fail(missing, column, lambda p: "missing value")
        values = s.to_numpy(dtype=np.float64)
        if np.all(values == np.round(values)):
            return values.astype(np.int64).astype(str).astype(object)
        return s.astype(str).to_numpy(dtype=object)
    missing = s.isna().to_numpy()
    text = s.astype(object).where(~missing, "").astype(str).str.strip()
    raw.fail(missing | (text == "").to_numpy(), column, lambda p: "empty value")
    return text.to_numpy(dtype=object)


def _numbers(raw: _Raw, column: str, what: str) -> np.ndarray:
    """A numeric column -> float64 array; missing or unparseable -> DataError."""
    s = raw.table[column]
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        values = s.to_numpy(dtype=np.float64, na_value=np.nan)
        raw.fail(np.isnan(values), column, lambda p: "missing value")
        return values
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64)
    text = s.astype(object).where(s.notna(), "").astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    empty = (text == "").to_numpy()
    raw.fail(empty, column, lambda p: "missing value")
    raw.fail(~np.isfinite(values), column, lambda p: f"cannot parse {_short(text.iloc[p])} as {what}")
    return values


def _flags(raw: _Raw, column: str) -> np.ndarray:
    values = _numbers(raw, column, "a 0/1 flag")
    raw.fail(values < 0, column, lambda p: f"expected a 0/1 flag, got {values[p]:g}")
    return values > 0


def _times(raw: _Raw, column: str, unit: str | None = None) -> np.ndarray:
    """A time column -> int64 ms since the epoch (UTC).

    Numbers are seconds or milliseconds: ``unit`` forces one, otherwise a column whose numeric values are all
    below 1e11 holds seconds. Strings that are not numbers are parsed as ISO-8601 (naive = UTC).
    """
    s = raw.table[column]
    n = len(s)
    if isinstance(s.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(s.dtype):
        raw.fail(s.isna().to_numpy(), column, lambda p: "missing value")
        if isinstance(s.dtype, pd.DatetimeTZDtype):
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        ms = s.to_numpy().astype("datetime64[ms]").astype(np.int64)
        raw.fail(ms < 0, column, lambda p: f"negative time {str(raw.table[column].iloc[p])!r} (before 1970)")
        return ms
    if pd.api.types.is_bool_dtype(s.dtype):
        raw.fail(np.ones(n, dtype=bool), column, lambda p: f"cannot parse {_short(s.iloc[p])} as a time")
    iso_ms = np.full(n, np.nan)
    if pd.api.types.is_numeric_dtype(s.dtype):
        numbers = s.to_numpy(dtype=np.float64, na_value=np.nan)
        text = None
        raw.fail(np.isnan(numbers), column, lambda p: "missing value")
        is_iso = np.zeros(n, dtype=bool)
    else:
        text = s.astype(object).where(s.notna(), "").astype(str).str.strip()
        raw.fail((text == "").to_numpy(), column, lambda p: "missing value")
        numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        is_iso = np.isnan(numbers)
        if is_iso.any():
            parsed = pd.to_datetime(text[is_iso], utc=True, format="ISO8601", errors="coerce")
            bad = parsed.isna().to_numpy()
            if bad.any():
                positions = np.flatnonzero(is_iso)
                mask = np.zeros(n, dtype=bool)
                mask[positions[bad]] = True
                raw.fail(mask, column, lambda p: f"cannot parse {_short(text.iloc[p])} as a time")
            delta = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
            iso_ms[is_iso] = delta.to_numpy(dtype=np.float64)
    is_num = ~is_iso
    raw.fail(is_num & ~np.isfinite(numbers), column, lambda p: f"cannot parse {_short(s.iloc[p])} as a time")
    raw.fail(is_num & (numbers < 0), column, lambda p: f"negative time {_short(s.iloc[p])}")
    if unit is None and raw.time_unit is not None:  # a later chunk of a file: its earlier rows decided
        unit = raw.time_unit
        if unit == "s":  # read whole, the file would be milliseconds; read in chunks, that is too late to decide
            raw.fail(is_num & (numbers >= _SECONDS_BELOW), column,
                     lambda p: f"{_short(s.iloc[p])} is a time in milliseconds, but the earlier rows hold seconds "
                               f"(all below {_SECONDS_BELOW:.0e})")
    if unit is None:
        num_values = numbers[is_num]
        unit = "s" if num_values.size and bool(np.all(num_values < _SECONDS_BELOW)) else "ms"
        raw.decided_time_unit = unit if num_values.size else None
    scale = 1000.0 if unit == "s" else 1.0
    if not is_iso.any() and unit == "ms" and pd.api.types.is_integer_dtype(s.dtype):
        ms = s.to_numpy(dtype=np.int64)  # exact, no float round trip
    else:
        ms_float = np.where(is_num, np.round(numbers * scale), iso_ms)
        ms = ms_float.astype(np.int64)
    raw.fail(ms < 0, column, lambda p: f"negative time {_short(s.iloc[p])} (before 1970)")
    return ms


# ---------------------------------------------------------------------------------------------------------------
# per-format conversion to canonical columns (+ _row with the source row number)


def _frame(users, items, actions, times, rows) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": pd.Series(users, dtype=object),
        "item_id": pd.Series(items, dtype=object),
        "action": pd.Series(actions, dtype=object),
        "timestamp": pd.Series(times, dtype=np.int64),
        "_row": pd.Series(rows, dtype=np.int64),
    })


def _convert_canonical(raw: _Raw, names=EVENT_COLUMNS, unit: str | None = None) -> pd.DataFrame:
    lookup = _require(raw, names)
    user_c, item_c, action_c, time_c = (lookup[n] for n in names)
    users = _ids(raw, user_c)
    items = _ids(raw, item_c)
    actions = _ids(raw, action_c)
    times = _times(raw, time_c, unit)
    return _frame(users, items, actions, times, raw.rows)


def _convert_otto(raw: _Raw) -> pd.DataFrame:
    return _convert_canonical(raw, names=("session", "aid", "type", "ts"))


def _convert_movielens(raw: _Raw) -> pd.DataFrame:
    lookup = _column_lookup(raw.table.columns)
    user = next((n for n in _MOVIELENS_USER if n in lookup), "userId")
    item = next((n for n in _MOVIELENS_ITEM if n in lookup), "movieId")
    lookup = _require(raw, (user, item, "rating", "timestamp"))
    users = _ids(raw, lookup[user])
    items = _ids(raw, lookup[item])
    rating = _numbers(raw, lookup["rating"], "a rating")
    times = _times(raw, lookup["timestamp"])
    actions = np.where(rating >= 4, "like", np.where(rating <= 2, "dislike", "rate")).astype(object)
    return _frame(users, items, actions, times, raw.rows)


def _convert_kuairand(raw: _Raw) -> tuple[pd.DataFrame, str | None]:
    lookup = _column_lookup(raw.table.columns)
    processed = "label" in lookup
    official = not processed and ("is_like" in lookup or "is_hate" in lookup)
    required = ["user_id", "video_id", "time_ms"]
    if not processed and not official:
        required.append("label")  # reported as missing; the official logs would have is_like / is_hate
    _require(raw, required, hint="" if processed or official else
             " (the official KuaiRand logs have 'is_like' / 'is_hate' instead of 'label')")
    users = _ids(raw, lookup["user_id"])
    items = _ids(raw, lookup["video_id"])
    times = _times(raw, lookup["time_ms"], unit="ms")
    pieces: list[tuple[np.ndarray, str]] = []  # (row mask, action)
    if processed:
        label_c = lookup["label"]
        label = _numbers(raw, label_c, "a label")
        raw.fail((label != 0) & (label != 1), label_c,
                 lambda p: f"expected 1 (like) or 0 (hate), got {label[p]:g}")
        pieces += [(label == 1, "like"), (label == 0, "hate")]
    else:
        pieces.append((np.ones(len(users), dtype=bool), "impression"))
        for col, action in (("is_like", "like"), ("is_hate", "hate")):
            if col in lookup:
                pieces.append((_flags(raw, lookup[col]), action))
    for col, action in _KUAIRAND_FLAGS:
        if col in lookup:
            pieces.append((_flags(raw, lookup[col]), action))
    parts = [np.flatnonzero(mask) for mask, _ in pieces]
    idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    actions = np.concatenate([np.full(len(p), a, dtype=object) for p, (_, a) in zip(parts, pieces)])
    frame = _frame(users[idx], items[idx], actions, times[idx], raw.rows[idx])
    return frame, (None if processed else "impression")


# id / name columns of every format: always read as text
_TEXT_COLUMNS = ("user_id", "item_id", "action", "video_id") + _MOVIELENS_USER + _MOVIELENS_ITEM

_DEFAULT_NEGATIVES = {"canonical": (), "kuairand": ("hate",), "otto": (), "movielens": ("dislike",)}


# ---------------------------------------------------------------------------------------------------------------
# public API


@dataclass
class EventChunk:
    """Validated canonical rows of (a part of) a file: user_id, item_id, action, timestamp and _row (the 1-based
    source row), in file order, exact duplicates not yet dropped."""

    frame: pd.DataFrame
    fmt: str
    exposure_action: str | None


def read_event_chunks(path, fmt: str | None = None, chunk_rows: int | None = None) -> Iterator[EventChunk]:
    """Read and validate a raw event log (every format of :func:`load_events`) as canonical chunks.

    ``chunk_rows`` None: the whole file in one chunk (what load_events reads). Otherwise about ``chunk_rows``
    source rows at a time (OTTO: events; whole sessions), so a file larger than memory is read in bounded memory.
    The checks and errors are those of load_events, with one difference in chunks: a time column's unit (seconds
    when every number is below 1e11) is decided by the first chunk with numbers, and a later row in milliseconds
    after rows in seconds is a DataError naming it (read whole, the file would silently be milliseconds).

    Raises:
        DataError: for any problem with the file or its contents (names file, row and column).
    """
    file = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    p = Path(file)
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})", file=file)
    if not p.exists():
        raise DataError("file not found", file=file)
    if p.is_dir():
        raise DataError("is a directory, expected an event file", file=file)
    if p.stat().st_size == 0:
        raise DataError("empty file (no data rows)", file=file)

    compression = _compression(p)
    base = _base_name(p)
    with open(p, "rb") as fh:
        is_parquet = fh.read(4) == b"PAR1"
    no_rows = "no data rows"

    def detect_parquet(raws: Iterator[_Raw]) -> Iterator[tuple[_Raw, str]]:
        detected = None
        for raw in raws:
            detected = detected or fmt or _detect_from_columns(raw.table.columns)
            if detected is None:
                raise DataError(_cannot_detect(raw.table.columns), file=file)
            if detected == "otto":
                raise DataError("OTTO data must be JSON lines, not Parquet", file=file)
            yield raw, detected

    if is_parquet or base.endswith((".parquet", ".pq")):
        raws = detect_parquet(_read_parquet(p, file, chunk_rows))
    else:
        first = _first_line(p, compression, file)
        if first is None:
            raise DataError("empty file (no data rows)", file=file)
        looks_json = first.lstrip().startswith("{") or base.endswith((".jsonl", ".json", ".ndjson"))
        no_rows = "header only, no data rows" if not looks_json else "no data rows"
        if fmt == "otto" or (fmt is None and looks_json) or (fmt is not None and first.lstrip().startswith("{")):
            raws = _read_json_lines(p, compression, file, fmt, chunk_rows)
        else:
            sep = "\t" if "\t" in first else ("," if "," in first else (";" if ";" in first else ","))
            fields = [f.strip() for f in (first.split("::") if "::" in first else first.split(sep))]
            # MovieLens u.data / ratings.dat have no header; the other formats always have one
            headerless = (fmt in (None, "movielens") and len(fields) == 4 and all(_is_number(f) for f in fields))
            if headerless:
                detected = "movielens"
                text = _read_delimited(p, compression, file, first, _MOVIELENS_HEADERLESS,
                                       text_columns=_TEXT_COLUMNS, chunk_rows=chunk_rows)
            else:
                header = [h.strip() for h in next(csv.reader([first], delimiter=sep))]
                detected = fmt or _detect_from_columns(header)
                if detected is None:
                    raise DataError(_cannot_detect(header), file=file)
                text = _read_delimited(p, compression, file, first, None, text_columns=_TEXT_COLUMNS,
                                       chunk_rows=chunk_rows)
            raws = ((raw, detected) for raw in text)

    time_unit = None
    n_rows = 0
    for raw, detected in raws:
        if len(raw.table) == 0:
            continue
        n_rows += len(raw.table)
        raw.time_unit = time_unit
        exposure = None
        if detected == "kuairand":
            frame, exposure = _convert_kuairand(raw)
        elif detected == "otto":
            frame = _convert_otto(raw)
        elif detected == "movielens":
            frame = _convert_movielens(raw)
        else:
            frame = _convert_canonical(raw)
        time_unit = time_unit or raw.decided_time_unit
        yield EventChunk(frame, detected, exposure)
        del raw, frame  # not held while the next chunk is read
    if n_rows == 0:
        raise DataError(no_rows, file=file)


def load_events(path, fmt: str | None = None, negative_actions: Sequence[str] | None = None,
                min_users: int = 2) -> EventLog:
    """Load a raw event log into canonical form.

    Args:
        path: the file (CSV/TSV/Parquet/JSON lines, optionally gzip/bz2/xz compressed).
        fmt: "canonical", "kuairand", "otto" or "movielens"; ``None`` detects it from the extension and header.
        negative_actions: actions that are negative feedback. ``None`` uses the format's default (kuairand:
            ("hate",), movielens: ("dislike",), otherwise none) restricted to actions present in the data; an
            explicit list overrides it and each name must occur in the data.
        min_users: the fewest distinct users the log must have (a split needs at least two).

    Raises:
        DataError: for any problem with the file or its contents (names file, row and column).
    """
    (chunk,) = read_event_chunks(path, fmt)
    file = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return _finish(chunk.frame, file, chunk.fmt, chunk.exposure_action, negative_actions, min_users)


def drop_duplicates_and_sort(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Canonical rows (and the _row column, if there) -> (events without exact duplicate rows, sorted by user, time,
    item, action, with the index reset; the number of rows dropped)."""
    before = len(frame)
    frame = frame.drop_duplicates(subset=list(EVENT_COLUMNS), keep="first")
    events = frame.sort_values(_SORT_KEYS, kind="mergesort").drop(columns="_row", errors="ignore")
    events = events.reset_index(drop=True)
    events["timestamp"] = events["timestamp"].astype(np.int64)
    return events, before - len(frame)


def resolve_negative_actions(present: set[str], fmt: str, exposure: str | None,
                             negative_actions: Sequence[str] | None, file: str) -> tuple[str, ...]:
    """The negative-feedback actions of a log whose actions are ``present``: ``None`` -> the format's default
    restricted to present actions; an explicit list -> checked (each must occur; never the exposure action)."""
    if negative_actions is None:
        return tuple(a for a in _DEFAULT_NEGATIVES[fmt] if a in present)
    if isinstance(negative_actions, str):
        negative_actions = (negative_actions,)
    negatives = tuple(dict.fromkeys(str(a) for a in negative_actions))
    for a in negatives:
        if a not in present:
            raise DataError(f"negative action {a!r} never occurs in the data "
                            f"(actions: {', '.join(sorted(present))})", file=file, column="action")
    if exposure is not None and exposure in negatives:
        raise DataError(f"{exposure!r} is the exposure action and cannot also be negative feedback",
                        file=file, column="action")
    return negatives


def require_users(n_users: int, min_users: int, file: str) -> None:
    """A split needs users on both sides: fail, naming user_id, for a log with fewer than ``min_users``."""
    if n_users < min_users:
        raise DataError(f"needs at least {min_users} users to split, found {n_users}", file=file,
                        column="user_id")


def _finish(frame: pd.DataFrame, file: str, fmt: str, exposure: str | None,
            negative_actions: Sequence[str] | None, min_users: int) -> EventLog:
    events, dropped = drop_duplicates_and_sort(frame)
    negatives = resolve_negative_actions(set(pd.unique(events["action"]).tolist()), fmt, exposure,
                                         negative_actions, file)
    require_users(int(events["user_id"].nunique()), min_users, file)
    return EventLog(events=events, source=file, fmt=fmt, duplicates_dropped=int(dropped),
                    negative_actions=negatives, exposure_action=exposure)


def add_sampled_negatives(log: EventLog, per_positive: float = 1.0, seed: int = 0) -> EventLog:
    """Add sampled exposure ("impression") rows to a log that has no logged exposures.

    Why: the ranker learns P(action | shown). Logs such as OTTO or plain click streams only record engagements,
    so there is no example of an item that was shown and *not* engaged with. This function fabricates such
    examples: for each positive row (any action that is not negative feedback), with ratio ``per_positive``
    (1.0 = one per positive, 0.5 = with probability one half, 2.5 = two plus a third with probability one half),
    it adds an ``impression`` row, at the same timestamp t as the positive, for an item drawn uniformly from the
    catalogue as of t (the items that have appeared in the log by t: a negative never comes from the future, which
    would teach "unseen item = not engaged" to a model evaluated on the later period) among the items that user had
    not interacted with by t. These are *sampled* negatives, not logged
    exposures (``exposures_sampled`` is set on the result): metrics computed on them measure ranking against
    random items, which is easier than ranking real impressions. Deterministic for a given ``seed``.
    """
    if per_positive < 0 or not math.isfinite(per_positive):
        raise ValueError(f"per_positive must be a finite number >= 0, got {per_positive!r}")
    if log.exposure_action is not None:
        raise DataError(f"the log already has exposure rows ({log.exposure_action!r}); sampling more would mix "
                        "sampled and logged exposures", file=log.source, column="action")
    events = log.events
    if (events["action"] == "impression").any():
        raise DataError("the log already uses the action name 'impression'", file=log.source, column="action")

    rng = np.random.default_rng(seed)
    user_codes = pd.factorize(events["user_id"], sort=True)[0].astype(np.int64)
    item_codes, items = pd.factorize(events["item_id"], sort=True)
    item_codes = item_codes.astype(np.int64)
    n_items = len(items)
    ts = events["timestamp"].to_numpy(dtype=np.int64)
    # the catalogue as of time t: the items that have appeared in the log by then (never one that appears later)
    first_seen = np.full(n_items, np.iinfo(np.int64).max)
    np.minimum.at(first_seen, item_codes, ts)
    by_first = np.argsort(first_seen, kind="stable")
    first_sorted = first_seen[by_first]
    # what the user had interacted with by time t: (user, item) -> the first time
    keys = user_codes * n_items + item_codes
    engaged, inverse = np.unique(keys, return_inverse=True)
    engaged_first = np.full(len(engaged), np.iinfo(np.int64).max)
    np.minimum.at(engaged_first, inverse, ts)

    positive = ~events["action"].isin(log.negative_actions).to_numpy()
    pos_idx = np.flatnonzero(positive)
    whole = int(per_positive)
    counts = np.full(len(pos_idx), whole, dtype=np.int64)
    frac = per_positive - whole
    if frac > 0:
        counts += rng.random(len(pos_idx)) < frac
    src = np.repeat(pos_idx, counts)
    sample_users, sample_ts = user_codes[src], ts[src]
    available = np.searchsorted(first_sorted, sample_ts, side="right")  # >= 1: the positive's own item

    def taken(users, chosen, t):
        """True where the user had interacted with the item at or before t."""
        k = users * n_items + chosen
        pos = np.minimum(np.searchsorted(engaged, k), len(engaged) - 1)
        return (engaged[pos] == k) & (engaged_first[pos] <= t)

    chosen = by_first[(rng.random(len(src)) * available).astype(np.int64)] if len(src) else np.zeros(0, np.int64)
    pending = np.ones(len(src), dtype=bool)
    for _ in range(64):  # rejection sampling, vectorised
        positions = np.flatnonzero(pending)
        hit = taken(sample_users[positions], chosen[positions], sample_ts[positions])
        pending[positions[~hit]] = False
        if not pending.any():
            break
        redraw = positions[hit]
        chosen[redraw] = by_first[(rng.random(len(redraw)) * available[redraw]).astype(np.int64)]
    keep = np.ones(len(src), dtype=bool)
    for pos in np.flatnonzero(pending):  # users who had seen most of the catalogue: its explicit complement
        cands = by_first[:available[pos]]
        free = cands[~taken(np.full(len(cands), sample_users[pos]), cands, np.full(len(cands), sample_ts[pos]))]
        if len(free):
            chosen[pos] = free[rng.integers(0, len(free))]
        else:  # every item in the catalogue so far: no negative to sample
            keep[pos] = False
    src, chosen = src[keep], chosen[keep]

    added = pd.DataFrame({
        "user_id": events["user_id"].to_numpy(dtype=object)[src],
        "item_id": np.asarray(items, dtype=object)[chosen],
        "action": np.full(len(src), "impression", dtype=object),
        "timestamp": events["timestamp"].to_numpy(dtype=np.int64)[src],
    })
    combined = pd.concat([events, added], ignore_index=True)
    combined = combined.drop_duplicates(subset=list(EVENT_COLUMNS), keep="first")
    combined = combined.sort_values(_SORT_KEYS, kind="mergesort").reset_index(drop=True)
    combined["timestamp"] = combined["timestamp"].astype(np.int64)
    return replace(log, events=combined, exposure_action="impression", exposures_sampled=True)


def load_records(records, source: str = "<records>", min_users: int = 1) -> EventLog:
    """Canonical records already in memory (a JSON request body, Redis stream entries) -> :class:`EventLog`.

    The in-memory twin of ``load_events(path, fmt="canonical")``: the same column converters, duplicate handling
    and sort, so ``seqrank ingest`` reads exactly what ``seqrank train`` reads. ``records`` is a list of mappings
    with the keys ``user_id, item_id, action, timestamp`` (other keys are ignored); times are seconds or
    milliseconds (decided over all the records by magnitude, as for a file's column) or ISO-8601 strings.
    :class:`DataError` names ``source``, the 1-based position of the record as ``row`` and the key as ``column``.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise DataError(f"expected a list of records, got {type(records).__name__}", file=source)
    if not records:
        raise DataError("no data rows", file=source)
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise DataError(f"expected an object with {', '.join(EVENT_COLUMNS)}, got {type(rec).__name__}",
                            file=source, row=i)
    table = pd.DataFrame.from_records(list(records))
    table.columns = [str(c).strip() for c in table.columns]
    raw = _Raw(table, np.arange(1, len(table) + 1, dtype=np.int64), source)
    return _finish(_convert_canonical(raw), source, "canonical", None, None, min_users)
