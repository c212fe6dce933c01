"""The feature-store contract shared by the embedded (SQLite) and Redis stores.

A store keeps, per user, the newest ``max_len`` raw actions (the real-time sequence read by the Triton
preprocess step) and one long-term user embedding (PinnerFormer), written by a batch job.

Append semantics (identical in every backend; the tests check it against a pure-Python model):

* An action is *invalid* when ``validate_action`` names a problem (ids must be non-empty ``str`` without
  control characters, the action a non-empty ``str`` without control characters, the timestamp an ``int``
  in ``[0, 2**53]``; the user id only has to be a non-empty ``str``).
* Actions are processed in arrival order (list order) per user, so ``append(batch)`` behaves like
  appending the batch's actions one at a time (up to where trimming happens, see below).
* An exact duplicate ``(user, item, action, ts)`` of a stored action, or of one earlier in the batch, is a
  *duplicate* (checked before lateness, so replaying old events reports duplicates, not late events).
* Otherwise an action older than ``newest - late_bound_ms`` is *too_late*, where ``newest`` is the newest
  timestamp of that user seen so far (stored, or accepted earlier in the same batch).
* Otherwise it is *accepted* and placed at its event-time position. Sequences are ordered by
  ``(timestamp_ms, item_id, action)`` ascending (code-point order, the same as Python's ``sorted``).
* After each batch only the newest ``max_len`` actions of a user are kept. An accepted action that falls
  outside them is still counted as accepted (it was valid and on time; retention dropped it).

Replaying events therefore never changes the state.
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

DEFAULT_MAX_LEN = 256
DEFAULT_LATE_BOUND_MS = 3_600_000      # 1 hour
DEFAULT_TIMEOUT_S = 0.05               # read deadline (Redis socket timeout)
DEFAULT_WRITE_TIMEOUT_S = 5.0          # append / put_embeddings (Redis socket timeout, SQLite busy timeout)
MAX_TIMESTAMP_MS = 2 ** 53             # exact in a Redis sorted-set score (a double)
STORE_ENV = "SEQRANK_STORE"
SEP = "\x1f"                            # field separator of the packed wire format (ids never contain it)

_CONTROL = re.compile(r"[\x00-\x1f]")


@dataclass(frozen=True)
class Action:
    """One raw user action."""
    user_id: str
    item_id: str
    action: str
    timestamp_ms: int


def _ties_out_of_order(items: list[str], actions: list[str], ties: np.ndarray) -> bool:
    """Whether any record i in ``ties`` (equal time with record i + 1) has (item, action) after record i + 1's, the
    order the stores keep: compared as object arrays, one C loop instead of a Python tuple per tie (a log with
    many same-time actions has ties in most records)."""
    if ties.size == 0:
        return False
    item, action = np.array(items, dtype=object), np.array(actions, dtype=object)
    a, b = item[ties], item[ties + 1]
    return bool(((a > b) | ((a == b) & (action[ties] > action[ties + 1]))).any())


@dataclass
class UserSequence:
    """A user's real-time sequence, newest LAST (ascending time), at most ``max_len`` entries."""
    item_ids: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    timestamps_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.item_ids)

    def __eq__(self, other) -> bool:
        if not isinstance(other, UserSequence):
            return NotImplemented
        return (self.item_ids == other.item_ids and self.actions == other.actions
                and np.array_equal(np.asarray(self.timestamps_ms), np.asarray(other.timestamps_ms)))

    def as_tuples(self) -> list[tuple[str, str, int]]:
        return [(i, a, int(t)) for i, a, t in zip(self.item_ids, self.actions, self.timestamps_ms)]

    @classmethod
    def from_packed(cls, packed: str, limit: Optional[int] = None) -> "UserSequence":
        """Parse the stores' wire format ``item SEP action SEP ts SEP item ...`` (SEP = \\x1f, oldest
        first), keeping the newest ``limit``. Verifies the order; sorts only if the source was unsorted."""
        if not packed:
            return cls()
        if limit is None:
            parts = packed.split(SEP)
        else:                                   # split only the newest `limit` records off the end
            parts = packed.rsplit(SEP, 3 * limit)
            if len(parts) > 3 * limit:
                del parts[0]
        items, actions = parts[0::3], parts[1::3]
        ts = np.fromiter(map(int, parts[2::3]), dtype=np.int64, count=len(items))
        if len(ts) > 1:
            d = np.diff(ts)
            if (d < 0).any() or _ties_out_of_order(items, actions, np.flatnonzero(d == 0)):
                return cls.from_rows(sorted(zip(items, actions, ts.tolist()), key=lambda r: (r[2], r[0], r[1])))
        return cls(item_ids=items, actions=actions, timestamps_ms=ts)

    @classmethod
    def from_rows(cls, rows) -> "UserSequence":
        """``rows``: iterable of (item_id, action, ts), already in ascending order."""
        rows = list(rows)
        return cls(item_ids=[r[0] for r in rows], actions=[r[1] for r in rows],
                   timestamps_ms=np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows)))


@dataclass
class IngestStats:
    """Counts returned by ``FeatureStore.append`` and ``seqrank.ingest.ingest``."""
    accepted: int = 0
    duplicates: int = 0
    too_late: int = 0
    invalid: int = 0

    @property
    def total(self) -> int:
        return self.accepted + self.duplicates + self.too_late + self.invalid

    def __add__(self, other: "IngestStats") -> "IngestStats":
        return IngestStats(self.accepted + other.accepted, self.duplicates + other.duplicates,
                           self.too_late + other.too_late, self.invalid + other.invalid)

    def __iadd__(self, other: "IngestStats") -> "IngestStats":
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.too_late += other.too_late
        self.invalid += other.invalid
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class StoreUnavailable(RuntimeError):
    """The backend could not answer within its timeout (down, hung, unreachable, locked)."""


def validate_action(a) -> Optional[str]:
    """None when ``a`` is a valid ``Action``, else ``"<field>: <problem>"``."""
    if not isinstance(a, Action):
        return f"action: expected Action, got {type(a).__name__}"
    if not isinstance(a.user_id, str) or not a.user_id:
        return "user_id: must be a non-empty string"
    for name in ("item_id", "action"):
        v = getattr(a, name)
        if not isinstance(v, str) or not v:
            return f"{name}: must be a non-empty string"
        if _CONTROL.search(v):
            return f"{name}: must not contain control characters"
    ts = a.timestamp_ms
    if isinstance(ts, (bool, np.bool_)) or not isinstance(ts, (int, np.integer)):
        return "timestamp_ms: must be an integer (milliseconds since the epoch)"
    if ts < 0 or ts > MAX_TIMESTAMP_MS:
        return f"timestamp_ms: must be in [0, 2**53], got {int(ts)}"
    return None


def sort_key(item_id: str, action: str, ts: int) -> tuple[int, str, str]:
    """The order of a sequence (ascending): event time, then item id, then action."""
    return (int(ts), item_id, action)


def pack_keys(keys: Sequence[tuple[int, str, str]]) -> str:
    """(ts, item, action) keys, ascending -> the packed wire format (see ``UserSequence.from_packed``)."""
    return SEP.join(f"{item}{SEP}{action}{SEP}{ts}" for ts, item, action in keys)


def unpack_keys(packed: Optional[str]) -> list[tuple[int, str, str]]:
    """The packed wire format -> (ts, item, action) keys in stored order."""
    if not packed:
        return []
    parts = packed.split(SEP)
    return list(zip(map(int, parts[2::3]), parts[0::3], parts[1::3]))


class FeatureStore(ABC):
    """Per-user real-time action sequences + long-term user embeddings."""

    max_len: int = DEFAULT_MAX_LEN
    late_bound_ms: int = DEFAULT_LATE_BOUND_MS

    def __init__(self, max_len: int = DEFAULT_MAX_LEN, late_bound_ms: int = DEFAULT_LATE_BOUND_MS):
        if int(max_len) < 1:
            raise ValueError("max_len must be >= 1")
        if int(late_bound_ms) < 0:
            raise ValueError("late_bound_ms must be >= 0")
        self.max_len = int(max_len)
        self.late_bound_ms = int(late_bound_ms)

    @abstractmethod
    def append(self, actions: Sequence[Action]) -> IngestStats:
        """Validate, dedup, place in event-time order, keep the newest ``max_len`` per user."""

    @abstractmethod
    def get_sequences(self, user_ids: Sequence[str]) -> list[UserSequence]:
        """One round trip for the whole batch; unknown user -> empty sequence."""

    @abstractmethod
    def user_ids(self) -> list[str]:
        """Every user with a stored action sequence, sorted: whom the daily embedding job embeds."""

    @abstractmethod
    def put_embeddings(self, user_ids: Sequence[str], embeddings: np.ndarray, as_of_ms: int) -> None:
        """float32 [n, D]; a user's stored embedding is replaced only by one with as_of_ms >= the stored one."""

    @abstractmethod
    def get_embeddings(self, user_ids: Sequence[str], dim: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """([n, D] float32, zeros where missing; found bool[n]); one round trip."""

    @abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # helpers shared by the backends -------------------------------------------------------------
    @staticmethod
    def _check_embeddings(user_ids: Sequence[str], embeddings, as_of_ms) -> np.ndarray:
        emb = np.asarray(embeddings)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be [n, D], got shape {emb.shape}")
        if emb.shape[0] != len(user_ids):
            raise ValueError(f"{len(user_ids)} user ids but {emb.shape[0]} embeddings")
        if emb.shape[1] < 1:
            raise ValueError("embedding dim must be >= 1")
        for u in user_ids:
            if not isinstance(u, str) or not u:
                raise ValueError("user_id: must be a non-empty string")
        if isinstance(as_of_ms, bool) or not isinstance(as_of_ms, (int, np.integer)) or as_of_ms < 0:
            raise ValueError("as_of_ms must be a non-negative integer")
        emb = np.ascontiguousarray(emb, dtype="<f4")
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():  # a NaN vector would rank this user's candidates in no meaningful order
            raise ValueError(f"embeddings: not finite (NaN or inf) for user {user_ids[int(np.argmax(bad))]!r}")
        return emb

    @staticmethod
    def _resolve_dim(found_dims: set, dim: Optional[int], known: Optional[int]) -> int:
        if len(found_dims) > 1:
            raise ValueError(f"stored embeddings have different dims: {sorted(found_dims)}")
        if found_dims:
            d = found_dims.pop()
            if dim is not None and int(dim) != d:
                raise ValueError(f"requested dim {dim} but stored embeddings have dim {d}")
            return d
        if dim is not None:
            return int(dim)
        if known is not None:
            return int(known)
        raise ValueError("no embeddings stored and no dim known: pass dim=")


# ------------------------------------------------------------------------------------------------
def _flag(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {value!r}")


_OWN_PARAMS = {"max_len": int, "late_bound_ms": int, "timeout_s": float, "write_timeout_s": float,
               "prefix": str, "dim": int, "cluster": _flag}


def open_store(url: Optional[str] = None, **kw) -> FeatureStore:
    """Open a store from a URL (or ``$SEQRANK_STORE`` when ``url`` is None).

    * ``sqlite:///abs/path/store.db`` (also ``sqlite:////abs/path``; ``sqlite://rel/path.db`` is relative)
      -> ``EmbeddedStore``
    * ``redis://host:port/db`` (also ``rediss://``, ``unix://``) -> ``RedisStore``; add ``?cluster=1`` for a
      Redis Cluster (the URL names any node; see ``seqrank.store.redis_store``)

    Options (keyword arguments override URL query parameters such as ``?max_len=100&prefix=exp1:``):
    ``max_len``, ``late_bound_ms``, ``timeout_s`` (read deadline, default 0.05 s), ``write_timeout_s``
    (default 5 s), ``prefix`` (Redis key prefix, default ``seqrank:``), ``dim`` (embedding dim when none stored).
    """
    if url is None:
        url = os.environ.get(STORE_ENV)
        if not url:
            raise ValueError(f"no store URL given and ${STORE_ENV} is not set")
    parts = urlsplit(url)
    own, rest = {}, []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in _OWN_PARAMS:
            own[k] = _OWN_PARAMS[k](v)
        else:
            rest.append((k, v))
    own.update(kw)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        from .embedded import EmbeddedStore
        if rest:
            raise ValueError(f"unknown sqlite store options: {[k for k, _ in rest]}")
        own.pop("prefix", None)
        if own.pop("cluster", False):
            raise ValueError("cluster=1 is a Redis option; a sqlite store is one file")
        path = url.split("://", 1)[1].split("?", 1)[0]
        if path.startswith("//"):               # sqlite:////abs/path (SQLAlchemy spelling) == sqlite:///abs/path
            path = "/" + path.lstrip("/")
        if not path:
            raise ValueError(f"no database path in {url!r}")
        return EmbeddedStore(path, **own)
    if scheme in ("redis", "rediss", "unix"):
        from .redis_store import RedisStore
        clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
        return RedisStore(clean, **own)
    raise ValueError(f"unsupported store URL {url!r} (expected sqlite:///path or redis://host:port/db)")
