"""Training loops: PinnerFormer (dense all-action or next-action) and the TransAct ranker (and its baselines).

Deterministic for a seed (per-epoch generators), checkpointed every epoch in a safe format (state_dicts loaded with
weights_only=True) and resumable: re-running the same command continues from the last finished epoch.
Data-parallel under torchrun (seqrank/distributed.py): every rank builds the same global batch and takes its share
of the rows, or, when each rank holds its own users (Prepared.partitioned, from a dataset), draws its share of each
step's batch from them; DistributedDataParallel averages the gradients. One process is the plain loop.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .config import PinnerFormerConfig, TransActConfig
from .dataset import Prepared, item_known_from
from .features import FIRST_ID, N_CONTEXT, OOV, PAD, UNAVAILABLE, History, Vocabulary, build_sequences
from .models.pinnerformer import PinnerFormer, sampled_softmax_loss, time_features
from .models.transact import TransActRanker, label_weights, time_window_mask, weighted_multitask_bce

if TYPE_CHECKING:  # examples are built from what this module trains (PinnerFormer's embeddings)
    from .examples import RankerExamples

log = logging.getLogger("seqrank.training")


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


class BestEpoch:
    """Model selection on a held-out slice: after every epoch the model's loss on the slice is measured and the
    weights of the best epoch so far are kept; training ends with those weights. Part of the checkpoint, so a
    resumed run selects exactly as an uninterrupted one. Data-parallel, rank 0 measures and every rank gets its
    number, so all of them keep the same epoch; when each rank holds its own users (partitioned), every rank
    measures its part of the slice and the parts are added."""

    def __init__(self, loss_of, partitioned: bool = False):
        self.loss_of = loss_of            # model -> (loss summed over the slice, its weight), in eval mode
        self.partitioned = partitioned
        self.losses: list[float] = []     # the slice's mean loss after each epoch (lower is better)
        self.best: dict | None = None

    def update(self, model) -> None:
        if self.partitioned:
            total, weight = distributed.all_sum(self._measure(model))
        else:
            total, weight = distributed.from_main(lambda: self._measure(model))
        loss = float(total / weight)
        if not self.losses or loss < min(self.losses):
            self.best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.losses.append(loss)

    def _measure(self, model) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            total, weight = self.loss_of(model)
        model.train()
        return float(total), float(weight)

    def state_dict(self) -> dict:
        return {"losses": self.losses, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.best = list(state["losses"]), state["best"]

    @property
    def best_epoch(self) -> int:
        return int(np.argmin(self.losses)) + 1

    def restore(self, model) -> None:
        if self.best is not None:
            model.load_state_dict(self.best)


def _checkpointed_epochs(model, optim, ckpt: Path, epochs: int, run_epoch, desc: str, seed: int,
                         selection=None) -> list[float]:
    """Run epochs [start, epochs) where start is read from the checkpoint; save after each epoch. `selection`
    (BestEpoch): measured after each epoch, and the model ends with its best epoch's weights (on the CPU).
    run_epoch(epoch) -> (rows this rank ran, rows of the global batches). Data-parallel: rank 0 writes the checkpoint
    and every rank resumes from it (the run directory is shared). Returns the seconds of each epoch run here
    (training, selection and checkpoint)."""
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws continue exactly where the finished epoch left them
        if selection is not None:
            selection.load_state_dict(state["selection"])
        start = int(state["epoch"])
    start = distributed.agree(start, f"the epoch {desc} resumes from")
    if start and distributed.is_main():
        log.info("%s: resuming from %s after epoch %d of %d", desc, ckpt, start, epochs)
    seconds = []
    for epoch in tqdm(range(start, epochs), desc=desc, initial=start, total=epochs, unit="epoch",
                      disable=not distributed.is_main()):
        started = time.perf_counter()
        distributed.seed_epoch(seed, epoch)
        model.train()
        here, total = run_epoch(epoch)
        if selection is not None:
            selection.update(model)
        if distributed.is_main():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "epoch": epoch + 1,
                        "torch_rng": torch.get_rng_state(),
                        **({"selection": selection.state_dict()} if selection is not None else {})}, tmp)
            tmp.replace(ckpt)
        seconds.append(round(time.perf_counter() - started, 2))
        if distributed.is_main():
            share = f", rank 0 ran {here} of the epoch's {total} rows" if distributed.world_size() > 1 else ""
            loss = f", selection loss {selection.losses[-1]:.5f}" if selection is not None else ""
            log.info("%s: epoch %d of %d in %.1f s%s%s", desc, epoch + 1, epochs, seconds[-1], share, loss)
        distributed.barrier()  # no rank runs ahead of the checkpoint a restarted group would resume from
    if selection is not None:
        selection.restore(model)
    model.cpu().eval()
    return seconds


def _stream(seed: int, epoch: int, prep: Prepared) -> list[int]:
    """The entropy of an epoch's random draws: (seed, epoch), the same on every rank that draws a global batch; with
    (rank) added when each rank draws batches from its own users (Prepared.partitioned)."""
    return [seed, epoch, distributed.rank()] if prep.partitioned else [seed, epoch]


# ---------------------------------------------------------------- PinnerFormer

def positive_events(histories: Mapping[str, History], vocab: Vocabulary, users,
                    before: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per user: (times, item indices) of positive engagements before `before` (negatives never are targets)."""
    negative = {vocab.actions.index(a) + FIRST_ID for a in vocab.negative_actions}
    out = {}
    for u in users:
        h = histories[u]
        keep = (h.ts < before) & ~np.isin(h.action, list(negative)) & (h.item >= FIRST_ID)
        out[u] = (h.ts[keep], h.item[keep])
    return out


@dataclass
class DenseTargets:
    """What PinnerFormer's loss draws from: the users (those with >= 2 positives before `before`), their histories
    and positives, the window a position's positive is sampled from, and the log sampling probability of every item
    as an in-batch negative (the logQ correction, from the positives' counts)."""
    histories: Mapping[str, History]
    users: list[str]
    positives: dict[str, tuple[np.ndarray, np.ndarray]]
    before: int
    window_ms: int
    n_items: int
    log_q: torch.Tensor
    partitioned: bool = False  # the users are this rank's own (Prepared.partitioned): batches of its own


def dense_targets(histories: Mapping[str, History], vocab: Vocabulary, users, before: int,
                  window_ms: int, device: torch.device | str = "cpu", partitioned: bool = False) -> DenseTargets:
    """The DenseTargets of `users` whose training period ends at `before` (log_q on `device`). partitioned: `users`
    are one rank's share of the log, and the item counts behind log_q are summed over the ranks."""
    positives = positive_events(histories, vocab, users, before)
    users = [u for u in users if len(positives[u][0]) >= 2]
    counts = np.bincount(np.concatenate([positives[u][1] for u in users] or [np.zeros(0, np.int64)]),
                         minlength=vocab.n_items)
    counts = distributed.over_log(counts, partitioned)
    if not users:
        raise ValueError("no user has 2 or more positive engagements to learn from"
                         + (" in this process's partition: run fewer processes" if partitioned else ""))
    log_q = torch.as_tensor(np.log(np.maximum(counts, 1) / counts.sum()), dtype=torch.float32, device=device)
    return DenseTargets(histories, users, positives, before, window_ms, vocab.n_items, log_q, partitioned)


def dense_batch(data: DenseTargets, cfg: PinnerFormerConfig, batch_users, rng):
    """A random "as of" point per user inside the training period, its sequence built like a request's, and the
    (row, position, target item) of each query the objective draws: the next positive (next_action) or a random
    positive of the window after the position (dense_all_action)."""
    as_of = []
    for u in batch_users:
        ts = data.histories[u].ts
        n_train = int(np.searchsorted(ts, data.before))
        as_of.append(ts[rng.integers(1, n_train + 1) - 1] + 1 if n_train else data.before)
    empty = History.empty()
    seq = build_sequences([data.histories.get(u, empty) for u in batch_users], as_of, cfg.max_len)
    rows, cols, targets = [], [], []
    for b, u in enumerate(batch_users):
        p_ts, p_item = data.positives[u]
        valid = np.flatnonzero(seq.seq_mask[b])
        t = seq.seq_ts[b, valid]
        lo = np.searchsorted(p_ts, t, side="right")          # strictly after the position's action
        hi = np.searchsorted(p_ts, t + data.window_ms, side="right")
        if cfg.objective == "next_action":
            ok = lo < len(p_ts)
            pick = lo
        elif cfg.objective == "dense_all_action":
            ok = lo < hi
            pick = lo + (rng.random(len(lo)) * np.maximum(hi - lo, 1)).astype(np.int64)
        else:
            raise ValueError(f"objective must be dense_all_action or next_action, got {cfg.objective!r}")
        cand = np.flatnonzero(ok)
        if len(cand) == 0:
            continue
        chosen = rng.choice(cand, size=min(cfg.positions_per_user, len(cand)), replace=False)
        rows += [b] * len(chosen)
        cols += valid[chosen].tolist()
        targets += p_item[np.minimum(pick[chosen], len(p_item) - 1)].tolist()
    return seq, np.array(rows), np.array(cols), np.array(targets)


def _pinnerformer_outputs(model: PinnerFormer, item, action, tfeat, mask, query_rows, query_cols, targets, random):
    """What one training step needs from PinnerFormer, in one call (distributed.data_parallel): the queries (the
    user embeddings at the chosen positions), the targets' and the random negatives' item embeddings, the
    temperature."""
    out = model.encode(item, action, tfeat, mask)
    return (out[query_rows, query_cols], model.item_embeddings(targets), model.item_embeddings(random),
            model.temperature)


def dense_epoch(model: PinnerFormer, optim, data: DenseTargets, cfg: PinnerFormerConfig, rng, step=None,
                allow_step: Callable[[], bool] | None = None) -> tuple[int, int]:
    """One pass over data.users in a random order, one optimizer step per batch of cfg.batch_users users (a batch
    with fewer than 2 queries is skipped). Under torchrun (`step` = distributed.data_parallel(model,
    _pinnerformer_outputs)) either every rank draws the same global batch, encodes its share of the batch's users and
    scores their queries against all of the batch's targets and the shared random negatives; or, with partitioned
    data, every rank draws 1/W of the batch from its own users (`rng` is then the rank's own) and scores its queries
    against its own batch's targets (the in-batch negatives of one rank) and its random negatives. `allow_step` is
    asked before each batch; False ends the pass (a budget). Returns (rows this rank trained on, rows of all
    batches)."""
    step = step or distributed.data_parallel(model, _pinnerformer_outputs)
    dev = data.log_q.device
    n_real = data.n_items - FIRST_ID
    order = rng.permutation(len(data.users))
    size = -(-cfg.batch_users // distributed.world_size()) if data.partitioned else cfg.batch_users
    batches = [order[s:s + size] for s in range(0, len(order), size)]
    if data.partitioned:
        batches = distributed.padded_steps(batches)
    here = total = 0
    for batch in batches:
        if allow_step is not None and not allow_step():
            break
        users = order[:1] if batch is None else batch  # None: a stand-in of one user, weighted 0 (padded_steps)
        seq, rows, cols, targets = dense_batch(data, cfg, [data.users[i] for i in users], rng)
        if data.partitioned:  # the rank's batch is its own: all its rows and queries, weighed by its share of queries
            n_rows, n_queries = (0, 0) if batch is None else (len(seq.seq_mask), len(rows))
            rows_all, queries_all = distributed.all_sum([n_rows, n_queries]).astype(int)
            if queries_all < 2:
                continue
            scale = distributed.local_factor(n_queries, queries_all)
            mine = np.arange(len(seq.seq_mask))
            if n_queries == 0:  # joins the step with its first row and one stand-in query, weighted 0
                mine, rows, cols, targets = (np.zeros(1, np.int64), np.zeros(1, np.int64),
                                             np.flatnonzero(seq.seq_mask[0])[:1], np.full(1, FIRST_ID))
            queries = np.arange(len(rows))
            here, total = here + n_rows, total + rows_all
        else:
            if len(rows) < 2:
                continue
            mine, scale = distributed.shard(len(seq.seq_mask))
            queries = np.flatnonzero(np.isin(rows, mine))
            here, total = here + int(scale > 0) * len(mine), total + len(seq.seq_mask)
        rnd = torch.as_tensor(rng.integers(FIRST_ID, data.n_items, cfg.random_negatives), device=dev)
        L = int(seq.seq_mask[mine].sum(1).max())
        t = lambda a: torch.as_tensor(a[mine, :L], device=dev)  # noqa: E731 - this rank's rows, no padding columns
        tgt = torch.as_tensor(targets, device=dev)
        query, target_emb, random_emb, temperature = step(
            t(seq.seq_item), t(seq.seq_action),
            torch.as_tensor(time_features(seq.seq_ts[mine, :L], seq.seq_mask[mine, :L]), device=dev),
            t(seq.seq_mask), torch.as_tensor(np.searchsorted(mine, rows[queries]), device=dev),
            torch.as_tensor(cols[queries], device=dev), tgt, rnd)
        loss = sampled_softmax_loss(
            query, target_emb, tgt, torch.as_tensor(rows, device=dev), random_emb, rnd, data.log_q[tgt],
            torch.full((len(rnd),), -float(np.log(n_real)), device=dev), temperature,
            query_index=torch.as_tensor(queries, device=dev)) * scale
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
    return here, total


def train_pinnerformer(prep: Prepared, cfg: PinnerFormerConfig, seed: int, ckpt: Path) -> PinnerFormer:
    torch.manual_seed(seed)
    dev = distributed.device()
    model = PinnerFormer(cfg, prep.vocab.n_items, prep.vocab.n_actions).to(dev)
    # The item table gets its own, larger step: its rows start at N(0, 1) (norm ~sqrt(d)) and move only when sampled,
    # so at the dense weights' lr (~1e-3 of that norm per step) they barely turn in a few hundred steps, and the towers
    # sit at chance (user embeddings all alike) -- measured on a planted-signal log (tests/test_planted.py).
    table = [model.item_emb.weight]
    dense = [p for name, p in model.named_parameters() if name != "item_emb.weight"]
    optim = torch.optim.AdamW([{"params": dense}, {"params": table, "lr": cfg.item_lr}], lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    users = [u for u in prep.users if u not in prep.pf_test_users]
    data = dense_targets(prep.histories, prep.vocab, users, prep.split_time, prep.future_window_ms, dev,
                         prep.partitioned)
    step = distributed.data_parallel(model, _pinnerformer_outputs)

    def run_epoch(epoch):
        return dense_epoch(model, optim, data, cfg, np.random.default_rng(_stream(seed, epoch, prep)), step)

    model.epoch_seconds = _checkpointed_epochs(model, optim, ckpt, cfg.epochs, run_epoch,
                                               f"pinnerformer[{cfg.objective}]", seed)
    return model


@torch.no_grad()
def embed_users(model: PinnerFormer, histories: Mapping[str, History], user_ids, as_of_ms,
                batch: int = 512) -> np.ndarray:
    """The daily batch job: each user's embedding from their actions strictly before `as_of` (zeros if none).
    histories: user -> History (a run's Prepared.histories, or actions read back from the feature store)."""
    model.eval()
    user_ids, as_of = list(user_ids), np.asarray(as_of_ms, dtype=np.int64)
    empty = History.empty()
    out = np.zeros((len(user_ids), model.cfg.dim), dtype=np.float32)
    for s in range(0, len(user_ids), batch):
        seq = build_sequences([histories.get(u, empty) for u in user_ids[s:s + batch]], as_of[s:s + batch],
                              model.cfg.max_len)
        out[s:s + batch] = pinnerformer_embed(model, seq).numpy()
    return out


def pinnerformer_embed(model: PinnerFormer, seq) -> torch.Tensor:
    return model(torch.as_tensor(seq.seq_item), torch.as_tensor(seq.seq_action),
                 torch.as_tensor(time_features(seq.seq_ts, seq.seq_mask)), torch.as_tensor(seq.seq_mask))


@torch.no_grad()
def item_table(model: PinnerFormer) -> np.ndarray:
    """Item embeddings for the ranker and retrieval; padding row zeros, OOV row = the mean item direction."""
    table = model.item_embeddings().numpy().copy()
    table[0] = 0.0
    mean = table[FIRST_ID:].mean(0)
    table[1] = mean / max(np.linalg.norm(mean), 1e-6)
    return table


# ---------------------------------------------------------------- ranker

def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng, pool: int = 32):
    """Shuffled batches of similar sequence length (padding columns are trimmed per batch, so this roughly halves
    the transformer's work); batches are drawn from random pools, then their order is shuffled."""
    order = rng.permutation(len(lengths))
    batches = []
    for s in range(0, len(order), batch_size * pool):
        chunk = order[s:s + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [np.sort(chunk[i:i + batch_size]) for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def build_ranker(cfg: TransActConfig, prep: Prepared, table: np.ndarray, user_dim: int) -> TransActRanker:
    return TransActRanker(cfg, table, prep.vocab.n_actions, user_dim, N_CONTEXT, len(prep.vocab.heads))


def candidate_oov_share(prep: Prepared) -> float:
    """The share of the ranker's training candidates it learns as the out-of-vocabulary row: not yet served by the
    daily refresh at their request (as_served), or outside the vocabulary; over every rank's candidates."""
    imp = prep.impressions.iloc[prep.ranker_train_rows()]
    cand = prep.vocab.item_index(imp.item_id.to_numpy())
    hidden = (cand == OOV) | (item_known_from(prep)[cand] > imp.request_time.to_numpy())
    count, n = distributed.over_log([int(hidden.sum()), len(hidden)], prep.partitioned)
    return float(count / n) if n else 0.0


def as_served(known_from: torch.Tensor, request_time: np.ndarray, inputs: tuple) -> tuple:
    """A batch's inputs (RankerExamples.tensors) with every item the daily refresh had not yet served at the request
    shown as the out-of-vocabulary row, in the sequence and as the candidate (dataset.item_known_from): what the
    served model saw then. A vocabulary holds every training item, so without this an item's first day would be
    learned with a row no server had yet, and the OOV row would never mean "new today", which it does in serving."""
    seq_item, seq_action, seq_mask, user_emb, context, cand = inputs
    t = torch.as_tensor(request_time)[:, None]
    return (torch.where(known_from[seq_item] > t, OOV, seq_item), seq_action, seq_mask, user_emb, context,
            torch.where(known_from[cand] > t, OOV, cand))


def store_outage(inputs: tuple, down: torch.Tensor) -> tuple:
    """A batch's inputs with the rows ``down`` as a store outage serves them (features.build_sequences with
    ``unavailable``): no sequence, a zero count and last-action gap, the "unavailable" flag set. Training only."""
    seq_item, seq_action, seq_mask, user_emb, context, cand = inputs
    d = down[:, None]
    context = context.clone()
    context[down, :2] = 0.0            # the history count and the hours since the last action
    context[down, UNAVAILABLE] = 1.0
    return (seq_item.masked_fill(d, PAD), seq_action.masked_fill(d, PAD), seq_mask & ~d, user_emb, context, cand)


def train_ranker(prep: Prepared, cfg: TransActConfig, table: np.ndarray, user_dim: int, train: RankerExamples,
                 seed: int, ckpt: Path, selection: RankerExamples | None = None) -> TransActRanker:
    """The ranker on `train`; with `selection` (later impressions of the training period), the epoch whose loss
    on them is lowest is kept (BestEpoch)."""
    torch.manual_seed(seed)
    dev = distributed.device()
    model = build_ranker(cfg, prep, table, user_dim).to(dev)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    negative_heads = torch.as_tensor([h in prep.vocab.negative_actions for h in prep.vocab.heads])

    def loss(logits, labels, total_weight=None):
        return weighted_multitask_bce(logits, labels, negative_heads.to(logits.device), cfg.negative_label_weight,
                                      total_weight)

    lengths = train.seq.seq_mask.sum(1)
    if not len(lengths):
        raise ValueError("no training impression to learn from"
                         + (" in this process's partition: run fewer processes" if prep.partitioned else ""))
    known_from = torch.as_tensor(item_known_from(prep))  # train on items as they were served, not as known today
    step = distributed.data_parallel(model, lambda m, *inputs, attn_mask: m.logits(*inputs, attn_mask=attn_mask))

    def run_epoch(epoch):
        rng = np.random.default_rng(_stream(seed, epoch, prep))
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(_stream(seed, epoch, prep)).generate_state(1)[0])
                                            if prep.partitioned else seed * 1000 + epoch)
        size = -(-cfg.batch_size // distributed.world_size()) if prep.partitioned else cfg.batch_size
        batches = length_bucketed_batches(lengths, size, rng)
        if prep.partitioned:
            batches = distributed.padded_steps(batches)
        here = total = 0
        for idx in batches:
            # a global batch: every rank draws the whole batch's outages and time-window masks (the same
            # generator stream as one process), then runs its share of the rows against the batch's total label
            # weight; a partitioned rank draws and runs its own batch against the weight of all ranks' batches
            rows = batches[0][:1] if idx is None else idx  # None: a stand-in of one row, weighted 0 (padded_steps)
            inputs = as_served(known_from, train.request_time[rows], train.tensors(rows))
            if cfg.history_outage_share > 0:
                inputs = store_outage(inputs, torch.rand(len(rows), generator=gen) < cfg.history_outage_share)
            seq_item, seq_action, seq_mask, user_emb, context, cand = inputs
            L = seq_mask.shape[1]
            age = torch.as_tensor((train.request_time[rows, None] - train.seq.seq_ts[rows, :L]) / 1000.0)
            window = time_window_mask(seq_mask, age, cfg.time_window_max_h, gen)  # training only
            labels = torch.as_tensor(train.labels[rows])
            weight = label_weights(labels, negative_heads, cfg.negative_label_weight).sum()
            if prep.partitioned:
                n_rows, weight_here = (0, 0.0) if idx is None else (len(rows), float(weight))
                rows_all, weight_all = distributed.all_sum([n_rows, weight_here])
                total_weight = torch.tensor(weight_all, dtype=torch.float32)
                mine, scale = np.arange(len(rows)), float(distributed.world_size() * (idx is not None))
                here, total = here + n_rows, total + int(rows_all)
            else:
                total_weight = weight
                mine, scale = distributed.shard(len(rows))
                here, total = here + int(scale > 0) * len(mine), total + len(rows)
            mine = torch.as_tensor(mine)
            L = max(1, int(seq_mask[mine].sum(1).max()))  # this rank's rows need fewer padding columns
            seqs = [x[mine, :L].to(dev) for x in (seq_item, seq_action, seq_mask)]
            logits = step(*seqs, *(x[mine].to(dev) for x in (user_emb, context, cand)),
                          attn_mask=window[mine, :L].to(dev))[:, 0]
            batch_loss = loss(logits, labels[mine].to(dev), total_weight.to(dev)) * scale
            optim.zero_grad()
            batch_loss.backward()
            optim.step()
        return here, total

    def selection_loss(m):
        """The selection slice's weighted loss: (sum, weight), added over the ranks when each holds its own users."""
        if len(selection) == 0:  # a rank whose users have no impression in the slice
            return 0.0, 0.0
        logits = np.concatenate([m.logits(*(x.to(dev) for x in as_served(known_from, selection.request_time[idx],
                                                                           selection.tensors(idx))))[:, 0].cpu().numpy()
                                 for idx in np.array_split(np.arange(len(selection)), -(-len(selection) // 1024))])
        labels = torch.as_tensor(selection.labels)
        return (float(loss(torch.as_tensor(logits), labels, torch.tensor(1.0))),
                float(label_weights(labels, negative_heads, cfg.negative_label_weight).sum()))

    best = BestEpoch(selection_loss, prep.partitioned) if selection is not None and distributed.over_log(len(selection), prep.partitioned) > 0 \
        else None
    model.epoch_seconds = _checkpointed_epochs(model, optim, ckpt, cfg.epochs, run_epoch,
                                               f"ranker[{cfg.sequence_encoder}]", seed, best)
    model.selected_epoch = best.best_epoch if best is not None else cfg.epochs
    return model


@torch.no_grad()
def predict(model: TransActRanker, ex: RankerExamples, batch: int = 1024) -> np.ndarray:
    model.eval()
    out = [model(*ex.tensors(np.arange(s, min(s + batch, len(ex)))))[:, 0].numpy()
           for s in range(0, len(ex), batch)]
    return np.concatenate(out) if out else np.zeros((0, len(model.heads.bias)), dtype=np.float32)
