"""The item side of each test day as the daily `seqrank refresh` would have served it: what evaluate scores with.

In production new items do not stay the out-of-vocabulary row until the next retrain: every day `seqrank refresh`
learns rows for the items of the day's actions (seqrank.refresh.learn_new_items) and the embed job then embeds every
user with them. An evaluation that scores a whole test period with the training vocabulary measures a system nobody
runs. Here the refreshes are replayed on the log: at each refresh time t after the split, learn_new_items from every
action before t, on top of the previous refresh (append-only: a row never moves), with a step bound only (no wall
clock, so the result is the same on any machine). A test request at time r is then scored with the newest state
learned before r: its vocabulary maps the candidate and the sequence, its table is the ranker's item table, and its
user tower gives the daily user embedding (seqrank.examples.EmbeddingCache, as of r's day).

States are kept under RUN/item_refresh/<t>/ (the layout of RUN/refresh/<N>/, seqrank.refresh.save_item_state) and
reused by later evaluations of the run (learned again when its PinnerFormer or the step bound changed). Refresh
times: every day start inside the test period, or, when the test period has more than `max_refreshes` days, the day
starts at the test requests' 1/K, ..., (K-1)/K quantiles and the first test day (a log whose test period spans months
is refreshed K times, not daily; metrics.json records the times).
"""
from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import RunConfig
from .dataset import Prepared, actions_by_user, day_start
from .examples import EmbeddingCache, RankerExamples
from .exporting import load_user_tower
from .features import OOV, History, Vocabulary, build_sequences
from .refresh import DEFAULT_MAX_STEPS, learn_new_items, save_item_state
from .training import predict

STATE_DIR = "item_refresh"


@dataclass
class ItemState:
    """The item side that serves requests from `since_ms` on (until the next state): the run's own for the first."""
    since_ms: int
    directory: Path
    new_items: int  # items this refresh added (0 for the run's own)


def refresh_times(request_times: np.ndarray, split_time: int, max_refreshes: int) -> list[int]:
    """The day starts after the split at which a refresh runs (see the module's docstring); none for
    max_refreshes 0."""
    if max_refreshes <= 0:
        return []
    days = np.unique(day_start(request_times))
    days = days[days > split_time]
    if len(days) > max_refreshes:
        quantiles = np.quantile(np.sort(request_times), np.arange(1, max_refreshes) / max_refreshes)
        days = np.unique(np.concatenate([days[:1], day_start(quantiles)]))
        days = days[days > split_time]
    return [int(d) for d in days]


def replay_refreshes(run: Path, prep: Prepared, rows: np.ndarray, max_refreshes: int = 8,
                     max_steps: int = DEFAULT_MAX_STEPS) -> list[ItemState]:
    """The item states that serve the impressions `rows` of `prep`: the run's own, then one per refresh time,
    learned (or read back from RUN/item_refresh/) in time order, each on top of the one before; max_refreshes 0:
    the run's own alone."""
    run = Path(run)
    states = [ItemState(-2 ** 62, run, 0)]
    # what a kept state was learned from: a retrained PinnerFormer or another step bound learns it again
    origin = {"pinnerformer_sha256": hashlib.sha256((run / "pinnerformer.safetensors").read_bytes()).hexdigest(),
              "max_steps": max_steps}
    times = refresh_times(prep.impressions.request_time.to_numpy()[rows], prep.split_time, max_refreshes)
    for t in tqdm(times, desc="item refreshes", unit="day"):
        directory = run / STATE_DIR / str(t)
        summary = directory / "refresh.json"
        base = states[-1].since_ms if len(states) > 1 else None  # relative, so a copied run reuses its states
        kept = json.loads(summary.read_text()) if summary.exists() else {}
        if kept.get("base_since_ms", -1) == base and all(kept.get(k) == v for k, v in origin.items()):
            states.append(ItemState(t, directory, kept["new_items"]))
            continue
        learned = learn_new_items(run, states[-1].directory, actions_by_user(prep.log.events[prep.log.events.timestamp < t]), max_steps,
                                  max_seconds=float("inf"))
        if learned is None:  # nothing new to learn that day: yesterday's state serves on
            continue
        directory.mkdir(parents=True, exist_ok=True)
        save_item_state(directory, learned)
        summary.write_text(json.dumps({**origin, "base_since_ms": base, "since_ms": t,
                                       "new_items": int(learned.new_ids.size), "n_items": learned.vocab.n_items,
                                       "learning_users": learned.users, "steps": learned.steps}, indent=2))
        states.append(ItemState(t, directory, int(learned.new_ids.size)))
    return states


@contextmanager
def _item_table(model, table):
    """`model` with the item rows of one refreshed state, its own restored afterwards."""
    trained = model.item_table
    model.item_table = table
    try:
        yield model
    finally:
        model.item_table = trained


class RefreshedTest:
    """Test impressions scored as the daily refresh serves them: each request with the newest item state learned
    before it (its vocabulary, its user tower's daily embeddings, its item table in the ranker)."""

    def __init__(self, cfg: RunConfig, prep: Prepared, rows: np.ndarray, states: list[ItemState]):
        request_time = prep.impressions.request_time.to_numpy()[rows]
        self.n, self.states = len(rows), states
        self.item_ids = prep.impressions.item_id.to_numpy()[rows]
        self.cand_item = np.full(len(rows), OOV, dtype=np.int64)  # each impression's candidate row in its state
        self.parts = []  # (positions in rows, examples, item table, vocabulary)
        ends = [s.since_ms for s in states[1:]] + [2 ** 62]
        users = set(prep.impressions.user_id.to_numpy()[rows])
        for state, end in zip(states, ends):
            positions = np.flatnonzero((request_time >= state.since_ms) & (request_time < end))
            if not len(positions):
                continue
            vocab = Vocabulary.load(state.directory / "vocab") if state.new_items else prep.vocab
            grown = prep if vocab is prep.vocab else prep.with_vocabulary(vocab, users)
            embeddings = EmbeddingCache(load_user_tower(state.directory, cfg, vocab), grown)
            ex = RankerExamples(grown, rows[positions], embeddings, cfg.transact.seq_len)
            self.cand_item[positions] = ex.cand_item
            table = torch.as_tensor(np.load(state.directory / "item_table.npy"))
            self.parts.append((positions, ex, table, vocab))

    def predict(self, model) -> np.ndarray:
        """`model`'s probabilities for every impression, in the order of `rows`; its own item table is restored."""
        out = np.zeros((self.n, len(model.heads.bias)), dtype=np.float32)
        for positions, ex, table, _ in self.parts:
            with _item_table(model, table):
                out[positions] = predict(model, ex)
        return out

    def store_down(self) -> "RefreshedTest":
        """The same impressions scored as during a feature-store outage: preprocess's fallback (no sequence, the
        context's "unavailable" flag set); embedding and item rows as served."""
        view = copy.copy(self)
        view.parts = []
        for positions, ex, table, vocab in self.parts:
            down = copy.copy(ex)
            down.seq = build_sequences([History.empty()] * len(ex.request_time), ex.request_time,
                                       ex.seq.seq_item.shape[1], unavailable=np.ones(len(ex.request_time), bool))
            view.parts.append((positions, down, table, vocab))
        return view

    @torch.no_grad()
    def predict_pairs(self, model, feature: np.ndarray, candidate: np.ndarray, batch: int = 1024) -> np.ndarray:
        """`model`'s probabilities [pairs, heads] for candidate impression `candidate[i]` scored with the features of
        impression `feature[i]` (positions in `rows`), as the server would have at feature[i]'s request: its
        sequence, embedding and context, and the candidate's row in the state serving that request."""
        model.eval()
        out = np.zeros((len(feature), len(model.heads.bias)), dtype=np.float32)
        for positions, ex, table, vocab in self.parts:
            pairs = np.flatnonzero(np.isin(feature, positions))
            with _item_table(model, table):
                for chunk in np.array_split(pairs, -(-len(pairs) // batch)) if len(pairs) else []:
                    inputs = ex.tensors(np.searchsorted(positions, feature[chunk]))[:-1]
                    cand = torch.as_tensor(vocab.item_index(self.item_ids[candidate[chunk]])[:, None])
                    out[chunk] = model(*inputs, cand)[:, 0].numpy()
        return out

    def summary(self) -> dict:
        return {"refresh_times_ms": [s.since_ms for s in self.states[1:]],
                "new_items_per_refresh": [s.new_items for s in self.states[1:]],
                "test_candidates_in_vocabulary": float((self.cand_item != OOV).mean()) if self.n else 0.0}
