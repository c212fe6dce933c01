"""seqrank.client: validation before sending, retries only on transient failures (capped, jittered backoff),
sync/async over gRPC/HTTP, the CLI."""
from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import pytest

from seqrank.client import AsyncRankingClient, ClientInputError, RankingClient, backoff_delay, is_unavailable
from seqrank.server.triton import free_port


@pytest.mark.parametrize("kwargs,message", [
    (dict(user_id="", candidates=["1"]), "user_id"),
    (dict(user_id="1", candidates=[]), "candidates"),
    (dict(user_id="1", candidates=[str(i) for i in range(1025)]), "candidates"),
    (dict(user_id="1", candidates=["1", ""]), "candidates[1]"),
    (dict(user_id="1", candidates=["1"], actions=[("a", "like")]), "actions[0]"),
    (dict(user_id="1", candidates=["1"], top_k=0), "top_k"),
])
def test_inputs_are_validated_before_sending(kwargs, message):
    port = free_port()  # nothing listens: a request that got sent would fail differently
    with RankingClient(f"127.0.0.1:{port}", "grpc", retries=0) as client:
        with pytest.raises(ClientInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            client.rank(**kwargs)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unavailable_is_retried_with_backoff_then_raised(protocol):
    port = free_port()
    with RankingClient(f"127.0.0.1:{port}", protocol, retries=2, backoff_s=0.1, timeout_s=1.0) as client:
        start = time.perf_counter()
        with pytest.raises(Exception) as err:
            client.rank("1", ["1"])
        took = time.perf_counter() - start
    assert is_unavailable(err.value)
    assert took >= (0.1 + 0.2) / 2  # two backoffs happened (each at least half its exponential ceiling)


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(0)
    delays = [[backoff_delay(a, 0.25, 2.0, rng) for a in range(8)] for _ in range(200)]
    for attempt in range(8):
        ceiling = min(2.0, 0.25 * 2 ** attempt)
        seen = [d[attempt] for d in delays]
        assert ceiling / 2 <= min(seen) and max(seen) <= ceiling  # never above the cap, never below half of it
        assert len({round(x, 6) for x in seen}) > 100  # jittered: clients do not retry in lockstep


def test_stub_failure_is_transient_but_a_bad_request_is_not():
    from tritonclient.utils import InferenceServerException
    dead = InferenceServerException("Failed to process the request(s) for model instance 'preprocess_0_0', "
                                    "message: Stub process 'preprocess_0_0' is not healthy.", status="StatusCode.INTERNAL")
    bad = InferenceServerException("[request id: <id_unknown>] candidate_ids: expected 1-D", status="StatusCode.INVALID_ARGUMENT")
    assert is_unavailable(dead) and not is_unavailable(bad)
    assert is_unavailable(InferenceServerException("failed to connect", status="StatusCode.UNAVAILABLE"))


def test_bad_request_is_not_retried(server):
    calls = []
    with RankingClient(server.grpc_url, "grpc", retries=3, backoff_s=1.0, timeout_s=30) as client:
        original = client.client.infer

        def counting(*a, **kw):
            calls.append(1)
            return original(*a, **kw)
        client.client.infer = counting
        with pytest.raises(Exception) as err:
            client.rank("111", ["1"], actions=[("1", "teleport", 1)])
    assert "action_types" in str(err.value) and len(calls) == 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_matches_sync(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with RankingClient(url, protocol, timeout_s=60) as c:
        want = c.rank("111", ["3892024", "2629583", "1135013"], request_time=1_649_700_000_000)

    async def go():
        async with AsyncRankingClient(url, protocol, timeout_s=60) as c:
            return await asyncio.gather(*(c.rank("111", ["3892024", "2629583", "1135013"],
                                                 request_time=1_649_700_000_000) for _ in range(8)))
    for got in asyncio.run(go()):
        assert got.item_ids == want.item_ids
        assert got.sequence_source == want.sequence_source


def test_rank_cli_prints_the_ranking(server):
    out = subprocess.run([sys.executable, "-m", "seqrank.cli", "rank", "--user-id", "111", "--candidates",
                          "3892024,2629583", "--protocol", "http", "--url", server.http_url, "--top-k", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("user 111") and len(lines) == 3  # header, column names, one ranked item


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_with_a_restricted_model_config_needs_the_heads_given(small_run, start_server, server, protocol):
    """The container restricts the model-config API, where the head names are: the client then says so and how to
    go on, and ranks as the open server does once given the run's heads."""
    import json
    from seqrank.client import HeadsUnavailable
    guarded = start_server(small_run["repo"], env={"SEQRANK_STORE": small_run["store"]}, timeout_s=300,
                           restricted_api_key="k")
    guarded.wait_models_ready(("seqrank",), timeout_s=120)
    url = (lambda s: s.grpc_url if protocol == "grpc" else s.http_url)
    request = ("111", ["3892024", "2629583", "1135013"])
    with RankingClient(url(guarded), protocol, timeout_s=60) as client:
        with pytest.raises(HeadsUnavailable, match="heads="):
            client.rank(*request, request_time=1_649_700_000_000)
    heads = json.loads((small_run["run"] / "run.json").read_text())["heads"]
    with RankingClient(url(guarded), protocol, timeout_s=60, heads=heads) as client, \
            RankingClient(url(server), protocol, timeout_s=60) as open_client:
        got, want = (c.rank(*request, request_time=1_649_700_000_000) for c in (client, open_client))
    assert got.item_ids == want.item_ids and open_client.heads == heads
    assert [i.scores for i in got.items] == [i.scores for i in want.items]
