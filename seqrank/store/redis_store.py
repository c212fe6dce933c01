"""RedisStore: the feature store on Redis (the production KV store an event stream keeps fresh).

Layout (``prefix`` default ``seqrank:``; ``{user}`` is a hash tag, so a user's keys share a cluster slot):

* ``{prefix}seq:{user}``   sorted set, score = event time (ms), member = ``item \\x1f action \\x1f ts``
  (UTF-8). Equal scores order by member bytes, i.e. by item id then action, the same order as the
  embedded store; exact duplicates collapse into one member. The source of truth.
* ``{prefix}seqp:{user}``  string: the members, oldest first, joined by ``\\x1f`` (the packed wire format
  of ``UserSequence.from_packed``): the read view. ``append`` APPENDs new members when they are all newer
  than the stored ones (the real-time case) and rebuilds it from the set otherwise, or when it holds more
  than ``max_len + slack`` records (slack = max(16, max_len // 2)); readers take its newest ``max_len``.
* ``{prefix}seqn:{user}``  the view's record count.
* ``{prefix}emb:{user}``   hash ``v`` (float32 little-endian bytes), ``dim``, ``as_of``.
* ``{prefix}meta``         hash ``dim`` (the embedding dim of the store).

``append`` runs one Lua script per user (atomic per user: dedup, late bound against the user's newest
event, insert, trim to ``max_len``, refresh the packed view), all users of a batch in one pipeline (one
round trip), so concurrent writers stay correct. ``get_sequences`` is one ``MGET`` of the packed views:
one round trip, one bulk string per user, almost no server work (a ZRANGE per user returning 256 members
each costs far more on the server and, parsed by redis-py, on the client). The price is 2-2.5x the memory
per user. A reader must not use a larger ``max_len`` than the writers (it could see trimmed records).

Redis Cluster (``redis://host:port/0?cluster=1``, any node as the seed): the store uses redis-py's ``RedisCluster``
client and keeps the key layout above. Why this and not hash tags alone: the ``{user}`` hash tag already puts all
of a user's keys in one slot, so every per-user script (append, put_embeddings) touches one slot; but a batch read
spans many users, hence many slots on several nodes, and one MGET over them fails with CROSSSLOT. Routing each
slot group to the node that owns it needs the slot map, MOVED/ASK redirects and failover handling, which is what
``RedisCluster`` does (and it is already in the lock file with ``redis``); hand-rolling that on plain connections
would be a second, untested cluster client. So a cluster read groups the request's keys per hash slot
(``RedisCluster.mget_nonatomic``: one MGET per slot group, all of a node's MGETs written in one pipeline and the
nodes' replies read after all writes, i.e. one round trip per node, in parallel); embeddings and appends go
through a cluster pipeline, which groups the per-user commands by node the same way. Co-locating several users
under one tag (bucketed tags) would make fewer MGETs but hot slots and a key-layout migration; not done. A
single-node store keeps its single MGET. The cluster client is created on first use (connecting needs the slot
map), so opening a store never fails because the cluster is down; the read client does not retry (the caller
falls back), the write client retries once after refreshing the slot map.

Any connection error or timeout surfaces as ``StoreUnavailable``; reads use ``timeout_s`` (default 50 ms)
as socket and connect timeout, writes ``write_timeout_s``. No client-side retries: the caller (Triton
preprocess) falls back instead; ``seqrank.ingest.ingest`` retries appends (they are idempotent).
"""
from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit
from typing import Optional, Sequence

import numpy as np
import redis
from redis.exceptions import ClusterDownError, NoScriptError, ReadOnlyError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import (DEFAULT_LATE_BOUND_MS, DEFAULT_MAX_LEN, DEFAULT_TIMEOUT_S, DEFAULT_WRITE_TIMEOUT_S, SEP,
                   Action, FeatureStore, IngestStats, StoreUnavailable, UserSequence, validate_action)


# KEYS[1] = the user's sorted set, KEYS[2] = its packed view, KEYS[3] = the view's record count;
# ARGV[1] = max_len, ARGV[2] = late_bound_ms, ARGV[3] = slack, then (ts, member) pairs in arrival order.
# Returns {accepted, duplicates, too_late}. Invariant: the view is a run of records in sequence order whose
# last ZCARD records are exactly the set (older, trimmed records before them only when ZCARD == max_len),
# at most max_len + slack records; it is rebuilt from the set when it would grow past that or when an
# event lands before the stored newest one.
_APPEND_LUA = """
local key, view = KEYS[1], KEYS[2]
local max_len = tonumber(ARGV[1])
local bound = tonumber(ARGV[2])
local slack = tonumber(ARGV[3])
local newest, newest_raw = nil, nil
local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if top[2] then newest_raw = top[2]; newest = tonumber(top[2]) end
local prev_newest = newest
local acc, dup, late = 0, 0, 0
local tail_only = true
for i = 4, #ARGV, 2 do
  local ts = tonumber(ARGV[i])
  local member = ARGV[i + 1]
  if redis.call('ZSCORE', key, member) then
    dup = dup + 1
  elseif newest and ts < newest - bound then
    late = late + 1
  else
    redis.call('ZADD', key, ARGV[i], member)
    acc = acc + 1
    if (not prev_newest) or ts <= prev_newest then tail_only = false end
    if (not newest) or ts > newest then newest = ts end
  end
end
if acc > 0 then
  local n = redis.call('ZCARD', key)
  if n > max_len then redis.call('ZREMRANGEBYRANK', key, 0, n - max_len - 1); n = max_len end
  local c = nil
  if tail_only then c = tonumber(redis.call('GET', KEYS[3])) end
  if c and c + acc <= max_len + slack and redis.call('EXISTS', view) == 1 then
    -- the common real-time case: everything new is newer than the stored sequence, so append the new
    -- members (in set order) to the view; the trimmed oldest records stay until the next rebuild
    redis.call('APPEND', view, '\\31' .. table.concat(
      redis.call('ZRANGEBYSCORE', key, '(' .. newest_raw, '+inf'), '\\31'))
    redis.call('INCRBY', KEYS[3], acc)
  else
    redis.call('SET', view, table.concat(redis.call('ZRANGE', key, 0, -1), '\\31'))
    redis.call('SET', KEYS[3], n)
  end
end
return {acc, dup, late}
"""

# KEYS[1] = the user's embedding hash; ARGV = vec bytes, dim, as_of. Older as_of never overwrites.
_PUT_EMB_LUA = """
local cur = redis.call('HGET', KEYS[1], 'as_of')
if cur and tonumber(cur) > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'dim', ARGV[2], 'as_of', ARGV[3])
return 1
"""

_SCRIPTS = {name: (src, hashlib.sha1(src.encode()).hexdigest())
            for name, src in (("append", _APPEND_LUA), ("put_emb", _PUT_EMB_LUA))}

_EMB_CHUNK = 10_000


@contextmanager
def _unavailable(what: str):
    try:
        yield
    # BusyLoadingError (loading the AOF) is a ConnectionError; ReadOnlyError: we hit a replica during a failover;
    # ClusterDownError / TryAgainError: a cluster without a master for a slot, or in the middle of a resharding
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, ClusterDownError, TryAgainError) as e:
        raise StoreUnavailable(f"redis {what}: {type(e).__name__}: {e}") from e
    except RedisClusterException as e:
        # no node reachable to learn the slot map from, or a slot no node serves; anything else is a usage error
        if isinstance(e.__cause__, (RedisConnectionError, RedisTimeoutError)) or ("slot" in str(e).lower() \
                and "not covered" in str(e).lower()):
            raise StoreUnavailable(f"redis {what}: {type(e).__name__}: {e}") from e
        raise


class RedisStore(FeatureStore):
    def __init__(self, url: str = "redis://localhost:6379/0", max_len: int = DEFAULT_MAX_LEN,
                 late_bound_ms: int = DEFAULT_LATE_BOUND_MS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S, prefix: str = "seqrank:",
                 dim: Optional[int] = None, cluster: bool = False, **redis_kwargs):
        """``redis_kwargs`` go to ``redis.Redis.from_url`` (e.g. ``password``, ``connection_class``), or to
        ``redis.RedisCluster.from_url`` with ``cluster=True`` (the URL names any node of the cluster)."""
        super().__init__(max_len, late_bound_ms)
        self.url = url
        self.prefix = prefix
        self.timeout_s = float(timeout_s)
        self.write_timeout_s = float(write_timeout_s)
        self.dim = int(dim) if dim is not None else None
        self.slack = max(16, self.max_len // 2)     # extra records the packed view may hold between rebuilds
        self.cluster = bool(cluster)
        common = dict(decode_responses=False, retry_on_timeout=False, health_check_interval=0)
        common.update(redis_kwargs)
        if self.cluster:
            parts = urlsplit(url)       # a cluster has only db 0: drop the path, RedisCluster refuses a db
            self._cluster_url = urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))
            self._cluster_kw = common
            self._cluster_lock = threading.Lock()
            self._clients: dict[str, object] = {}
        else:
            self._r = redis.Redis.from_url(url, socket_timeout=self.timeout_s,
                                           socket_connect_timeout=self.timeout_s, **common)
            self._w = redis.Redis.from_url(url, socket_timeout=self.write_timeout_s,
                                           socket_connect_timeout=self.write_timeout_s, **common)

    def _client(self, kind: str):
        """The read ("r") or write ("w") client; a cluster's are created on first use (module docstring)."""
        if not self.cluster:
            return self._r if kind == "r" else self._w
        client = self._clients.get(kind)
        if client is None:
            with self._cluster_lock, _unavailable("connect"):
                client = self._clients.get(kind)
                if client is None:
                    timeout = self.timeout_s if kind == "r" else self.write_timeout_s
                    client = redis.RedisCluster.from_url(
                        self._cluster_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                        cluster_error_retry_attempts=0 if kind == "r" else 1, **self._cluster_kw)
                    self._clients[kind] = client
        return client

    # keys / encoding ---------------------------------------------------------------------------
    def seq_key(self, user_id: str) -> bytes:
        return f"{self.prefix}seq:{{{user_id}}}".encode()

    def packed_key(self, user_id: str) -> bytes:
        return f"{self.prefix}seqp:{{{user_id}}}".encode()

    def count_key(self, user_id: str) -> bytes:
        return f"{self.prefix}seqn:{{{user_id}}}".encode()

    def emb_key(self, user_id: str) -> bytes:
        return f"{self.prefix}emb:{{{user_id}}}".encode()

    @property
    def meta_key(self) -> bytes:
        return f"{self.prefix}meta".encode()

    @staticmethod
    def _member(a: Action) -> bytes:
        return f"{a.item_id}{SEP}{a.action}{SEP}{int(a.timestamp_ms)}".encode()

    # scripts -----------------------------------------------------------------------------------
    def _run_pipeline(self, fill, what: str) -> list:
        """Fill a non-transactional pipeline on the write client and execute it (one round trip); after
        NOSCRIPT (a restarted or flushed server) load the scripts and run it again: every script here is
        idempotent, so rerunning is safe."""
        client = self._client("w")
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
                pipe.execute_command("EVALSHA", sha, 3, self.seq_key(user), self.packed_key(user),
                                     self.count_key(user), self.max_len, self.late_bound_ms, self.slack, *args)

        for acc, dup, late in self._run_pipeline(fill, "append"):
            stats.accepted += int(acc)
            stats.duplicates += int(dup)
            stats.too_late += int(late)
        return stats

    def get_sequences(self, user_ids: Sequence[str]) -> list[UserSequence]:
        user_ids = list(user_ids)
        if not user_ids:
            return []
        keys = [self.packed_key(u) for u in user_ids]
        reader = self._client("r")
        with _unavailable("get_sequences"):
            if self.cluster:        # one MGET per hash slot, one round trip per node (module docstring)
                replies = reader.mget_nonatomic(keys)
            else:
                replies = reader.execute_command("MGET", *keys)
        return [UserSequence.from_packed(r.decode(), limit=self.max_len) if r else UserSequence()
                for r in replies]

    # embeddings --------------------------------------------------------------------------------
    def user_ids(self) -> list[str]:
        """SCAN over the sequence keys (on a cluster, of every primary), never KEYS: the server keeps serving."""
        head = f"{self.prefix}seq:{{".encode()
        with _unavailable("scan"):
            keys = self._client("r").scan_iter(match=head + b"*", count=1000)
            return sorted({k[len(head):-1].decode() for k in keys if k.endswith(b"}")})

    def put_embeddings(self, user_ids: Sequence[str], embeddings: np.ndarray, as_of_ms: int) -> None:
        user_ids = list(user_ids)
        emb = self._check_embeddings(user_ids, embeddings, as_of_ms)
        d = int(emb.shape[1])
        writer = self._client("w")
        with _unavailable("put_embeddings"):
            stored = writer.hget(self.meta_key, "dim")
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
        reader = self._client("r")
        with _unavailable("get_embeddings"):
            pipe = reader.pipeline(transaction=False)
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
        clients = list(self._clients.values()) if self.cluster else [self._r, self._w]
        for c in clients:
            try:
                c.close()
            except Exception:  # closing must never raise
                pass

    def __repr__(self) -> str:
        return (f"RedisStore({self.url!r}, prefix={self.prefix!r}, cluster={self.cluster}, max_len={self.max_len}, "
                f"late_bound_ms={self.late_bound_ms})")
