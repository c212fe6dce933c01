"""Data-parallel training (seqrank/distributed.py) with the real torchrun and torch.distributed (gloo, CPU), on the
first users of the shipped KuaiRand sample with small models:

- 2 processes train the models 1 process trains from the same global batches (same selected epoch, the same
  predictions and AUCs within the tolerance docs/training-at-scale.md states), the log names the world size, and no
  rank but 0 writes a byte (tests/only_rank0_writes.py);
- from a dataset (seqrank convert), 2 processes that each read and train on only their own users (a partition)
  train a model as good as one process's, within a stated tolerance, and write what it writes;
- a worker SIGKILLed after the ranker's first checkpoint: torchrun restarts the group, it resumes from the
  checkpoint and ends with the weights of the uninterrupted 2-process run.

The batch sizes are picked so that each model's last batch holds a single row: rank 1 then has no row of it and
joins the gradient all-reduce with a zero-weighted stand-in (distributed.shard), which the comparison covers too.
~2.5 min on 2 shared cores.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from seqrank.distributed import restart_hazard, shard_of
from seqrank.evaluation import ranker_test_scores

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
N_USERS = 80
# 1 vs 2 processes: the same arithmetic summed in another order (float32); on this short run (60 ranker steps) the
# rounding stays small: measured 3e-7 on an AVX-512 machine and 4.2e-5 on an AVX2-only one (other kernels, other
# summation orders, amplified by 60 steps). Longer runs amplify it as any 1e-7 perturbation of one process's training does (docs/training-at-scale.md)
PREDICTION_TOLERANCE = 2e-4
AUC_TOLERANCE = 1e-4
# 2 partitioned processes draw other batches than 1 process (each from its own users), so they train other models
# of the same quality: over 3 seeds, their mean AUC must not fall below one process's by more than this margin (on
# this log a seed alone moves one process's like/hate AUC by up to 0.03 and click by 0.15)
SEEDS = (0, 1, 2)
PARTITIONED_AUC_MARGIN = 0.015
# PinnerFormer batches of 32 users, 16 per rank: the ranks hold 33 and 31 of its users, so rank 1 has one batch fewer
# and joins the last step with a stand-in (as rank 1 does for ~7 ranker steps per epoch: 2044 against 1646 rows)
PARTITIONED = ("--set", "pinnerformer.batch_users=32")
PF = {"epochs": 2, "max_len": 32, "d_model": 16, "n_heads": 1, "n_layers": 1, "d_ff": 32, "dim": 16,
      "random_negatives": 64, "positions_per_user": 8, "dropout": 0.0}
RANKER = {"epochs": 3, "seq_len": 20, "action_dim": 8, "item_dim": 8, "d_ff": 16, "n_layers": 1, "top_k_rows": 3,
          "mlp": [32, 16], "cross_rank": 8, "cross_layers": 1, "dropout": 0.0}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def _last_batch_of_one(n: int, sizes: range) -> int:
    """A batch size that leaves a last batch of one row."""
    size = next((b for b in sizes if n % b == 1), None)
    assert size is not None, f"no batch size in {sizes} leaves one row of {n}"
    return size


def _pinnerformer_users(prep, dense_targets):
    users = [u for u in prep.users if u not in prep.pf_test_users]
    return dense_targets(prep.histories, prep.vocab, users, prep.split_time, prep.future_window_ms).users


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The small log (first N_USERS users of the sample) and a config whose last batches hold one row."""
    from seqrank.config import RunConfig
    from seqrank.data.sample import write_first_users
    from seqrank.dataset import load_log, prepare
    from seqrank.training import dense_targets

    base = tmp_path_factory.mktemp("ddp")
    events = write_first_users(base / "events.tsv.gz", N_USERS)
    cfg = RunConfig.from_dict({"seed": 0, "threads": 1, "pinnerformer": PF, "transact": RANKER})
    prep = prepare(load_log(str(events), cfg), cfg)
    cfg = replace(cfg, pinnerformer=replace(cfg.pinnerformer,
                                            batch_users=_last_batch_of_one(len(_pinnerformer_users(prep, dense_targets)),
                                                                           range(16, 40))),
                  transact=replace(cfg.transact,
                                   batch_size=_last_batch_of_one(len(prep.ranker_train_rows()), range(100, 200))))
    config = base / "config.json"
    config.write_text(cfg.to_json())
    return base, events, config


def _train_args(events: Path, out: Path, config: Path) -> list[str]:
    return ["train", "--events", str(events), "--out", str(out), "--config", str(config)]


@pytest.fixture(scope="module")
def one_and_two(setup):
    """The same training by one process (plain `seqrank train`) and by two (torchrun, ranks > 0 cannot write)."""
    base, events, config = setup
    one = subprocess.run([sys.executable, "-m", "seqrank.cli", *_train_args(events, base / "one", config)],
                         cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2",
                          str(REPO_ROOT / "tests" / "only_rank0_writes.py"), *_train_args(events, base / "two", config)],
                         cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    return base / "one", one, base / "two", two


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def test_two_processes_train_what_one_trains_and_only_rank_0_writes(one_and_two):
    one, one_log, two, two_log = one_and_two
    assert "world size 2" in two_log.stderr
    # each rank ran its half of every batch (rank 0 the one row of a last batch of one)
    for model in ("pinnerformer[dense_all_action]", "ranker[transact]"):
        line = re.escape(model) + r": epoch \d+ of \d+ in [\d.]+ s, rank 0 ran (\d+) of the epoch's (\d+) rows"
        shares = re.findall(line, two_log.stderr)
        assert shares and all(0.45 < int(here) / int(total) < 0.55 for here, total in shares), (model, shares)
    assert "world size" not in one_log.stderr  # no process group without torchrun
    assert "trained in" in one_log.stdout and two_log.stdout.count("trained in") == 1  # rank 0's line alone
    assert _files(two) == _files(one)
    info_one, info_two = (json.loads((run / "run.json").read_text()) for run in (one, two))
    assert (info_one["world_size"], info_two["world_size"]) == (1, 2)
    assert info_two["ranker_selected_epoch"] == info_one["ranker_selected_epoch"]
    np.testing.assert_allclose(np.load(two / "user_emb.npy"), np.load(one / "user_emb.npy"), atol=1e-4)
    probs_one, auc_one = ranker_test_scores(one)
    probs_two, auc_two = ranker_test_scores(two)
    print(f"1 vs 2 processes: largest prediction difference {np.abs(probs_two - probs_one).max():.2e}, AUC "
          + ", ".join(f"{h} {auc_one[h]:.4f}/{auc_two[h]:.4f}" for h in ("like", "hate", "click")))
    np.testing.assert_allclose(probs_two, probs_one, atol=PREDICTION_TOLERANCE)
    for head in ("like", "hate", "click"):
        assert abs(auc_two[head] - auc_one[head]) <= AUC_TOLERANCE, (head, auc_one[head], auc_two[head])


@pytest.fixture(scope="module")
def partitioned(setup):
    """2 processes training from the small log converted to a dataset of 8 buckets, for seeds 0, 1, 2: each rank
    reads and prepares the users of its own 4 buckets and trains on batches of them (ranks > 0 cannot write)."""
    from seqrank.data.parquet_events import convert_events
    base, events, config = setup
    dataset = base / "events-ds"
    convert_events(str(events), dataset, n_buckets=8)
    runs, logs = [], []
    for seed in SEEDS:
        out = base / f"partitioned-seed{seed}"
        two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2",
                              str(REPO_ROOT / "tests" / "only_rank0_writes.py"),
                              *_train_args(dataset, out, config), *PARTITIONED, "--set", f"seed={seed}"],
                             cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert two.returncode == 0, two.stderr[-4000:]
        runs.append(out)
        logs.append(two)
    return runs, logs


@pytest.fixture(scope="module")
def seeds_of_one(setup):
    """One process's runs (from the file) with the same config, for the same seeds."""
    base, events, config = setup
    runs = []
    for seed in SEEDS:
        out = base / f"one-seed{seed}"
        done = subprocess.run([sys.executable, "-m", "seqrank.cli", *_train_args(events, out, config), *PARTITIONED,
                               "--set", f"seed={seed}"], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        runs.append(out)
    return runs


def test_ranks_train_on_their_own_users_of_a_dataset_and_reach_what_one_process_reaches(partitioned, seeds_of_one):
    (two, *_), (log, *_) = partitioned
    one = seeds_of_one[0]
    assert "world size 2" in log.stderr
    held = {int(part): (int(users), int(events)) for part, users, events in
            re.findall(r"partition (\d) of 2: (\d+) users, (\d+) events", log.stderr)}
    info_one, info_two = (json.loads((run / "run.json").read_text()) for run in (one, two))
    assert sorted(held) == [0, 1] and all(users > 0 for users, _ in held.values()), log.stderr[-2000:]
    assert sum(users for users, _ in held.values()) == N_USERS  # each user on one rank
    assert sum(events for _, events in held.values()) == info_one["n_events"] == info_two["n_events"]
    for model in ("pinnerformer[dense_all_action]", "ranker[transact]"):  # rank 0 ran its own users' rows only
        line = re.escape(model) + r": epoch \d+ of \d+ in [\d.]+ s, rank 0 ran (\d+) of the epoch's (\d+) rows"
        shares = re.findall(line, log.stderr)
        assert shares and all(0.2 < int(here) / int(total) < 0.8 for here, total in shares), (model, shares)
    assert _files(two) == _files(one)
    assert info_two["candidate_oov_share"] == info_one["candidate_oov_share"]  # items first acted on by either rank's users
    # the daily batch gathered from both ranks: every user once, in one process's order
    np.testing.assert_array_equal(np.load(two / "users.npy"), np.load(one / "users.npy"))
    assert np.load(two / "user_emb.npy").shape == np.load(one / "user_emb.npy").shape
    for head in ("like", "hate", "click"):
        aucs = {name: [ranker_test_scores(run)[1][head] for run in runs]
                for name, runs in (("2 partitioned processes", partitioned[0]), ("1 process", seeds_of_one))}
        print(f"{head} AUC, seeds {SEEDS}: " + "; ".join(f"{name} " + " ".join(f"{a:.4f}" for a in values)
                                                         for name, values in aucs.items()))
        assert np.mean(aucs["2 partitioned processes"]) >= np.mean(aucs["1 process"]) - PARTITIONED_AUC_MARGIN, aucs


def test_a_process_count_that_does_not_divide_the_buckets_is_refused_by_name(setup, tmp_path):
    from seqrank.config import RunConfig
    from seqrank.data.loaders import DataError
    from seqrank.data.parquet_events import convert_events
    from seqrank.streamed import prepare_events
    _, events, _ = setup
    convert_events(str(events), tmp_path / "ds", n_buckets=8)
    with pytest.raises(DataError, match="has 8 buckets, which 3 data-parallel processes cannot share"):
        prepare_events(str(tmp_path / "ds"), RunConfig(), 0, 3)
    assert prepare_events(str(tmp_path / "ds"), RunConfig(), 1, 4).partition == (1, 4)


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun (pid `parent`) started."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) != parent:
            continue
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            out[int(rank)] = int(entry)
    return out


@pytest.mark.parametrize("source", ["file", "dataset"])
def test_a_killed_worker_is_restarted_and_the_group_resumes_from_the_checkpoint(setup, one_and_two, partitioned,
                                                                                source):
    """From a file (global batches split by rows) and from a dataset (each rank's own users)."""
    base, events, config = setup
    extra: tuple[str, ...] = ()
    if source == "file":
        uninterrupted = one_and_two[2]
    else:
        events, uninterrupted, extra = base / "events-ds", partitioned[0][0], PARTITIONED  # seed 0, the config's
    out = base / f"killed-{source}"
    checkpoint = out / "checkpoints" / "ranker_transact.pt"
    proc = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                             "--monitor-interval", "0.2", "-m", "seqrank.cli", *_train_args(events, out, config), *extra],
                            cwd=REPO_ROOT, env=_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while not checkpoint.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no ranker checkpoint appeared"
            time.sleep(0.02)
        assert not (out / "ranker.safetensors").exists(), "the ranker finished before a worker could be killed"
        victim = _workers(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert "pytorch/pytorch#135712" not in stderr  # its fresh store per attempt: no warning
    resumed = [line for line in stderr.splitlines() if "ranker[transact]: resuming from" in line]
    assert resumed, stderr[-4000:]
    epoch = int(resumed[0].split("after epoch ")[1].split()[0])
    assert 1 <= epoch < RANKER["epochs"], resumed  # resumed mid-training, from a finished epoch's checkpoint
    assert "trained in" in stdout
    for name in ("pinnerformer.safetensors", "ranker.safetensors"):
        got, want = load_file(out / name), load_file(uninterrupted / name)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
    np.testing.assert_array_equal(np.load(out / "user_emb.npy"), np.load(uninterrupted / "user_emb.npy"))
    assert json.loads((out / "run.json").read_text())["ranker_selected_epoch"] == \
        json.loads((uninterrupted / "run.json").read_text())["ranker_selected_epoch"]


def test_each_rank_takes_every_world_th_row_and_an_empty_share_gets_a_zero_weighted_stand_in():
    rows, scale = shard_of(7, 1, 3)
    assert rows.tolist() == [1, 4] and scale == 3.0
    assert sorted(np.concatenate([shard_of(7, r, 3)[0] for r in range(3)]).tolist()) == list(range(7))
    assert shard_of(5, 0, 1)[0].tolist() == list(range(5)) and shard_of(5, 0, 1)[1] == 1.0
    rows, scale = shard_of(1, 1, 2)  # a last batch of one row: rank 1 has none of it
    assert rows.tolist() == [0] and scale == 0.0


def test_restarts_on_the_shared_rendezvous_store_are_flagged():
    """torchrun's shared store keeps a dead attempt's keys (the restarted group above hangs without the opt-out)."""
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "1"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_hazard(shared)
    assert restart_hazard({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_hazard({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # what the opt-out sets
    assert restart_hazard({}) is None


def test_the_small_log_holds_every_event_of_the_first_users_and_nothing_else(tmp_path):
    from seqrank.data.loaders import KUAIRAND_SAMPLE, load_events
    from seqrank.data.sample import write_first_users
    full = load_events(KUAIRAND_SAMPLE).events
    small = load_events(write_first_users(tmp_path / "three.tsv.gz", 3), min_users=1).events
    assert small.user_id.nunique() == 3
    assert len(small) == int(full.user_id.isin(small.user_id.unique()).sum())
    with pytest.raises(ValueError, match="users must be >= 1"):
        write_first_users(tmp_path / "none.tsv.gz", 0)


def test_only_train_runs_under_torchrun(tmp_path):
    result = subprocess.run([sys.executable, "-m", "seqrank.cli", "evaluate", "--run", str(tmp_path)], cwd=REPO_ROOT,
                            env=_env(WORLD_SIZE="2"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "only `seqrank train` runs under torchrun" in result.stderr, result.stderr


def test_training_on_cuda_devices_uses_nccl(setup, tmp_path):
    import torch
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device here (the NCCL path runs only on a GPU machine)")
        pytest.skip("no CUDA device")
    _, events, config = setup
    n = min(2, torch.cuda.device_count())
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(n), "-m", "seqrank.cli",
                             *_train_args(events, tmp_path / "gpu", config)],
                            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"world size {n} (nccl backend, device cuda:0)" in result.stderr
    assert json.loads((tmp_path / "gpu" / "run.json").read_text())["world_size"] == n
