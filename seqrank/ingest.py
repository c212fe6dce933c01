"""Ingestion into the feature store: files / stdin (jsonl or csv), a tiny HTTP API for producers, and a
freshness probe.

    seqrank ingest --store URL [--file PATH | -] [--format jsonl|csv] [--serve --port 8090]

Records: ``{"user_id", "item_id", "action", "timestamp_ms"}`` (csv: a header with those columns). Numeric
ids are turned into strings; ``timestamp_ms`` must be an integer (an integral float or a digit string is
accepted). A malformed record is counted as invalid and logged with its line number; it never aborts the
stream. HTTP: ``POST /v1/actions`` with a JSON list of actions -> 200 with the counts, or 400 naming the
first bad field (nothing is appended); ``?partial=1`` appends the valid ones and counts the rest as
invalid. ``GET /healthz`` -> 200.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Iterable, Iterator, Optional, Union
from urllib.parse import parse_qs, urlsplit

from .store.base import STORE_ENV, Action, FeatureStore, IngestStats, StoreUnavailable, open_store, validate_action

log = logging.getLogger("seqrank.ingest")

FIELDS = ("user_id", "item_id", "action", "timestamp_ms")
MAX_BODY_BYTES = 32 * 1024 * 1024


class RecordError(ValueError):
    """A record that cannot become a valid Action; ``str(e)`` starts with the field name."""


def action_from_record(rec) -> Action:
    """dict -> validated Action, or RecordError naming the bad field."""
    if not isinstance(rec, dict):
        raise RecordError(f"record: expected an object with {', '.join(FIELDS)}, got {type(rec).__name__}")
    vals = {}
    for f in FIELDS:
        if f not in rec or rec[f] is None or rec[f] == "":
            raise RecordError(f"{f}: missing")
    for f in ("user_id", "item_id", "action"):
        v = rec[f]
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise RecordError(f"{f}: must be a string, got {type(v).__name__}")
        vals[f] = str(v)
    ts = rec["timestamp_ms"]
    if isinstance(ts, bool):
        raise RecordError("timestamp_ms: must be an integer, got bool")
    if isinstance(ts, float):
        if not math.isfinite(ts) or not ts.is_integer():
            raise RecordError(f"timestamp_ms: must be an integer, got {ts!r}")
        ts = int(ts)
    elif isinstance(ts, str):
        try:
            ts = int(ts.strip())
        except ValueError:
            raise RecordError(f"timestamp_ms: must be an integer, got {ts!r}") from None
    elif not isinstance(ts, int):
        raise RecordError(f"timestamp_ms: must be an integer, got {type(ts).__name__}")
    a = Action(vals["user_id"], vals["item_id"], vals["action"], ts)
    problem = validate_action(a)
    if problem:
        raise RecordError(problem)
    return a


class ActionReader:
    """Iterates the valid Actions of a jsonl/csv stream; ``invalid`` counts the skipped malformed records.

    ``ingest`` adds ``invalid`` to its stats after the stream is consumed.
    """

    def __init__(self, path_or_stdin: Union[str, os.PathLike, IO, None] = "-", fmt: Optional[str] = "jsonl"):
        self.source = path_or_stdin
        if fmt is None:
            name = str(path_or_stdin) if isinstance(path_or_stdin, (str, os.PathLike)) else ""
            fmt = "csv" if name.lower().endswith(".csv") else "jsonl"
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"unknown format {fmt!r} (jsonl or csv)")
        self.fmt = fmt
        self.invalid = 0
        self.lines = 0
        self.name = "<stdin>" if path_or_stdin in (None, "-") else str(getattr(path_or_stdin, "name", path_or_stdin))

    def _bad(self, line_no: int, why: str) -> None:
        self.invalid += 1
        log.warning("%s:%d: invalid record skipped: %s", self.name, line_no, why)

    def _open(self):
        src = self.source
        if src in (None, "-"):
            return sys.stdin, False
        if isinstance(src, (str, os.PathLike)):
            return open(src, "r", encoding="utf-8", newline="" if self.fmt == "csv" else None,
                        errors="replace"), True
        return src, False

    def __iter__(self) -> Iterator[Action]:
        f, owned = self._open()
        try:
            yield from (self._jsonl(f) if self.fmt == "jsonl" else self._csv(f))
        finally:
            if owned:
                f.close()

    def _jsonl(self, f) -> Iterator[Action]:
        for line_no, line in enumerate(f, 1):
            self.lines = line_no
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                self._bad(line_no, f"not JSON ({e})")
                continue
            try:
                yield action_from_record(rec)
            except RecordError as e:
                self._bad(line_no, str(e))

    def _csv(self, f) -> Iterator[Action]:
        reader = csv.DictReader(f)
        missing = [c for c in FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{self.name}: csv header lacks {missing} (has {reader.fieldnames})")
        for rec in reader:
            line_no = reader.line_num
            self.lines = line_no
            if None in rec:                       # more cells than header columns
                self._bad(line_no, "too many columns")
                continue
            if all(v in (None, "") for v in rec.values()):
                continue
            try:
                yield action_from_record(rec)
            except RecordError as e:
                self._bad(line_no, str(e))


def read_actions(path_or_stdin: Union[str, os.PathLike, IO, None] = "-", fmt: Optional[str] = "jsonl") -> ActionReader:
    """Actions from a jsonl/csv file, an open text file, or stdin (``"-"``). ``fmt=None``: from the extension."""
    return ActionReader(path_or_stdin, fmt)


def _append_retrying(store: FeatureStore, batch: list, retries: int, backoff_s: float) -> IngestStats:
    """``store.append`` with retries on StoreUnavailable. Safe because append is idempotent: a batch that
    was applied before its reply was lost comes back as duplicates."""
    for attempt in range(retries + 1):
        try:
            return store.append(batch)
        except StoreUnavailable as e:
            if attempt == retries:
                raise
            wait = backoff_s * (2 ** attempt)
            log.warning("store unavailable (%s); retrying in %.2f s (%d/%d)", e, wait, attempt + 1, retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


def ingest(store: FeatureStore, source: Iterable[Action], batch_size: int = 1000, retries: int = 3,
           backoff_s: float = 0.2, log_every_s: float = 10.0) -> IngestStats:
    """Append ``source`` in batches of ``batch_size``; returns the summed counts (including records the
    reader skipped as malformed). A batch is retried ``retries`` times (exponential backoff from
    ``backoff_s``) when the store is unavailable, then StoreUnavailable propagates."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    total = IngestStats()
    batch: list[Action] = []
    t0 = last = time.monotonic()
    for a in source:
        batch.append(a)
        if len(batch) >= batch_size:
            total += _append_retrying(store, batch, retries, backoff_s)
            batch = []
            now = time.monotonic()
            if now - last >= log_every_s:
                last = now
                log.info("ingested %d records (%.0f/s): %s", total.total, total.total / (now - t0),
                         total.to_dict())
    if batch:
        total += _append_retrying(store, batch, retries, backoff_s)
    total.invalid += int(getattr(source, "invalid", 0))
    return total


def replay_log(store: FeatureStore, events, skip_actions: Iterable[str] = (), batch_size: int = 5000) -> IngestStats:
    """A canonical event table (user_id, item_id, action, timestamp) into the store, as the real-time stream would
    deliver it, without ``skip_actions`` (pass the log's exposure action: a store keeps a bounded number of actions
    per user and the model's sequence holds engagements only, so exposures would crowd out what it reads)."""
    skip = {a for a in skip_actions if a}
    ev = events[~events["action"].isin(skip)] if skip else events
    return ingest(store, (Action(str(u), str(i), str(a), int(t)) for u, i, a, t in
                          ev[["user_id", "item_id", "action", "timestamp"]].itertuples(index=False, name=None)),
                  batch_size=batch_size)


# HTTP API ----------------------------------------------------------------------------------------
def make_ingest_app(store: FeatureStore, max_body_bytes: int = MAX_BODY_BYTES):
    """A ``BaseHTTPRequestHandler`` class bound to ``store`` (serve it with ``ThreadingHTTPServer``)."""

    class IngestHandler(BaseHTTPRequestHandler):
        server_version = "seqrank-ingest/1"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):          # route access logs through logging
            log.debug("%s " + fmt, self.address_string(), *args)

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if urlsplit(self.path).path == "/healthz":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": f"no route {self.path}"})

        def do_POST(self):
            parts = urlsplit(self.path)
            if parts.path != "/v1/actions":
                self._reply(404, {"error": f"no route {parts.path}"})
                return
            partial = parse_qs(parts.query).get("partial", ["0"])[-1].lower() in ("1", "true", "yes")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._reply(411, {"error": "Content-Length required"})
                return
            if length > max_body_bytes:
                self.close_connection = True
                self._reply(413, {"error": f"body larger than {max_body_bytes} bytes"})
                return
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError as e:
                self._reply(400, {"error": f"body: not JSON ({e})"})
                return
            if isinstance(body, dict) and "actions" in body:
                body = body["actions"]
            if not isinstance(body, list):
                self._reply(400, {"error": "body: expected a JSON list of actions"})
                return
            actions, invalid = [], 0
            for i, rec in enumerate(body):
                try:
                    actions.append(action_from_record(rec))
                except RecordError as e:
                    if not partial:
                        self._reply(400, {"error": f"actions[{i}].{e}", "index": i,
                                          "field": str(e).split(":", 1)[0]})
                        return
                    invalid += 1
            try:
                stats = store.append(actions) if actions else IngestStats()
            except StoreUnavailable as e:
                self._reply(503, {"error": f"store unavailable: {e}"})
                return
            stats.invalid += invalid
            self._reply(200, stats.to_dict())

    return IngestHandler


def make_ingest_server(store: FeatureStore, host: str = "127.0.0.1", port: int = 8090) -> ThreadingHTTPServer:
    """A started-but-not-serving server (``port=0`` picks a free one: ``server.server_address[1]``)."""
    server = ThreadingHTTPServer((host, port), make_ingest_app(store))
    server.daemon_threads = True
    return server


def run_ingest_server(store: FeatureStore, host: str = "0.0.0.0", port: int = 8090) -> None:
    """Serve ``POST /v1/actions`` until interrupted."""
    server = make_ingest_server(store, host, port)
    log.info("ingest API on http://%s:%d/v1/actions -> %r", host, server.server_address[1], store)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# freshness -------------------------------------------------------------------------------------
def measure_freshness(store: FeatureStore, n: int = 100, reader: Optional[FeatureStore] = None,
                      timeout_s: float = 5.0, user_id: Optional[str] = None) -> list[float]:
    """Append one action, then poll ``reader`` (default: ``store``) until it is visible; ``n`` times.

    Returns the action-to-readable latencies in milliseconds. Uses a dedicated probe user
    (``__freshness__/<random>``), so real users are untouched.
    """
    reader = reader or store
    user = user_id or f"__freshness__/{uuid.uuid4().hex[:12]}"
    base_ms = int(time.time() * 1000)
    samples = []
    for i in range(n):
        a = Action(user, f"probe{i}", "probe", base_ms + i)
        t0 = time.perf_counter()
        stats = store.append([a])
        if stats.accepted != 1:
            raise RuntimeError(f"freshness probe not accepted: {stats}")
        deadline = time.monotonic() + timeout_s
        while True:
            seq = reader.get_sequences([user])[0]
            if len(seq) and seq.item_ids[-1] == a.item_id and int(seq.timestamps_ms[-1]) == a.timestamp_ms:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"probe action not visible after {timeout_s} s")
            time.sleep(0.0005)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


# CLI -------------------------------------------------------------------------------------------
def main_ingest(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="seqrank ingest", description="Load user actions into the feature store.")
    p.add_argument("--store", default=os.environ.get(STORE_ENV),
                   help=f"store URL (sqlite:///abs/path.db or redis://host:port/db); default ${STORE_ENV}")
    p.add_argument("--file", help="jsonl/csv file of actions, or - for stdin")
    p.add_argument("--format", choices=("jsonl", "csv"), default=None, help="default: from the file extension")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--late-bound-ms", type=int, default=None)
    p.add_argument("--serve", action="store_true", help="serve POST /v1/actions")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.store:
        p.error(f"--store is required (or set ${STORE_ENV})")
    if not args.file and not args.serve:
        p.error("nothing to do: give --file PATH (or -) and/or --serve")
    kw = {k: v for k, v in (("max_len", args.max_len), ("late_bound_ms", args.late_bound_ms)) if v is not None}
    kw.setdefault("timeout_s", 5.0)      # a bulk loader is not latency bound
    store = open_store(args.store, **kw)
    try:
        if args.file:
            t0 = time.perf_counter()
            stats = ingest(store, read_actions(args.file, args.format), batch_size=args.batch_size)
            dt = time.perf_counter() - t0
            out = dict(stats.to_dict(), seconds=round(dt, 3), per_second=round(stats.total / dt, 1) if dt else None)
            print(json.dumps(out), flush=True)
        if args.serve:
            run_ingest_server(store, args.host, args.port)
    except StoreUnavailable as e:
        log.error("store unavailable: %s", e)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main_ingest())
