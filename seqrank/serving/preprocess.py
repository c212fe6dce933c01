"""Request validation and tensor building for the Triton preprocess step (also usable without Triton).

The error contract (docs/serving-contract.md): a malformed request raises RequestError naming the field; the
Python backend turns it into INVALID_ARG for that request only. Defined behaviours, not errors: an unknown
candidate id gets the OOV row and oov=True; an empty history is a cold start; a history longer than S keeps the
newest S; actions at or after the request time are ignored; a store that is down or slow gives an empty sequence
and sequence_source="fallback_store_unavailable"; a user whose stored record cannot be read (corrupt, wrong type or
dim) gets the same, flagged "fallback_store_error", and the rest of the batch is unaffected.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..features import (HISTORY_COUNT_CAP, OOV, PAD, History, Vocabulary, as_bytes_array, build_sequences,
                        byte_lengths, index_histories)

FUTURE_TOLERANCE_MS = 5 * 60 * 1000   # a request time more than 5 minutes ahead of the server clock is an error
MIN_VALID_TIME_MS = 946_684_800_000   # 2000-01-01: earlier request times are almost surely seconds, not ms
ACTION_FIELDS = ("action_item_ids", "action_types", "action_times_ms")
_log = logging.getLogger(__name__)
# the sources whose history could not be read: served with the "history unavailable" context flag, which the
# ranker learned (TransActConfig.history_outage_share), not as a user without history
FALLBACK_SOURCES = ("fallback_store_unavailable", "fallback_store_error")
# N is padded up to one of these (one TensorRT profile each). A GPU backend batches only requests of one bucket, and
# only while they come in a row, so fewer buckets batch more and pad more: chosen with research/bucket_batching.py
# (docs/deployment.md, "Candidate buckets"); `seqrank export --candidate-buckets` sets a deployment's own.
CANDIDATE_BUCKETS = (16, 128, 512, 1024)


def check_buckets(buckets) -> tuple[int, ...]:
    """Candidate buckets as a tuple, or ValueError naming the setting: at least one, positive, strictly increasing."""
    out = tuple(int(b) for b in buckets)
    if not out or out[0] < 1 or any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"candidate_buckets must be positive and strictly increasing, got {list(out)}")
    return out


class RequestError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class Request:
    user_id: str
    candidates: np.ndarray            # object array of bytes [N]
    request_time_ms: int
    actions: tuple | None = None      # (item ids, action names: bytes arrays; times) from the request, or None


@dataclass
class Tensors:
    seq_item: np.ndarray
    seq_action: np.ndarray
    seq_mask: np.ndarray
    user_emb: np.ndarray
    context: np.ndarray
    cand_item: np.ndarray
    oov: np.ndarray
    sequence_source: str
    embedding_source: str = "none"   # "store" (the daily embed job), "exported" (the run's table) or "none" (zeros)
    extra: dict = field(default_factory=dict)


def _one(value: np.ndarray | None, name: str):
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise RequestError(name, f"expected exactly one value, got {flat.size}")
    return flat[0]


def _ids(value: np.ndarray, name: str, max_bytes: int) -> np.ndarray:
    """A flat object array of bytes ids; the first empty (or whitespace-only) or over-long element is an error."""
    flat = as_bytes_array(value)
    empty = ~np.fromiter(map(bool, map(bytes.strip, flat)), dtype=bool, count=flat.size)
    lengths = byte_lengths(flat)
    bad = np.flatnonzero(empty | (lengths > max_bytes))
    if bad.size:
        i = int(bad[0])
        if empty[i]:
            raise RequestError(name, f"element {i} is empty")
        raise RequestError(name, f"element {i} is {lengths[i]} bytes, the cap is {max_bytes}")
    return flat


class Preprocessor:
    def __init__(self, tables: Path, seq_len: int, buckets: Sequence[int], max_candidates: int,
                 max_actions: int = 10_000, max_id_bytes: int = 256, store=None):
        tables = Path(tables)
        self.vocab = Vocabulary.load(tables)
        self.users = np.load(tables / "users.npy", mmap_mode="r")
        self.user_emb = np.load(tables / "user_emb.npy", mmap_mode="r")
        self.seq_len, self.buckets = seq_len, list(check_buckets(buckets))
        self.max_candidates = min(max_candidates, self.buckets[-1])
        self.max_actions, self.max_id_bytes = max_actions, max_id_bytes
        self.store = store
        if store is not None and getattr(store, "max_len", HISTORY_COUNT_CAP) < HISTORY_COUNT_CAP:
            _log.warning("the feature store keeps %d actions per user, fewer than the %d the model's history count "
                         "feature was trained on: store-backed rankings will see a smaller count (train/serve skew)",
                         store.max_len, HISTORY_COUNT_CAP)
        self.known_actions = set(self.vocab.actions) | ({self.vocab.exposure_action} - {None})
        self.known_action_bytes = {a.encode() for a in self.known_actions}  # requests carry names as bytes

    # ------------------------------------------------------------ validation (per request)
    def parse(self, inputs: Mapping[str, np.ndarray | None], now_ms: int | None = None) -> Request:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if inputs.get("user_id") is None:
            raise RequestError("user_id", "is required")
        user = _ids(np.array([_one(inputs["user_id"], "user_id")], dtype=object), "user_id", self.max_id_bytes)[0]
        try:
            user_id = (user if isinstance(user, bytes) else str(user).encode()).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("user_id", "is not valid UTF-8") from None
        if inputs.get("candidate_ids") is None:
            raise RequestError("candidate_ids", "is required")
        cands = _ids(inputs["candidate_ids"], "candidate_ids", self.max_id_bytes)
        if cands.size == 0:
            raise RequestError("candidate_ids", "needs at least 1 candidate")
        if cands.size > self.max_candidates:
            raise RequestError("candidate_ids", f"{cands.size} candidates, the cap is {self.max_candidates}")
        t = inputs.get("request_time_ms")
        request_time = now_ms if t is None else int(_one(t, "request_time_ms"))
        if request_time < MIN_VALID_TIME_MS:
            raise RequestError("request_time_ms", f"{request_time} is before 2000-01-01 (milliseconds expected)")
        if request_time > now_ms + FUTURE_TOLERANCE_MS:
            raise RequestError("request_time_ms", f"{request_time} is in the future (server clock {now_ms})")
        given = [f for f in ACTION_FIELDS if inputs.get(f) is not None]
        actions = None
        if given:
            if len(given) != len(ACTION_FIELDS):
                missing = [f for f in ACTION_FIELDS if f not in given]
                raise RequestError(missing[0], f"is required when {', '.join(given)} is given")
            items = _ids(inputs["action_item_ids"], "action_item_ids", self.max_id_bytes)
            kinds = as_bytes_array(inputs["action_types"])
            times = np.asarray(inputs["action_times_ms"]).reshape(-1)
            if not np.issubdtype(times.dtype, np.integer):
                raise RequestError("action_times_ms", f"must be INT64 milliseconds, got {times.dtype}")
            if len(items) > self.max_actions:
                raise RequestError("action_item_ids", f"{len(items)} actions, the cap is {self.max_actions}")
            for name, arr in (("action_types", kinds), ("action_times_ms", times)):
                if len(arr) != len(items):
                    raise RequestError(name, f"has {len(arr)} elements, action_item_ids has {len(items)}")
            if len(times) and times.min() < 0:
                raise RequestError("action_times_ms", f"negative time at element {int(np.argmin(times))}")
            known = np.fromiter(map(self.known_action_bytes.__contains__, kinds), dtype=bool, count=kinds.size)
            if not known.all():
                i = int(np.argmin(known))
                raise RequestError("action_types", f"element {i} is unknown action "  # echo at most 64 bytes
                                                   f"{kinds[i][:64].decode(errors='replace')!r}; "
                                                   f"known: {sorted(self.known_actions)}")
            actions = (items, kinds, times.astype(np.int64))
        return Request(user_id, cands, request_time, actions)

    # ------------------------------------------------------------ tensors (batched)
    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def table_embeddings(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The daily batch table shipped in the repository (a sorted, memory-mapped user id array): each user's
        embedding (zeros when absent) and whether it was found."""
        q = np.array([u.encode() for u in user_ids], dtype=object)
        out = np.zeros((len(q), self.user_emb.shape[1]), dtype=np.float32)
        found = np.zeros(len(q), dtype=bool)
        if len(self.users) == 0:
            return out, found
        fits = np.array([len(x) <= self.users.itemsize for x in q], dtype=bool)
        qs = np.asarray(q[fits], dtype=self.users.dtype)
        pos = np.minimum(np.searchsorted(self.users, qs), len(self.users) - 1)
        hit = self.users[pos] == qs
        rows = np.flatnonzero(fits)[hit]
        out[rows] = self.user_emb[pos[hit]]
        found[rows] = True
        return out, found

    def _store_rows(self, users: Sequence[str], dim: int) -> list[tuple[History, np.ndarray | None]]:
        """Each user's history and stored embedding (None: none stored, or not finite) in one round trip each."""
        seqs = self.store.get_sequences(users)
        store_emb, found = self.store.get_embeddings(users, dim=dim)
        found = found & np.isfinite(store_emb).all(axis=1)
        histories = index_histories(self.vocab, [(s.item_ids, s.actions, s.timestamps_ms) for s in seqs])
        return [(h, store_emb[j] if found[j] else None) for j, h in enumerate(histories)]

    def _read_store(self, requests, need_store, histories, sources, emb, emb_sources) -> None:
        """Fill the histories and embeddings of requests ``need_store`` from the store. A store that does not answer
        fails the whole batch over to the no-sequence path (fallback_store_unavailable); any other error (one user's
        corrupt record, a wrong key type, a stored dim that is not the model's) is retried user by user, so only the
        users whose record cannot be read fall back (fallback_store_error) and the rest of the batch is served."""
        from ..store.base import StoreUnavailable
        users = [requests[i].user_id for i in need_store]
        try:
            read = dict(zip(need_store, self._store_rows(users, emb.shape[1])))
        except StoreUnavailable:
            read = {}
        except Exception as e:
            _log.warning("store read failed for a batch of %d users (%s: %s); retrying user by user",
                         len(users), type(e).__name__, e)
            read = {}
            for i, user in zip(need_store, users):
                try:
                    read[i] = self._store_rows([user], emb.shape[1])[0]
                except StoreUnavailable:
                    break  # it stopped answering: do not wait for its timeout once per user
                except Exception as e:
                    _log.warning("store record of user %r cannot be read (%s: %s)", user, type(e).__name__, e)
                    read[i] = None
        for i in need_store:
            if i not in read:
                sources[i] = "fallback_store_unavailable"
            elif read[i] is None:
                sources[i] = "fallback_store_error"
            else:
                histories[i], stored = read[i]
                sources[i] = "store" if len(histories[i].ts) else "empty"
                if stored is not None:
                    emb[i] = stored
                    emb_sources[i] = "store"

    def build(self, requests: Sequence[Request]) -> list[Tensors]:
        histories: list[History] = [History.empty()] * len(requests)
        sources = ["request"] * len(requests)
        need_store = [i for i, r in enumerate(requests) if r.actions is None]
        carried = [i for i, r in enumerate(requests) if r.actions is not None]
        for i, h in zip(carried, index_histories(self.vocab, [requests[i].actions for i in carried])):
            histories[i] = h
        emb, in_table = self.table_embeddings([r.user_id for r in requests])
        emb_sources = ["exported" if found else "none" for found in in_table]
        if need_store:
            for i in need_store:
                sources[i] = "empty"
            if self.store is not None:
                self._read_store(requests, need_store, histories, sources, emb, emb_sources)
        for i, h in enumerate(histories):
            if sources[i] == "request" and len(h.ts) == 0:
                sources[i] = "empty"
        seq = build_sequences(histories, [r.request_time_ms for r in requests], self.seq_len,
                              unavailable=[s in FALLBACK_SOURCES for s in sources])
        out = []
        for i, r in enumerate(requests):
            n = len(r.candidates)
            cand = np.full(self.bucket(n), PAD, dtype=np.int64)
            cand[:n] = self.vocab.item_index(r.candidates)
            oov = np.zeros(len(cand), dtype=bool)
            oov[:n] = cand[:n] == OOV
            out.append(Tensors(seq.seq_item[i], seq.seq_action[i], seq.seq_mask[i], emb[i], seq.context[i],
                               cand, oov, sources[i], emb_sources[i]))
        return out
