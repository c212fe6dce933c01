"""`seqrank train`: what a run directory holds and how it is produced (seqrank.evaluation reads it back).

events -> seqrank.dataset (Prepared) -> PinnerFormer (seqrank.training) -> seqrank.examples -> the ranker

run/
  config.json  run.json (events path, split, heads, dims)  vocab/ (items.npy, vocab.json)
  pinnerformer.safetensors  item_table.npy  users.npy + user_emb.npy (daily batch as of the data's end)
  ranker.safetensors (TransAct)  baselines/ (no_sequence, avg_pool rankers; next_action PinnerFormer)
  checkpoints/ (per-epoch, resumable)  metrics.json
Every saved model and checkpoint records its origin (model_origin: config, events, code); a later train or evaluate
reuses it only if the origin is the same, and trains it again otherwise.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from . import __version__, distributed
from .config import RunConfig
from .dataset import Prepared
from .examples import EmbeddingCache, RankerData, ranker_data
from .features import N_CONTEXT
from .models.pinnerformer import PinnerFormer
from .streamed import prepare_events
from .training import build_ranker, candidate_oov_share, embed_users, item_table, seed_everything, train_pinnerformer, \
    train_ranker

log = logging.getLogger("seqrank.pipeline")


def load_pinnerformer(run: Path, cfg, prep, name="pinnerformer.safetensors") -> PinnerFormer:
    model = PinnerFormer(cfg, prep.vocab.n_items, prep.vocab.n_actions)
    model.load_state_dict(load_file(run / name))
    return model.eval()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The package's own source code, every module."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def model_origin(cfg: RunConfig, prep: Prepared, model: str, *parts) -> str:
    """What a saved model is trained from: the config (for PinnerFormer, all but the ranker's section), the events
    (path, size and modification time of each file), the package's code and ``parts`` (the objective or encoder; a
    ranker's item table). A model or checkpoint of another origin is trained again: a run re-trained or re-evaluated
    after a code, config or data change never reuses a model that the change would have made differently."""
    config = json.loads(cfg.to_json())
    if model == "pinnerformer":
        config.pop("transact")
    source = Path(prep.log.source)
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    events = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    digest = hashlib.sha256(json.dumps([model, config, events, code_digest()], sort_keys=True).encode())
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else str(part).encode())
    return digest.hexdigest()


def save_model(model, out: Path, **facts) -> None:
    """The weights with ``facts`` (origin, selected epoch) in one metadata entry: safetensors writes several entries
    in no fixed order, and the same model must be the same bytes."""
    save_file(model.state_dict(), out, metadata={"seqrank": json.dumps(facts, sort_keys=True)})


def saved_facts(path: Path) -> dict:
    """What save_model stored with the weights at ``path`` (empty for a file written otherwise)."""
    return json.loads(load_metadata(path).get("seqrank", "{}"))


def _reusable(out: Path, ckpt: Path, origin: str) -> bool:
    """Whether the saved model `out` has this origin (then it is loaded, not trained). Otherwise, a checkpoint of
    another origin is removed (the model trains from its first epoch) and the origin is written beside the
    checkpoint, so a restarted run resumes only its own."""
    if distributed.agree(out.exists() and saved_facts(out).get("origin") == origin, f"whether {out} is current"):
        return True
    if distributed.is_main():
        tag = ckpt.with_suffix(".origin")
        if ckpt.exists() and (not tag.exists() or tag.read_text() != origin):
            log.info("%s was trained from another config, code or data: starting over", ckpt)
            ckpt.unlink()
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tag.write_text(origin)
    distributed.barrier()
    return False


def fit_pinnerformer(run: Path, cfg: RunConfig, prep: Prepared, objective: str, out: Path,
                     tag: str = "") -> PinnerFormer:
    """The PinnerFormer at `out`, trained if it is not there yet or was trained from another origin (model_origin)."""
    pf_cfg = replace(cfg.pinnerformer, objective=objective)
    origin = model_origin(cfg, prep, "pinnerformer", objective)
    ckpt = run / "checkpoints" / f"pinnerformer_{objective}{tag}.pt"
    if _reusable(out, ckpt, origin):
        return load_pinnerformer(out.parent, pf_cfg, prep, out.name)
    seed_everything(cfg.seed, cfg.threads)
    model = train_pinnerformer(prep, pf_cfg, cfg.seed, ckpt)
    if distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out, origin=origin)
    return model


def fit_ranker(run, cfg, prep, table, examples: "RankerData", encoder: str, out: Path, tag: str = ""):
    """The ranker at `out`, trained (on examples.train, best epoch on examples.selection) if it is not there yet or
    was trained from another origin (model_origin: its item table included)."""
    r_cfg = replace(cfg.transact, sequence_encoder=encoder)
    origin = model_origin(cfg, prep, "ranker", encoder, np.ascontiguousarray(table))
    ckpt = run / "checkpoints" / f"ranker_{encoder}{tag}.pt"
    if _reusable(out, ckpt, origin):
        model = build_ranker(r_cfg, prep, table, cfg.pinnerformer.dim)
        model.load_state_dict(load_file(out))
        model.selected_epoch = int(saved_facts(out)["selected_epoch"])
        return model.eval()
    seed_everything(cfg.seed, cfg.threads)
    model = train_ranker(prep, r_cfg, table, cfg.pinnerformer.dim, examples.train, cfg.seed, ckpt, examples.selection)
    if distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out, origin=origin, selected_epoch=model.selected_epoch)
    return model


def daily_batch(pf: PinnerFormer, prep: Prepared) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Every user's embedding as of the end of the data, users sorted; on rank 0 (None elsewhere) when each rank
    embeds its own users."""
    end = int(prep.log.events.timestamp.max()) + 1
    if not prep.partitioned:
        if not distributed.is_main():
            return None, None
        return prep.users, embed_users(pf, prep.histories, prep.users, np.full(len(prep.users), end))
    end = distributed.all_max(end)
    emb = embed_users(pf, prep.histories, prep.users, np.full(len(prep.users), end))
    parts = distributed.gather_to_main((prep.users, emb))
    if parts is None:
        return None, None
    users = np.concatenate([u for u, _ in parts])
    order = np.argsort(users, kind="stable")
    return users[order], np.concatenate([e for _, e in parts])[order]


def load_run(run: Path) -> tuple[RunConfig, dict, Prepared]:
    run = Path(run)
    cfg = RunConfig.load_saved(run)
    info = json.loads((run / "run.json").read_text())
    prep = prepare_events(info["events"], cfg)
    return cfg, info, prep


def train(events: str, out: str | Path, config: str | None = None, negative_actions=None,
          overrides: list[str] | None = None) -> Path:
    """Learn PinnerFormer and the TransAct ranker from an events file or dataset directory (seqrank convert) into the
    run directory `out`. `config`: a JSON run config; `overrides`: ["section.field=value", ...] applied on top
    (RunConfig.with_overrides). Under torchrun every rank trains its share of each batch (seqrank/distributed.py)
    and rank 0 alone writes. From a dataset directory, each rank reads and prepares only the users of its own
    partition (seqrank.streamed) and trains on batches drawn from them; a file is read whole by every rank."""
    run = Path(out)
    cfg = RunConfig.load(config).with_overrides(overrides or [])
    main = distributed.is_main()
    if main:
        run.mkdir(parents=True, exist_ok=True)
    if negative_actions:
        cfg.data.negative_actions = list(negative_actions)
    started = time.time()
    previous = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    seed_everything(cfg.seed, cfg.threads)
    prep = prepare_events(events, cfg, distributed.rank(), distributed.world_size())
    if prep.partitioned:  # every rank says what it holds: its own users, never the whole log
        log.info("partition %d of %d: %d users, %d events", *prep.partition, len(prep.users), len(prep.log.events))
    info = {"seqrank_version": __version__, "events": str(Path(events).resolve()), "split": cfg.data.split,
            "split_time_ms": prep.split_time, "selection_start_ms": prep.selection_start,
            "heads": prep.vocab.heads, "negative_heads": prep.vocab.negative_actions,
            "user_dim": cfg.pinnerformer.dim, "n_context": N_CONTEXT, "seq_len": cfg.transact.seq_len,
            "duplicates_dropped": prep.log.duplicates_dropped, "n_events": int(distributed.over_log(len(prep.log.events), prep.partitioned)),
            "future_window_days": round(prep.future_window_ms / 86_400_000, 3),
            "candidate_oov_share": round(candidate_oov_share(prep), 4),
            "world_size": distributed.world_size()}
    if main:
        (run / "config.json").write_text(cfg.to_json())
        prep.vocab.save(run / "vocab")
        (run / "run.json").write_text(json.dumps(info, indent=2))

    pf = fit_pinnerformer(run, cfg, prep, cfg.pinnerformer.objective, run / "pinnerformer.safetensors")
    info["pinnerformer_reused"] = not getattr(pf, "epoch_seconds", [])  # no epoch ran here: train_seconds omits it
    table = item_table(pf)
    if main:
        np.save(run / "item_table.npy", table)
    examples = ranker_data(cfg, prep, EmbeddingCache(pf, prep), test=False)
    ranker = fit_ranker(run, cfg, prep, table, examples, cfg.transact.sequence_encoder, run / "ranker.safetensors")
    # the daily batch as of the end of the data: what serving reads for each user's long-term embedding
    users, user_emb = daily_batch(pf, prep)
    if not main:
        return run
    info["ranker_selected_epoch"] = ranker.selected_epoch
    # seconds per epoch of the models trained by this command (a reused or resumed model's earlier epochs: absent)
    info["epoch_seconds"] = {"pinnerformer": getattr(pf, "epoch_seconds", []),
                             "ranker": getattr(ranker, "epoch_seconds", [])}
    np.save(run / "users.npy", np.asarray(users, dtype="S"))
    np.save(run / "user_emb.npy", user_emb)
    info["train_seconds"] = round(time.time() - started, 1)
    trained_nothing = info["pinnerformer_reused"] and not getattr(ranker, "epoch_seconds", [])
    if trained_nothing and "train_seconds" in previous:
        # the run keeps the timings of the command that trained its models
        info.update({k: previous[k] for k in ("train_seconds", "epoch_seconds", "pinnerformer_reused") if k in previous})
    (run / "run.json").write_text(json.dumps(info, indent=2))
    print(f"nothing to train: the saved models are current ({round(time.time() - started, 1)} s) -> {run}"
          if trained_nothing else f"trained in {info['train_seconds']} s -> {run}")
    return run

def load_ranker_examples(run: Path):
    """A trained run's config, data, item table and ranker examples (its PinnerFormer's daily batch as the user
    embedding): what evaluate trains and scores rankers on."""
    cfg, info, prep = load_run(run)
    if saved_facts(run / "pinnerformer.safetensors").get("origin") != \
            model_origin(cfg, prep, "pinnerformer", cfg.pinnerformer.objective):
        # its rankers would be trained on that PinnerFormer's table, and evaluate's user folds would retrain it
        raise ValueError(f"{run}: its PinnerFormer was trained from another config, code or data than today's: train "
                         f"the run again first (seqrank train --events {info['events']} --out {run})")
    embeddings = EmbeddingCache(load_pinnerformer(run, cfg.pinnerformer, prep), prep)
    return cfg, info, prep, np.load(run / "item_table.npy"), ranker_data(cfg, prep, embeddings)

def load_metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
