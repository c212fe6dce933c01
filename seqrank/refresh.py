"""`seqrank refresh`: items first seen after training reach the served model without a retrain.

What it learns: one PinnerFormer item-embedding row per item the served vocabulary does not know, from today's
actions (the feature store, or an events file), with the run's own loss and feature path (training.dense_targets /
dense_epoch: the dense all-action sampled softmax over sequences built like a request's). Everything else is frozen:
the transformer, the item tower, the temperature and every row of the training vocabulary. Rows added by earlier
refreshes keep learning from each day's actions. New rows start at the mean of the known rows (an average item).
Only the users whose actions touch such rows are read, and an item is added when it occurs in the history of a user
with 2 or more positive engagements (someone to learn it from); other unknown items stay out of the vocabulary until
a later day. Bounded: at most the run's PinnerFormer epochs over those users, `max_steps` optimizer steps and
`max_seconds` of training, whichever ends first.

What it writes (append-only: every known item keeps its row, so old indices never change):
- RUN/refresh/<N>/: the item side as of version N (vocab/ with item_rows.npy, pinnerformer.safetensors,
  item_table.npy, refresh.json): the next refresh starts from it and `seqrank embed` reads the newest one;
- REPO/ranker/<N>/: the trained ranker re-exported with its item table grown by the new rows (ONNX, parity-checked);
  the ranker configs' `n_items` follows (seqrank.exporting.triton_config);
- REPO/preprocess/<N>/: its model file and tables, the vocabulary mapping the new items.
N is one more than the newest version of either model. Each directory is staged beside its destination and renamed
into place, the ranker before the preprocess. With `servers`, each server (model control mode explicit) then loads
ranker N, waits for it, and loads preprocess N (seqrank.server.model_control): until preprocess switches, new items
are the OOV row, never out of the ranker's range. Version 1 of a repository is `seqrank export`'s, the run itself.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from .exporting import triton_config
from .config import RunConfig
from .dataset import DAY_MS, PAPER_WINDOW_DAYS
from .exporting import load_ranker, load_user_tower, write_ranker_version
from .features import FIRST_ID, Vocabulary, as_bytes_array, index_histories_of
from .models.pinnerformer import PinnerFormer
from .training import dense_epoch, dense_targets

REFRESH_DIR = "refresh"
DEFAULT_MAX_STEPS = 2000
DEFAULT_MAX_SECONDS = 900.0
_log = logging.getLogger(__name__)


class RefreshError(RuntimeError):
    """A run or repository the refresh cannot build on; the message names the path."""


def version_numbers(directory: Path) -> list[int]:
    """The numbered subdirectories of ``directory`` (a model's versions, a run's refreshes), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def item_state_dir(run: Path, version: int | None = None) -> Path:
    """Where a run's item side (vocab/, pinnerformer.safetensors, item_table.npy) is as of repository ``version``:
    the run itself for version 1 (what `seqrank export` wrote), RUN/refresh/<version> for a refreshed one; None:
    the newest."""
    run = Path(run)
    if version is None:
        refreshed = version_numbers(run / REFRESH_DIR)
        return run / REFRESH_DIR / str(refreshed[-1]) if refreshed else run
    if version == 1:
        return run
    state = run / REFRESH_DIR / str(version)
    if not (state / "vocab").is_dir():
        raise RefreshError(f"{state}: no item state for repository version {version}: that version was not "
                           f"written by `seqrank refresh` from this run")
    return state


@dataclass
class Budget:
    """The refresh's bound: at most ``max_steps`` optimizer steps and ``max_seconds`` from its creation."""
    max_steps: int
    max_seconds: float
    steps: int = 0
    started: float = field(default_factory=time.monotonic)

    def allow_step(self) -> bool:
        if self.steps >= self.max_steps or self.elapsed >= self.max_seconds:
            return False
        self.steps += 1
        return True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def spent(self) -> bool:
        return self.steps >= self.max_steps or self.elapsed >= self.max_seconds


def _engaged_item_ids(actions: dict[str, tuple], exposure: str | None) -> np.ndarray:
    """Every item id of the actions that can be a sequence row (exposures never are)."""
    ids = []
    for items, names, _ in actions.values():
        items = as_bytes_array(items)
        if exposure is not None:
            items = items[as_bytes_array(names) != exposure.encode()]
        ids.append(items)
    return np.concatenate(ids) if ids else np.zeros(0, dtype=object)


def learnable_items(base: Vocabulary, actions: dict[str, tuple], trained_rows: int, before: int,
                    window_ms: int) -> np.ndarray:
    """The ids unknown to ``base`` that occur in the history of a user the refresh learns from: one whose actions
    touch a row at or past ``trained_rows`` and who has 2 or more positive engagements."""
    candidate, unknown = base.append_items(_engaged_item_ids(actions, base.exposure_action))
    if unknown.size == 0:
        return unknown
    histories = index_histories_of(candidate, actions)
    try:
        data = dense_targets(histories, candidate, _touching(histories, trained_rows), before, window_ms)
    except ValueError:
        return unknown[:0]
    rows = np.unique(np.concatenate([histories[u].item for u in data.users]))
    rows = rows[rows >= base.n_items]
    return np.sort(candidate.items[np.isin(candidate.rows, rows)])


def _touching(histories, first_row: int) -> list[str]:
    return sorted(u for u, h in histories.items() if (h.item >= first_row).any())


def grown_user_tower(base: PinnerFormer, n_items: int, trained_rows: int) -> PinnerFormer:
    """``base`` with item rows up to ``n_items`` (the new ones at the mean known row), every weight frozen but the
    item rows at or past ``trained_rows`` (a gradient hook zeroes the others' gradient)."""
    model = PinnerFormer(base.cfg, n_items, base.action_emb.num_embeddings)
    state = base.state_dict()
    known = state["item_emb.weight"]
    start = known[FIRST_ID:].mean(0, keepdim=True).expand(n_items - known.shape[0], -1)
    state["item_emb.weight"] = torch.cat([known, start])
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    table = model.item_emb.weight
    table.requires_grad_(True)
    frozen = (torch.arange(n_items) < trained_rows)[:, None]
    table.register_hook(lambda grad: grad.masked_fill(frozen, 0.0))
    return model


def learn_rows(model: PinnerFormer, data, cfg, seed: int, budget: Budget) -> int:
    """Train the unfrozen item rows of ``model`` on ``data`` (training.DenseTargets) within ``budget``; returns
    the epochs started. Adam without weight decay at the table's training rate (item_lr): a row that no batch
    touches never moves."""
    optim = torch.optim.Adam([model.item_emb.weight], lr=cfg.item_lr)
    torch.manual_seed(seed)  # dropout draws
    model.train()
    epochs = 0
    while epochs < cfg.epochs and not budget.spent:
        dense_epoch(model, optim, data, cfg, np.random.default_rng([seed, epochs]), allow_step=budget.allow_step)
        epochs += 1
    model.eval()
    return epochs


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _copy_code(src: Path, dst: Path) -> None:
    """The model files of a version that the refresh does not regenerate (the Python backends' *.py)."""
    for f in src.glob("*.py"):
        shutil.copy2(f, dst / f.name)


def _publish(staged: Path, final: Path) -> None:
    if final.exists():  # a version left behind by an interrupted refresh that no server loaded
        shutil.rmtree(final)
    staged.rename(final)


def set_ranker_n_items(repository: Path, n_items: int) -> list[Path]:
    """Every ranker config that declares `n_items` (the CPU ranker's id bound) -> ``n_items``; the changed files."""
    changed = []
    ranker = Path(repository) / "ranker"
    for path in [ranker / "config.pbtxt", *sorted((ranker / "configs").glob("*.pbtxt"))]:
        if path.exists() and triton_config.edit(path, lambda c: triton_config.fill(c, {}, {"n_items": n_items}, path)):
            changed.append(path)
    return changed


def window_of(cfg: RunConfig, info: dict) -> int:
    """The run's dense all-action window (ms): the one its training resolved (run.json), else the config's, else
    the paper's 28 days."""
    days = info.get("future_window_days") or cfg.pinnerformer.future_window_days or PAPER_WINDOW_DAYS
    return int(float(days) * DAY_MS)


@dataclass
class Learned:
    """What learn_new_items produced: the grown vocabulary, the user tower with the learned rows, the ranker's item
    table grown to match, the ids added, and how the training went."""
    vocab: Vocabulary
    tower: PinnerFormer
    table: np.ndarray
    new_ids: np.ndarray
    users: int
    steps: int
    epochs: int
    seconds: float


def learn_new_items(run: Path, base_dir: Path, actions: dict[str, tuple], max_steps: int = DEFAULT_MAX_STEPS,
                    max_seconds: float = DEFAULT_MAX_SECONDS) -> Learned | None:
    """Rows for the items of ``actions`` (user -> (item ids, action names, timestamps ms)) unknown to the item state
    in ``base_dir`` (item_state_dir), learned on top of it; None when there is no item to learn."""
    run = Path(run)
    cfg = RunConfig.load_saved(run)
    base = Vocabulary.load(Path(base_dir) / "vocab", mmap=False)
    trained_rows = Vocabulary.load(run / "vocab").n_items  # the training vocabulary's rows: frozen
    newest = max((int(np.max(ts)) for _, _, ts in actions.values() if len(ts)), default=None)
    if newest is None:
        return None
    before = newest + 1  # every action counts
    window_ms = window_of(cfg, json.loads((run / "run.json").read_text()))
    new_ids = learnable_items(base, actions, trained_rows, before, window_ms)
    if new_ids.size == 0:
        return None
    vocab, _ = base.append_items(new_ids)
    histories = index_histories_of(vocab, actions)
    data = dense_targets(histories, vocab, _touching(histories, trained_rows), before, window_ms)
    tower = grown_user_tower(load_user_tower(base_dir, cfg, base), vocab.n_items, trained_rows)
    budget = Budget(max_steps, max_seconds)
    epochs = learn_rows(tower, data, cfg.pinnerformer, cfg.seed, budget)
    seconds = budget.elapsed
    with torch.no_grad():
        learned = tower.item_embeddings(torch.arange(trained_rows, vocab.n_items)).numpy()
    table = np.concatenate([np.load(Path(base_dir) / "item_table.npy")[:trained_rows], learned]).astype(np.float32)
    return Learned(vocab, tower, table, new_ids, len(data.users), budget.steps, epochs, seconds)


def save_item_state(directory: Path, learned: Learned) -> None:
    """The item side as of a refresh (what item_state_dir points at): vocab/, pinnerformer.safetensors, item_table.npy."""
    learned.vocab.save(Path(directory) / "vocab")
    save_file(learned.tower.state_dict(), Path(directory) / "pinnerformer.safetensors")
    np.save(Path(directory) / "item_table.npy", learned.table)


def refresh(run: Path, repository: Path, actions: dict[str, tuple], max_steps: int = DEFAULT_MAX_STEPS,
            max_seconds: float = DEFAULT_MAX_SECONDS, servers: Sequence[str] = (),
            admin_key: str | None = None) -> dict:
    """Learn rows for the new items of ``actions`` (user -> (item ids, action names, timestamps ms), as
    embed_job.todays_actions reads them), publish them as version N of ``repository`` and, for each of ``servers``
    (HTTP host:port, model control mode explicit), load ranker N then preprocess N. Returns a summary (also written
    to RUN/refresh/<N>/refresh.json); no version is written when there is no new item to learn."""
    started = time.monotonic()
    run, repository = Path(run), Path(repository)
    cfg = RunConfig.load_saved(run)
    served = version_numbers(repository / "preprocess")
    if not served or not version_numbers(repository / "ranker"):
        raise RefreshError(f"{repository}: not an exported model repository (no preprocess/ or ranker/ versions)")
    base_version = served[-1]
    version = max(base_version, version_numbers(repository / "ranker")[-1]) + 1
    base_dir = item_state_dir(run, base_version)
    base_items = Vocabulary.load(base_dir / "vocab").n_items
    served_items = Vocabulary.load(repository / "preprocess" / str(base_version) / "tables").n_items
    if served_items != base_items:
        raise RefreshError(f"{repository}/preprocess/{base_version}: {served_items} item rows, but the run's item "
                           f"state {base_dir} has {base_items}: the repository was not exported from {run}")
    summary = {"run": str(run), "repository": str(repository), "base_version": base_version, "version": None,
               "users": len(actions), "new_items": 0}
    learned = learn_new_items(run, base_dir, actions, max_steps, max_seconds)
    if learned is None:
        _log.info("refresh: no new item to learn in %d users' actions; nothing published", len(actions))
        return summary
    vocab = learned.vocab

    ranker, _, _ = load_ranker(run)
    ranker.item_table = torch.as_tensor(learned.table)
    ranker_dir, preprocess_dir = repository / "ranker", repository / "preprocess"
    staged_ranker = _fresh_dir(ranker_dir / f".staging-{version}")
    _copy_code(ranker_dir / str(version_numbers(ranker_dir)[-1]), staged_ranker)
    exported = write_ranker_version(ranker, staged_ranker, cfg.transact.seq_len)
    staged_pre = _fresh_dir(preprocess_dir / f".staging-{version}")
    _copy_code(preprocess_dir / str(base_version), staged_pre)
    vocab.save(staged_pre / "tables")
    for name in ("users.npy", "user_emb.npy"):
        shutil.copy2(preprocess_dir / str(base_version) / "tables" / name, staged_pre / "tables" / name)
    staged_state = _fresh_dir(run / REFRESH_DIR / f".staging-{version}")
    save_item_state(staged_state, learned)
    summary.update(version=version, new_items=int(learned.new_ids.size), n_items=vocab.n_items,
                   trained_rows=Vocabulary.load(run / "vocab").n_items, learning_users=learned.users,
                   steps=learned.steps, epochs=learned.epochs, train_seconds=round(learned.seconds, 2),
                   max_steps=max_steps, max_seconds=max_seconds,
                   parity_max_abs_diff=max(p["max_abs_diff"] for p in exported["parity"] + exported["cpu_parity"]))
    (staged_state / "refresh.json").write_text(json.dumps(summary, indent=2))

    # Publish: the run's state, the ranker (its id bound follows), then the preprocess that maps the new items.
    _publish(staged_state, run / REFRESH_DIR / str(version))
    _publish(staged_ranker, ranker_dir / str(version))
    set_ranker_n_items(repository, vocab.n_items)
    _publish(staged_pre, preprocess_dir / str(version))
    summary["written_seconds"] = round(time.monotonic() - started, 2)
    if servers:
        from .server.model_control import load_in_order
        for server in servers:
            load_in_order(server, [("ranker", version), ("preprocess", version)], admin_key)
        summary["loaded_on"] = list(servers)
    summary["seconds"] = round(time.monotonic() - started, 2)
    (run / REFRESH_DIR / str(version) / "refresh.json").write_text(json.dumps(summary, indent=2))
    print(f"refresh: {summary['new_items']} new items learned from {learned.users} users in {learned.steps} steps "
          f"({learned.seconds:.1f} s) -> version {version} of {repository}"
          + (f", loaded on {', '.join(servers)}" if servers else ""))
    return summary


def rollback(run: Path, repository: Path, servers: Sequence[str] = (), admin_key: str | None = None) -> int:
    """Take the newest refreshed version back: preprocess first (its new items become the OOV row again), loaded
    on each of ``servers`` before the ranker versions past it go (a new item id never reaches a smaller table);
    the CPU ranker's id bound and the run's item state follow. Returns the version served afterwards."""
    run, repository = Path(run), Path(repository)
    served = version_numbers(repository / "preprocess")
    if len(served) < 2:
        raise RefreshError(f"{repository}/preprocess: nothing to roll back (versions {served})")
    previous = served[-2]
    from .server.model_control import load_in_order
    shutil.rmtree(repository / "preprocess" / str(served[-1]))
    for server in servers:
        load_in_order(server, [("preprocess", previous)], admin_key)
    for v in version_numbers(repository / "ranker"):
        if v > previous:
            shutil.rmtree(repository / "ranker" / str(v))
    set_ranker_n_items(repository, Vocabulary.load(repository / "preprocess" / str(previous) / "tables").n_items)
    for server in servers:
        load_in_order(server, [("ranker", version_numbers(repository / "ranker")[-1])], admin_key)
    for v in version_numbers(run / REFRESH_DIR):
        if v > previous:
            shutil.rmtree(run / REFRESH_DIR / str(v))
    print(f"rollback: {repository} serves version {previous}" + (f" on {', '.join(servers)}" if servers else ""))
    return previous
