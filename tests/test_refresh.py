"""`seqrank refresh` on the real tritonserver: a running server (model control mode explicit) serves the exported run
while clients rank without pause; actions on a new item by a new user and some known users go into the store;
`seqrank embed` and `seqrank refresh --server` run; the server switches to the new version with zero failed requests,
the new item is then scored with its own row (`oov` False, scores unlike the OOV row's) and the new user's embedding
comes from the store (`embedding_source`). Rolling back (newest version directories removed, preprocess loaded
before the ranker) brings the OOV row back, again without a failed request."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from seqrank.client import RankingClient
from seqrank.config import RunConfig
from seqrank.exporting import export_run, load_user_tower
from seqrank.features import OOV, Vocabulary, index_history
from seqrank.embed_job import write_embeddings
from seqrank.refresh import Budget, RefreshError, item_state_dir, refresh, rollback, version_numbers
from seqrank.server.model_control import LoadError, load_in_order, version_ready
from seqrank.store import Action, open_store
from seqrank.training import embed_users

from conftest import ENSEMBLE_MODELS
from run_fixture import DAY_MS as DAY
from test_faults import Load

NEW_ITEM, UNKNOWN_ITEM, NEW_USER = "refresh-new-item", "never-in-any-log", "refresh-new-user"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "seqrank.cli", *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _scores(result, item: str) -> list[float]:
    return next(list(i.scores.values()) for i in result.items if i.item_id == item)


@pytest.fixture
def refreshed_copy(small_run, tmp_path):
    """A private copy of the served run, repository and store (the refresh adds versions to them)."""
    for name in ("run", "model_repository"):
        shutil.copytree(small_run["root"] / name, tmp_path / name, symlinks=True)
    with sqlite3.connect(small_run["root"] / "store.db") as src, sqlite3.connect(tmp_path / "store.db") as dst:
        src.backup(dst)  # consistent even while another test's server reads it
    return {"run": tmp_path / "run", "repo": tmp_path / "model_repository", "store": f"sqlite:///{tmp_path / 'store.db'}"}


def test_refresh_reaches_a_running_server_with_zero_failed_requests(refreshed_copy, start_server):
    run, repo, store_url = refreshed_copy["run"], refreshed_copy["repo"], refreshed_copy["store"]
    server = start_server(repo, model_control_mode="explicit", env={"SEQRANK_STORE": store_url}, reuse=False,
                          timeout_s=300)
    server.wait_models_ready(ENSEMBLE_MODELS, timeout_s=120)
    known = [x.decode() for x in Vocabulary.load(repo / "preprocess" / "1" / "tables").items[:6]]
    candidates = known + [NEW_ITEM, UNKNOWN_ITEM]
    with open_store(store_url) as store:
        users = store.user_ids()[:20]
        t = max(int(s.timestamps_ms.max()) for s in store.get_sequences(users)) + 60_000
        actions = [Action(u, NEW_ITEM, kind, t + 1000 * k + dt) for k, u in enumerate(users + [NEW_USER])
                   for kind, dt in (("click", 0), ("like", 1))]
        actions += [Action(u, item, "click", t + 1000 * k + 500) for k, u in enumerate(users + [NEW_USER])
                    for item in known[:2]]
        assert store.append(actions).accepted == len(actions)

    with RankingClient(server.grpc_url, "grpc", timeout_s=30, retries=0) as client:
        before = client.rank(NEW_USER, candidates)
        flags = {i.item_id: i.oov for i in before.items}
        assert flags[NEW_ITEM] and flags[UNKNOWN_ITEM] and not any(flags[k] for k in known)
        assert _scores(before, NEW_ITEM) == _scores(before, UNKNOWN_ITEM)  # both the OOV row, bitwise
        assert before.sequence_source == "store" and before.embedding_source == "none"

        traffic = Load(server.grpc_url, [(NEW_USER, candidates), (users[0], candidates), (users[1], known)],
                       threads=2, retries=0)  # no retries: one failed request counts
        with traffic:
            time.sleep(1.0)
            _cli("embed", "--run", str(run), env={"SEQRANK_STORE": store_url})
            out = _cli("refresh", "--run", str(run), "--events", "store", "--store", store_url,
                       "--repository", str(repo), "--max-steps", "40", "--server", server.http_url)
            assert "-> version 2 of" in out.stdout, out.stdout
            time.sleep(1.5)
        failures = traffic.failures()
        assert traffic.ok_count() >= 10 and not failures, \
            f"{len(failures)} requests failed, {traffic.ok_count()} ok: {failures[:3]}\n{server.log_text()[-3000:]}"
        assert version_ready(server.http_url, "ranker", 2) and version_ready(server.http_url, "preprocess", 2)
        assert not version_ready(server.http_url, "ranker", 1)  # version_policy latest 1: the old one is unloaded
        vocab = Vocabulary.load(repo / "preprocess" / "2" / "tables")
        old = Vocabulary.load(repo / "preprocess" / "1" / "tables")
        np.testing.assert_array_equal(vocab.item_index(old.items), old.item_index(old.items))  # old rows unchanged

        after = client.rank(NEW_USER, candidates)
        flags = {i.item_id: i.oov for i in after.items}
        assert not flags[NEW_ITEM] and flags[UNKNOWN_ITEM]
        assert not np.allclose(_scores(after, NEW_ITEM), _scores(after, UNKNOWN_ITEM), atol=1e-6)
        assert after.embedding_source == "store"  # written by `seqrank embed` for the user first seen today

        # Rollback: preprocess goes back to the old vocabulary first, then the ranker to the smaller table.
        with Load(server.grpc_url, [(NEW_USER, candidates), (users[0], known)], threads=2, retries=0) as rollback:
            time.sleep(0.5)
            _cli("refresh", "--rollback", "--run", str(run), "--repository", str(repo), "--server", server.http_url)
            time.sleep(1.0)
        assert rollback.ok_count() >= 5 and not rollback.failures(), rollback.failures()[:3]
        assert version_numbers(repo / "preprocess") == version_numbers(repo / "ranker") == [1]
        assert not (run / "refresh" / "2").exists()
        assert _wait(lambda: not version_ready(server.http_url, "ranker", 2), 30)
        back = client.rank(NEW_USER, candidates)
        assert {i.item_id: i.oov for i in back.items}[NEW_ITEM]


# ----------------------------------------------------------------------------------------------------------------------
# Without a server: what the refresh learns and writes (a tiny trained run)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_exported(tiny_run, tmp_path_factory):
    """The tiny run with its exported repository (copied: the session's run stays as trained)."""
    root = tmp_path_factory.mktemp("tiny-exported")
    shutil.copytree(tiny_run, root / "run")
    export_run(root / "run", root / "model_repository")
    return root / "run", root / "model_repository"


@pytest.fixture
def tiny(tiny_exported, tmp_path):
    """A private copy of the tiny run and its exported repository."""
    run, repo = tiny_exported
    shutil.copytree(run, tmp_path / "run")
    shutil.copytree(repo, tmp_path / "model_repository")
    return tmp_path / "run", tmp_path / "model_repository"


def _today(new_items=("new-a", "new-b"), users=range(6), t=12 * DAY) -> dict:
    """Actions of a day after training: known users engage with new and known items."""
    out = {}
    for u in users:
        rows = [(item, "like", t + 10 * k + u) for k, item in enumerate(new_items)]
        rows += [(f"i{u}", "click", t + 100 + u), (f"i{u + 1}", "like", t + 200 + u)]
        rows += [(new_items[0], "click", t + 300 + u), ("only-hated", "hate", t + 400 + u)]
        out[f"u{u}"] = tuple(np.array(col) for col in zip(*rows))
    return out


def test_appended_items_take_the_next_rows_and_known_rows_never_move(tmp_path):
    vocab = Vocabulary.build(["b", "d", "f"], ["click"], [], None)
    grown, new = vocab.append_items(["e", "a", "d", "zz", "a"])
    assert new.tolist() == [b"a", b"e", b"zz"]
    assert grown.item_index(["b", "d", "f"]).tolist() == vocab.item_index(["b", "d", "f"]).tolist() == [2, 3, 4]
    assert grown.item_index(["a", "e", "zz", "nope"]).tolist() == [5, 6, 7, OOV] and grown.n_items == 8
    again, more = grown.append_items(["c", "e"])
    assert more.tolist() == [b"c"] and again.item_index(["a", "c", "zz", "b"]).tolist() == [5, 8, 7, 2]
    assert grown.append_items(["a", "b"])[0] is grown  # nothing new: the same vocabulary
    again.save(tmp_path / "v")
    loaded = Vocabulary.load(tmp_path / "v")
    assert loaded.item_index(["a", "b", "c", "zz", "x"]).tolist() == [5, 2, 8, 7, OOV]
    assert not (tmp_path / "plain").exists() and vocab.save(tmp_path / "plain") is None
    assert not (tmp_path / "plain" / "item_rows.npy").exists()  # a trained vocabulary keeps its old layout


def test_refresh_learns_only_the_new_rows_and_publishes_a_version(tiny):
    run, repo = tiny
    summary = refresh(run, repo, _today(), max_steps=5)
    assert summary["version"] == 2 and summary["new_items"] == 3 and 0 < summary["steps"] <= 5
    base = Vocabulary.load(run / "vocab")
    state = item_state_dir(run)
    assert state == run / "refresh" / "2"
    vocab = Vocabulary.load(state / "vocab")
    served = Vocabulary.load(repo / "preprocess" / "2" / "tables")
    np.testing.assert_array_equal(served.item_index(base.items), base.item_index(base.items))
    rows = served.item_index(["new-a", "new-b", "only-hated"])
    assert sorted(rows.tolist()) == list(range(base.n_items, base.n_items + 3)) and vocab.n_items == served.n_items
    cfg = RunConfig.load_saved(run)
    before = load_user_tower(run, cfg, base).state_dict()
    after = load_user_tower(state, cfg, vocab).state_dict()
    for name, value in before.items():  # every weight frozen but the new rows
        if name == "item_emb.weight":
            assert torch.equal(after[name][:base.n_items], value)
            start = value[2:].mean(0)
            assert all(not torch.allclose(after[name][r], start) for r in rows), "a new row did not move"
        else:
            assert torch.equal(after[name], value), name
    table = np.load(state / "item_table.npy")
    np.testing.assert_array_equal(table[:base.n_items], np.load(run / "item_table.npy"))
    assert table.shape[0] == vocab.n_items
    import onnxruntime as ort
    sess = ort.InferenceSession(str(repo / "ranker" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "seq_item" and (repo / "ranker" / "2" / "model_cpu.onnx").is_file()
    assert (repo / "ranker" / "2" / "model_cpu.py").is_file() and (repo / "preprocess" / "2" / "model.py").is_file()
    cpu = (repo / "ranker" / "configs" / "cpu.pbtxt").read_text()
    assert f'string_value: "{vocab.n_items}"' in cpu  # the CPU ranker's id bound follows the table
    assert not list(repo.glob("*/.staging-*")) and not list((run / "refresh").glob(".staging-*"))


def test_a_second_refresh_builds_on_the_first_and_old_rows_keep_their_place(tiny):
    run, repo = tiny
    refresh(run, repo, _today(), max_steps=2)
    first = Vocabulary.load(repo / "preprocess" / "2" / "tables")
    summary = refresh(run, repo, _today(("new-c", "new-a"), t=13 * DAY), max_steps=2)
    assert summary["version"] == 3 and summary["base_version"] == 2 and summary["new_items"] == 1
    second = Vocabulary.load(repo / "preprocess" / "3" / "tables")
    np.testing.assert_array_equal(second.item_index(first.items), first.item_index(first.items))
    assert second.item_index(["new-c"]).tolist() == [first.n_items]
    # nothing new the next day: no version is written
    assert refresh(run, repo, _today(("new-c", "new-a"), t=14 * DAY), max_steps=2)["version"] is None
    assert version_numbers(repo / "preprocess") == [1, 2, 3]
    # rollback takes version 3 back: directories, the CPU ranker's bound and the run's item state
    assert rollback(run, repo) == 2
    assert version_numbers(repo / "preprocess") == version_numbers(repo / "ranker") == [1, 2]
    assert item_state_dir(run) == run / "refresh" / "2"
    assert f'string_value: "{first.n_items}"' in (repo / "ranker" / "configs" / "cpu.pbtxt").read_text()
    rollback(run, repo)
    with pytest.raises(RefreshError, match="nothing to roll back"):
        rollback(run, repo)


def test_the_time_budget_stops_training(tiny):
    run, repo = tiny
    summary = refresh(run, repo, _today(), max_steps=1000, max_seconds=0.0)
    assert summary["steps"] == 0 and summary["version"] == 2  # published, the rows at their starting point
    budget = Budget(max_steps=3, max_seconds=60)
    assert [budget.allow_step() for _ in range(5)] == [True, True, True, False, False] and budget.spent


def test_refresh_refuses_a_repository_exported_from_another_run(tiny, tiny_exported):
    run, repo = tiny
    refresh(run, repo, _today(), max_steps=1)
    shutil.rmtree(run / "refresh")  # the run lost its item state: version 2 cannot be built on
    with pytest.raises(RefreshError, match="not written by `seqrank refresh` from this run"):
        refresh(run, repo, _today(("new-z",)), max_steps=1)


def test_embed_reads_the_refreshed_items(tiny, tmp_path):
    """After a refresh, `seqrank embed` embeds with the newest item state: a new item is its learned row."""
    run, repo = tiny
    refresh(run, repo, _today(), max_steps=5)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    mine = [("new-a", "like", 20 * DAY), ("i3", "click", 20 * DAY + 1)]
    with open_store(url) as store:
        store.append([Action("fresh", *a) for a in mine])
    write_embeddings(run, url, as_of_ms=20 * DAY + 2)
    with open_store(url) as store:
        got = store.get_embeddings(["fresh"])[0][0]
    cfg, state = RunConfig.load_saved(run), run / "refresh" / "2"
    vocab = Vocabulary.load(state / "vocab")
    want = embed_users(load_user_tower(state, cfg, vocab), {"x": index_history(vocab, *zip(*mine))}, ["x"],
                       [20 * DAY + 2])[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    old_vocab = Vocabulary.load(run / "vocab")
    as_oov = embed_users(load_user_tower(run, cfg, old_vocab), {"x": index_history(old_vocab, *zip(*mine))},
                         ["x"], [20 * DAY + 2])[0]
    assert not np.allclose(got, as_oov, atol=1e-4)


def test_refresh_command_line_errors_name_the_argument(tiny):
    run, repo = tiny
    for args, message in ((["--repository", str(repo)], "needs --events"),
                          (["--repository", str(repo), "--events", "store"], "needs --store or $SEQRANK_STORE"),
                          (["--repository", str(repo), "--events", "x.csv", "--server", "h:1", "--admin-key-env",
                            "SEQRANK_UNSET_KEY_VAR"], "SEQRANK_UNSET_KEY_VAR is empty or unset")):
        result = subprocess.run([sys.executable, "-m", "seqrank.cli", "refresh", "--run", str(run), *args],
                                capture_output=True, text=True, timeout=120,
                                env={k: v for k, v in os.environ.items()
                                     if k not in ("SEQRANK_UNSET_KEY_VAR", "SEQRANK_STORE")})
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_load_in_order_uses_the_admin_key_and_names_a_refused_model(start_server, toy_repository):
    server = start_server(toy_repository, model_control_mode="explicit", restricted_api_key="k")
    with pytest.raises(LoadError, match="echo_double: .* refused the load \\(HTTP 403\\)"):
        load_in_order(server.http_url, [("echo_double", 1)])
    load_in_order(server.http_url, [("echo_double", 1)], admin_key="k")
    with pytest.raises(LoadError, match="no_such_model"):
        load_in_order(server.http_url, [("no_such_model", 1)], admin_key="k")
