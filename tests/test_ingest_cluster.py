"""The Redis store on a REAL 3-master Redis Cluster (three cluster-enabled redis-server processes joined by
``redis-cli --cluster create``; tests/redis_server.py), never a mock.

Users spread over many hash slots on all three masters: actions and embeddings written, then read back in one batch
each and compared with the same writes on an embedded (SQLite) store. A plain single-node MGET of the same keys
fails with CROSSSLOT, the failure the store had before reads were grouped per slot.
"""
from __future__ import annotations

import random
import time
import uuid

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from seqrank.ingest import main_ingest
from seqrank.store import Action, EmbeddedStore, StoreUnavailable, open_store

try:
    from redis_server import free_port, info, redis_cluster  # noqa: F401 (a fixture)
except ImportError:  # tests/ imported as a package
    from tests.redis_server import free_port, info, redis_cluster  # noqa: F401

T0 = 1_700_000_000_000


def spread_actions(n_users, seed=0):
    """Several actions per user, out of order across users and batches, some exact repeats."""
    rng = random.Random(seed)
    evs = [Action(f"user{u}", f"pin{rng.randrange(500)}", rng.choice(["click", "save", "hide"]),
                  T0 + rng.randrange(600_000)) for u in range(n_users) for _ in range(rng.randint(1, 8))]
    rng.shuffle(evs)
    return evs + rng.sample(evs, 40)


def mget_calls(cluster) -> list[int]:
    return [int(info(n.port, "INFO", "commandstats").get("cmdstat_mget", "calls=0").split(",")[0].split("=")[1])
            for n in cluster.nodes]


def test_batch_reads_across_slots_match_the_embedded_store(redis_cluster, tmp_path):
    prefix = f"c{uuid.uuid4().hex[:8]}:"
    store = open_store(f"{redis_cluster.url}&prefix={prefix}", timeout_s=2.0, max_len=16)
    ref = EmbeddedStore(str(tmp_path / "ref.db"), timeout_s=2.0, max_len=16)
    try:
        evs = spread_actions(300)
        users = sorted({a.user_id for a in evs}) + ["never_seen"]
        slots = {key_slot(store.packed_key(u)) for u in users}
        assert len(slots) > 250                                   # the batch spans many slots ...
        for k in range(0, len(evs), 97):
            assert store.append(evs[k:k + 97]) == ref.append(evs[k:k + 97])
        # ... on every master
        assert all(info(n.port, "INFO", "keyspace").get("db0", "keys=0") != "keys=0" for n in redis_cluster.nodes)
        vecs = np.random.default_rng(1).normal(size=(len(users) - 1, 8)).astype(np.float32)
        store.put_embeddings(users[:-1], vecs, as_of_ms=T0)

        before = mget_calls(redis_cluster)
        got = store.get_sequences(users)                          # one batch read for all 301 users
        after = mget_calls(redis_cluster)
        assert got == ref.get_sequences(users)
        assert sum(len(s) for s in got) > 1000 and len(got[-1]) == 0
        # grouped per hash slot: one MGET per slot group, spread over the three masters
        assert sum(after) - sum(before) == len(slots) and all(a > b for a, b in zip(after, before))

        emb, found = store.get_embeddings(users)
        assert found.tolist() == [True] * (len(users) - 1) + [False]
        np.testing.assert_array_equal(emb[:-1], vecs)
        assert not emb[-1].any()

        # what a single MGET over the batch (the store's read before cluster support) gets from any master
        plain = redis.Redis(port=redis_cluster.nodes[0].port)
        with pytest.raises(redis.ResponseError, match="CROSSSLOT"):
            plain.mget([store.packed_key(u) for u in users])
        plain.close()

        # a second client (the Triton preprocess) reads the same data; replays change nothing
        other = open_store(f"redis://127.0.0.1:{redis_cluster.nodes[2].port}/0?cluster=1&prefix={prefix}",
                           timeout_s=2.0, max_len=16)
        assert other.append(evs[:200]).accepted == 0
        assert other.get_sequences(users) == got
        other.close()
    finally:
        store.close()
        ref.close()


def test_cli_ingest_into_the_cluster(redis_cluster, tmp_path, capsys):
    prefix = f"cli{uuid.uuid4().hex[:8]}:"
    path = tmp_path / "events.csv"
    rows = [(f"u{u}", f"p{k}", "click", 1_700_000_000 + k) for u in range(50) for k in range(3)]
    path.write_text("user_id,item_id,action,timestamp\n" + "".join(f"{u},{i},{a},{t}\n" for u, i, a, t in rows))
    url = f"{redis_cluster.url}&prefix={prefix}"
    assert main_ingest(["--store", url, "--file", str(path), "--batch-size", "40"]) == 0
    reader = open_store(url, timeout_s=2.0)
    seqs = reader.get_sequences([f"u{u}" for u in range(50)])
    assert [s.as_tuples() for s in seqs] == [[(f"p{k}", "click", T0 + 1000 * k) for k in range(3)]] * 50
    reader.close()


def test_unreachable_cluster_is_store_unavailable_fast():
    store = open_store(f"redis://127.0.0.1:{free_port()}/0?cluster=1")    # opening never connects
    for call in (lambda: store.get_sequences(["u"]), lambda: store.append([Action("u", "p", "click", T0)])):
        t = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.perf_counter() - t < 2.0
    store.close()
