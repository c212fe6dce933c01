"""Feature-store freshness through the ensemble: from a new action written to Redis to the first ranking that uses
it."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from features import load_store
from systems import start_triton


def freshness(repo: Path, ev, run: Path, req: dict, n: int, workdir: Path, vocab_items: list[str],
              actions: list[str], skip_actions=(), cores: frozenset[int] | None = None) -> dict:
    """Time from ``store.append`` of a new action to the first ensemble response computed with it.

    A real redis-server (tests/redis_server.py) holds the log; the ensemble runs with SEQRANK_STORE=redis://...
    For probe i, at time T (now, strictly increasing): (1) rank (user, 16 candidates, request_time_ms = T + 1) with
    the store path -> reference utilities U0 (the action is not stored yet); (2) t0; append (user, item_i, action_i,
    T) with a separate RedisStore client (as an ingest process would); (3) re-send the identical request until the
    response's sequence_source is "store" and its utilities differ from U0 (the new action is the newest row of the
    sequence and changes every candidate's score); t1. Sample = t1 - t0: the write, the preprocess step's store read
    and one full ensemble round trip (the last poll), i.e. action-to-visible-in-a-ranking.
    """
    from redis_server import RedisServer
    import tritonclient.grpc as grpcclient

    from seqrank.client import build_inputs
    from seqrank.ingest import measure_freshness
    from seqrank.store import open_store
    from seqrank.store.base import Action

    result = {"store": "redis", "n": n}
    if not RedisServer.available():
        result["error"] = "redis-server not installed"
        return result
    srv = RedisServer(appendonly=False).start()
    server = None
    try:
        loaded = load_store(srv.url, ev, run, skip_actions)
        result["load"] = loaded
        server = start_triton(repo, srv.url, workdir / "tritonserver-redis.log", cores)
        writer = open_store(srv.url, timeout_s=1.0, write_timeout_s=5.0)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        cands = req["candidate_ids"][:16]
        user = req["user_id"]

        def rank(t_req: int):
            inputs = build_inputs(grpcclient, user, cands, request_time=t_req)
            r = client.infer("seqrank", inputs, outputs=[grpcclient.InferRequestedOutput(k)
                                                         for k in ("ranked_ids", "utility", "sequence_source")])
            ids = [x.decode() for x in r.as_numpy("ranked_ids").reshape(-1)]
            util = dict(zip(ids, r.as_numpy("utility").reshape(-1).tolist()))
            return util, r.as_numpy("sequence_source").reshape(-1)[0].decode()

        samples, polls, failures = [], [], 0
        last_t = 0
        for i in range(n):
            t_act = max(int(time.time() * 1000), last_t + 1)
            last_t = t_act
            ref, _ = rank(t_act + 1)
            a = Action(user, vocab_items[(7 * i + 3) % len(vocab_items)], actions[i % len(actions)], t_act)
            t0 = time.perf_counter()
            stats = writer.append([a])
            if stats.accepted != 1:
                failures += 1
                continue
            k = 0
            while True:
                util, source = rank(t_act + 1)
                k += 1
                if source == "store" and any(abs(util[c] - ref[c]) > 0 for c in ref):
                    samples.append((time.perf_counter() - t0) * 1e3)
                    polls.append(k)
                    break
                if time.perf_counter() - t0 > 10.0:
                    failures += 1
                    break
        client.close()
        store_only = measure_freshness(writer, n=min(n, 100))
        writer.close()
        s = np.asarray(samples)
        result.update(
            samples=len(samples), failures=failures,
            p50_ms=float(np.percentile(s, 50)) if len(s) else float("nan"),
            p99_ms=float(np.percentile(s, 99)) if len(s) else float("nan"),
            max_ms=float(s.max()) if len(s) else float("nan"), polls_mean=float(np.mean(polls)) if polls else None,
            samples_ms=[round(x, 3) for x in samples],
            store_only_p50_ms=float(np.percentile(store_only, 50)), store_only_p99_ms=float(np.percentile(store_only, 99)),
            measured=("store.append of a new action (RedisStore client) -> first response of the seqrank ensemble "
                      "(gRPC, 1 user x 16 candidates, request_time_ms = action time + 1 ms, sequence from the "
                      "store) whose utilities differ from the reference computed just before the append"))
    finally:
        if server is not None:
            server.stop()
        srv.cleanup()
    return result
