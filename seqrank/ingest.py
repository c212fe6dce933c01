"""Ingestion into the feature store: event files (the ones ``seqrank train`` reads), an HTTP API for producers, a
Redis Streams consumer, and a freshness probe.

    seqrank ingest --store URL --file PATH|-                       # canonical/KuaiRand/OTTO/MovieLens file or stdin
    seqrank ingest --store URL --serve [--port 8090] [--token-env SEQRANK_INGEST_TOKEN]
    seqrank ingest --store URL --stream redis://host:6379/0 [--stream-key seqrank:actions] [--group seqrank-ingest]

One input path: every record, whatever its transport, goes through ``seqrank.data.loaders`` (``load_events`` for
files, ``load_records`` for request bodies and stream entries), so ingest accepts exactly the events training
accepts: ``user_id, item_id, action, timestamp`` with the timestamp in seconds or milliseconds (decided by
magnitude over a file, a request or a stream batch) or ISO-8601. A file with a bad row is refused whole, naming the
file, row and column (nothing is appended); exact duplicate rows count as duplicates. The previous record shape
(``timestamp_ms``) is refused with "missing required column 'timestamp'": rename the field (millisecond values are
recognised as such).

HTTP API (FastAPI on uvicorn, ``make_ingest_app``): ``POST /v1/actions`` with ``Authorization: Bearer <token>`` and a
JSON list of actions (or ``{"actions": [...]}``) -> 200 with the counts (accepted, duplicates, too_late, invalid).
All or nothing: a bad action rejects the request and nothing is appended. Errors are JSON ``{"error", "field"[,
"index"]}``: 401 missing/wrong token, 400 body not JSON or a bad header, 413 body over ``max_body_bytes`` or more
than ``max_actions`` actions, 422 an action with a bad field (``index`` is its position in the list), 429 more than
``max_in_flight`` requests in progress (``Retry-After: 1``), 503 the store is unavailable (``Retry-After: 1``;
safe to retry: appends are idempotent). ``GET /healthz`` -> 200 without auth. Binds 127.0.0.1 unless ``--host``.
The token comes from the environment variable named by ``--token-env``; without one the server refuses to start
unless ``--insecure-no-auth`` is given.

Stream consumer (``StreamConsumer``): at-least-once from a Redis stream through a consumer group. Entries carry the
canonical fields; a batch is read with XREADGROUP, appended with the store's idempotent append, then XACKed, so a
consumer killed between the append and the XACK gets the batch again on restart (its own pending entries are read
first; entries pending on a consumer that never came back are taken over with XAUTOCLAIM after
``claim_idle_ms``) and the store absorbs the repeats as duplicates. An entry that is not a valid action goes to the
dead-letter stream ``<key>:dead`` with the error, and is acknowledged. The stream is replayable: entries stay until
the producer trims them (XADD MAXLEN), and a new group reads from the start.
"""

import argparse
import hmac
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .data.loaders import DataError, EventLog, load_events, load_records
from .store.base import (MAX_TIMESTAMP_MS, STORE_ENV, Action, FeatureStore, IngestStats, StoreUnavailable,
                         open_store)

log = logging.getLogger("seqrank.ingest")

FIELDS = ("user_id", "item_id", "action", "timestamp")
MAX_BODY_BYTES = 1024 * 1024          # one request's body
MAX_ACTIONS = 10_000                  # actions in one request
MAX_IN_FLIGHT = 32                    # requests in progress at once; more get 429
MAX_FIELD_CHARS = 1024                # an id / action name longer than this is refused
TOKEN_ENV = "SEQRANK_INGEST_TOKEN"
_CONTROL = r"[\x00-\x1f]"             # the store's packed format reserves \x1f; no control characters at all


# events -> actions -----------------------------------------------------------------------------
def check_store_limits(log_: EventLog, records: Optional[Sequence[dict]] = None) -> None:
    """DataError when an event is valid for training but cannot be stored: a control character in an item id or
    action (the store's packed format uses \\x1f), or a time past 2**53 ms. With ``records`` (the input of
    ``load_records``) the error's row is the offending record's 1-based position."""
    ev = log_.events
    for column in ("item_id", "action"):
        bad = ev[column].str.contains(_CONTROL, regex=True).to_numpy()
        if bad.any():
            value = ev[column].iloc[int(np.argmax(bad))]
            row = None if records is None else next(
                (i for i, r in enumerate(records, 1) if re.search(_CONTROL, str(r.get(column, "")))), None)
            raise DataError(f"{value!r} contains a control character (the store cannot hold it)",
                            file=log_.source, row=row, column=column)
    late = ev["timestamp"].to_numpy() > MAX_TIMESTAMP_MS
    if late.any():
        ts = int(ev["timestamp"].iloc[int(np.argmax(late))])
        raise DataError(f"time {ts} ms is past 2**53 ms", file=log_.source, column="timestamp")


def actions_of(log_: EventLog) -> Iterator[Action]:
    """The canonical events as store Actions (sorted per user by time, as the loaders leave them)."""
    ev = log_.events
    for u, i, a, t in zip(ev["user_id"].tolist(), ev["item_id"].tolist(), ev["action"].tolist(),
                          ev["timestamp"].tolist()):
        yield Action(u, i, a, int(t))


def load_actions(path, fmt: Optional[str] = None) -> EventLog:
    """An event file (any shape ``seqrank train`` reads; ``"-"`` = stdin) -> checked EventLog; DataError names the
    file, row and column of the first problem."""
    if path in (None, "-"):
        with tempfile.NamedTemporaryFile(prefix="seqrank-ingest-", suffix=".stdin") as tmp:
            shutil.copyfileobj(sys.stdin.buffer, tmp)
            tmp.flush()
            ev = load_events(tmp.name, fmt=fmt, min_users=1)
        ev.source = "<stdin>"
    else:
        ev = load_events(path, fmt=fmt, min_users=1)
    check_store_limits(ev)
    return ev


def log_from_records(records: Sequence[dict], source: str) -> EventLog:
    """In-memory canonical records (request body, stream entries) -> checked EventLog, or DataError."""
    ev = load_records(records, source=source)
    check_store_limits(ev, records)
    return ev


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
    """Append ``source`` in batches of ``batch_size``; returns the summed counts. A batch is retried ``retries``
    times (exponential backoff from ``backoff_s``) when the store is unavailable, then StoreUnavailable
    propagates."""
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
    return total


def ingest_log(store: FeatureStore, ev: EventLog, batch_size: int = 1000, **kw) -> IngestStats:
    """A loaded EventLog into the store; the exact duplicate rows the loader dropped count as duplicates."""
    stats = ingest(store, actions_of(ev), batch_size=batch_size, **kw)
    stats.duplicates += int(ev.duplicates_dropped)
    return stats


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
_JSON_TYPES = {"user_id": ((str, int), "a string or an integer"), "item_id": ((str, int), "a string or an integer"),
               "action": ((str,), "a string"), "timestamp": ((int, float, str), "a number or an ISO-8601 string")}


class RequestError(Exception):
    """An HTTP error answer: status, message, the field it names and the action's index (if any)."""

    def __init__(self, status: int, field: str, message: str, index: Optional[int] = None, headers=None):
        super().__init__(message)
        self.status, self.field, self.index, self.headers = status, field, index, headers

    def body(self) -> dict:
        where = self.field if self.index is None else f"actions[{self.index}].{self.field}"
        out = {"error": f"{where}: {self}", "field": self.field}
        if self.index is not None:
            out["index"] = self.index
        return out


def check_json_types(body: list) -> None:
    """The JSON shape of each action (types and lengths; the values are parsed by the loaders) -> RequestError."""
    for i, rec in enumerate(body):
        if not isinstance(rec, dict):
            raise RequestError(422, "action", f"expected an object with {', '.join(FIELDS)}, "
                               f"got {type(rec).__name__}", index=i)
        for field, (types, what) in _JSON_TYPES.items():
            v = rec.get(field)
            if v is None or v == "":
                raise RequestError(422, field, "missing", index=i)
            if isinstance(v, bool) or not isinstance(v, types):
                raise RequestError(422, field, f"must be {what}, got {type(v).__name__}", index=i)
            if isinstance(v, str) and len(v) > MAX_FIELD_CHARS:
                raise RequestError(422, field, f"longer than {MAX_FIELD_CHARS} characters", index=i)


def make_ingest_app(store: FeatureStore, token: Optional[str], *, insecure_no_auth: bool = False,
                    max_body_bytes: int = MAX_BODY_BYTES, max_actions: int = MAX_ACTIONS,
                    max_in_flight: int = MAX_IN_FLIGHT):
    """The FastAPI app serving ``POST /v1/actions`` into ``store`` (module docstring). ``token=None`` needs
    ``insecure_no_auth=True`` (refused otherwise, so an open API is never started by accident)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    if not token and not insecure_no_auth:
        raise ValueError("no ingest token: pass one, or insecure_no_auth=True to serve without authentication")
    if min(max_body_bytes, max_actions, max_in_flight) < 1:
        raise ValueError("max_body_bytes, max_actions and max_in_flight must be >= 1")
    expected = token.encode() if token else None
    app = FastAPI(title="seqrank ingest", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.in_flight = 0
    app.state.limits = dict(max_body_bytes=max_body_bytes, max_actions=max_actions, max_in_flight=max_in_flight)

    def check_auth(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise RequestError(401, "Authorization", "missing bearer token",
                               headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise RequestError(401, "Authorization", "invalid bearer token",
                               headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise RequestError(400, "Content-Length", f"not a byte count: {length!r}")
            if int(length) > max_body_bytes:
                raise RequestError(413, "body", f"{int(length)} bytes, more than {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():        # also caps a chunked body, which has no Content-Length
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(413, "body", f"more than {max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(request: Request) -> IngestStats:
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, "body", f"not JSON ({e})") from None
        if isinstance(body, dict) and set(body) == {"actions"}:
            body = body["actions"]
        if not isinstance(body, list):
            raise RequestError(422, "actions", "expected a JSON list of actions (or {\"actions\": [...]})")
        if len(body) > max_actions:
            raise RequestError(413, "actions", f"{len(body)} actions, more than {max_actions}")
        if not body:
            return IngestStats()
        check_json_types(body)
        try:
            ev = log_from_records(body, source="request")
        except DataError as e:
            raise RequestError(422, e.column or "actions", e.message,
                               index=None if e.row is None else e.row - 1) from None
        try:
            stats = await run_in_threadpool(store.append, list(actions_of(ev)))
        except StoreUnavailable as e:
            raise RequestError(503, "store", f"unavailable ({e})", headers={"Retry-After": "1"}) from None
        stats.duplicates += int(ev.duplicates_dropped)
        return stats

    @app.post("/v1/actions")
    async def post_actions(request: Request):
        counted = False
        try:
            check_auth(request)
            if app.state.in_flight >= max_in_flight:
                raise RequestError(429, "request", f"more than {max_in_flight} requests in progress; retry",
                                   headers={"Retry-After": "1"})
            app.state.in_flight += 1
            counted = True
            stats = await handle(request)
        except RequestError as e:
            if e.status >= 500 or e.status == 429:
                log.warning("POST /v1/actions -> %d: %s", e.status, e)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        finally:
            if counted:
                app.state.in_flight -= 1
        return stats.to_dict()

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, "in_flight": app.state.in_flight}

    return app


def run_ingest_server(app, host: str = "127.0.0.1", port: int = 8090, log_level: str = "info") -> None:
    """Serve the app with uvicorn until SIGINT/SIGTERM."""
    import uvicorn
    log.info("ingest API on http://%s:%d/v1/actions", host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False,
                timeout_keep_alive=5, server_header=False)


# Redis Streams consumer ----------------------------------------------------------------------------
class StreamConsumer:
    """Applies a Redis stream of canonical action entries to a store through a consumer group, at least once.

    ``run`` loops: (1) this consumer's own pending entries (delivered before a crash, never acknowledged), (2)
    entries pending on other consumers for more than ``claim_idle_ms`` (XAUTOCLAIM; a consumer that died and
    never came back), (3) new entries (XREADGROUP ``>``). Each batch: parse (``load_records``), append to the
    store (retried while it is unavailable; never acknowledged before the append returned), XACK. Entries that
    are not valid actions are copied to ``dead_key`` with the error and acknowledged.
    """

    def __init__(self, store: FeatureStore, url: str, key: str = "seqrank:actions", group: str = "seqrank-ingest",
                 consumer: Optional[str] = None, batch: int = 500, block_ms: int = 1000,
                 claim_idle_ms: int = 60_000, dead_key: Optional[str] = None, start_id: str = "0"):
        import redis
        self.store = store
        self.key, self.group = key, group
        self.consumer = consumer or socket.gethostname()
        self.batch, self.block_ms, self.claim_idle_ms = int(batch), int(block_ms), int(claim_idle_ms)
        self.dead_key = dead_key or f"{key}:dead"
        self.start_id = start_id
        self.r = redis.Redis.from_url(url, socket_timeout=max(5.0, block_ms / 1000 + 5),
                                      socket_connect_timeout=5.0)
        self.stats = IngestStats()
        self.stopping = threading.Event()

    def ensure_group(self) -> None:
        import redis
        try:
            self.r.xgroup_create(self.key, self.group, id=self.start_id, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _records(self, entries) -> list[dict]:
        return [{k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
                for _, fields in entries]

    def apply(self, entries) -> IngestStats:
        """Parse, append and acknowledge one batch of (id, fields) entries (fields None: the entry was trimmed
        from the stream while pending; nothing to apply, it is acknowledged)."""
        ids = [i for i, _ in entries]
        entries = [(i, f) for i, f in entries if f is not None]
        stats = IngestStats()
        records = self._records(entries)
        good: list[Action] = []
        if records:
            try:
                ev = log_from_records(records, source=f"stream {self.key}")
                good, stats.duplicates = list(actions_of(ev)), int(ev.duplicates_dropped)
            except DataError:       # find the bad entries one by one; the rest are applied
                dead = self.r.pipeline(transaction=False)
                for (entry_id, fields), rec in zip(entries, records):
                    try:
                        one = log_from_records([rec], source=f"stream {self.key} entry {entry_id.decode()}")
                    except DataError as e:
                        stats.invalid += 1
                        log.warning("dead-lettering %s: %s", entry_id.decode(), e)
                        dead.xadd(self.dead_key, {**fields, b"error": str(e).encode(), b"id": entry_id})
                        continue
                    good.extend(actions_of(one))
                dead.execute()
        while good:
            try:
                stats += _append_retrying(self.store, good, retries=5, backoff_s=0.2)
                break
            except StoreUnavailable as e:       # keep the batch unacknowledged; never drop it
                log.error("store unavailable, batch of %d kept pending: %s", len(good), e)
                if self.stopping.wait(1.0):
                    return stats                # exit without the XACK: redelivered on restart
        if ids:
            self.r.xack(self.key, self.group, *ids)
        self.stats += stats
        return stats

    def _read(self, from_id: str, block: Optional[int]):
        reply = self.r.xreadgroup(self.group, self.consumer, {self.key: from_id}, count=self.batch, block=block)
        return reply[0][1] if reply else []

    def run(self, idle_exit_s: Optional[float] = None) -> IngestStats:
        """Consume until ``stop()`` (or SIGTERM via ``main_ingest``), or ``idle_exit_s`` without new entries."""
        self.ensure_group()
        while not self.stopping.is_set():       # 1: our own pending entries, from the start
            entries = self._read("0", None)
            if not entries:
                break
            self.apply(entries)
        last_claim, idle_since = 0.0, time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if now - last_claim >= self.claim_idle_ms / 1000.0:     # 2: entries of consumers that died
                last_claim = now
                cursor = "0-0"
                while not self.stopping.is_set():
                    cursor, claimed = self.r.xautoclaim(self.key, self.group, self.consumer, self.claim_idle_ms,
                                                        start_id=cursor, count=self.batch)[:2]
                    if claimed:
                        self.apply(claimed)
                    if cursor in (b"0-0", "0-0"):
                        break
            entries = self._read(">", self.block_ms)                 # 3: new entries
            if entries:
                self.apply(entries)
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since >= idle_exit_s:
                break
        return self.stats

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.r.close()


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
                   help=f"store URL (sqlite:///abs/path.db, redis://host:port/db, redis://host:port/0?cluster=1); "
                        f"default ${STORE_ENV}")
    p.add_argument("--file", help="event file (canonical user_id,item_id,action,timestamp or any format "
                                  "seqrank train reads), or - for stdin")
    p.add_argument("--format", choices=("canonical", "kuairand", "otto", "movielens"), default=None,
                   help="the file's format (default: detected, as seqrank train does)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--late-bound-ms", type=int, default=None)
    g = p.add_argument_group("HTTP API")
    g.add_argument("--serve", action="store_true", help="serve POST /v1/actions (FastAPI on uvicorn)")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8090)
    g.add_argument("--token-env", default=TOKEN_ENV,
                   help=f"environment variable holding the bearer token (default {TOKEN_ENV})")
    g.add_argument("--insecure-no-auth", action="store_true",
                   help="serve without authentication (refused otherwise when the token variable is unset)")
    g.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    g.add_argument("--max-actions", type=int, default=MAX_ACTIONS)
    g.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT)
    g = p.add_argument_group("Redis Streams consumer")
    g.add_argument("--stream", metavar="URL", help="consume a Redis stream (redis://host:port/db)")
    g.add_argument("--stream-key", default="seqrank:actions")
    g.add_argument("--group", default="seqrank-ingest")
    g.add_argument("--consumer", default=None, help="consumer name (default: the host name)")
    g.add_argument("--stream-batch", type=int, default=500)
    g.add_argument("--block-ms", type=int, default=1000)
    g.add_argument("--claim-idle-ms", type=int, default=60_000,
                   help="take over entries pending this long on another consumer")
    g.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long without new entries")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.store:
        p.error(f"--store is required (or set ${STORE_ENV})")
    if not args.file and not args.serve and not args.stream:
        p.error("nothing to do: give --file PATH (or -), --serve and/or --stream URL")
    if args.serve and args.stream:
        p.error("--serve and --stream run as separate processes")
    token = os.environ.get(args.token_env) if args.serve else None
    if args.serve and not token and not args.insecure_no_auth:
        p.error(f"no bearer token: ${args.token_env} is unset or empty (pass --insecure-no-auth to serve "
                f"without authentication)")
    kw = {k: v for k, v in (("max_len", args.max_len), ("late_bound_ms", args.late_bound_ms)) if v is not None}
    kw.setdefault("timeout_s", 5.0)      # a bulk loader is not latency bound
    if args.serve:
        kw["timeout_s"] = 1.0
    store = open_store(args.store, **kw)
    try:
        if args.file:
            t0 = time.perf_counter()
            try:
                ev = load_actions(args.file, args.format)
            except DataError as e:
                print(f"seqrank ingest: {e}", file=sys.stderr, flush=True)
                return 2
            stats = ingest_log(store, ev, batch_size=args.batch_size)
            dt = time.perf_counter() - t0
            out = dict(stats.to_dict(), seconds=round(dt, 3), per_second=round(stats.total / dt, 1) if dt else None)
            print(json.dumps(out), flush=True)
        if args.serve:
            app = make_ingest_app(store, token, insecure_no_auth=args.insecure_no_auth,
                                  max_body_bytes=args.max_body_bytes, max_actions=args.max_actions,
                                  max_in_flight=args.max_in_flight)
            if not token:
                log.warning("serving WITHOUT authentication (--insecure-no-auth)")
            run_ingest_server(app, args.host, args.port, args.log_level)
        if args.stream:
            consumer = StreamConsumer(store, args.stream, key=args.stream_key, group=args.group,
                                      consumer=args.consumer, batch=args.stream_batch, block_ms=args.block_ms,
                                      claim_idle_ms=args.claim_idle_ms)
            signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
            try:
                stats = consumer.run(idle_exit_s=args.idle_exit_s)
            finally:
                consumer.close()
            print(json.dumps(stats.to_dict()), flush=True)
    except StoreUnavailable as e:
        log.error("store unavailable: %s", e)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main_ingest())
