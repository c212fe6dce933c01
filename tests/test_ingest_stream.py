"""``seqrank ingest --stream``: a Redis Streams consumer group feeding the store, on a real redis-server.

The consumer process is SIGKILLed mid-stream while it holds delivered but unacknowledged entries, then restarted
(under its own name: it re-reads its pending entries; under another name: it takes them over with XAUTOCLAIM).
Afterwards every valid event is in the store exactly once, nothing is pending, and the invalid entries are in the
dead-letter stream with the field named.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from seqrank.store import RedisStore

try:
    from redis_server import redis_server  # noqa: F401 (a fixture)
except ImportError:  # tests/ imported as a package
    from tests.redis_server import redis_server  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000
N_USERS, PER_USER = 40, 100


def produce(r, key):
    """XADD the events (interleaved across users, each user's in time order) plus three invalid entries."""
    rng = random.Random(3)
    clocks = {f"user{u}": T0 + rng.randrange(1000) for u in range(N_USERS)}
    queue = [u for u in clocks for _ in range(PER_USER)]
    rng.shuffle(queue)
    expected = {u: [] for u in clocks}
    pipe = r.pipeline(transaction=False)
    bad = {len(queue) // 4: {"timestamp": "soon"}, len(queue) // 2: {"item_id": ""},
           3 * len(queue) // 4: {"action": None}}
    for k, u in enumerate(queue):
        clocks[u] += rng.choice([1, 50, 900])
        ev = {"user_id": u, "item_id": f"pin{rng.randrange(300)}", "action": rng.choice(["click", "save"]),
              "timestamp": str(clocks[u])}
        pipe.xadd(key, ev)
        expected[u].append((ev["item_id"], ev["action"], clocks[u]))
        if k in bad:
            broken = {**ev, "item_id": "x", **bad[k]}
            pipe.xadd(key, {f: v for f, v in broken.items() if v is not None})
    pipe.execute()
    return {u: sorted(v, key=lambda r: (r[2], r[0], r[1])) for u, v in expected.items()}, len(bad)


def consumer(url, store_url, key, group, name, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-m", "seqrank.ingest", "--store", store_url, "--stream", url,
                             "--stream-key", key, "--group", group, "--consumer", name, "--stream-batch", "100",
                             "--block-ms", "100", "--log-level", "WARNING", *extra],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pending(r, key, group):
    return r.xpending(key, group)["pending"]


def kill_while_holding_unacked(proc, r, key, group, total, timeout_s=30):
    """SIGSTOP the consumer at moments until one finds it mid-stream with delivered, unacknowledged entries; then
    SIGKILL it there. Returns the pending entry ids."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "never caught the consumer holding unacknowledged entries"
        groups = {g["name"].decode(): g for g in r.xinfo_groups(key)}
        if group in groups and groups[group]["entries-read"] and groups[group]["entries-read"] > 200:
            os.kill(proc.pid, signal.SIGSTOP)
            n = pending(r, key, group)
            if n and groups[group]["entries-read"] < total - 200:
                proc.kill()
                proc.wait(10)
                return [e["message_id"] for e in r.xpending_range(key, group, "-", "+", 1000)]
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.003)


@pytest.mark.parametrize("restart_as", ["same", "other"])
def test_killed_consumer_restarts_without_loss_or_double_apply(redis_server, restart_as):
    r = redis.Redis.from_url(redis_server.url)
    tag = uuid.uuid4().hex[:8]
    key, group, prefix = f"stream{tag}", "ingest", f"st{tag}:"
    expected, n_bad = produce(r, key)
    total = r.xlen(key)
    store_url = f"{redis_server.url}?prefix={prefix}"

    first = consumer(redis_server.url, store_url, key, group, "c1")
    held = kill_while_holding_unacked(first, r, key, group, total)
    assert held                                                  # killed between XREADGROUP and XACK
    store = RedisStore(redis_server.url, prefix=prefix, timeout_s=2.0)
    before = sum(len(s) for s in store.get_sequences(list(expected)))
    assert 0 < before < N_USERS * PER_USER                       # mid-stream

    name, extra = ("c1", ()) if restart_as == "same" else ("c2", ("--claim-idle-ms", "200"))
    second = consumer(redis_server.url, store_url, key, group, name, "--idle-exit-s", "1.0", *extra)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    stats = json.loads(out.strip().splitlines()[-1])

    assert pending(r, key, group) == 0                           # everything acknowledged ...
    g = {g["name"].decode(): g for g in r.xinfo_groups(key)}[group]
    assert g["lag"] == 0 and g["last-delivered-id"] == r.xinfo_stream(key)["last-generated-id"]
    got = {u: s.as_tuples() for u, s in zip(expected, store.get_sequences(list(expected)))}
    assert got == expected                                       # ... each valid event in the store exactly once
    # the restarted consumer re-applied what the killed one held: those that had reached the store are duplicates
    assert stats["accepted"] == N_USERS * PER_USER - before
    assert stats["too_late"] == 0 and stats["accepted"] + stats["duplicates"] >= N_USERS * PER_USER - before
    dead = r.xrange(f"{key}:dead")
    assert stats["invalid"] == len(dead) == n_bad
    errors = sorted(fields[b"error"].decode() for _, fields in dead)
    assert any("column 'timestamp'" in e and "'soon'" in e for e in errors), errors
    assert any("column 'item_id'" in e for e in errors) and any("column 'action'" in e for e in errors), errors
    store.close()
    r.close()


def test_store_down_keeps_entries_pending_until_it_is_back(redis_server, tmp_path):
    """The store cannot write (its SQLite file is locked by another writer): the consumer acknowledges nothing,
    it retries; once the lock is released every entry is applied and acknowledged. Nothing is dropped."""
    import sqlite3
    import threading

    from seqrank.ingest import StreamConsumer
    from seqrank.store import Action, EmbeddedStore

    r = redis.Redis.from_url(redis_server.url)
    key = f"down{uuid.uuid4().hex[:8]}"
    for k in range(30):
        r.xadd(key, {"user_id": "u", "item_id": f"p{k}", "action": "click", "timestamp": str(T0 + k)})
    path = str(tmp_path / "s.db")
    store = EmbeddedStore(path, timeout_s=2.0, write_timeout_s=0.05)
    store.append([Action("w", "p", "click", T0)])                    # the schema exists before the lock
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    c = StreamConsumer(store, redis_server.url, key=key, group="g", consumer="c", batch=10, block_ms=50)
    c.ensure_group()
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("stats", c.run(idle_exit_s=0.5)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while pending(r, key, "g") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.5)
        assert pending(r, key, "g") == 10 and store.get_sequences(["u"])[0].item_ids == []   # held, not acked
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    t.join(30)
    assert not t.is_alive()
    assert done["stats"].accepted == 30 and pending(r, key, "g") == 0
    assert store.get_sequences(["u"])[0].item_ids == [f"p{k}" for k in range(30)]
    c.close()
    store.close()
    r.close()
