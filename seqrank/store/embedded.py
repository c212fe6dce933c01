"""EmbeddedStore: the feature store in one SQLite file (WAL mode), no server.

Safe for several processes at once (the ingest process writes while Triton preprocess stubs read): WAL
readers never block on the writer, writers serialize on ``BEGIN IMMEDIATE`` with a busy timeout. Inside a
process every thread gets its own connection, so one store object may be shared by threads.

Schema: ``actions`` with primary key (user_id, ts, item_id, action) (WITHOUT ROWID: the key *is* the
sequence order, exact duplicates collapse), ``embeddings`` (float32 little-endian blobs + dim + as_of),
``meta`` (the embedding dim).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Optional, Sequence

import numpy as np

from .base import (DEFAULT_LATE_BOUND_MS, DEFAULT_MAX_LEN, DEFAULT_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S,
                   Action, FeatureStore, IngestStats, StoreUnavailable, UserSequence, validate_action)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    user_id TEXT NOT NULL, ts INTEGER NOT NULL, item_id TEXT NOT NULL, action TEXT NOT NULL,
    PRIMARY KEY (user_id, ts, item_id, action)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS embeddings (
    user_id TEXT NOT NULL PRIMARY KEY, dim INTEGER NOT NULL, as_of_ms INTEGER NOT NULL, vec BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""

_NEWEST = "SELECT MAX(ts) FROM actions WHERE user_id = ?"
_EXISTS = "SELECT 1 FROM actions WHERE user_id = ? AND ts = ? AND item_id = ? AND action = ?"
_INSERT = "INSERT OR IGNORE INTO actions (user_id, ts, item_id, action) VALUES (?, ?, ?, ?)"
_TRIM = """
DELETE FROM actions WHERE user_id = ?1 AND (ts, item_id, action) <= (
    SELECT ts, item_id, action FROM actions WHERE user_id = ?1
    ORDER BY ts DESC, item_id DESC, action DESC LIMIT 1 OFFSET ?2)
"""
# one query for the whole batch: the requested ids travel as one JSON array parameter; each user's newest
# ?2 actions come back packed into one string (newest first), "item US action US ts US item ..."
_READ_SEQ = """
SELECT r.key, (
    SELECT group_concat(f, char(31)) FROM (
        SELECT a.item_id || char(31) || a.action || char(31) || a.ts AS f FROM actions AS a
        WHERE a.user_id = r.value ORDER BY a.ts DESC, a.item_id DESC, a.action DESC LIMIT ?2))
FROM json_each(?1) AS r
"""
_READ_EMB = """
SELECT r.key, e.dim, e.vec FROM json_each(?1) AS r JOIN embeddings AS e ON e.user_id = r.value
"""
_UPSERT_EMB = """
INSERT INTO embeddings (user_id, dim, as_of_ms, vec) VALUES (?, ?, ?, ?)
ON CONFLICT (user_id) DO UPDATE SET dim = excluded.dim, as_of_ms = excluded.as_of_ms, vec = excluded.vec
WHERE excluded.as_of_ms >= embeddings.as_of_ms
"""


class EmbeddedStore(FeatureStore):
    def __init__(self, path: str, max_len: int = DEFAULT_MAX_LEN, late_bound_ms: int = DEFAULT_LATE_BOUND_MS,
                 timeout_s: float = DEFAULT_TIMEOUT_S, write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
                 dim: Optional[int] = None):
        super().__init__(max_len, late_bound_ms)
        self.path = str(path)
        self.timeout_s = float(timeout_s)            # read deadline (progress handler)
        self.write_timeout_s = float(write_timeout_s)  # busy timeout: waits for other writers
        self.dim = int(dim) if dim is not None else None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._closed = False
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        conn = self._conn()
        try:
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
        if row is not None and self.dim is None:
            self.dim = int(row[0])

    # connections -------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("store is closed")
        if os.getpid() != self._pid:        # forked: never reuse the parent's connections
            self._pid = os.getpid()
            self._local = threading.local()
            self._conns = []
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self.write_timeout_s, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as e:
                raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _read(self, sql: str, params) -> list:
        """Run one read query under the read deadline (``timeout_s``)."""
        conn = self._conn()
        deadline = time.monotonic() + self.timeout_s
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 2000)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
        finally:
            conn.set_progress_handler(None, 0)

    def _write(self, fn):
        """Run ``fn(conn)`` inside one IMMEDIATE transaction."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
        try:
            out = fn(conn)
            conn.execute("COMMIT")
            return out
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise StoreUnavailable(f"sqlite store {self.path}: {e}") from e
            raise

    # sequences ---------------------------------------------------------------------------------
    def append(self, actions: Sequence[Action]) -> IngestStats:
        stats = IngestStats()
        by_user: dict[str, list[Action]] = {}
        for a in actions:
            if validate_action(a) is not None:
                stats.invalid += 1
                continue
            by_user.setdefault(a.user_id, []).append(a)
        if not by_user:
            return stats
        bound, max_len = self.late_bound_ms, self.max_len

        def apply(conn: sqlite3.Connection) -> None:
            for user, evs in by_user.items():
                newest = conn.execute(_NEWEST, (user,)).fetchone()[0]
                for a in evs:
                    ts = int(a.timestamp_ms)
                    row = (user, ts, a.item_id, a.action)
                    if newest is not None and ts < newest - bound:
                        if conn.execute(_EXISTS, row).fetchone() is not None:
                            stats.duplicates += 1
                        else:
                            stats.too_late += 1
                        continue
                    if conn.execute(_INSERT, row).rowcount == 1:
                        stats.accepted += 1
                        newest = ts if newest is None else max(newest, ts)
                    else:
                        stats.duplicates += 1
                conn.execute(_TRIM, (user, max_len))

        self._write(apply)      # on an error the transaction rolls back and the stats are discarded
        return stats

    def get_sequences(self, user_ids: Sequence[str]) -> list[UserSequence]:
        user_ids = list(user_ids)
        if not user_ids:
            return []
        rows = self._read(_READ_SEQ, (json.dumps(user_ids), self.max_len))
        out = [UserSequence() for _ in user_ids]
        for pos, packed in rows:
            out[pos] = UserSequence.from_packed(packed, newest_first=True)
        return out

    # embeddings --------------------------------------------------------------------------------
    def put_embeddings(self, user_ids: Sequence[str], embeddings: np.ndarray, as_of_ms: int) -> None:
        user_ids = list(user_ids)
        emb = self._check_embeddings(user_ids, embeddings, as_of_ms)
        d = int(emb.shape[1])

        def apply(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
            if row is not None and int(row[0]) != d:
                raise ValueError(f"store holds embeddings of dim {row[0]}, got dim {d}")
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(d),))
            conn.executemany(_UPSERT_EMB, [(u, d, int(as_of_ms), emb[i].tobytes())
                                           for i, u in enumerate(user_ids)])

        self._write(apply)
        self.dim = d

    def get_embeddings(self, user_ids: Sequence[str], dim: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        user_ids = list(user_ids)
        rows = self._read(_READ_EMB, (json.dumps(user_ids),)) if user_ids else []
        known = self.dim
        if not rows and dim is None and known is None:
            meta = self._read("SELECT value FROM meta WHERE key = 'dim'", ())
            known = int(meta[0][0]) if meta else None
        d = self._resolve_dim({int(r[1]) for r in rows}, dim, known)
        out = np.zeros((len(user_ids), d), dtype=np.float32)
        found = np.zeros(len(user_ids), dtype=bool)
        for pos, _, vec in rows:
            out[pos] = np.frombuffer(vec, dtype="<f4")
            found[pos] = True
        return out, found

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            self._closed = True
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass

    def __repr__(self) -> str:
        return f"EmbeddedStore({self.path!r}, max_len={self.max_len}, late_bound_ms={self.late_bound_ms})"
