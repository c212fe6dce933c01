"""`seqrank train` and `seqrank evaluate`: what a run directory holds and how it is produced.

run/
  config.json  run.json (events path, split, heads, dims)  vocab/ (items.npy, vocab.json)
  pinnerformer.safetensors  item_table.npy  users.npy + user_emb.npy (daily batch as of the data's end)
  ranker.safetensors (TransAct)  baselines/ (no_sequence, avg_pool rankers; next_action PinnerFormer)
  checkpoints/ (per-epoch, resumable)  metrics.json
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import metrics as M
from .config import RunConfig
from .dataset import Prepared, load_log, prepare
from .features import FIRST_ID, N_CONTEXT, OOV
from .models.pinnerformer import PinnerFormer
from .train import (RankerExamples, build_ranker, candidate_oov_rate, embed_users, item_table, predict,
                    seed_everything, train_pinnerformer, train_ranker)


class EmbeddingCache:
    """Daily-batch user embeddings, computed once per (user, day) the examples need."""

    def __init__(self, model: PinnerFormer, prep: Prepared):
        self.model, self.prep, self.cache = model, prep, {}

    def __call__(self, users, as_of) -> np.ndarray:
        keys = list(zip(users, np.asarray(as_of).tolist()))
        missing = sorted(set(keys) - self.cache.keys())
        if missing:
            emb = embed_users(self.model, self.prep, [u for u, _ in missing], [t for _, t in missing])
            self.cache.update(zip(missing, emb))
        return np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, self.model.cfg.dim), np.float32)


def _load_pinnerformer(run: Path, cfg, prep, name="pinnerformer.safetensors") -> PinnerFormer:
    model = PinnerFormer(cfg, prep.vocab.n_items, prep.vocab.n_actions)
    model.load_state_dict(load_file(run / name))
    return model.eval()


def _fit_pinnerformer(run: Path, cfg: RunConfig, prep: Prepared, objective: str, out: Path,
                      tag: str = "") -> PinnerFormer:
    pf_cfg = replace(cfg.pinnerformer, objective=objective)
    if out.exists():
        return _load_pinnerformer(out.parent, pf_cfg, prep, out.name)
    seed_everything(cfg.seed, cfg.threads)
    model = train_pinnerformer(prep, pf_cfg, cfg.seed, run / "checkpoints" / f"pinnerformer_{objective}{tag}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out)
    return model


def _fit_ranker(run, cfg, prep, table, train_ex, encoder: str, out: Path, tag: str = ""):
    r_cfg = replace(cfg.transact, sequence_encoder=encoder)
    if out.exists():
        model = build_ranker(r_cfg, prep, table, cfg.pinnerformer.dim)
        model.load_state_dict(load_file(out))
        return model.eval()
    seed_everything(cfg.seed, cfg.threads)
    model = train_ranker(prep, r_cfg, table, cfg.pinnerformer.dim, train_ex, cfg.seed,
                         run / "checkpoints" / f"ranker_{encoder}{tag}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out)
    return model


def load_run(run: Path) -> tuple[RunConfig, dict, Prepared]:
    run = Path(run)
    cfg = RunConfig.load_saved(run)
    info = json.loads((run / "run.json").read_text())
    prep = prepare(load_log(info["events"], cfg), cfg)
    return cfg, info, prep


def train(events: str, out: str | Path, config: str | None = None, negative_actions=None) -> Path:
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.load(config)
    if negative_actions:
        cfg.data.negative_actions = list(negative_actions)
    started = time.time()
    seed_everything(cfg.seed, cfg.threads)
    prep = prepare(load_log(events, cfg), cfg)
    (run / "config.json").write_text(cfg.to_json())
    prep.vocab.save(run / "vocab")
    info = {"events": str(Path(events).resolve()), "split_time_ms": prep.split_time,
            "heads": prep.vocab.heads, "negative_heads": prep.vocab.negative_actions,
            "user_dim": cfg.pinnerformer.dim, "n_context": N_CONTEXT, "seq_len": cfg.transact.seq_len,
            "duplicates_dropped": prep.log.duplicates_dropped, "n_events": len(prep.log.events),
            "future_window_days": round(prep.future_window_ms / 86_400_000, 3),
            "embedding_end_ms": prep.embedding_end, "ranker_start_ms": prep.ranker_start,
            "candidate_oov_rate": round(candidate_oov_rate(cfg.transact, prep), 4)}
    (run / "run.json").write_text(json.dumps(info, indent=2))

    pf = _fit_pinnerformer(run, cfg, prep, cfg.pinnerformer.objective, run / "pinnerformer.safetensors")
    table = item_table(pf)
    np.save(run / "item_table.npy", table)
    embeddings = EmbeddingCache(pf, prep)
    train_ex = RankerExamples(prep, prep.ranker_train_rows(), embeddings, cfg.transact.seq_len)
    _fit_ranker(run, cfg, prep, table, train_ex, cfg.transact.sequence_encoder, run / "ranker.safetensors")
    # the daily batch as of the end of the data: what serving reads for each user's long-term embedding
    end = int(prep.log.events.timestamp.max()) + 1
    np.save(run / "users.npy", np.asarray(prep.users, dtype="S"))
    np.save(run / "user_emb.npy", embed_users(pf, prep, prep.users, np.full(len(prep.users), end)))
    info["train_seconds"] = round(time.time() - started, 1)
    (run / "run.json").write_text(json.dumps(info, indent=2))
    print(f"trained in {info['train_seconds']} s -> {run}")
    return run


def load_ranker_examples(run: Path):
    """A trained run's config, data, item table and ranker examples of both periods (its PinnerFormer's daily batch
    as the user embedding): what evaluate and scripts/ranker_variants.py train and score rankers on."""
    cfg, info, prep = load_run(run)
    embeddings = EmbeddingCache(_load_pinnerformer(run, cfg.pinnerformer, prep), prep)
    train_ex = RankerExamples(prep, prep.ranker_train_rows(), embeddings, cfg.transact.seq_len)
    test_ex = RankerExamples(prep, prep.test_rows(), embeddings, cfg.transact.seq_len)
    return cfg, info, prep, np.load(run / "item_table.npy"), train_ex, test_ex


def evaluate(run: str | Path, seeds: list[int] | None = None, user_folds: int = 1) -> dict:
    """Time-split evaluation of the run (its seed). `seeds`: also train every ranker (TransAct and both baselines,
    the same PinnerFormer) with these seeds and report each head's AUC per seed with mean and standard deviation:
    on small logs a single seed can move an AUC by more than the differences between the models. `user_folds` K > 1:
    PinnerFormer's dense vs next-action also over K folds of users, every user held out once (evaluate_user_models)."""
    run = Path(run)
    cfg, info, prep, table, train_ex, test_ex = load_ranker_examples(run)
    heads, negative = prep.vocab.heads, prep.vocab.negative_actions

    ranker_metrics, gate, test_probs, group_hits = {}, None, {}, {}
    for encoder in ("transact", "no_sequence", "avg_pool"):
        path = run / "ranker.safetensors" if encoder == cfg.transact.sequence_encoder \
            else run / "baselines" / f"ranker_{encoder}.safetensors"
        model = _fit_ranker(run, cfg, prep, table, train_ex, encoder, path)
        probs = predict(model, test_ex)
        util = M.utility(probs, heads, negative, cfg.utility_weights)
        group_rows, group_hits[encoder] = M.hits_per_group(test_ex.user_day, test_ex.labels, util, k=3, seed=cfg.seed)
        hits = group_hits[encoder].mean(axis=0)
        test_probs[encoder] = {cfg.seed: probs}
        ranker_metrics[encoder] = {h: {"auc": M.auc(test_ex.labels[:, j], probs[:, j]), "hit@3": float(hits[j])}
                                   for j, h in enumerate(heads)}
        if encoder == "transact" and model.output_gate is not None:
            gate = gate_ablation(model, test_ex, probs, heads)
    seed_metrics = {}
    for seed in sorted(set(seeds or [])):
        for encoder in ("transact", "no_sequence", "avg_pool"):
            if seed == cfg.seed:
                aucs = {h: ranker_metrics[encoder][h]["auc"] for h in heads}
            else:
                model = _fit_ranker(run, replace(cfg, seed=seed), prep, table, train_ex, encoder,
                                    run / "seeds" / f"ranker_{encoder}_seed{seed}.safetensors", tag=f"_seed{seed}")
                probs = test_probs[encoder][seed] = predict(model, test_ex)
                aucs = {h: M.auc(test_ex.labels[:, j], probs[:, j]) for j, h in enumerate(heads)}
            for h, value in aucs.items():
                seed_metrics.setdefault(encoder, {}).setdefault(h, {"seeds": [], "auc": []})
                seed_metrics[encoder][h]["seeds"].append(seed)
                seed_metrics[encoder][h]["auc"].append(value)
    for per_head in seed_metrics.values():
        for entry in per_head.values():
            entry["mean"] = float(np.mean(entry["auc"]))
            entry["sd"] = float(np.std(entry["auc"], ddof=1)) if len(entry["auc"]) > 1 else None  # JSON has no NaN
    lifts = {base: {h: {"auc": ranker_metrics["transact"][h]["auc"] - ranker_metrics[base][h]["auc"],
                        "hit@3_lift": M.lift(ranker_metrics["transact"][h]["hit@3"], ranker_metrics[base][h]["hit@3"])}
                    for h in heads} for base in ("no_sequence", "avg_pool")}

    uncertainty = comparison_uncertainty(test_ex, test_probs, group_rows, group_hits, heads)
    bounds = M.hit_at_k_bounds(test_ex.user_day, test_ex.labels, k=3)
    hit_bounds = {h: {**{name: float(v[j]) for name, v in bounds.items()},
                      # the largest lift any ranking could show over the no-sequence model on these groups
                      "reachable_lift_over_no_sequence": M.lift(float(bounds["fewest" if h in negative else "most"][j]),
                                                                ranker_metrics["no_sequence"][h]["hit@3"])}
                  for j, h in enumerate(heads)}

    user_metrics = evaluate_user_models(run, cfg, prep, user_folds)
    result = {"ranker": ranker_metrics, "lifts_of_transact": lifts, "user_model": user_metrics,
              "uncertainty": uncertainty, "hit@3_bounds": hit_bounds,
              **({"ranker_seeds": seed_metrics} if seed_metrics else {}),
              **({"transact_output_gate": gate} if gate else {}),
              "data": {"events": info["events"], "test_impressions": len(test_ex),
                       **candidate_coverage(prep.impressions, prep.embedding_end,
                                            lambda items: prep.vocab.item_index(items) != OOV),
                       "train_impressions": len(train_ex),
                       "test_positives": {h: int((test_ex.labels[:, j] > 0).sum()) for j, h in enumerate(heads)},
                       "hit@3_groups": int((np.bincount(test_ex.user_day) >= 4).sum()),
                       "hit@3_grouping": "user-day (impressions of one user and day, >= 4)"}}
    (run / "metrics.json").write_text(json.dumps(result, indent=2))
    print(format_table(result, heads))
    if gate:
        print(f"TransAct output gate {gate['value']:.4f}; with the gate closed the AUC moves by at most "
              f"{gate['max_abs_auc_change']:.4f} (what the sequence encoder adds on top of the other features)")
    if seed_metrics:
        print(format_seed_table(seed_metrics, heads))
    print(format_uncertainty_table(uncertainty, result["data"]["test_positives"], heads))
    print("HIT@3 whatever the model (random order / an oracle for the head / the reachable lift over no-sequence): "
          + ", ".join(f"{h} {b['random']:.3f}/{b['fewest' if h in negative else 'most']:.3f}/"
                      f"{b['reachable_lift_over_no_sequence']:+.1%}" for h, b in hit_bounds.items()))
    return result


def comparison_uncertainty(test_ex: RankerExamples, test_probs: dict, group_rows: np.ndarray, group_hits: dict,
                           heads: list[str], n_boot: int = 1000) -> dict:
    """TransAct against each baseline with 95% intervals from one paired bootstrap over test users: the AUC
    difference averaged over every seed trained (all seeds resample the same users), also split by whether the
    candidate is in the vocabulary (early fusion can only match a known item against the history), and the HIT@3
    lift of the run's seed. An interval that straddles 0 means this test period cannot tell the two models apart."""
    seeds = sorted(test_probs["transact"])
    out = {"method": f"paired bootstrap over test users ({n_boot} resamples, 95% percentile interval); "
                     "auc_difference: TransAct minus the baseline, mean over the seeds; hit@3_lift: the run's seed",
           "seeds": seeds, "auc_difference": {}, "auc_difference_by_candidate": {}, "hit@3_lift": {}}

    def auc_differences(base, rows):
        return {h: M.auc_difference_ci(test_ex.labels[rows, j], [test_probs["transact"][s][rows, j] for s in seeds],
                                       [test_probs[base][s][rows, j] for s in seeds], test_ex.user[rows], n_boot)
                for j, h in enumerate(heads)}

    known = test_ex.cand_item != OOV
    group_users = test_ex.user[group_rows]
    for base in ("no_sequence", "avg_pool"):
        out["auc_difference"][base] = auc_differences(base, slice(None))
        out["auc_difference_by_candidate"][base] = {"in_vocabulary": auc_differences(base, known),
                                                    "out_of_vocabulary": auc_differences(base, ~known)}
        out["hit@3_lift"][base] = {h: M.ratio_lift_ci(group_hits["transact"][:, j], group_hits[base][:, j],
                                                      group_users, n_boot) for j, h in enumerate(heads)}
    return out


def evaluate_user_models(run: Path, cfg: RunConfig, prep: Prepared, user_folds: int = 1) -> dict:
    """PinnerFormer's Recall@10 of each held-out user's positives in the window after the split, dense all-action
    against next-action (trained here if the run lacks it), with the ratio's 95% interval over the held-out users.
    user_folds K > 1: also cross-validate over users, so every user is held out once and the interval rests on all
    of them: the users PinnerFormer trained on are split into K - 1 more held-out folds, each with its own pair of
    PinnerFormers trained like the run's (same config and seed) on everyone else (`folds` in the result)."""
    per_user = {objective: [] for objective in USER_OBJECTIVES}
    for k, held_out in enumerate(held_out_user_folds(prep, user_folds, cfg.seed)):
        fold_prep = replace(prep, pf_test_users=held_out)
        for objective in USER_OBJECTIVES:
            path = (run / "user_folds" / f"pinnerformer_{objective}_fold{k}.safetensors" if k else
                    run / ("pinnerformer.safetensors" if objective == cfg.pinnerformer.objective
                           else f"baselines/pinnerformer_{objective}.safetensors"))
            per_user[objective].append(recall_of_held_out_users(run, cfg, fold_prep, objective, sorted(held_out),
                                                                path, tag=f"_fold{k}" if k else ""))
    user_metrics = dense_vs_next({objective: values[0] for objective, values in per_user.items()})
    if user_folds > 1:
        user_metrics["folds"] = {"k": user_folds,
                                 **dense_vs_next({o: np.concatenate(v) for o, v in per_user.items()})}
    return user_metrics


def held_out_user_folds(prep: Prepared, k: int, seed: int) -> list[set]:
    """k disjoint sets of users that together hold every user: the run's own held-out users (pf_test_users) first,
    then the users PinnerFormer trained on, shuffled and split into k - 1 folds (k = 1 / pinnerformer_test_users
    gives folds of the same size)."""
    rest = np.random.default_rng(seed).permutation(sorted(set(prep.users) - prep.pf_test_users))
    if not 1 <= k <= len(rest) + 1:
        raise ValueError(f"user_folds must be between 1 and {len(rest) + 1} (the users PinnerFormer trains on + 1), "
                         f"got {k}")
    folds = [set(prep.pf_test_users)]
    if k > 1:
        folds += [set(fold.tolist()) for fold in np.array_split(rest, k - 1)]
    return folds


USER_OBJECTIVES = ("dense_all_action", "next_action")


def recall_of_held_out_users(run: Path, cfg: RunConfig, prep: Prepared, objective: str, users: list, path: Path,
                             tag: str = "") -> np.ndarray:
    """Recall@10 per held-out user (those with a future positive) of the PinnerFormer at `path` (trained if absent)."""
    negative = [prep.vocab.actions.index(a) + FIRST_ID for a in prep.vocab.negative_actions]
    future = []
    for u in users:
        h = prep.histories[u]
        sel = (h.ts >= prep.split_time) & (h.ts < prep.split_time + prep.future_window_ms) & (h.item >= FIRST_ID)
        future.append(set(h.item[sel & ~np.isin(h.action, negative)].tolist()))
    model = _fit_pinnerformer(run, cfg, prep, objective, path, tag)
    emb = embed_users(model, prep, users, np.full(len(users), prep.split_time))
    return M.recall_per_user(emb, item_table(model), future, k=10)


def dense_vs_next(per_user: dict) -> dict:
    """Mean Recall@10 of each objective over the same users, their ratio and its 95% interval over those users."""
    out = {o: {"recall@10": float(v.mean()) if len(v) else float("nan"), "users": len(v)} for o, v in per_user.items()}
    dense, nxt = out["dense_all_action"]["recall@10"], out["next_action"]["recall@10"]
    out["dense_vs_next_ratio"] = dense / nxt if nxt > 0 else None  # None: next-action retrieved nothing
    lift = M.ratio_lift_ci(per_user["dense_all_action"], per_user["next_action"],
                           np.arange(len(per_user["dense_all_action"])))
    out["dense_vs_next_ratio_ci"] = [1.0 + v for v in lift["ci"]] if lift["ci"] else None
    return out


def candidate_coverage(impressions, embedding_end: int, in_vocabulary=None) -> dict:
    """How much the embedding period tells the models about the test candidates: the share of test impressions
    whose item it saw and the vocabulary holds (the rest are one out-of-vocabulary row), and how often the median seen
    one was shown in that period. Early fusion can only match a candidate against the history through what its
    embedding learned. in_vocabulary(items) -> bool mask: the vocabulary (None: every item the period saw)."""
    train_counts = impressions.loc[impressions.timestamp < embedding_end, "item_id"].value_counts()
    if in_vocabulary is not None:
        train_counts = train_counts[in_vocabulary(train_counts.index.to_numpy())]
    test_items = impressions.loc[impressions.is_test, "item_id"]
    seen = test_items.map(train_counts).dropna()
    return {"test_candidates_seen_in_training": float(len(seen) / max(len(test_items), 1)),
            "train_impressions_of_seen_test_candidate_median": float(seen.median()) if len(seen) else 0.0}


@torch.no_grad()
def gate_ablation(model, test_ex: RankerExamples, probs: np.ndarray, heads: list[str]) -> dict:
    """TransAct's contribution, measured: the test AUC with its output gate closed (0) against the trained gate. A
    gate the training left near 0 means the ranker learned to do without the sequence encoder on this data."""
    value = float(model.output_gate)
    model.output_gate.fill_(0.0)
    try:
        closed = predict(model, test_ex)
    finally:
        model.output_gate.fill_(value)
    auc_closed = {h: M.auc(test_ex.labels[:, j], closed[:, j]) for j, h in enumerate(heads)}
    change = {h: M.auc(test_ex.labels[:, j], probs[:, j]) - auc_closed[h] for j, h in enumerate(heads)}
    return {"value": value, "auc_with_gate_closed": auc_closed, "auc_change_from_gate": change,
            "max_abs_auc_change": float(np.nanmax(np.abs(list(change.values())))),  # a head with no positive: NaN
            "mean_abs_prob_change": float(np.abs(probs - closed).mean())}


def format_seed_table(seed_metrics: dict, heads: list[str]) -> str:
    encoders = ("transact", "no_sequence", "avg_pool")
    seeds = seed_metrics["transact"][heads[0]]["seeds"]
    lines = [f"AUC over seeds {seeds} (mean +- sd)", f"{'head':<14}" + "".join(f"{e:>20}" for e in encoders)]
    for h in heads:
        lines.append(f"{h:<14}" + "".join(f"{seed_metrics[e][h]['mean']:>13.4f} +-{seed_metrics[e][h]['sd'] or 0:.3f}"
                                          for e in encoders))
    return "\n".join(lines)


def format_uncertainty_table(uncertainty: dict, positives: dict, heads: list[str]) -> str:
    def cell(entry):
        if entry["ci"] is None:
            return f"{'n/a':>26}"
        return f"{entry['value']:>+8.3f} [{entry['ci'][0]:+.3f},{entry['ci'][1]:+.3f}]"

    d, by = uncertainty["auc_difference"], uncertainty["auc_difference_by_candidate"]["avg_pool"]
    lines = [f"TransAct AUC minus baseline, mean over seeds {uncertainty['seeds']}, 95% user-bootstrap interval",
             f"{'head':<14}{'test pos':>9}{'vs no_sequence':>26}{'vs avg_pool':>26}"
             f"{'vs avg_pool, known cand.':>26}{'vs avg_pool, unknown':>26}"]
    lines += [f"{h:<14}{positives[h]:>9}{cell(d['no_sequence'][h])}{cell(d['avg_pool'][h])}"
              f"{cell(by['in_vocabulary'][h])}{cell(by['out_of_vocabulary'][h])}" for h in heads]
    return "\n".join(lines)


def format_table(result: dict, heads: list[str]) -> str:
    r = result["ranker"]
    lines = [f"{'head':<14}{'AUC transact':>13}{'no_seq':>9}{'avg_pool':>9}{'HIT@3 tr':>10}{'no_seq':>9}"
             f"{'lift':>9}{'vs avg':>9}"]
    for h in heads:
        t, n, a = r["transact"][h], r["no_sequence"][h], r["avg_pool"][h]
        lines.append(f"{h:<14}{t['auc']:>13.4f}{n['auc']:>9.4f}{a['auc']:>9.4f}{t['hit@3']:>10.4f}"
                     f"{n['hit@3']:>9.4f}{M.lift(t['hit@3'], n['hit@3']):>+9.1%}{M.lift(t['hit@3'], a['hit@3']):>+9.1%}")
    u = result["user_model"]
    for m in (u, u.get("folds")):
        if m is None:
            continue
        name = f" ({m['k']} user folds)" if "k" in m else ""
        ratio, ci = m["dense_vs_next_ratio"], m.get("dense_vs_next_ratio_ci")
        lines.append(f"PinnerFormer Recall@10{name}: dense all-action {m['dense_all_action']['recall@10']:.4f}  "
                     f"next-action {m['next_action']['recall@10']:.4f}  ratio "
                     + (f"{ratio:.3f}" if ratio is not None else "n/a (next-action 0)")
                     + (f" [95%: {ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                     + f" over {m['dense_all_action']['users']} held-out users")
    return "\n".join(lines)


def write_embeddings(run: str | Path, store_url: str, as_of_ms: int | None = None) -> int:
    """The daily batch job of the paper: every user's long-term embedding as of a time, into the feature store."""
    from .store import open_store
    cfg, info, prep = load_run(Path(run))
    model = _load_pinnerformer(Path(run), cfg.pinnerformer, prep)
    as_of = int(prep.log.events.timestamp.max()) + 1 if as_of_ms is None else int(as_of_ms)
    emb = embed_users(model, prep, prep.users, np.full(len(prep.users), as_of))
    store = open_store(store_url, timeout_s=5.0)
    try:
        store.put_embeddings(list(prep.users), emb, as_of)
    finally:
        store.close()
    print(f"wrote {len(prep.users)} user embeddings as of {as_of} to {store_url}")
    return len(prep.users)
