"""RedisStore: the feature store on Redis (the production KV store an event stream keeps fresh).

Layout (``prefix`` default ``seqrank:``):

* ``{prefix}seq:{user}``  sorted set, score = event time (ms), member = ``item \\x1f action \\x1f ts``
  (UTF-8). Equal scores order by member bytes, i.e. by item id then action, the same order as the
  embedded store; exact duplicates collapse into one member.
* ``{prefix}emb:{user}``  hash ``v`` (float32 little-endian bytes), ``dim``, ``as_of``.
* ``{prefix}meta``        hash ``dim`` (the embedding dim of the store).

``append`` runs one Lua script per user (atomic per user: dedup, late bound against the user's newest
event, insert, trim to ``max_len``), all users of a batch in one pipeline (one round trip), so concurrent
writers stay correct. Reads are one pipeline per batch (a tiny Lua script per user returns the newest
``max_len`` members packed into one string). Any connection error or timeout surfaces as
``StoreUnavailable``; reads use ``timeout_s`` (default 50 ms) as socket and connect timeout, writes
``write_timeout_s``. No client-side retries: the caller (Triton preprocess) falls back instead.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import (DEFAULT_LATE_BOUND_MS, DEFAULT_MAX_LEN, DEFAULT_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S, SEP,
                   Action, FeatureStore, IngestStats, StoreUnavailable, UserSequence, validate_action)


# KEYS[1] = the user's sorted set; ARGV[1] = max_len, ARGV[2] = late_bound_ms, then (ts, member) pairs
# in arrival order. Returns {accepted, duplicates, too_late}.
_APPEND_LUA = """
local key = KEYS[1]
local max_len = tonumber(ARGV[1])
local bound = tonumber(ARGV[2])
local newest = nil
local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if top[2] then newest = tonumber(top[2]) end
local acc, dup, late = 0, 0, 0
for i = 3, #ARGV, 2 do
  local ts = tonumber(ARGV[i])
  local member = ARGV[i + 1]
  if redis.call('ZSCORE', key, member) then
    dup = dup + 1
  elseif newest and ts < newest - bound then
    late = late + 1
  else
    redis.call('ZADD', key, ARGV[i], member)
    acc = acc + 1
    if (not newest) or ts > newest then newest = ts end
  end
end
local n = redis.call('ZCARD', key)
if n > max_len then redis.call('ZREMRANGEBYRANK', key, 0, n - max_len - 1) end
return {acc, dup, late}
"""

# KEYS[1] = the user's embedding hash; ARGV = vec bytes, dim, as_of. Older as_of never overwrites.
_PUT_EMB_LUA = """
local cur = redis.call('HGET', KEYS[1], 'as_of')
if cur and tonumber(cur) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'dim', ARGV[2], 'as_of', ARGV[3])
return 1
"""

# KEYS[1] = the user's sorted set; ARGV[1] = max_len. The newest max_len members, oldest first, packed
# into one string joined by \x1f: one bulk reply per user instead of max_len (client-side parsing of
# thousands of replies would dominate the read latency).
_READ_LUA = """
return table.concat(redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1), '\\31')
"""

_SCRIPTS = {name: (src, hashlib.sha1(src.encode()).hexdigest())
            for name, src in (("append", _APPEND_LUA), ("put_emb", _PUT_EMB_LUA), ("read", _READ_LUA))}

_EMB_CHUNK = 10_000


@contextmanager
def _unavailable(what: str):
    try:
        yield
    # BusyLoadingError (loading the AOF) is a ConnectionError; ReadOnlyError: we hit a replica during a failover
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError) as e:
        raise StoreUnavailable(f"redis {what}: {type(e).__name__}: {e}") from e


class RedisStore(FeatureStore):
    def __init__(self, url: str = "redis://localhost:6379/0", max_len: int = DEFAULT_MAX_LEN,
                 late_bound_ms: int = DEFAULT_LATE_BOUND_MS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S, prefix: str = "seqrank:",
                 dim: Optional[int] = None, **redis_kwargs):
        """``redis_kwargs`` go to ``redis.Redis.from_url`` (e.g. ``password``, ``connection_class``)."""
        super().__init__(max_len, late_bound_ms)
        self.url = url
        self.prefix = prefix
        self.timeout_s = float(timeout_s)
        self.write_timeout_s = float(write_timeout_s)
        self.dim = int(dim) if dim is not None else None
        common = dict(decode_responses=False, retry_on_timeout=False, health_check_interval=0)
        common.update(redis_kwargs)
        self._r = redis.Redis.from_url(url, socket_timeout=self.timeout_s,
                                       socket_connect_timeout=self.timeout_s, **common)
        self._w = redis.Redis.from_url(url, socket_timeout=self.write_timeout_s,
                                       socket_connect_timeout=self.write_timeout_s, **common)

    # keys / encoding ---------------------------------------------------------------------------
    def seq_key(self, user_id: str) -> bytes:
        return f"{self.prefix}seq:{user_id}".encode()

    def emb_key(self, user_id: str) -> bytes:
        return f"{self.prefix}emb:{user_id}".encode()

    @property
    def meta_key(self) -> bytes:
        return f"{self.prefix}meta".encode()

    @staticmethod
    def _member(a: Action) -> bytes:
        return f"{a.item_id}{SEP}{a.action}{SEP}{int(a.timestamp_ms)}".encode()

    # scripts -----------------------------------------------------------------------------------
    def _run_pipeline(self, fill, what: str, write: bool = True) -> list:
        """Fill a non-transactional pipeline and execute it (one round trip); after NOSCRIPT (a restarted
        or flushed server) load the scripts and run it again: every script here is idempotent, so rerunning
        is safe."""
        client = self._w if write else self._r
        with _unavailable(what):
            for attempt in (0, 1):
                pipe = client.pipeline(transaction=False)
                fill(pipe)
                try:
                    return pipe.execute()
                except NoScriptError:
                    if attempt:
                        raise
                    for src, _ in _SCRIPTS.values():
                        client.script_load(src)
        raise AssertionError("unreachable")

    # sequences ---------------------------------------------------------------------------------
    def append(self, actions: Sequence[Action]) -> IngestStats:
        stats = IngestStats()
        by_user: dict[str, list] = {}
        for a in actions:
            if validate_action(a) is not None:
                stats.invalid += 1
                continue
            by_user.setdefault(a.user_id, []).extend((int(a.timestamp_ms), self._member(a)))
        if not by_user:
            return stats
        sha = _SCRIPTS["append"][1]

        def fill(pipe):
            for user, args in by_user.items():
                pipe.execute_command("EVALSHA", sha, 1, self.seq_key(user), self.max_len,
                                     self.late_bound_ms, *args)

        for acc, dup, late in self._run_pipeline(fill, "append"):
            stats.accepted += int(acc)
            stats.duplicates += int(dup)
            stats.too_late += int(late)
        return stats

    def get_sequences(self, user_ids: Sequence[str]) -> list[UserSequence]:
        user_ids = list(user_ids)
        if not user_ids:
            return []
        sha = _SCRIPTS["read"][1]

        def fill(pipe):
            for u in user_ids:
                pipe.execute_command("EVALSHA", sha, 1, self.seq_key(u), self.max_len)

        replies = self._run_pipeline(fill, "get_sequences", write=False)
        return [UserSequence.from_packed(r.decode()) for r in replies]

    # embeddings --------------------------------------------------------------------------------
    def put_embeddings(self, user_ids: Sequence[str], embeddings: np.ndarray, as_of_ms: int) -> None:
        user_ids = list(user_ids)
        emb = self._check_embeddings(user_ids, embeddings, as_of_ms)
        d = int(emb.shape[1])
        with _unavailable("put_embeddings"):
            stored = self._w.hget(self.meta_key, "dim")
        if stored is not None and int(stored) != d:
            raise ValueError(f"store holds embeddings of dim {int(stored)}, got dim {d}")
        sha = _SCRIPTS["put_emb"][1]
        for start in range(0, max(len(user_ids), 1), _EMB_CHUNK):
            def fill(pipe, start=start):
                if start == 0:
                    pipe.hsetnx(self.meta_key, "dim", d)
                for i in range(start, min(start + _EMB_CHUNK, len(user_ids))):
                    pipe.execute_command("EVALSHA", sha, 1, self.emb_key(user_ids[i]),
                                         emb[i].tobytes(), d, int(as_of_ms))
            self._run_pipeline(fill, "put_embeddings")
        self.dim = d

    def get_embeddings(self, user_ids: Sequence[str], dim: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        user_ids = list(user_ids)
        with _unavailable("get_embeddings"):
            pipe = self._r.pipeline(transaction=False)
            pipe.hget(self.meta_key, "dim")
            for u in user_ids:
                pipe.hmget(self.emb_key(u), "v", "dim")
            replies = pipe.execute()
        meta_dim, rows = replies[0], replies[1:]
        known = self.dim if self.dim is not None else (int(meta_dim) if meta_dim is not None else None)
        d = self._resolve_dim({int(r[1]) for r in rows if r[0] is not None}, dim, known)
        out = np.zeros((len(user_ids), d), dtype=np.float32)
        found = np.zeros(len(user_ids), dtype=bool)
        for i, (vec, _) in enumerate(rows):
            if vec is not None:
                out[i] = np.frombuffer(vec, dtype="<f4")
                found[i] = True
        return out, found

    def close(self) -> None:
        for c in (self._r, self._w):
            try:
                c.close()
            except Exception:  # closing must never raise
                pass

    def __repr__(self) -> str:
        return (f"RedisStore({self.url!r}, prefix={self.prefix!r}, max_len={self.max_len}, "
                f"late_bound_ms={self.late_bound_ms})")
