"""The ensemble on the real tritonserver: loading, gRPC = HTTP, train/serve parity, batching, errors, perf_analyzer."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from seqrank.client import RankingClient
from seqrank.dataset import sequences_for
from seqrank.exporting import load_ranker
from seqrank.pipeline import load_run


from conftest import ENSEMBLE_MODELS as MODELS, rss_by_process


def _requests(small_run, n=12):
    """Held-out requests: per test-period user, the first test impression's time and the items shown in the period."""
    info = json.loads((small_run["run"] / "run.json").read_text())
    ev = small_run["events"]
    test = ev[ev.timestamp >= info["split_time_ms"]]
    out = []
    for user, g in test.groupby("user_id"):
        items = list(dict.fromkeys(g.item_id))
        if len(items) >= 3:
            out.append((user, int(g.timestamp.min()), items[:40]))
    return out[:n]


def test_ensemble_and_composing_models_are_ready(server):
    import tritonclient.http as http
    client = http.InferenceServerClient(server.http_url)
    for name in MODELS:
        assert client.is_model_ready(name), name
    heads = client.get_model_config("seqrank")["parameters"]["heads"]["string_value"].split(",")
    assert {"like", "hate", "click"} <= set(heads)


def test_grpc_and_http_give_identical_rankings(server, small_run):
    with RankingClient(server.grpc_url, "grpc", timeout_s=60) as g, RankingClient(server.http_url, "http") as h:
        for user, start, items in _requests(small_run, 5):
            a, b = g.rank(user, items, request_time=start), h.rank(user, items, request_time=start)
            assert a.item_ids == b.item_ids
            assert sorted(a.item_ids) == sorted(items)
            np.testing.assert_allclose([i.utility for i in a.items], [i.utility for i in b.items], atol=1e-6)
            assert a.sequence_source == b.sequence_source == "store"


def test_train_serve_parity(server, small_run):
    """Served scores = the torch model's scores on the same held-out requests, features built by the training path.
    The CPU ranker serves the fused graph (model_cpu.onnx) on each run's real history width; torch gets the padded
    history."""
    export = json.loads((small_run["run"] / "export" / "export.json").read_text())
    assert export["cpu_onnx"]["fused_skip_layernorm"] == 4 and (small_run["repo"] / "ranker/1/model_cpu.onnx").is_file()
    assert export["cpu_onnx"]["full_history_branch"]
    cfg, info, prep = load_run(small_run["run"])
    model, _, vocab = load_ranker(small_run["run"])
    heads = info["heads"]
    # the daily batch as training wrote it (not the served lookup, which is part of what is under test)
    run_users = {u.decode(): k for k, u in enumerate(np.load(small_run["run"] / "users.npy"))}
    run_emb = np.load(small_run["run"] / "user_emb.npy")
    checked = with_embedding = 0
    with RankingClient(server.grpc_url, "grpc", timeout_s=60) as client:
        for user, start, items in _requests(small_run):
            seq = sequences_for(prep, [user], [start], cfg.transact.seq_len)
            user_emb = np.zeros((1, run_emb.shape[1]), dtype=np.float32)
            if user in run_users:
                user_emb[0] = run_emb[run_users[user]]
                with_embedding += bool(np.abs(user_emb).sum() > 0)
            with torch.no_grad():
                expected = model(torch.as_tensor(seq.seq_item), torch.as_tensor(seq.seq_action),
                                 torch.as_tensor(seq.seq_mask), torch.as_tensor(user_emb),
                                 torch.as_tensor(seq.context),
                                 torch.as_tensor(vocab.item_index(np.array(items, dtype=object))[None]))[0].numpy()
            # the user's raw actions in the request: the exact history the training features saw
            ev = small_run["events"]
            mine = ev[ev.user_id == user]
            actions = list(zip(mine.item_id, mine.action, mine.timestamp.astype(int)))
            served = client.rank(user, items, actions=actions, request_time=start)
            assert served.sequence_source in ("request", "empty")
            got = {i.item_id: [i.scores[k] for k in heads] for i in served.items}
            diff = np.abs(np.array([got[i] for i in items]) - expected).max()
            assert diff <= 1e-4, (user, diff)
            checked += 1
    assert checked >= 5 and with_embedding >= 3, (checked, with_embedding)


def test_concurrent_requests_with_different_candidate_counts_are_batched(server, small_run):
    import tritonclient.http as http
    requests = _requests(small_run, 8)
    pool_items = [i for _, _, items in requests for i in items]
    jobs = [(requests[k % len(requests)][0], requests[k % len(requests)][1], pool_items[: 1 + (k * 37) % 200])
            for k in range(48)]
    with RankingClient(server.grpc_url, "grpc", timeout_s=60) as c:
        expected = [c.rank(u, items, request_time=t) for u, t, items in jobs]
    stats_client = http.InferenceServerClient(server.http_url)
    before = {m: stats_client.get_inference_statistics(m)["model_stats"][0] for m in ("preprocess", "ranker")}

    def call(job):
        with RankingClient(server.grpc_url, "grpc", timeout_s=60) as c:
            return c.rank(job[0], job[2], request_time=job[1])

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, jobs * 2))
    for got, want in zip(results, expected * 2):
        assert got.item_ids == want.item_ids
        np.testing.assert_allclose([i.utility for i in got.items], [i.utility for i in want.items], atol=1e-5)
    for m in ("preprocess", "ranker"):
        after = stats_client.get_inference_statistics(m)["model_stats"][0]
        requests = after["inference_count"] - before[m]["inference_count"]
        executions = after["execution_count"] - before[m]["execution_count"]
        assert requests == 2 * len(jobs), m
        assert executions < requests, f"{m}: {executions} executions for {requests} requests: not batched"


def test_ranker_stub_memory_is_reached_at_load_and_stays(server, small_run):
    """A burst of the largest requests (1,024 candidates each), many batched into one execution, must not raise the
    ranker stubs' memory: the stub scores at most max_rows_per_run candidate rows per ONNX Runtime run, and its
    warm-up reached that peak at load (seqrank/serving/batching.py). Scored in one run, 16 such requests would
    hold 16,384 rows of activations in ONNX Runtime's arena, which keeps its peak for good."""
    def ranker_stubs():
        return {k: v for k, v in rss_by_process(server.group_pids()).items() if k.startswith("ranker stub")}

    user, t, items = _requests(small_run, 1)[0]
    # 1,024 distinct items the model knows: the stub scores each distinct id once, so unknown ids (all the one OOV
    # row) would make this a small request
    vocab = [x.decode() for x in np.load(small_run["run"] / "vocab" / "items.npy").tolist()]
    candidates = [*items, *[i for i in vocab if i not in set(items)][: 1024 - len(items)]]
    assert len(set(candidates)) == 1024
    with RankingClient(server.grpc_url, "grpc", timeout_s=120) as c:
        want = c.rank(user, candidates, request_time=t)
    before = ranker_stubs()

    def call(_):
        with RankingClient(server.grpc_url, "grpc", timeout_s=120) as c:
            return c.rank(user, candidates, request_time=t)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, range(32)))
    assert all(r.item_ids == want.item_ids for r in results)
    after = ranker_stubs()
    assert before and before.keys() == after.keys()
    grown_mb = {k: (after[k] - before[k]) / 1024 for k in before}
    assert all(g < 8 for g in grown_mb.values()), grown_mb


# Malformed requests, one by one over gRPC and HTTP: tests/test_robustness.py.


def test_bad_and_good_requests_in_one_batch(server, small_run):
    """Valid requests batched with bad ones are answered correctly."""
    requests = _requests(small_run, 4)
    with RankingClient(server.grpc_url, "grpc", timeout_s=60) as c:
        want = [c.rank(u, items, request_time=t).item_ids for u, t, items in requests]

    def good(k):
        u, t, items = requests[k]
        with RankingClient(server.grpc_url, "grpc", retries=0, timeout_s=60) as c:
            return c.rank(u, items, request_time=t).item_ids

    def bad(_):
        with RankingClient(server.grpc_url, "grpc", retries=0, timeout_s=60) as c:
            try:
                c.rank("111", ["1"], actions=[("1", "nope", 1)])
            except Exception as e:  # noqa: BLE001
                return str(e)
        return "no error"

    with ThreadPoolExecutor(max_workers=12) as pool:
        goods = [pool.submit(good, k % 4) for k in range(24)]
        bads = [pool.submit(bad, k) for k in range(24)]
        for k, f in enumerate(goods):
            assert f.result() == want[k % 4]
        for f in bads:
            assert "action_types" in f.result()


def test_a_store_outage_is_flagged_unavailable_not_served_as_a_new_user(small_run):
    """The fallback's tensors: an outage gives no sequence with context[UNAVAILABLE] = 1; the same user's request
    carrying its own actions reads them and is not flagged, and a user the store answers for with nothing (a new
    user) is not flagged either."""
    from perf.features import preprocessor
    from seqrank.features import UNAVAILABLE
    from seqrank.serving.preprocess import Request
    ev = small_run["events"]
    user, items = str(ev.user_id.iloc[0]), np.array([str(i).encode() for i in ev.item_id.unique()[:3]], dtype=object)
    t = int(ev.timestamp.max()) + 1
    own = ev[ev.user_id == ev.user_id.iloc[0]]
    actions = (np.array([str(i).encode() for i in own.item_id], dtype=object),
               np.array([a.encode() for a in own.action], dtype=object), own.timestamp.to_numpy(np.int64))
    down = preprocessor(small_run["repo"], "redis://127.0.0.1:1/0")
    outage, given = down.build([Request(user, items, t), Request(user, items, t, actions)])
    assert outage.sequence_source == "fallback_store_unavailable" and not outage.seq_mask.any()
    assert outage.context[UNAVAILABLE] == 1.0 and outage.context[0] == 0.0
    assert given.sequence_source == "request" and given.seq_mask.any() and given.context[UNAVAILABLE] == 0.0
    up = preprocessor(small_run["repo"], small_run["store"])
    stored, new_user = up.build([Request(user, items, t), Request("a user never seen", items, t)])
    assert stored.sequence_source == "store" and stored.context[UNAVAILABLE] == 0.0
    assert new_user.sequence_source == "empty" and new_user.context[UNAVAILABLE] == 0.0


def test_store_down_falls_back_to_no_sequence(small_run, start_server, tmp_path):
    """A store that cannot answer: ranking still answers, flagged fallback_store_unavailable."""
    s = start_server(small_run["repo"], env={"SEQRANK_STORE": "redis://127.0.0.1:1/0"}, timeout_s=300, reuse=False)
    s.wait_models_ready(MODELS, timeout_s=120)
    with RankingClient(s.grpc_url, "grpc") as c:
        res = c.rank("111", ["1", "2", "3"])
    assert res.sequence_source == "fallback_store_unavailable"
    assert len(res.items) == 3
    import urllib.request
    metrics = urllib.request.urlopen(f"http://{s.metrics_url}/metrics", timeout=10).read().decode()
    counted = {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.splitlines() if line.startswith("seqrank_store_fallback_total")}
    assert counted["unavailable"] >= 1 and counted["error"] == 0, counted
    s.stop()


def test_perf_analyzer_runs_against_the_ensemble(server, small_run, tmp_path):
    from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env
    user, start, items = _requests(small_run, 1)[0]
    data = {"data": [{"user_id": [user], "candidate_ids": {"content": items, "shape": [len(items)]},
                      "request_time_ms": [start]}]}
    path = tmp_path / "input.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([str(perf_analyzer_binary()), "-m", "seqrank", "-u", server.grpc_url, "-i", "grpc",
                          "--input-data", str(path), "--concurrency-range", "2:2",
                          # a shared CI machine never passes a tight stability check: always report
                          "--stability-percentage", "1000", "--max-trials", "3", "--measurement-mode",
                          "count_windows", "--measurement-request-count", "50", "-f", str(tmp_path / "pa.csv")],
                         env=perf_analyzer_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = (tmp_path / "pa.csv").read_text().splitlines()
    assert rows[0].startswith("Concurrency") and len(rows) == 2
    assert float(rows[1].split(",")[1]) > 0  # inferences/second


def test_an_export_from_another_template_is_stale(small_run, tmp_path, monkeypatch):
    """`make demo` re-exports a run whose repository an older template made (e.g. one without an output the client
    now asks for) instead of serving it."""
    import shutil
    from seqrank.exporting import repository as exporting  # where TEMPLATE is read
    assert exporting.is_current_export(small_run["run"], small_run["repo"])
    template = tmp_path / "model_repository"
    shutil.copytree(exporting.TEMPLATE, template, ignore=shutil.ignore_patterns("__pycache__"))
    config = template / "seqrank" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "embedding_source"', 'name: "embedding_origin"'))
    monkeypatch.setattr(exporting, "TEMPLATE", template)
    assert not exporting.is_current_export(small_run["run"], small_run["repo"])


def test_an_export_of_a_run_trained_again_since_is_stale(small_run, tmp_path):
    """`make demo` and the bench re-export (or refuse) a repository whose run was trained again since: another
    ranker's weights, the same template."""
    import shutil
    from seqrank.exporting import repository as exporting
    run = tmp_path / "run"
    shutil.copytree(small_run["run"], run, ignore=shutil.ignore_patterns("model_repository", "checkpoints"))
    assert exporting.is_current_export(run, small_run["repo"])
    ranker = run / "ranker.safetensors"
    ranker.write_bytes(ranker.read_bytes()[:-1] + bytes([ranker.read_bytes()[-1] ^ 1]))
    assert not exporting.is_current_export(run, small_run["repo"])
