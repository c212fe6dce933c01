"""End to end: `seqrank train` + `seqrank evaluate` on the shipped KuaiRand sample with a small config, through the
real command line (subprocess), then a resumed `seqrank train` on the same run directory.

Kept small (one epoch each, small dims; ~1 min on 2 cores) -- the numbers are not the point, the run directory,
the metrics' shape and the resume behaviour are.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from seqrank import __version__ as seqrank_version
from seqrank.data.loaders import KUAIRAND_SAMPLE

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL_CONFIG = {
    "seed": 0,
    "threads": 2,
    "pinnerformer": {"epochs": 1, "max_len": 32, "d_model": 16, "n_heads": 1, "n_layers": 1, "d_ff": 32,
                     "dim": 16, "random_negatives": 64, "positions_per_user": 8},
    # two epochs, so that the selection slice has an epoch to choose
    "transact": {"epochs": 2, "seq_len": 20, "action_dim": 8, "item_dim": 8, "d_ff": 16, "n_layers": 1,
                 "top_k_rows": 3, "mlp": [32, 16], "cross_rank": 8, "cross_layers": 1, "sequence_mean": True},
}
REQUIRED_HEADS = ("like", "hate", "click")
RUN_FILES = ("config.json", "run.json", "vocab/items.npy", "vocab/vocab.json", "pinnerformer.safetensors",
             "item_table.npy", "users.npy", "user_emb.npy", "ranker.safetensors",
             "checkpoints/pinnerformer_dense_all_action.pt", "checkpoints/ranker_transact.pt")
EVAL_FILES = ("metrics.json", "baselines/ranker_no_sequence.safetensors", "baselines/ranker_avg_pool.safetensors",
              "baselines/pinnerformer_next_action.safetensors")


def seqrank(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "seqrank.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"seqrank {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, elapsed


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    config = base / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    out = base / "run"
    train, train_s = seqrank("train", "--events", str(KUAIRAND_SAMPLE), "--out", str(out), "--config", str(config))
    assert "trained in" in train.stdout
    files_after_train = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    evaluate, eval_s = seqrank("evaluate", "--run", str(out))
    return {"out": out, "config": config, "train_s": train_s, "eval_s": eval_s, "eval_stdout": evaluate.stdout,
            "files_after_train": files_after_train}


def test_train_writes_the_run_directory(run):
    out = run["out"]
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert "metrics.json" not in run["files_after_train"]  # train alone does not evaluate
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transact"]["seq_len"] == 20 and cfg["pinnerformer"]["epochs"] == 1 and cfg["seed"] == 0
    info = json.loads((out / "run.json").read_text())
    assert info["events"] == str(KUAIRAND_SAMPLE.resolve())
    for h in REQUIRED_HEADS:
        assert h in info["heads"]
    assert info["negative_heads"] == ["hate"]
    assert info["seq_len"] == 20 and info["user_dim"] == 16 and info["train_seconds"] > 0
    assert info["seqrank_version"] == seqrank_version and info["ranker_selected_epoch"] in (1, 2)
    assert info["split_time_ms"] > info["selection_start_ms"]
    # candidates trained as the OOV row: those no daily refresh had served yet (on this log 44%, first acted on
    # the day they were shown), not a random share
    assert 0.3 < info["candidate_oov_share"] < 0.6
    vocab = json.loads((out / "vocab" / "vocab.json").read_text())
    assert vocab["heads"] == info["heads"]
    items = np.load(out / "vocab" / "items.npy")
    table = np.load(out / "item_table.npy")
    assert table.shape == (len(items) + 2, 16) and np.isfinite(table).all()
    assert (table[0] == 0).all()                             # padding row
    users, emb = np.load(out / "users.npy"), np.load(out / "user_emb.npy")
    assert len(users) == len(emb) > 100 and emb.shape[1] == 16 and np.isfinite(emb).all()
    norms = np.linalg.norm(emb, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-4) | (norms == 0))  # L2-normalised (zeros only for an empty history)


def test_evaluate_writes_metrics_of_the_required_shape(run):
    out = run["out"]
    for name in EVAL_FILES:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    heads = json.loads((out / "run.json").read_text())["heads"]
    assert set(metrics["ranker"]) == {"transact", "no_sequence", "avg_pool"}
    for encoder, per_head in metrics["ranker"].items():
        assert set(per_head) == set(heads)
        for h, m in per_head.items():
            assert {"auc", "gauc", "moment_gauc", "hit@3"} <= set(m), (encoder, h)
            if h in REQUIRED_HEADS:
                assert 0.0 < m["auc"] < 1.0 and 0.0 < m["gauc"] < 1.0 and 0.0 < m["moment_gauc"] < 1.0, (encoder, h, m)
            else:  # a rare head may have no positive in the test period
                assert math.isnan(m["auc"]) or 0.0 <= m["auc"] <= 1.0, (encoder, h, m)
            assert 0.0 <= m["hit@3"] <= 3.0, (encoder, h, m)
    # the sequence models learned the strongly user-dependent like/hate labels even in one small epoch
    for h in ("like", "hate"):
        assert metrics["ranker"]["transact"][h]["auc"] > 0.6, metrics["ranker"]["transact"][h]
    user = metrics["user_model"]
    for objective in ("dense_all_action", "next_action"):
        assert 0.0 <= user[objective]["recall@10"] <= 1.0
        assert user[objective]["users"] > 0
    if user["dense_vs_next_ratio"] is not None:  # None only when next-action recalls nothing at all
        lo, hi = user["dense_vs_next_ratio_ci"]
        assert lo <= user["dense_vs_next_ratio"] <= hi
    data = metrics["data"]
    assert data["test_impressions"] > 0 and data["train_impressions"] > data["test_impressions"]
    assert 0.0 < data["test_candidates_seen_in_training"] < 1.0  # this log: about half the test items are new
    assert data["train_impressions_of_seen_test_candidate_median"] >= 1.0
    # each test request was scored with the rows the daily refresh learned before it: one refresh per test day
    # (this sample's test period spans 4 day starts), each adding items, and more test candidates in the vocabulary
    refreshed = data["item_refresh"]
    times = refreshed["refresh_times_ms"]
    assert len(times) >= 3 and times == sorted(times) and all(t % 86_400_000 == 0 for t in times)
    assert times[0] > json.loads((out / "run.json").read_text())["split_time_ms"]
    assert all(n > 0 for n in refreshed["new_items_per_refresh"])
    assert refreshed["test_candidates_in_vocabulary"] > data["test_candidates_seen_in_training"] + 0.05
    assert all((out / "item_refresh" / str(t) / "item_table.npy").is_file() for t in times)
    assert set(metrics["lifts_of_transact"]) == {"no_sequence", "avg_pool"}
    assert data["request_gap_s"] == 60.0 and data["test_users"] > 0 and data["test_requests"] >= data["test_users"]
    assert data["complement_heads"] == [["hate", "like"]]   # KuaiRand: every impression is liked or hated
    verdict = metrics["verdict"]
    assert "hate" not in verdict["counted_heads"] and verdict["complement_of"] == {"hate": "like"}
    assert all(verdict[b][h][m] in ("above", "below", "level", "n/a") for b in ("no_sequence", "avg_pool")
               for h in heads for m in ("auc", "gauc", "moment_gauc"))
    assert data["moment_pairs"] > data["moments"] > 0
    # every comparison carries its bootstrap interval, around the point it reports
    assert set(data["test_positives"]) == set(heads) and data["test_positives"]["like"] > 0
    unc = metrics["uncertainty"]
    assert unc["seeds"] == [0]
    for base in ("no_sequence", "avg_pool"):
        for h in REQUIRED_HEADS:
            for m, key in (("auc", "auc_difference"), ("gauc", "gauc_difference"),
                           ("moment_gauc", "moment_gauc_difference")):
                d = unc[key][base][h]
                assert d["value"] == pytest.approx(metrics["lifts_of_transact"][base][h][m], abs=1e-12)
                assert d["ci"][0] <= d["value"] <= d["ci"][1] and 0 <= d["share_at_or_below_0"] <= 1
            for part in ("in_vocabulary", "out_of_vocabulary"):  # the same comparison split by the candidate's coverage
                d = unc["auc_difference_by_candidate"][base][part][h]
                assert d["ci"] is None or d["ci"][0] <= d["value"] <= d["ci"][1], (part, h, d)
            d = unc["gauc_difference_by_candidate"][base]["in_vocabulary"][h]
            assert d["ci"] is None or d["ci"][0] <= d["value"] <= d["ci"][1], (h, d)
            lift = unc["hit@3_lift"][base][h]
            assert lift["ci"] is not None and lift["ci"][0] <= lift["value"] <= lift["ci"][1], (base, h, lift)
            assert lift["value"] == pytest.approx(metrics["lifts_of_transact"][base][h]["hit@3_lift"], abs=1e-6)
    assert "TransAct minus" in run["eval_stdout"]
    for h in REQUIRED_HEADS:  # the no-sequence model's HIT@3 lies between what any ranking could reach
        b, got = metrics["hit@3_bounds"][h], metrics["ranker"]["no_sequence"][h]["hit@3"]
        assert b["fewest"] - 1e-6 <= got <= b["most"] + 1e-6 and b["fewest"] <= b["random"] <= b["most"]
    # the printed table names every head
    for h in heads:
        assert h in run["eval_stdout"]


def test_evaluate_is_deterministic_and_reuses_trained_baselines(run):
    out = run["out"]
    before = {name: digest(out / name) for name in EVAL_FILES if name.endswith(".safetensors")}
    checkpoints = {p.name: digest(p) for p in (out / "checkpoints").glob("*.pt")}
    assert len(checkpoints) == 5  # 3 rankers + 2 PinnerFormer objectives
    item_states = {str(p.relative_to(out)): digest(p) for p in (out / "item_refresh").rglob("*") if p.is_file()}
    assert item_states
    selected = json.loads((out / "metrics.json").read_text())["ranker_seeds"]["selected_epoch"]
    assert all(epochs[0] in (1, 2) for epochs in selected.values())
    first = json.loads((out / "metrics.json").read_text())
    seqrank("evaluate", "--run", str(out))
    second = json.loads((out / "metrics.json").read_text())
    assert {name: digest(out / name) for name in before} == before
    # no epoch ran again: a finished epoch rewrites its checkpoint
    assert {p.name: digest(p) for p in (out / "checkpoints").glob("*.pt")} == checkpoints
    # the replayed refreshes are read back, not learned again
    assert {str(p.relative_to(out)): digest(p) for p in (out / "item_refresh").rglob("*") if p.is_file()} == item_states
    assert json.dumps(first["ranker"], sort_keys=True) == json.dumps(second["ranker"], sort_keys=True)
    assert json.dumps(first["user_model"], sort_keys=True) == json.dumps(second["user_model"], sort_keys=True)


def test_train_resumes_from_the_finished_checkpoint(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    weights = {name: digest(out / name) for name in ("pinnerformer.safetensors", "ranker.safetensors")}
    user_emb = np.load(out / "user_emb.npy")
    checkpoints = {p.name: digest(p) for p in (out / "checkpoints").glob("*.pt")}
    trained_in = json.loads((out / "run.json").read_text())["train_seconds"]
    # 1) everything finished: a second `seqrank train` reuses the trained models, and keeps their training time
    seqrank("train", "--events", str(KUAIRAND_SAMPLE), "--out", str(out), "--config", str(run["config"]))
    assert {name: digest(out / name) for name in weights} == weights
    assert json.loads((out / "run.json").read_text())["train_seconds"] == trained_in
    np.testing.assert_array_equal(np.load(out / "user_emb.npy"), user_emb)
    # 2) the final weights are gone but the per-epoch checkpoints finished: they are reused, not retrained
    (out / "pinnerformer.safetensors").unlink()
    (out / "ranker.safetensors").unlink()
    resumed, _ = seqrank("train", "--events", str(KUAIRAND_SAMPLE), "--out", str(out), "--config",
                           str(run["config"]))
    assert {name: digest(out / name) for name in weights} == weights
    np.testing.assert_array_equal(np.load(out / "user_emb.npy"), user_emb)
    # no epoch ran: each finished epoch would have rewritten its checkpoint
    assert {p.name: digest(p) for p in (out / "checkpoints").glob("*.pt")} == checkpoints
    assert "nothing to train: the saved models are current" in resumed.stdout


def test_train_after_a_config_change_trains_again_only_what_the_change_touches(run, tmp_path):
    """A saved model or checkpoint is reused only when it was trained from the same config, events and code
    (pipeline.model_origin): after a change of the ranker's config the ranker trains again from its first epoch (its
    finished checkpoint of the old config is not resumed), PinnerFormer is reused."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    pinnerformer, ranker = digest(out / "pinnerformer.safetensors"), digest(out / "ranker.safetensors")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**SMALL_CONFIG, "transact": {**SMALL_CONFIG["transact"], "lr": 1e-3}}))
    proc, _ = seqrank("train", "--events", str(KUAIRAND_SAMPLE), "--out", str(out), "--config", str(config))
    assert "trained in" in proc.stdout
    assert digest(out / "pinnerformer.safetensors") == pinnerformer
    assert digest(out / "ranker.safetensors") != ranker
    info = json.loads((out / "run.json").read_text())
    assert info["pinnerformer_reused"] and len(info["epoch_seconds"]["ranker"]) == 2  # both epochs ran again
    # the new ranker is now the current one: evaluate scores it without training it again
    retrained = digest(out / "ranker.safetensors")
    checkpoint = digest(out / "checkpoints" / "ranker_transact.pt")
    proc, _ = seqrank("train", "--events", str(KUAIRAND_SAMPLE), "--out", str(out), "--config", str(config))
    assert "nothing to train: the saved models are current" in proc.stdout
    assert digest(out / "ranker.safetensors") == retrained
    assert digest(out / "checkpoints" / "ranker_transact.pt") == checkpoint
    # a change of PinnerFormer's config trains both again (the ranker reads PinnerFormer's item table)
    config.write_text(json.dumps({**SMALL_CONFIG, "pinnerformer": {**SMALL_CONFIG["pinnerformer"], "lr": 1e-3}}))
    seqrank("train", "--events", str(KUAIRAND_SAMPLE), "--out", str(out), "--config", str(config))
    info = json.loads((out / "run.json").read_text())
    assert not info["pinnerformer_reused"] and digest(out / "pinnerformer.safetensors") != pinnerformer
    assert len(info["epoch_seconds"]["pinnerformer"]) == 1 and len(info["epoch_seconds"]["ranker"]) == 2


def test_evaluate_refuses_a_run_whose_pinnerformer_is_not_current(run, tmp_path):
    """evaluate would train rankers on a stale PinnerFormer's item table (and its user folds would retrain that
    PinnerFormer in place): it stops, naming the command that trains the run again."""
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    config = json.loads((out / "config.json").read_text())
    config["pinnerformer"]["lr"] = 1e-3
    (out / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "seqrank.cli", "evaluate", "--run", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "its PinnerFormer was trained from another config, code or data" in proc.stderr
    assert f"seqrank train --events {KUAIRAND_SAMPLE.resolve()} --out {out}" in proc.stderr


def test_evaluate_over_seeds_trains_each_ranker_per_seed_and_reports_the_spread(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    seeds_eval, _ = seqrank("evaluate", "--run", str(out), "--seeds", "0,1", "--user-folds", "3")
    metrics = json.loads((out / "metrics.json").read_text())
    first = json.loads((run["out"] / "metrics.json").read_text())
    seeds = metrics["ranker_seeds"]
    assert seeds["seeds"] == [0, 1] and all(len(v) == 2 for v in seeds["selected_epoch"].values())
    for encoder in ("transact", "no_sequence", "avg_pool"):
        assert (out / "seeds" / f"ranker_{encoder}_seed1.safetensors").is_file()
        assert (out / "checkpoints" / f"ranker_{encoder}_seed1.pt").is_file()  # never the seed-0 checkpoint
        for head, entry in seeds[encoder].items():
            for m in ("auc", "gauc", "hit@3"):
                values = entry[m]["values"]
                assert values[0] == first["ranker"][encoder][head][m] or math.isnan(values[0])  # seed 0: the run's
                assert entry[m]["mean"] == pytest.approx(np.mean(values)) or math.isnan(entry[m]["mean"])
                # metrics.json's ranker section is the mean over the seeds
                assert metrics["ranker"][encoder][head][m] == pytest.approx(np.mean(values)) or math.isnan(values[0])
    # seed 1 is a different model: its AUCs are not all equal to seed 0's
    assert any(e["auc"]["values"][0] != e["auc"]["values"][1] for e in seeds["transact"].values())
    assert "seeds [0, 1]" in seeds_eval.stdout
    # the interval is for the difference averaged over both seeds; HIT@3 lifts are given per seed
    assert metrics["uncertainty"]["seeds"] == [0, 1]
    for h in ("like", "hate"):
        mean_diff = np.mean([seeds["transact"][h]["auc"]["values"][i] - seeds["avg_pool"][h]["auc"]["values"][i]
                             for i in (0, 1)])
        assert metrics["uncertainty"]["auc_difference"]["avg_pool"][h]["value"] == pytest.approx(mean_diff, abs=1e-12)
        assert len(metrics["lifts_of_transact"]["no_sequence"][h]["hit@3_lift_per_seed"]["values"]) == 2
    # --user-folds 3: the run's own held-out users keep their numbers; two more folds of users, each scored by its own
    # pair of PinnerFormers, put every user in the dense vs next-action comparison
    user, folds = metrics["user_model"], metrics["user_model"]["folds"]
    assert json.dumps({k: v for k, v in user.items() if k != "folds"}, sort_keys=True) == \
        json.dumps(first["user_model"], sort_keys=True)
    for k in (1, 2):
        for objective in ("dense_all_action", "next_action"):
            assert (out / "user_folds" / f"pinnerformer_{objective}_fold{k}of3.safetensors").is_file()
            assert (out / "checkpoints" / f"pinnerformer_{objective}_fold{k}of3.pt").is_file()
    assert folds["k"] == 3 and folds["dense_all_action"]["users"] == folds["next_action"]["users"]
    assert folds["dense_all_action"]["users"] >= 3 * user["dense_all_action"]["users"]  # 20% of users -> all
    if folds["dense_vs_next_ratio_ci"] is not None:
        lo, hi = folds["dense_vs_next_ratio_ci"]
        assert lo <= folds["dense_vs_next_ratio"] <= hi
    assert "(3 user folds)" in seeds_eval.stdout


def test_evaluate_without_refreshes_scores_with_the_training_vocabulary(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    seqrank("evaluate", "--run", str(out), "--refreshes", "0")
    frozen, refreshed = (json.loads((d / "metrics.json").read_text()) for d in (out, run["out"]))
    assert frozen["data"]["item_refresh"]["refresh_times_ms"] == []
    assert frozen["data"]["item_refresh"]["test_candidates_in_vocabulary"] < \
        refreshed["data"]["item_refresh"]["test_candidates_in_vocabulary"]
    # the same trained rankers, scored with other item rows
    assert frozen["ranker_seeds"]["selected_epoch"] == refreshed["ranker_seeds"]["selected_epoch"]
    assert frozen["ranker"]["transact"]["click"]["auc"] != refreshed["ranker"]["transact"]["click"]["auc"]


def test_kept_item_states_are_learned_again_for_another_pinnerformer(run, tmp_path):
    from safetensors.torch import load_file, save_file
    from seqrank.daily_items import replay_refreshes
    from seqrank.pipeline import load_run
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    first = sorted((out / "item_refresh").glob("*/refresh.json"))
    kept = {p: digest(p.parent / "item_table.npy") for p in first}
    weights = load_file(out / "pinnerformer.safetensors")  # a retrained PinnerFormer, as far as the states can tell
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()}, out / "pinnerformer.safetensors")
    _, _, prep = load_run(out)
    states = replay_refreshes(out, prep, prep.test_rows())
    assert [s.directory for s in states[1:]] == [p.parent for p in first]
    assert all(digest(p.parent / "item_table.npy") != h for p, h in kept.items())


def test_moment_pairs_score_as_evaluate_scores_each_request(run):
    """RefreshedTest.predict_pairs (moment GAUC): an impression paired with itself gets exactly what predict gives
    it; a candidate scored at another impression's request gets that request's features and item state."""
    from seqrank.daily_items import RefreshedTest, replay_refreshes
    from seqrank.evaluation import ranker_path
    from seqrank.features import OOV
    from seqrank.pipeline import fit_ranker, load_ranker_examples
    out = run["out"]
    cfg, _, prep, table, data = load_ranker_examples(out)
    rows = prep.test_rows()
    served = RefreshedTest(cfg, prep, rows, replay_refreshes(out, prep, rows))
    model = fit_ranker(out, cfg, prep, table, data, "transact", ranker_path(out, cfg, "transact", cfg.seed))
    every = np.arange(len(rows))
    np.testing.assert_allclose(served.predict_pairs(model, every, every), served.predict(model), atol=1e-6)
    # the latest impression's item as a candidate of the earliest request: scored with the earliest request's
    # features and item state, where an item a later refresh learned is still the OOV row
    times = prep.impressions.request_time.to_numpy()[rows]
    newest = np.flatnonzero(served.cand_item >= prep.vocab.n_items)  # items learned by a refresh after the split
    first, last = every[[np.argmin(times)]], newest[[np.argmax(times[newest])]]
    early = next(part for part in served.parts if first[0] in part[0])
    assert early is served.parts[0] and len(served.parts) > 1
    assert early[3].item_index(served.item_ids[last])[0] == OOV
    pair = served.predict_pairs(model, first, last)
    assert not np.allclose(pair, served.predict(model)[last], atol=1e-6)  # not its own request's features
    # another item that later refresh learned is the same OOV row at that moment, so it scores the same there,
    # though the two have rows of their own in the states that served them
    other = newest[served.item_ids[newest] != served.item_ids[last[0]]][:1]
    assert served.cand_item[other[0]] != served.cand_item[last[0]]
    np.testing.assert_array_equal(served.predict_pairs(model, first, other), pair)


def test_store_down_scores_every_request_as_the_outage_fallback(run):
    """RefreshedTest.store_down (the outage cut of research/sequence_lag.py, ranker_variants.py --store-down): every
    request with no sequence and the "unavailable" flag, the rest as served; the ranker's scores change."""
    from seqrank.daily_items import RefreshedTest, replay_refreshes
    from seqrank.evaluation import ranker_path
    from seqrank.features import UNAVAILABLE
    from seqrank.pipeline import fit_ranker, load_ranker_examples
    out = run["out"]
    cfg, _, prep, table, data = load_ranker_examples(out)
    rows = prep.test_rows()
    served = RefreshedTest(cfg, prep, rows, replay_refreshes(out, prep, rows))
    down = served.store_down()
    assert len(down.parts) == len(served.parts) > 1
    for (positions, ex, item_rows, vocab), (p2, dex, t2, v2) in zip(served.parts, down.parts):
        assert p2 is positions and t2 is item_rows and v2 is vocab
        assert ex.seq.seq_mask.any() and not dex.seq.seq_mask.any()
        assert (dex.seq.context[:, UNAVAILABLE] == 1).all() and (ex.seq.context[:, UNAVAILABLE] == 0).all()
        np.testing.assert_array_equal(dex.seq.context[:, 2:UNAVAILABLE], ex.seq.context[:, 2:UNAVAILABLE])
        np.testing.assert_array_equal(dex.cand_item, ex.cand_item)
    model = fit_ranker(out, cfg, prep, table, data, "transact", ranker_path(out, cfg, "transact", cfg.seed))
    assert not np.allclose(down.predict(model), served.predict(model), atol=1e-4)


def test_refresh_times_are_daily_up_to_a_cap():
    from seqrank.daily_items import refresh_times
    day = 86_400_000
    split = 10 * day + 5_000
    few = np.array([split + 1, split + day, split + 2 * day + 7, split + 2 * day + 9])
    assert refresh_times(few, split, 8) == [11 * day, 12 * day]      # every day start after the split
    assert refresh_times(few, split, 0) == []
    many = split + np.arange(200) * day // 2                          # 100 days of requests
    times = refresh_times(many, split, 8)
    assert 2 <= len(times) <= 8 and times[0] == 11 * day and times == sorted(set(times))
    assert all(t % day == 0 and t > split for t in times)


def test_user_folds_hold_out_every_user_exactly_once():
    from dataclasses import replace as dc_replace

    import pandas as pd

    from seqrank.config import RunConfig
    from seqrank.data.loaders import EventLog
    from seqrank.dataset import prepare
    from seqrank.evaluation import held_out_user_folds
    rows = [(f"u{i}", f"i{j}", "click", 1000 * (10 * i + j)) for i in range(10) for j in range(3)]
    log = EventLog(events=pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]), source="hand",
                   fmt="canonical", duplicates_dropped=0, negative_actions=(), exposure_action=None)
    cfg = RunConfig()
    cfg.data = dc_replace(cfg.data, pinnerformer_test_users=0.2)
    prep = prepare(log, cfg)
    assert held_out_user_folds(prep, 1, seed=0) == [prep.pf_test_users]
    folds = held_out_user_folds(prep, 5, seed=0)
    assert folds[0] == prep.pf_test_users and [len(f) for f in folds] == [2] * 5
    assert set().union(*folds) == set(prep.users) and sum(len(f) for f in folds) == len(prep.users)
    assert held_out_user_folds(prep, 5, seed=0) == folds
    for bad in (0, 10):
        with pytest.raises(ValueError, match="user_folds"):
            held_out_user_folds(prep, bad, seed=0)


def test_candidate_coverage_counts_test_items_seen_in_training():
    import pandas as pd
    from seqrank.evaluation import candidate_coverage
    imp = pd.DataFrame({"item_id": ["a", "a", "b", "c", "a", "b", "d", "d"],
                        "timestamp": [1, 2, 3, 4, 10, 11, 12, 13],
                        "is_test": [False, False, False, False, True, True, True, True]})
    cov = candidate_coverage(imp, train_end=10)
    assert cov["test_candidates_seen_in_training"] == 0.5               # a and b seen; d (twice) never
    assert candidate_coverage(imp, train_end=3)["test_candidates_seen_in_training"] == 0.25  # only a, once
    assert cov["train_impressions_of_seen_test_candidate_median"] == 1.5  # a: 2, b: 1
