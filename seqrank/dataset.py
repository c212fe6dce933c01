"""From an event log to model inputs: time split, vocabulary, per-user histories, ranker examples.

Examples and serving requests go through the same seqrank.features functions; this module only decides
*which* (user, request time, candidates) to build, never *how* a feature is computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import RunConfig
from .data.loaders import DataError, EventLog, add_sampled_negatives, load_events
from .features import History, SequenceBatch, Vocabulary, build_sequences, index_history

DAY_MS = 86_400_000


@dataclass
class Prepared:
    log: EventLog
    vocab: Vocabulary
    split_time: int                  # ms: train period < split_time <= test period
    users: np.ndarray                # sorted user ids (str)
    histories: dict[str, History]    # every user's full history (both periods), vocabulary indices
    impressions: pd.DataFrame        # user_id, item_id, timestamp, request_time, session, is_test
    labels: np.ndarray               # float32 [E, H] aligned with impressions
    pf_test_users: set[str]          # users held out from PinnerFormer training
    future_window_ms: int            # PinnerFormer's dense all-action window, resolved for this log
    unseen_item_share: float         # share of impressions whose item training never saw (unseen_item_share below)
    embedding_end: int               # ms: PinnerFormer and the vocabulary learn from events before it (<= split_time)
    ranker_start: int                # ms: the ranker trains on the training impressions at or after it
    ranker_users: set[str] | None = None  # the users whose impressions the ranker trains on (None: every user)

    def ranker_train_rows(self) -> np.ndarray:
        """The impressions the ranker trains on: the training period from ranker_start, of ranker_users."""
        imp = self.impressions
        keep = ~imp.is_test.to_numpy() & (imp.timestamp.to_numpy() >= self.ranker_start)
        if self.ranker_users is not None:
            keep &= imp.user_id.isin(self.ranker_users).to_numpy()
        return np.flatnonzero(keep)

    def test_rows(self) -> np.ndarray:
        return np.flatnonzero(self.impressions.is_test.to_numpy())


PAPER_WINDOW_DAYS = 28.0  # PinnerFormer's dense all-action window


def future_window_ms(cfg: RunConfig, span_ms: int) -> int:
    """The window a position's positive is sampled from. The paper uses 28 days of a years-long log; a short log
    cannot fill that, so by default it is the test horizon (test_fraction x span: 2.8 days on the 14-day KuaiRand
    log), never more than 28 days. An explicit future_window_days wins."""
    days = cfg.pinnerformer.future_window_days
    if days is None:
        return int(min(PAPER_WINDOW_DAYS * DAY_MS, cfg.data.test_fraction * span_ms))
    return int(days * DAY_MS)


def unseen_item_share(train_ev: pd.DataFrame, cfg: RunConfig) -> float:
    """How many of the impressions a ranker will score show an item it never saw in training, estimated inside the
    training period alone (its last test_fraction against the items of what came before), so the test period is
    never looked at. The ranker's default candidate_oov_rate: KuaiRand 0.51 (the test period's own share: 0.48),
    MovieLens 100K 0.015 (0.008)."""
    inner_split = split_time_ms(train_ev, cfg)
    seen = train_ev.item_id[train_ev.timestamp < inner_split].unique()
    later = train_ev.loc[train_ev.timestamp >= inner_split, ["user_id", "item_id", "timestamp"]].drop_duplicates()
    return float((~later.item_id.isin(seen)).mean()) if len(later) else 0.0


def load_log(events: str, cfg: RunConfig, negative_actions=None) -> EventLog:
    log = load_events(events, negative_actions=negative_actions or cfg.data.negative_actions, min_users=5)
    if not log.negative_actions and log.exposure_action is None:
        # Without hides or logged exposures every impression is positive: sample shown-but-not-engaged items.
        log = add_sampled_negatives(log, cfg.data.sampled_negatives_per_positive, seed=cfg.seed)
    return log


def split_time_ms(events: pd.DataFrame, cfg: RunConfig) -> int:
    """Train period < split time <= test period: the last test_fraction of the log's time span is the test period."""
    t0, t1 = int(events.timestamp.min()), int(events.timestamp.max())
    return int(t0 + (1.0 - cfg.data.test_fraction) * (t1 - t0))


def embedding_period_ms(t0: int, split_time: int, cfg: RunConfig) -> tuple[int, int]:
    """(embedding_end, ranker_start). With embedding_period p < 1, PinnerFormer (item table, user tower) and the
    vocabulary learn from the first p of the training period and the ranker from the rest: a ranker example's item
    embedding was then learned without the example's outcome, as at serving time, when every embedding predates the
    request (a pretrained table learned on the ranker's own period encodes its labels: README, session 12).
    p = 1: both learn from the whole training period."""
    p = cfg.data.embedding_period
    if not 0.0 < p <= 1.0:
        raise ValueError(f"data.embedding_period must be in (0, 1], got {p}")
    if p >= 1.0:
        return split_time, t0
    end = int(t0 + p * (split_time - t0))
    return end, end


def prepare(log: EventLog, cfg: RunConfig) -> Prepared:
    ev = log.events
    t0, t1 = int(ev.timestamp.min()), int(ev.timestamp.max())
    split_time = split_time_ms(ev, cfg)
    embedding_end, ranker_start = embedding_period_ms(t0, split_time, cfg)
    train_ev = ev[ev.timestamp < split_time]
    if train_ev.user_id.nunique() < 2 or (ev.timestamp >= split_time).sum() == 0:
        raise DataError("too few events on one side of the time split", file=log.source)
    if (ev.timestamp < embedding_end).sum() == 0 or (train_ev.timestamp >= ranker_start).sum() == 0:
        raise DataError(f"data.embedding_period {cfg.data.embedding_period} leaves no events for PinnerFormer or "
                        "for the ranker", file=log.source)
    users = np.array(sorted(ev.user_id.unique()))
    rng = np.random.default_rng(cfg.seed)
    n_test = max(1, int(round(cfg.data.pinnerformer_test_users * len(users))))
    pf_test_users = set(rng.choice(users, size=n_test, replace=False).tolist())
    ranker_users = held_out_ranker_users(cfg, pf_test_users, log.source)
    # Items known to the models are those PinnerFormer learned: later items are out of vocabulary, as in production.
    learned = ev.timestamp < embedding_end
    if ranker_users is not None:
        learned &= ~ev.user_id.isin(pf_test_users)
    vocab = Vocabulary.build(ev.item_id[learned].to_numpy(), ev.action.unique(),
                             log.negative_actions, log.exposure_action)
    histories = {u: index_history(vocab, g.item_id.to_numpy(), g.action.to_numpy(), g.timestamp.to_numpy())
                 for u, g in ev.groupby("user_id", sort=True)}
    impressions, labels = build_impressions(ev, vocab.heads, cfg.data.session_gap_s)
    impressions["is_test"] = impressions.timestamp >= split_time
    return Prepared(log, vocab, split_time, users, histories, impressions, labels, pf_test_users,
                    future_window_ms(cfg, t1 - t0), unseen_item_share(train_ev, cfg), embedding_end, ranker_start,
                    ranker_users)


def held_out_ranker_users(cfg: RunConfig, pf_test_users: set[str], source) -> set[str] | None:
    """data.ranker_users "held_out": the ranker learns only from users PinnerFormer never trained on, so the item
    table cannot encode a training example's own outcome (a table learned on the ranker's own impressions does:
    README, session 12), at the cost of the ranker's share of users instead of the embedding period's share of time."""
    if cfg.data.ranker_users == "all":
        return None
    if cfg.data.ranker_users != "held_out":
        raise ValueError(f'data.ranker_users must be "all" or "held_out", got {cfg.data.ranker_users!r}')
    if not 0.0 < cfg.data.pinnerformer_test_users < 1.0:
        raise DataError("data.ranker_users held_out needs data.pinnerformer_test_users in (0, 1)", file=source)
    return set(pf_test_users)


def build_impressions(ev: pd.DataFrame, heads: list[str], session_gap_s: float):
    """Rows sharing (user, item, timestamp) are one impression; its labels are the set of its actions.
    A session (gap > session_gap_s starts a new one) is one ranking request made at the session's first action:
    every impression of the session is ranked with the features available at that time."""
    head_col = {h: i for i, h in enumerate(heads)}
    keys = ["user_id", "item_id", "timestamp"]
    imp = ev[keys].drop_duplicates().sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
    row_of = pd.Series(np.arange(len(imp)), index=pd.MultiIndex.from_frame(imp[keys]))
    labels = np.zeros((len(imp), len(heads)), dtype=np.float32)
    has_head = ev.action.isin(head_col)
    rows = row_of.loc[pd.MultiIndex.from_frame(ev.loc[has_head, keys])].to_numpy()
    labels[rows, ev.loc[has_head, "action"].map(head_col).to_numpy()] = 1.0
    gap = imp.groupby("user_id").timestamp.diff()
    new_session = gap.isna() | (gap > session_gap_s * 1000)
    imp["session"] = np.cumsum(new_session.to_numpy())
    imp["request_time"] = imp.groupby("session").timestamp.transform("min")
    return imp, labels


def sequences_for(prep: Prepared, user_ids, request_times, max_len: int) -> SequenceBatch:
    empty = History.empty()
    return build_sequences([prep.histories.get(u, empty) for u in user_ids], request_times, max_len)


def day_start(ts_ms) -> np.ndarray:
    """The daily batch: the long-term embedding used at time t was computed from actions before t's day."""
    return (np.asarray(ts_ms, dtype=np.int64) // DAY_MS) * DAY_MS
