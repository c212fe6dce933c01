"""`seqrank evaluate`: TransAct against its two baselines (no sequence, average pooling) over several training seeds,
and PinnerFormer's dense all-action loss against next-action, on the run's test period; the statistics are in
seqrank.metrics, the written result is the run's metrics.json (docs/results.md reads it).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import metrics as M
from .config import RunConfig
from .dataset import Prepared
from .daily_items import RefreshedTest, replay_refreshes
from .examples import RankerExamples
from .features import FIRST_ID, OOV
from .pipeline import fit_pinnerformer, fit_ranker, load_ranker_examples
from .training import embed_users, item_table, predict


def ranker_test_scores(run: str | Path) -> tuple[np.ndarray, dict[str, float]]:
    """A trained run's own ranker on its test period, nothing trained: the probabilities [impressions, heads] and
    each head's AUC (what compares two trainings of one config, e.g. 1 and 2 processes)."""
    run = Path(run)
    cfg, _, prep, table, data = load_ranker_examples(run)
    model = fit_ranker(run, cfg, prep, table, data, cfg.transact.sequence_encoder, run / "ranker.safetensors")
    probs = predict(model, data.test)
    return probs, {h: M.auc(data.test.labels[:, j], probs[:, j]) for j, h in enumerate(prep.vocab.heads)}


RANKERS = ("transact", "no_sequence", "avg_pool")
BASELINES = ("no_sequence", "avg_pool")
MIN_USERS = 100  # an estimate resting on fewer test users is flagged (metrics.json "warnings")


def ranker_path(run: Path, cfg: RunConfig, encoder: str, seed: int) -> Path:
    if seed == cfg.seed:
        return run / "ranker.safetensors" if encoder == cfg.transact.sequence_encoder \
            else run / "baselines" / f"ranker_{encoder}.safetensors"
    return run / "seeds" / f"ranker_{encoder}_seed{seed}.safetensors"


def evaluate(run: str | Path, seeds: list[int] | None = None, user_folds: int = 1, refreshes: int = 8) -> dict:
    """Time-split evaluation of TransAct against its two baselines (the same ranker without the sequence, and with
    the sequence averaged), each trained with every seed in `seeds` (default: the run's): per head pooled AUC, GAUC,
    moment GAUC (metrics.moments: one request's ranking of its user-day group's impressions from then on, so a
    user's estimate moving over time does not enter) and HIT@3, their mean and spread over seeds, and every
    comparison with a 95% interval over test users and seeds together. Every test request is scored as production
    serves it: with the item rows the daily `seqrank refresh` learned before it (seqrank.daily_items; at most
    `refreshes` refreshes over the test period, daily when it has no more days; 0: the training vocabulary
    throughout). `user_folds` K > 1: PinnerFormer's dense vs next-action also over K folds of users, every user held
    out once (evaluate_user_models)."""
    run = Path(run)
    cfg, info, prep, table, data = load_ranker_examples(run)
    test_ex = data.test
    served = RefreshedTest(cfg, prep, prep.test_rows(), replay_refreshes(run, prep, prep.test_rows(), refreshes))
    heads, negative = prep.vocab.heads, prep.vocab.negative_actions
    seeds = sorted(set(seeds or [cfg.seed]))
    # moment GAUC: each request ranks its user-day group's impressions from then on with its own features
    feature, candidate, moment = M.moments(test_ex.user_day, test_ex.request, test_ex.request_time)
    moment_labels = test_ex.labels[candidate]

    probs, hits, epochs = {e: {} for e in RANKERS}, {e: {} for e in RANKERS}, {e: {} for e in RANKERS}
    moment_probs = {e: {} for e in RANKERS}
    for seed, encoder in tqdm([(s, e) for s in seeds for e in RANKERS], desc="rankers (seed, model)", unit="model"):
        path = ranker_path(run, cfg, encoder, seed)
        model = fit_ranker(run, replace(cfg, seed=seed), prep, table, data, encoder, path,
                            tag="" if seed == cfg.seed else f"_seed{seed}")
        epochs[encoder][seed] = model.selected_epoch
        probs[encoder][seed] = p = served.predict(model)
        moment_probs[encoder][seed] = served.predict_pairs(model, feature, candidate)
        util = M.utility(p, heads, negative, cfg.utility_weights)
        group_rows, hits[encoder][seed] = M.hits_per_group(test_ex.user_day, test_ex.labels, util, k=3,
                                                           seed=cfg.seed)

    per_seed = {e: {h: {"auc": [M.auc(test_ex.labels[:, j], probs[e][s][:, j]) for s in seeds],
                        "gauc": [M.gauc(test_ex.labels[:, j], probs[e][s][:, j], test_ex.user) for s in seeds],
                        "moment_gauc": [M.gauc(moment_labels[:, j], moment_probs[e][s][:, j], moment)
                                        for s in seeds],
                        "hit@3": [float(hits[e][s][:, j].mean()) for s in seeds]}
                    for j, h in enumerate(heads)} for e in RANKERS}
    ranker_metrics = {e: {h: {m: float(np.mean(v)) for m, v in per_seed[e][h].items()} for h in heads}
                      for e in RANKERS}
    seed_metrics = {"seeds": seeds, "selected_epoch": {e: [epochs[e][s] for s in seeds] for e in RANKERS},
                    **{e: {h: {m: {"values": v, "mean": float(np.mean(v)), "sd": _sd(v)}
                               for m, v in per_seed[e][h].items()} for h in heads} for e in RANKERS}}
    lifts = {base: {h: {"auc": ranker_metrics["transact"][h]["auc"] - ranker_metrics[base][h]["auc"],
                        "gauc": ranker_metrics["transact"][h]["gauc"] - ranker_metrics[base][h]["gauc"],
                        "moment_gauc": ranker_metrics["transact"][h]["moment_gauc"]
                        - ranker_metrics[base][h]["moment_gauc"],
                        "hit@3_lift": M.lift(ranker_metrics["transact"][h]["hit@3"], ranker_metrics[base][h]["hit@3"]),
                        "hit@3_lift_per_seed": _mean_sd([M.lift(a, b) for a, b in zip(
                            per_seed["transact"][h]["hit@3"], per_seed[base][h]["hit@3"])])}
                    for h in heads} for base in BASELINES}

    uncertainty = comparison_uncertainty(test_ex, probs, group_rows, hits, heads, seeds, served.cand_item != OOV)
    uncertainty["moment_gauc_difference"] = {
        base: {h: M.gauc_difference_ci(moment_labels[:, j], [moment_probs["transact"][s][:, j] for s in seeds],
                                       [moment_probs[base][s][:, j] for s in seeds], test_ex.user[feature],
                                       groups=moment)
               for j, h in enumerate(heads)} for base in BASELINES}
    bounds = M.hit_at_k_bounds(test_ex.user_day, test_ex.labels, k=3)
    hit_bounds = {h: {**{name: float(v[j]) for name, v in bounds.items()},
                      # the largest lift any ranking could show over the no-sequence model on these groups
                      "reachable_lift_over_no_sequence": M.lift(float(bounds["fewest" if h in negative else "most"][j]),
                                                                ranker_metrics["no_sequence"][h]["hit@3"])}
                  for j, h in enumerate(heads)}
    positives = {h: int((test_ex.labels[:, j] > 0).sum()) for j, h in enumerate(heads)}
    complements = M.complement_pairs(test_ex.labels, heads)
    user_metrics = evaluate_user_models(run, cfg, prep, user_folds)
    data_info = {"events": info["events"], "split": cfg.data.split, "request_gap_s": cfg.data.request_gap_s,
                 "test_impressions": len(test_ex), "test_users": int(len(np.unique(test_ex.user))),
                 "test_requests": int(len(np.unique(test_ex.request))),
                 **candidate_coverage(prep.impressions, prep.split_time), "item_refresh": served.summary(),
                 "train_impressions": len(data.train), "selection_impressions": len(data.selection),
                 "test_positives": positives, "complement_heads": complements,
                 "hit@3_groups": int((np.bincount(test_ex.user_day) >= 4).sum()),
                 "hit@3_grouping": "user-day (impressions of one user and day, >= 4)",
                 "moments": int(len(np.unique(moment))), "moment_pairs": int(len(moment)),
                 "moment_grouping": f"at each request of a hit@3 group, the group's impressions from then on (at "
                                    f"most {M.MOMENT_CANDIDATES}), scored with that request's features"}
    result = {"ranker": ranker_metrics, "lifts_of_transact": lifts, "user_model": user_metrics,
              "uncertainty": uncertainty, "hit@3_bounds": hit_bounds, "ranker_seeds": seed_metrics,
              "verdict": verdict(uncertainty, positives, complements, heads, negative),
              "warnings": small_sample_warnings(test_ex, user_metrics, heads), "data": data_info}
    (run / "metrics.json").write_text(json.dumps(result, indent=2))
    print(format_table(result, heads))
    for w in result["warnings"]:
        print(f"warning: {w}")
    return result


def _sd(values) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None  # JSON has no NaN


def _mean_sd(values) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    return {"values": values, "mean": float(np.mean(finite)) if finite else None, "sd": _sd(finite)}


def verdict(uncertainty: dict, positives: dict, complements: list, heads: list[str], negative: list[str],
            min_positives: int = 100) -> dict:
    """Per head and baseline: is TransAct above it at 95% (the interval's lower end > 0), by pooled AUC, GAUC and
    moment GAUC.
    Heads with fewer than min_positives test positives, and one head of each complement pair (the same fact: the
    negative one, e.g. KuaiRand's hate = 1 - like), are listed but not counted."""
    duplicate = M.complement_of(complements, negative)
    out = {"counted_heads": [h for h in heads if positives[h] >= min_positives and h not in duplicate],
           "min_positives": min_positives, "complement_of": duplicate}
    for base in BASELINES:
        out[base] = {h: {m: _above(uncertainty[key][base][h]) for m, key in (
            ("auc", "auc_difference"), ("gauc", "gauc_difference"), ("moment_gauc", "moment_gauc_difference"))}
            for h in heads}
    return out


def _above(entry: dict) -> str:
    if entry["ci"] is None:
        return "n/a"
    lo, hi = entry["ci"]
    return "above" if lo > 0 else "below" if hi < 0 else "level"


def small_sample_warnings(test_ex: RankerExamples, user_metrics: dict, heads: list[str]) -> list[str]:
    """Where an estimate rests on fewer than MIN_USERS users."""
    out = []
    for j, h in enumerate(heads):
        users = len(np.unique(test_ex.user[test_ex.labels[:, j] > 0]))
        if users < MIN_USERS:
            out.append(f"head {h}: its test positives come from {users} users (< {MIN_USERS}); its intervals are wide")
    for name, m in (("held-out users", user_metrics), ("user folds", user_metrics.get("folds"))):
        if m is not None and m["dense_all_action"]["users"] < MIN_USERS:
            out.append(f"PinnerFormer Recall@10 over {name} rests on {m['dense_all_action']['users']} users "
                       f"(< {MIN_USERS})")
    return out


def comparison_uncertainty(test_ex: RankerExamples, test_probs: dict, group_rows: np.ndarray, group_hits: dict,
                           heads: list[str], seeds: list[int], known: np.ndarray, n_boot: int = 1000) -> dict:
    """TransAct against each baseline with 95% intervals from one paired bootstrap over test users and training
    seeds together (metrics.seed_resampled_mean): the AUC and GAUC differences (mean over seeds), both also on the
    candidates in the vocabulary that served them (`known`) alone and the AUC on the others (early fusion can only
    match a known item against the history), and the HIT@3 lift. An interval that straddles 0 means this test period and these seeds cannot tell
    the two models apart."""
    out = {"method": f"paired bootstrap over test users and training seeds ({n_boot} resamples, 95% percentile "
                     "interval); differences: TransAct minus the baseline, mean over the seeds",
           "seeds": seeds, "auc_difference": {}, "gauc_difference": {}, "auc_difference_by_candidate": {},
           "gauc_difference_by_candidate": {}, "hit@3_lift": {}}

    def differences(fn, base, rows):
        return {h: fn(test_ex.labels[rows, j], [test_probs["transact"][s][rows, j] for s in seeds],
                      [test_probs[base][s][rows, j] for s in seeds], test_ex.user[rows], n_boot)
                for j, h in enumerate(heads)}

    group_users = test_ex.user[group_rows]
    for base in BASELINES:
        out["auc_difference"][base] = differences(M.auc_difference_ci, base, slice(None))
        out["gauc_difference"][base] = differences(M.gauc_difference_ci, base, slice(None))
        out["auc_difference_by_candidate"][base] = {"in_vocabulary": differences(M.auc_difference_ci, base, known),
                                                    "out_of_vocabulary": differences(M.auc_difference_ci, base, ~known)}
        out["gauc_difference_by_candidate"][base] = {"in_vocabulary": differences(M.gauc_difference_ci, base, known)}
        out["hit@3_lift"][base] = {h: M.ratio_lift_ci([group_hits["transact"][s][:, j] for s in seeds],
                                                      [group_hits[base][s][:, j] for s in seeds], group_users, n_boot)
                                   for j, h in enumerate(heads)}
    return out


def evaluate_user_models(run: Path, cfg: RunConfig, prep: Prepared, user_folds: int = 1) -> dict:
    """PinnerFormer's Recall@10 of each held-out user's positives in the window after the split, dense all-action
    against next-action (trained here if the run lacks it), with the ratio's 95% interval over the held-out users.
    user_folds K > 1: also cross-validate over users, so every user is held out once and the interval rests on all
    of them: the users PinnerFormer trained on are split into K - 1 more held-out folds, each with its own pair of
    PinnerFormers trained like the run's (same config and seed) on everyone else (`folds` in the result)."""
    per_user = {objective: [] for objective in USER_OBJECTIVES}
    for k, held_out in enumerate(tqdm(held_out_user_folds(prep, user_folds, cfg.seed), desc="user folds")):
        fold_prep = replace(prep, pf_test_users=held_out)
        for objective in USER_OBJECTIVES:
            fold = f"_fold{k}of{user_folds}"  # the folds of another K hold other users
            path = (run / "user_folds" / f"pinnerformer_{objective}{fold}.safetensors" if k else
                    run / ("pinnerformer.safetensors" if objective == cfg.pinnerformer.objective
                           else f"baselines/pinnerformer_{objective}.safetensors"))
            per_user[objective].append(recall_of_held_out_users(run, cfg, fold_prep, objective, sorted(held_out),
                                                                path, tag=fold if k else ""))
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
    model = fit_pinnerformer(run, cfg, prep, objective, path, tag)
    emb = embed_users(model, prep.histories, users, np.full(len(users), prep.split_time))
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


def candidate_coverage(impressions, train_end: int) -> dict:
    """How much training tells the models about the test candidates: the share of test impressions whose item the
    training period showed (the vocabulary; the rest are one out-of-vocabulary row), and how often the median seen one
    was shown in it. Early fusion can only match a candidate against the history through what its embedding learned."""
    train_counts = impressions.loc[impressions.timestamp < train_end, "item_id"].value_counts()
    test_items = impressions.loc[impressions.is_test, "item_id"]
    seen = test_items.map(train_counts).dropna()
    return {"test_candidates_seen_in_training": float(len(seen) / max(len(test_items), 1)),
            "train_impressions_of_seen_test_candidate_median": float(seen.median()) if len(seen) else 0.0}


def _cell(entry: dict) -> str:
    if entry["ci"] is None:
        return f"{'n/a':>24}"
    return f"{entry['value']:>+7.3f} [{entry['ci'][0]:+.3f},{entry['ci'][1]:+.3f}]"


def format_table(result: dict, heads: list[str]) -> str:
    """The printed summary: per head, each model's AUC / GAUC / moment GAUC / HIT@3 (mean +- sd over seeds), then
    TransAct minus each baseline with its 95% interval over users and seeds."""
    seeds, sm, u = result["ranker_seeds"]["seeds"], result["ranker_seeds"], result["uncertainty"]
    complement_of = result["verdict"]["complement_of"]
    pos = result["data"]["test_positives"]
    refresh = result["data"]["item_refresh"]
    lines = [f"seeds {seeds}; mean +- sd over seeds; {result['data']['test_users']} test users, "
             f"{result['data']['test_requests']} requests; item rows of {len(refresh['refresh_times_ms'])} daily "
             f"refreshes (+{sum(refresh['new_items_per_refresh'])} items), test candidates in the vocabulary "
             f"{refresh['test_candidates_in_vocabulary']:.0%}",
             f"{'head':<14}{'pos':>6}" + "".join(f"{e + ' ' + m:>22}" for m in ("AUC", "GAUC", "mGAUC")
                                                 for e in RANKERS)]
    for h in heads:
        cells = "".join(f"{sm[e][h][m]['mean']:>15.4f} +-{sm[e][h][m]['sd'] or 0:.3f}"
                        for m in ("auc", "gauc", "moment_gauc") for e in RANKERS)
        note = f"  (= 1 - {complement_of[h]})" if h in complement_of else ""
        lines.append(f"{h:<14}{pos[h]:>6}{cells}{note}")
    lines.append(f"{'TransAct minus':<14}{'':>6}" + "".join(f"{b + ' ' + m:>24}" for b in BASELINES
                                                            for m in ("AUC", "GAUC", "mGAUC")))
    for h in heads:
        lines.append(f"{h:<14}{pos[h]:>6}" + "".join(_cell(u[k][b][h]) for b in BASELINES for k in (
            "auc_difference", "gauc_difference", "moment_gauc_difference")))
    lines.append(f"{'HIT@3':<14}" + "".join(f"{e:>20}" for e in RANKERS) + f"{'lift vs no_seq':>26}"
                 + f"{'reachable':>11}")
    for h in heads:
        lift = u["hit@3_lift"]["no_sequence"][h]
        lines.append(f"{h:<14}" + "".join(f"{sm[e][h]['hit@3']['mean']:>13.4f} +-{sm[e][h]['hit@3']['sd'] or 0:.3f}"
                                          for e in RANKERS)
                     + (f"{lift['value']:>+10.1%} [{lift['ci'][0]:+.1%},{lift['ci'][1]:+.1%}]" if lift["ci"]
                        else f"{'n/a':>26}")
                     + f"{result['hit@3_bounds'][h]['reachable_lift_over_no_sequence']:>+11.1%}")
    for m in (result["user_model"], result["user_model"].get("folds")):
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
