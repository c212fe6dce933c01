"""The one feature-building path, shared by training (seqrank.dataset) and serving (Triton preprocess).

Raw actions (item id, action name, timestamp) -> vocabulary indices -> the real-time sequence of a request:
the newest S actions strictly before the request time, newest first, padded after, with a validity mask.
Nothing at or after the request time ever enters a feature (that is the leakage guarantee, tested).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

PAD = 0          # index 0: padding (never attended or pooled)
OOV = 1          # index 1: out-of-vocabulary item / action
FIRST_ID = 2     # known ids start here
N_CONTEXT = 5    # context features: log1p(#history), log1p(hours since last action), sin/cos hour of day, and
UNAVAILABLE = 4  # a flag: 1 = the history could not be read (store down), which is not "no history" (a new user)
# context[0] counts at most this many earlier actions: the feature store keeps a user's newest 256 raw actions
# (seqrank.store DEFAULT_MAX_LEN), so serving from it cannot count more, and training must not either
HISTORY_COUNT_CAP = 256


def as_bytes_array(ids) -> np.ndarray:
    """Object/str/bytes ids -> a flat object array of bytes (the form Triton's BYTES tensors arrive in; returned
    as is, without a Python loop per element: the serving path's most common call)."""
    arr = np.asarray(ids, dtype=object).reshape(-1)
    types = set(map(type, arr))
    if types <= {bytes}:
        return arr
    out = np.empty(arr.size, dtype=object)
    # str ids (a feature store's records) encoded with a C-level map; anything else through str() first
    out[:] = list(map(str.encode, arr)) if types <= {str} else [x if isinstance(x, bytes) else str(x).encode()
                                                                for x in arr]
    return out


def byte_lengths(raw: np.ndarray) -> np.ndarray:
    """The length of every element of an object array of bytes, int64."""
    return np.fromiter(map(len, raw), dtype=np.int64, count=raw.size)


@dataclass
class Vocabulary:
    """Item and action vocabularies. Items are a sorted bytes array: memory-mappable and looked up vectorised.

    A trained vocabulary's item row is its position + FIRST_ID. Items appended later (seqrank.refresh) take the next
    rows while the array stays sorted for the lookup, so `rows` then holds each sorted item's row: the rows of the
    items known before never change."""

    items: np.ndarray                 # dtype 'S<n>', sorted, unique
    actions: list[str]                # sequence action vocabulary (index = position + FIRST_ID)
    heads: list[str]                  # actions predicted by the ranker, one sigmoid head each
    negative_actions: list[str]       # heads where lower is better (hide / hate / dislike)
    exposure_action: str | None       # "shown, not engaged": a label context, never a sequence row
    rows: np.ndarray | None = None    # int64 row of each sorted item; None: position + FIRST_ID (nothing appended)

    @classmethod
    def build(cls, item_ids: Sequence, actions: Sequence[str], negative_actions: Sequence[str],
              exposure_action: str | None) -> "Vocabulary":
        items = np.unique(np.asarray(as_bytes_array(item_ids), dtype="S"))
        seq_actions = sorted(a for a in set(actions) if a != exposure_action)
        return cls(items, seq_actions, list(seq_actions), sorted(negative_actions), exposure_action)

    @property
    def n_items(self) -> int:
        return len(self.items) + FIRST_ID

    @property
    def n_actions(self) -> int:
        return len(self.actions) + FIRST_ID

    def item_index(self, ids) -> np.ndarray:
        """ids (str/bytes, any shape) -> int64 indices; unknown ids -> OOV. Vectorised binary search."""
        raw = as_bytes_array(ids)
        out = np.full(raw.shape, OOV, dtype=np.int64)
        if raw.size == 0 or self.items.size == 0:
            return out
        # An id longer than the longest known id is unknown; numpy would silently truncate it, so filter first.
        fits = byte_lengths(raw) <= self.items.itemsize
        query = np.asarray(raw[fits], dtype=self.items.dtype)
        pos = np.searchsorted(self.items, query)
        pos_c = np.minimum(pos, len(self.items) - 1)
        hit = self.items[pos_c] == query
        found = pos_c[hit]
        out[np.flatnonzero(fits)[hit]] = found + FIRST_ID if self.rows is None else self.rows[found]
        return out

    def append_items(self, item_ids) -> tuple["Vocabulary", np.ndarray]:
        """This vocabulary with the unknown ones of ``item_ids`` appended as rows n_items, n_items + 1, ... (in id
        order); every known item keeps its row. Returns (the new vocabulary, the appended ids, sorted)."""
        ids = np.unique(np.asarray(as_bytes_array(item_ids), dtype="S"))
        new = ids[self.item_index(ids) == OOV] if ids.size else ids
        if new.size == 0:
            return self, new
        old_rows = self.rows if self.rows is not None else np.arange(FIRST_ID, self.n_items, dtype=np.int64)
        merged = np.concatenate([np.asarray(self.items), new])
        merged_rows = np.concatenate([np.asarray(old_rows), np.arange(self.n_items, self.n_items + len(new))])
        order = np.argsort(merged, kind="stable")
        return replace(self, items=merged[order], rows=merged_rows[order].astype(np.int64)), new

    def action_index(self, names) -> np.ndarray:
        """Action names -> int64 indices; the exposure action -> -1 (dropped from sequences); unknown -> OOV."""
        table = self._action_codes
        raw = np.asarray(names, dtype=object).reshape(-1)
        if not set(map(type, raw)) <= {bytes, str}:
            raw = as_bytes_array(raw)
        return np.fromiter(map(table.get, raw, repeat(OOV, raw.size)), dtype=np.int64, count=raw.size)

    @cached_property
    def _action_codes(self) -> dict:
        """Action name (as str and as bytes: requests carry bytes, stores str) -> its index; the exposure -> -1."""
        table = {a: i + FIRST_ID for i, a in enumerate(self.actions)}
        if self.exposure_action is not None:
            table[self.exposure_action] = -1
        return {**table, **{name.encode(): code for name, code in table.items()}}

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "items.npy", self.items)
        if self.rows is not None:
            np.save(directory / "item_rows.npy", self.rows)
        meta = {k: getattr(self, k) for k in ("actions", "heads", "negative_actions", "exposure_action")}
        (directory / "vocab.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> "Vocabulary":
        meta = json.loads((Path(directory) / "vocab.json").read_text())
        mode = "r" if mmap else None
        items = np.load(Path(directory) / "items.npy", mmap_mode=mode)
        rows_path = Path(directory) / "item_rows.npy"
        rows = np.load(rows_path, mmap_mode=mode) if rows_path.exists() else None
        return cls(items=items, **meta, rows=rows)


@dataclass
class History:
    """One user's raw actions as vocabulary indices, ascending time, exposures dropped."""

    item: np.ndarray    # int64 [n]
    action: np.ndarray  # int64 [n]
    ts: np.ndarray      # int64 [n] ms

    @classmethod
    def empty(cls) -> "History":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z)


def index_history(vocab: Vocabulary, item_ids, actions, timestamps_ms) -> History:
    """Raw actions -> History. Stable sort by time so equal timestamps keep their given order."""
    return index_histories(vocab, [(item_ids, actions, timestamps_ms)])[0]


def index_histories(vocab: Vocabulary, raws: Iterable[tuple]) -> list[History]:
    """index_history for many users at once: ``raws`` of (item ids, action names, timestamps ms). The ids of all
    users are looked up in one vectorised pass, so a batch of users costs one lookup, not one per user."""
    raws = [tuple(np.asarray(x, dtype=dtype).reshape(-1) for x, dtype in zip(raw, (object, object, np.int64)))
            for raw in raws]
    sizes = [len(ts) for _, _, ts in raws]
    for items, actions, ts in raws:
        if not len(items) == len(actions) == len(ts):
            raise ValueError(f"item ids, action names and timestamps differ in length: "
                             f"{len(items)}, {len(actions)}, {len(ts)}")
    if not raws:
        return []
    item, action, ts = (np.concatenate(column) if len(column) > 1 else column[0] for column in zip(*raws))
    item, action = vocab.item_index(item), vocab.action_index(action)
    out = []
    for start, stop in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes)):
        i, a, t = item[start:stop], action[start:stop], ts[start:stop]
        keep = a >= 0
        i, a, t = i[keep], a[keep], t[keep]
        order = np.argsort(t, kind="stable")
        out.append(History(i[order], a[order], t[order]))
    return out


def index_histories_of(vocab: Vocabulary, by_user: Mapping[str, tuple]) -> dict[str, History]:
    """index_histories over a mapping user -> (item ids, action names, timestamps ms), keyed as given."""
    return dict(zip(by_user, index_histories(vocab, by_user.values())))


@dataclass
class SequenceBatch:
    seq_item: np.ndarray     # int64 [E, S]  newest first, PAD after the last real action
    seq_action: np.ndarray   # int64 [E, S]
    seq_mask: np.ndarray     # bool  [E, S]  True = real action
    seq_ts: np.ndarray       # int64 [E, S]  action times (training: time-window mask, PinnerFormer time features)
    context: np.ndarray      # float32 [E, N_CONTEXT]


def build_sequences(histories: Sequence[History], request_times_ms, max_len: int,
                    unavailable: np.ndarray | None = None) -> SequenceBatch:
    """For each (history, request time): the newest `max_len` actions strictly before the request time.
    ``unavailable`` (bool per request) flags the requests whose history could not be read: they get an empty
    sequence and context[UNAVAILABLE] = 1, so the ranker can tell a store outage from a user who has done nothing."""
    req = np.asarray(request_times_ms, dtype=np.int64).reshape(-1)
    unavailable = np.zeros(len(req), dtype=bool) if unavailable is None else np.asarray(unavailable, dtype=bool)
    histories = [History.empty() if down else h for h, down in zip(histories, unavailable, strict=True)]
    n = len(histories)
    seq_item = np.zeros((n, max_len), dtype=np.int64)
    seq_action = np.zeros((n, max_len), dtype=np.int64)
    seq_ts = np.zeros((n, max_len), dtype=np.int64)
    n_before = np.zeros(n, dtype=np.int64)
    last_gap_h = np.zeros(n, dtype=np.float32)
    for e, (h, t) in enumerate(zip(histories, req)):
        end = int(np.searchsorted(h.ts, t, side="left"))  # strictly before t
        start = max(0, end - max_len)
        k = end - start
        n_before[e] = end
        if k:
            seq_item[e, :k] = h.item[start:end][::-1]
            seq_action[e, :k] = h.action[start:end][::-1]
            seq_ts[e, :k] = h.ts[start:end][::-1]
            last_gap_h[e] = (t - h.ts[end - 1]) / 3.6e6
    lengths = np.minimum(n_before, max_len)
    seq_mask = np.arange(max_len)[None, :] < lengths[:, None]
    hour = (req // 3_600_000) % 24 * (2 * np.pi / 24)
    context = np.stack([np.log1p(np.minimum(n_before, HISTORY_COUNT_CAP)), np.log1p(last_gap_h), np.sin(hour),
                        np.cos(hour), unavailable], axis=1)
    return SequenceBatch(seq_item, seq_action, seq_mask, seq_ts, context.astype(np.float32))
