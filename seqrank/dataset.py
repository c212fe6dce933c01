"""From an event log to model inputs: time split, vocabulary, per-user histories, ranker examples.

Examples and serving requests go through the same seqrank.features functions; this module only decides
*which* (user, request time, candidates) to build, never *how* a feature is computed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from . import distributed
from .config import RunConfig
from .data.loaders import DataError, EventLog, add_sampled_negatives, load_events
from .features import (FIRST_ID, History, SequenceBatch, Vocabulary, as_bytes_array, build_sequences,
                       index_histories_of)

DAY_MS = 86_400_000


@dataclass
class Prepared:
    log: EventLog
    vocab: Vocabulary
    split_time: int                  # ms: train period < split_time <= test period
    users: np.ndarray                # sorted user ids (str)
    histories: dict[str, History]    # every user's full history (both periods), vocabulary indices
    impressions: pd.DataFrame        # user_id, item_id, timestamp, request, request_time, is_test
    labels: np.ndarray               # float32 [E, H] aligned with impressions
    pf_test_users: set[str]          # users held out from PinnerFormer training
    future_window_ms: int            # PinnerFormer's dense all-action window, resolved for this log
    selection_start: int | None      # ms: the training impressions from here choose the ranker's best epoch
    # (part, n_parts): the users of partition `part` of a dataset (seqrank.streamed); n_parts > 1 is a data-parallel
    # rank's own users, from which it trains on batches of its own (seqrank.training)
    partition: tuple[int, int] = (0, 1)

    @property
    def partitioned(self) -> bool:
        return self.partition[1] > 1

    def ranker_train_rows(self) -> np.ndarray:
        """The impressions the ranker learns from: the training period before the selection slice."""
        keep = ~self.impressions.is_test.to_numpy()
        if self.selection_start is not None:
            keep &= self.impressions.timestamp.to_numpy() < self.selection_start
        return np.flatnonzero(keep)

    def selection_rows(self) -> np.ndarray:
        """The newest training impressions, held out to choose the ranker's best epoch (empty: selection off)."""
        if self.selection_start is None:
            return np.zeros(0, dtype=np.int64)
        ts = self.impressions.timestamp.to_numpy()
        return np.flatnonzero(~self.impressions.is_test.to_numpy() & (ts >= self.selection_start))

    def test_rows(self) -> np.ndarray:
        return np.flatnonzero(self.impressions.is_test.to_numpy())

    def with_vocabulary(self, vocab: Vocabulary, users=None) -> "Prepared":
        """The same log through another vocabulary (one a refresh grew): every history re-indexed, or only those of
        ``users``."""
        ev = self.log.events if users is None else self.log.events[self.log.events.user_id.isin(users)]
        return replace(self, vocab=vocab, histories=index_histories_of(vocab, actions_by_user(ev)))


PAPER_WINDOW_DAYS = 28.0  # PinnerFormer's dense all-action window


def future_window_ms(cfg: RunConfig, span_ms: int) -> int:
    """The window a position's positive is sampled from. The paper uses 28 days of a years-long log; a short log
    cannot fill that, so by default it is the test horizon (test_fraction x span: 2.8 days on the 14-day KuaiRand
    log), never more than 28 days. An explicit future_window_days wins."""
    days = cfg.pinnerformer.future_window_days
    if days is None:
        return int(min(PAPER_WINDOW_DAYS * DAY_MS, cfg.data.test_fraction * span_ms))
    return int(days * DAY_MS)


MIN_USERS = 5  # a log with fewer users is refused (the split and the held-out PinnerFormer users need more)


def load_log(events: str, cfg: RunConfig, negative_actions=None) -> EventLog:
    log = load_events(events, negative_actions=negative_actions or cfg.data.negative_actions, min_users=MIN_USERS)
    if not log.negative_actions and log.exposure_action is None:
        # Without hides or logged exposures every impression is positive: sample shown-but-not-engaged items.
        log = add_sampled_negatives(log, cfg.data.sampled_negatives_per_positive, seed=cfg.seed)
    return log


def split_time_ms(ts_sorted: np.ndarray, cfg: RunConfig) -> int:
    """Train period < split time <= test period: the test period holds the last test_fraction of the events (their
    times, sorted ascending). A quantile of the events, not of the time span: on a log whose activity is concentrated
    early, the last 20% of the span can hold a handful of users (evaluate warns when an estimate rests on fewer than
    100)."""
    ts = ts_sorted
    split = int(ts[min(len(ts) - 1, int(np.floor((1.0 - cfg.data.test_fraction) * len(ts))))])
    return max(split, int(ts[0]) + 1)


def validation_period(ts_sorted: np.ndarray, cfg: RunConfig) -> tuple[np.ndarray, int | None]:
    """data.split "validation": the log without its test period (the times before the cutoff, and the cutoff), to be
    split again the same way. A choice (a hyper-parameter, a variant) is made on the slice this makes, and the test
    split is looked at once per decision. data.split "test": every time, no cutoff."""
    if cfg.data.split == "test":
        return ts_sorted, None
    cutoff = split_time_ms(ts_sorted, cfg)
    return ts_sorted[:int(np.searchsorted(ts_sorted, cutoff))], cutoff


def selection_start_ms(train_times: np.ndarray, cfg: RunConfig) -> int | None:
    """The ranker's newest selection_fraction of training impressions (by time) pick its best epoch; None: off."""
    f = cfg.data.selection_fraction  # in [0, 1): the config checks it
    if f == 0.0 or len(train_times) == 0:
        return None
    ts = np.sort(train_times)
    return int(ts[int(np.floor((1.0 - f) * len(ts)))])


def _item_bytes(item_ids) -> np.ndarray:
    """Distinct item ids as a sorted bytes array (the vocabulary's form)."""
    return np.unique(np.asarray(as_bytes_array(pd.unique(np.asarray(item_ids, dtype=object))), dtype="S"))


@dataclass
class LogFacts:
    """What every user's examples share, computed over the whole log: by prepare() in memory, or by a streaming pass
    over a dataset larger than memory (seqrank.streamed.scan_events) -- the same function (log_facts) either way."""
    cutoff: int | None               # data.split validation: only the events before it are used
    split_time: int
    users: np.ndarray                # every user, sorted
    pf_test_users: set[str]
    vocab: Vocabulary
    future_window_ms: int
    selection_start: int | None


def log_facts(ts_sorted: np.ndarray, frames, negative_actions, exposure_action, cutoff: int | None,
              cfg: RunConfig, source: str) -> LogFacts:
    """The facts of a log from the sorted times of its events (before the cutoff: validation_period) and those events
    as canonical frames that each hold all events of their users (one frame, or one per bucket). Memory: the times
    (8 bytes per event), one frame, the distinct users and items, and the time of every training impression."""
    ts = ts_sorted
    split_time = split_time_ms(ts, cfg)
    n_train = int(np.searchsorted(ts, split_time))
    if n_train == 0 or n_train == len(ts):
        raise DataError("too few events on one side of the time split", file=source)
    users, actions, train_items, train_times, train_users = [], set(), np.zeros(0, dtype="S1"), [], 0
    for ev in frames:
        train_ev = ev[ev.timestamp.to_numpy() < split_time]
        users.append(pd.unique(ev.user_id))
        actions.update(pd.unique(ev.action).tolist())
        train_users += train_ev.user_id.nunique()
        train_items = np.union1d(train_items, _item_bytes(train_ev.item_id))
        train_times.append(train_ev[["user_id", "item_id", "timestamp"]].drop_duplicates().timestamp.to_numpy())
    if train_users < 2:
        raise DataError("too few events on one side of the time split", file=source)
    users = np.array(sorted(itertools.chain.from_iterable(users)))
    rng = np.random.default_rng(cfg.seed)
    n_test = max(1, int(round(cfg.data.pinnerformer_test_users * len(users))))
    pf_test_users = set(rng.choice(users, size=n_test, replace=False).tolist())
    # Items known to the models are those of the training period: later items are out of vocabulary, as in production.
    vocab = Vocabulary.build(train_items, sorted(actions), negative_actions, exposure_action)
    return LogFacts(cutoff, split_time, users, pf_test_users, vocab, future_window_ms(cfg, int(ts[-1] - ts[0])),
                    selection_start_ms(np.concatenate(train_times), cfg))


def prepare(log: EventLog, cfg: RunConfig) -> Prepared:
    """Every user's timeline and ranker examples, the whole log in memory."""
    ts, cutoff = validation_period(np.sort(log.events.timestamp.to_numpy()), cfg)
    ev = log.events if cutoff is None else log.events[log.events.timestamp < cutoff].reset_index(drop=True)
    facts = log_facts(ts, [ev], log.negative_actions, log.exposure_action, cutoff, cfg, log.source)
    return build_examples(replace(log, events=ev), facts, cfg)


def actions_by_user(events: pd.DataFrame) -> dict[str, tuple]:
    """Per user, (item ids, action names, timestamps ms) of ``events``: what index_histories_of and the daily jobs take."""
    return {u: (g.item_id.to_numpy(), g.action.to_numpy(), g.timestamp.to_numpy())
            for u, g in events.groupby("user_id", sort=True)}


def build_examples(log: EventLog, facts: LogFacts, cfg: RunConfig) -> Prepared:
    """The timelines and ranker examples of the users of log.events (every user, or one partition's), with the
    facts of the whole log."""
    ev = log.events
    histories = index_histories_of(facts.vocab, actions_by_user(ev))
    users = np.array(sorted(histories))
    impressions, labels = build_impressions(ev, facts.vocab.heads, cfg.data.request_gap_s)
    impressions["is_test"] = impressions.timestamp >= facts.split_time
    return Prepared(log, facts.vocab, facts.split_time, users, histories, impressions, labels,
                    facts.pf_test_users & set(histories), facts.future_window_ms,
                    facts.selection_start)


def build_impressions(ev: pd.DataFrame, heads: list[str], request_gap_s: float):
    """Rows sharing (user, item, timestamp) are one impression; its labels are the set of its actions.

    A ranking request is what a feed sends: one user's page of candidates at one moment. Offline, a request is a
    user's impressions from its first one to request_gap_s after it (a page: 60 s by default); the next impression
    starts the next request. Every impression is scored with its request's time, so its sequence holds every action
    strictly before that moment, including the engagements of minutes ago in the same sitting, and never one of its
    own request. The window is measured from the request's first impression, so a long sitting of closely spaced
    impressions is many requests, not one request frozen at the sitting's start."""
    head_col = {h: i for i, h in enumerate(heads)}
    keys = ["user_id", "item_id", "timestamp"]
    imp = ev[keys].drop_duplicates().sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    row_of = pd.Series(np.arange(len(imp)), index=pd.MultiIndex.from_frame(imp[keys]))
    labels = np.zeros((len(imp), len(heads)), dtype=np.float32)
    has_head = ev.action.isin(head_col)
    rows = row_of.loc[pd.MultiIndex.from_frame(ev.loc[has_head, keys])].to_numpy()
    labels[rows, ev.loc[has_head, "action"].map(head_col).to_numpy()] = 1.0
    imp["request"] = request_ids(imp.user_id.to_numpy(), imp.timestamp.to_numpy(), int(request_gap_s * 1000))
    imp["request_time"] = imp.groupby("request").timestamp.transform("min")
    return imp, labels


def request_ids(users: np.ndarray, ts: np.ndarray, window_ms: int) -> np.ndarray:
    """Request number of each impression (rows sorted by user, then time): a request starts at a user's first
    impression and at every impression more than window_ms after the start of the current request."""
    out = np.empty(len(ts), dtype=np.int64)
    request, start, user = -1, 0, None
    for i, (u, t) in enumerate(zip(users.tolist(), ts.tolist())):
        if u != user or t - start > window_ms:
            request, start, user = request + 1, t, u
        out[i] = request
    return out


def sequences_for(prep: Prepared, user_ids, request_times, max_len: int) -> SequenceBatch:
    empty = History.empty()
    return build_sequences([prep.histories.get(u, empty) for u in user_ids], request_times, max_len)


def item_known_from(prep: Prepared) -> np.ndarray:
    """Per vocabulary row, the time (ms) from which the daily `seqrank refresh` serves the item's own row: the day
    start after its first action that can be a sequence row (an exposure teaches the refresh nothing). Items first
    acted on during the log's first day are known from the start (the log cannot say when they were new); rows no
    action of the training period touches are never known (no refresh would learn them). Over every rank's users
    when each holds its own (distributed.all_max)."""
    ev = prep.log.events[prep.log.events.timestamp.to_numpy() < prep.split_time]
    acted = ev[ev.action.to_numpy() != prep.vocab.exposure_action] if prep.vocab.exposure_action else ev
    never = 2 ** 62
    first = np.full(prep.vocab.n_items, never, dtype=np.int64)
    np.minimum.at(first, prep.vocab.item_index(acted.item_id.to_numpy()), acted.timestamp.to_numpy().astype(np.int64))
    start = int(ev.timestamp.min()) if len(ev) else never
    if prep.partitioned:
        first = -distributed.all_max(-first)
        start = -distributed.all_max(-start)
    known = np.where(first == never, never, day_start(first) + DAY_MS)
    known[day_start(first) == day_start(start)] = -never
    known[:FIRST_ID] = -never  # padding and OOV are what they are
    return known


def day_start(ts_ms) -> np.ndarray:
    """The daily batch: the long-term embedding used at time t was computed from actions before t's day."""
    return (np.asarray(ts_ms, dtype=np.int64) // DAY_MS) * DAY_MS
