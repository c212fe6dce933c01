"""Feature store + ingestion (issue #7): both backends against a real redis-server / SQLite file, never mocks."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from seqrank.data.loaders import DataError
from seqrank.ingest import ingest, ingest_log, load_actions, main_ingest, measure_freshness
from seqrank.store import (Action, EmbeddedStore, IngestStats, RedisStore, StoreUnavailable, UserSequence,
                           open_store)

try:
    from redis_server import RedisServer, free_port, redis_server  # noqa: F401 (a fixture)
except ImportError:  # tests/ imported as a package
    from tests.redis_server import RedisServer, free_port, redis_server  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000
HOUR = 3_600_000


# fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def own_redis():
    """A redis-server this test may stop, pause and restart."""
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


def _store_factory(kind, tmp_path, request):
    opened = []
    counter = iter(range(10_000))

    def make(**kw):
        kw.setdefault("timeout_s", 2.0)      # correctness tests: generous; latency tests set their own
        if kind == "embedded":
            s = EmbeddedStore(str(tmp_path / f"store{next(counter)}.db"), **kw)
        else:
            srv = request.getfixturevalue("redis_server")
            s = RedisStore(srv.url, prefix=f"t{uuid.uuid4().hex[:10]}:", **kw)
        opened.append(s)
        return s

    return make, opened


@pytest.fixture(params=["embedded", "redis"])
def make_store(request, tmp_path):
    """``make_store(**kw)`` -> a fresh, empty store of the parametrized kind."""
    make, opened = _store_factory(request.param, tmp_path, request)
    make.kind = request.param
    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store):
    return make_store()


# helpers ---------------------------------------------------------------------------------------
ACTIONS = ["click", "repin", "save", "closeup", "hide", "share"]


def realistic_events(n_users=30, n_events=600, seed=0, messy=True, span_ms=None):
    """Pin-style actions: Zipf-ish items, per-user clocks with ties, bursts and pauses. ``messy`` adds
    neighbour swaps (out-of-order), re-sent duplicates, too-late events and a few invalid records."""
    rng = random.Random(seed)
    users = [f"user{u:03d}" for u in range(n_users)]
    weights = [1.0 / (i + 1) ** 0.7 for i in range(n_users)]
    clock = {u: T0 + rng.randint(0, 60_000) for u in users}
    evs = []
    for _ in range(n_events):
        u = rng.choices(users, weights)[0]
        clock[u] += rng.choice([0, 0, 120, 800, 2_500, 9_000, 40_000])
        item = f"pin{min(int(rng.paretovariate(0.8)), 5000):05d}"
        evs.append(Action(u, item, rng.choices(ACTIONS, [50, 10, 8, 25, 3, 4])[0], clock[u]))
    if messy:
        for i in range(len(evs) - 1):
            if rng.random() < 0.2:
                evs[i], evs[i + 1] = evs[i + 1], evs[i]
        base = list(evs)
        for _ in range(n_events // 15):
            evs.insert(rng.randrange(len(evs)), rng.choice(base))
        for _ in range(n_events // 30):
            a = rng.choice(base)
            evs.append(Action(a.user_id, "pin99999", "click", a.timestamp_ms - 2 * HOUR))
        for bad in (Action("", "pin1", "click", T0), Action("user000", "", "click", T0),
                    Action("user000", "pin1", "click", -1), Action("user000", "pin1", "cl\x1fick", T0),
                    Action("user000", "pin1", "click", 1.5)):
            evs.insert(rng.randrange(len(evs)), bad)
    return evs


def _valid_by_hand(a) -> bool:
    """The documented validity rules, written out apart from seqrank.store.validate_action (which is under test)."""
    text_ok = all(isinstance(v, str) and v and not any(ord(c) < 32 for c in v)
                  for v in (a.item_id, a.action))
    ts = a.timestamp_ms
    ts_ok = isinstance(ts, (int, np.integer)) and not isinstance(ts, (bool, np.bool_)) and 0 <= ts <= 2 ** 53
    return isinstance(a.user_id, str) and bool(a.user_id) and text_ok and ts_ok


class Reference:
    """The documented append semantics in plain Python (the oracle)."""

    def __init__(self, max_len=256, late_bound_ms=HOUR):
        self.max_len, self.bound = max_len, late_bound_ms
        self.data = defaultdict(list)

    def append(self, actions):
        st = IngestStats()
        by_user = {}
        for a in actions:
            if not _valid_by_hand(a):
                st.invalid += 1
            else:
                by_user.setdefault(a.user_id, []).append(a)
        for u, evs in by_user.items():
            kept = set(self.data[u])
            newest = max((k[0] for k in kept), default=None)
            for a in evs:
                k = (a.timestamp_ms, a.item_id, a.action)
                if k in kept:
                    st.duplicates += 1
                elif newest is not None and k[0] < newest - self.bound:
                    st.too_late += 1
                else:
                    kept.add(k)
                    st.accepted += 1
                    newest = k[0] if newest is None else max(newest, k[0])
            self.data[u] = sorted(kept)[-self.max_len:]
        return st

    def sequence(self, u):
        return [(i, a, t) for t, i, a in self.data.get(u, [])]


def snapshot(store, users):
    return {u: s.as_tuples() for u, s in zip(users, store.get_sequences(users))}


def batches(evs, sizes):
    i, k = 0, 0
    while i < len(evs):
        n = sizes[k % len(sizes)]
        yield evs[i:i + n]
        i, k = i + n, k + 1


def write_jsonl(path, evs):
    """Canonical JSON lines (the columns ``seqrank train`` reads; times in ms)."""
    with open(path, "w") as f:
        for a in evs:
            f.write(json.dumps({"user_id": a.user_id, "item_id": a.item_id, "action": a.action,
                                "timestamp": a.timestamp_ms}) + "\n")
    return path


def eventually(fn, timeout_s=10.0):
    """``fn()`` retried while the store is unavailable (a busy machine can miss a 50 ms read deadline
    right after a server resumes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def users_of(evs):
    return sorted({a.user_id for a in evs if isinstance(a.user_id, str) and a.user_id})


# append semantics (both stores) ---------------------------------------------------------------
def test_replay_same_file_twice_identical_state(make_store, tmp_path):
    store = make_store()
    evs = realistic_events(n_users=25, n_events=400, seed=1, messy=False)
    path = write_jsonl(tmp_path / "actions.jsonl", evs)
    first = ingest_log(store, load_actions(str(path)), batch_size=64)
    assert first.invalid == 0 and first.too_late == 0 and first.accepted + first.duplicates == len(evs)
    users = users_of(evs)
    state1 = snapshot(store, users)
    second = ingest_log(store, load_actions(str(path)), batch_size=97)
    assert second == IngestStats(accepted=0, duplicates=len(evs), too_late=0, invalid=0)
    assert snapshot(store, users) == state1
    # a messy stream (late, invalid, duplicate events) replayed: no state change, nothing accepted
    messy = realistic_events(n_users=25, n_events=400, seed=2)
    m1 = store.append(messy)
    state2 = snapshot(store, users_of(messy))
    m2 = store.append(messy)
    assert m2.accepted == 0 and m2.invalid == m1.invalid and m2.duplicates == m1.accepted + m1.duplicates
    assert snapshot(store, users_of(messy)) == state2


def test_duplicates_inside_one_batch(store):
    a = Action("u1", "pinA", "click", T0)
    b = Action("u1", "pinA", "repin", T0)          # same item and time, other action: not a duplicate
    st = store.append([a, a, b, a, Action("u1", "pinA", "click", T0 + 1)])
    assert st == IngestStats(accepted=3, duplicates=2)
    assert store.get_sequences(["u1"])[0].as_tuples() == [
        ("pinA", "click", T0), ("pinA", "repin", T0), ("pinA", "click", T0 + 1)]
    assert store.append([a]) == IngestStats(duplicates=1)


def test_out_of_order_within_bound_lands_in_order(store):
    ts = [T0 + 5000, T0 + 1000, T0 + 3000, T0 + 4000, T0 + 2000]
    st = store.append([Action("u", f"p{t - T0}", "click", t) for t in ts[:2]])
    st += store.append([Action("u", f"p{t - T0}", "click", t) for t in ts[2:]])
    assert st.accepted == 5
    seq = store.get_sequences(["u"])[0]
    assert seq.timestamps_ms.dtype == np.int64
    assert list(seq.timestamps_ms) == sorted(ts)
    assert seq.item_ids == ["p1000", "p2000", "p3000", "p4000", "p5000"]
    assert seq.actions == ["click"] * 5


def test_same_timestamp_orders_by_item_then_action(store):
    evs = [Action("u", "b", "save", T0), Action("u", "a", "save", T0), Action("u", "b", "click", T0),
           Action("u", "ab", "click", T0), Action("u", "a", "click", T0), Action("u", "Z", "zz", T0)]
    store.append(evs[:3])
    store.append(evs[3:])
    got = store.get_sequences(["u"])[0].as_tuples()
    assert got == sorted([(a.item_id, a.action, a.timestamp_ms) for a in evs], key=lambda r: (r[2], r[0], r[1]))
    assert [r[0] for r in got] == ["Z", "a", "a", "ab", "b", "b"]


def test_a_packed_record_out_of_order_is_read_back_in_order():
    """The wire format's reader checks the order it promises (time, then item, then action) and repairs a record
    that breaks it, at a tie too; an ordered record is returned as it is."""
    from seqrank.store.base import SEP

    def packed(rows):
        return SEP.join(f"{i}{SEP}{a}{SEP}{t}" for i, a, t in rows)

    ordered = [("a", "click", T0), ("a", "save", T0), ("b", "click", T0), ("a", "click", T0 + 1)]
    assert UserSequence.from_packed(packed(ordered)).as_tuples() == ordered
    for broken in ([ordered[2], ordered[0], ordered[1], ordered[3]],     # items out of order at a tie
                   [ordered[1], ordered[0], ordered[2], ordered[3]],     # same item, actions out of order at a tie
                   [ordered[3], *ordered[:3]]):                          # time out of order
        assert UserSequence.from_packed(packed(broken)).as_tuples() == ordered
    assert UserSequence.from_packed(packed(ordered), limit=2).as_tuples() == ordered[2:]


def test_too_late_rejected_and_counted(make_store):
    store = make_store(late_bound_ms=10_000)
    assert store.append([Action("u", "p0", "click", T0 + 100_000)]).accepted == 1
    st = store.append([
        Action("u", "edge", "click", T0 + 90_000),        # exactly newest - bound: on time
        Action("u", "late", "click", T0 + 89_999),        # 1 ms too late
        Action("v", "other", "click", T0),                # another user's clock: fine
        Action("u", "newer", "click", T0 + 200_000),      # moves u's clock forward ...
        Action("u", "now_late", "click", T0 + 150_000),   # ... so this one (arrives after it) is late
        Action("u", "p0", "click", T0 + 100_000),         # a replayed stored event: duplicate, not late
    ])
    assert st == IngestStats(accepted=3, duplicates=1, too_late=2)
    seqs = store.get_sequences(["u", "v"])
    assert seqs[0].item_ids == ["edge", "p0", "newer"]
    assert seqs[1].item_ids == ["other"]


def test_keeps_newest_max_len(make_store):
    store = make_store(max_len=5)
    evs = [Action("u", f"p{i:02d}", "click", T0 + i * 1000) for i in range(12)]
    random.Random(3).shuffle(evs)
    st = store.append(evs[:7]) + store.append(evs[7:])
    assert st.accepted == 12
    seq = store.get_sequences(["u"])[0]
    assert seq.item_ids == [f"p{i:02d}" for i in range(7, 12)]
    # an on-time event older than everything kept is accepted but immediately outside the window
    assert store.append([Action("u", "old", "click", T0)]).accepted == 1
    assert store.get_sequences(["u"])[0] == seq
    assert len(store.get_sequences(["u"])[0]) == 5


def test_invalid_records_counted(store):
    st = store.append([Action("", "p", "click", T0), Action("u", "", "click", T0), Action("u", "p", "", T0),
                       Action("u", "p", "click", -1), Action("u", "p", "click", "123"),
                       Action("u", "p", "click", True), Action("u", "p\x1f", "click", T0),
                       {"user_id": "u"}, Action("u", "p", "click", T0)])
    assert st == IngestStats(accepted=1, invalid=8)


def test_unknown_users_and_empty_batch(store):
    assert store.get_sequences([]) == []
    seqs = store.get_sequences(["nobody", "nobody"])
    assert [len(s) for s in seqs] == [0, 0]
    assert seqs[0].timestamps_ms.dtype == np.int64 and isinstance(seqs[0], UserSequence)
    assert store.append([]) == IngestStats()


def test_matches_reference_semantics(make_store):
    store = make_store(max_len=8, late_bound_ms=HOUR)
    ref = Reference(max_len=8, late_bound_ms=HOUR)
    evs = realistic_events(n_users=20, n_events=500, seed=4)
    for b in batches(evs, [1, 7, 50, 3, 120]):
        assert store.append(b) == ref.append(b)
    users = users_of(evs)
    assert snapshot(store, users) == {u: ref.sequence(u) for u in users}


# both backends agree --------------------------------------------------------------------------
def test_embedded_and_redis_identical(redis_server, tmp_path):
    evs = realistic_events(n_users=40, n_events=800, seed=5)
    users = users_of(evs) + ["never_seen"]
    for max_len in (256, 16):
        emb = EmbeddedStore(str(tmp_path / f"e{max_len}.db"), max_len=max_len, timeout_s=2.0)
        red = RedisStore(redis_server.url, prefix=f"cmp{max_len}{uuid.uuid4().hex[:6]}:", max_len=max_len,
                         timeout_s=2.0)
        try:
            for b in batches(evs, [100, 1, 33, 250]):
                assert emb.append(b) == red.append(b)
            se, sr = emb.get_sequences(users), red.get_sequences(users)
            assert se == sr
            assert sum(len(s) for s in se) > 0
        finally:
            emb.close()
            red.close()


# concurrency ------------------------------------------------------------------------------------
def _concurrent_workload(seed=6):
    """Events all within the late bound (arrival order cannot matter), with duplicates across writers."""
    evs = realistic_events(n_users=12, n_events=1200, seed=seed, messy=False)
    rng = random.Random(seed)
    evs = evs + rng.sample(evs, 150)
    rng.shuffle(evs)
    return evs


def test_concurrent_writer_threads_same_as_sequential(make_store):
    evs = _concurrent_workload()
    users = users_of(evs)
    seq_store = make_store(max_len=64)
    for b in batches(evs, [40]):
        seq_store.append(b)
    expected = snapshot(seq_store, users)

    shared = make_store(max_len=64)
    parts = [evs[k::4] for k in range(4)]
    totals, errors = [IngestStats() for _ in parts], []
    barrier = threading.Barrier(4)

    def work(k):
        try:
            barrier.wait()
            for b in batches(parts[k], [5, 17, 9]):
                totals[k] += shared.append(b)
        except Exception as e:  # surfaced below
            errors.append(e)

    done = threading.Event()
    observed = []

    def read_while_writing():            # a concurrent reader (a Triton stub) only ever sees valid sequences
        try:
            while not done.is_set():
                for s in shared.get_sequences(users):
                    observed.append(len(s))
                    assert len(s) <= 64 and s.as_tuples() == sorted(s.as_tuples(), key=lambda r: (r[2], r[0], r[1]))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    reader = threading.Thread(target=read_while_writing)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    reader.join(10)
    assert not errors
    assert observed
    assert snapshot(shared, users) == expected
    total = sum(totals, IngestStats())
    assert total.too_late == 0 and total.invalid == 0 and total.accepted + total.duplicates == len(evs)


def test_concurrent_writer_processes_same_as_sequential(make_store, tmp_path):
    """4 ingest processes (the CLI) append interleaved events for the same users at once."""
    evs = _concurrent_workload(seed=7)
    users = users_of(evs)
    ref = Reference(max_len=64)
    ref.append(evs)
    target = make_store(max_len=64)
    url = (f"sqlite:///{target.path}" if make_store.kind == "embedded"
           else f"{target.url}?prefix={target.prefix}")
    payloads = [write_jsonl(tmp_path / f"part{k}.jsonl", evs[k::4]).read_text() for k in range(4)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    # all four start, import and block on stdin; then their input is released together, so they overlap
    procs = [subprocess.Popen([sys.executable, "-m", "seqrank.ingest", "--store", url, "--file", "-",
                               "--batch-size", "10", "--max-len", "64", "--log-level", "WARNING"],
                              cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in payloads]
    outs = [None] * 4

    def feed(k):
        outs[k] = procs[k].communicate(payloads[k], timeout=120)

    feeders = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join(130)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(c["accepted"] + c["duplicates"] for c in counts) == len(evs)
    assert snapshot(target, users) == {u: ref.sequence(u) for u in users}


# round trips ------------------------------------------------------------------------------------
def _counting_connection_class():
    import redis

    class CountingConnection(redis.connection.Connection):
        sends = 0

        def send_packed_command(self, command, check_health=True):
            type(self).sends += 1
            return super().send_packed_command(command, check_health)

    return CountingConnection


def test_redis_get_sequences_64_users_is_one_round_trip(redis_server):
    import redis
    conn_cls = _counting_connection_class()
    store = RedisStore(redis_server.url, prefix=f"rt{uuid.uuid4().hex[:6]}:", timeout_s=2.0,
                       connection_class=conn_cls)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        users = [f"u{i}" for i in range(64)]
        store.append([Action(u, f"p{j}", "click", T0 + j) for u in users[:40] for j in range(5)])
        store.get_sequences(users[:1])                       # warm up: connect + handshake
        store.get_embeddings(users[:1], dim=4)
        stats = admin.info("commandstats")
        before = {c: stats.get(c, {}).get("calls", 0) for c in ("cmdstat_mget", "cmdstat_get", "cmdstat_zrange")}
        conn_cls.sends = 0
        seqs = store.get_sequences(users)
        assert conn_cls.sends == 1                           # one request written, one reply: one round trip
        stats = admin.info("commandstats")
        after = {c: stats.get(c, {}).get("calls", 0) for c in before}
        assert after["cmdstat_mget"] - before["cmdstat_mget"] == 1       # one command for all 64 users
        assert after["cmdstat_get"] == before["cmdstat_get"] and after["cmdstat_zrange"] == before["cmdstat_zrange"]
        assert [len(s) for s in seqs] == [5] * 40 + [0] * 24
        conn_cls.sends = 0
        store.get_embeddings(users, dim=4)
        assert conn_cls.sends == 1
        conn_cls.sends = 0
        store.append([Action(u, "p9", "click", T0 + 9) for u in users])   # 64 users: one pipeline
        assert conn_cls.sends == 1
    finally:
        store.close()
        admin.close()


def test_embedded_get_sequences_64_users_is_one_query(tmp_path):
    store = EmbeddedStore(str(tmp_path / "s.db"))
    try:
        users = [f"u{i}" for i in range(64)]
        store.append([Action(u, f"p{j}", "click", T0 + j) for u in users[:40] for j in range(5)])
        store.put_embeddings(users[:3], np.ones((3, 4), np.float32), T0)
        with store._connection(write=False) as conn:   # the pooled read connection get_sequences reuses
            statements = []
            conn.set_trace_callback(statements.append)
        seqs = store.get_sequences(users)
        assert len(statements) == 1 and statements[0].lstrip().upper().startswith("SELECT")
        statements.clear()
        store.get_embeddings(users)
        assert len(statements) == 1
        conn.set_trace_callback(None)
        assert [len(s) for s in seqs] == [5] * 40 + [0] * 24
    finally:
        store.close()


# Redis operations ----------------------------------------------------------------------------
def test_redis_persists_across_restart(own_redis):
    store = RedisStore(own_redis.url, timeout_s=2.0)
    evs = realistic_events(n_users=10, n_events=200, seed=8)
    store.append(evs)
    users = users_of(evs)
    before = snapshot(store, users)
    store.put_embeddings(["user000", "user001"], np.arange(8, dtype=np.float32).reshape(2, 4), T0)
    own_redis.restart()                                      # same dir and port; AOF replayed
    try:
        assert snapshot(store, users) == before              # the old client reconnects
        fresh = open_store(own_redis.url, timeout_s=2.0)
        assert snapshot(fresh, users) == before
        emb, found = fresh.get_embeddings(["user001", "nobody"])
        assert found.tolist() == [True, False] and emb[0].tolist() == [4, 5, 6, 7]
        # the script cache is empty after a restart: append reloads it transparently
        assert store.append([Action("user000", "after_restart", "click", T0 + 10 * HOUR)]).accepted == 1
        assert fresh.get_sequences(["user000"])[0].item_ids[-1] == "after_restart"
        fresh.close()
    finally:
        store.close()


def test_redis_down_raises_store_unavailable_fast(own_redis):
    store = RedisStore(own_redis.url)                        # default read timeout 0.05 s
    store.append([Action("u", "p", "click", T0)])
    assert len(eventually(lambda: store.get_sequences(["u"]))[0]) == 1

    own_redis.pause()                                        # hung: accepts connections, never answers
    try:
        for call in (lambda: store.get_sequences(["u"] * 64), lambda: store.get_embeddings(["u"], dim=4)):
            t = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.perf_counter() - t < 0.5
        fast_writer = RedisStore(own_redis.url, write_timeout_s=0.2)
        t = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            fast_writer.append([Action("u", "p2", "click", T0 + 1)])
        assert time.perf_counter() - t < 0.5
        fast_writer.close()
    finally:
        own_redis.resume()
    assert len(eventually(lambda: store.get_sequences(["u"]))[0]) >= 1   # recovers once the server answers

    own_redis.stop()                                         # down: connection refused
    for call in (lambda: store.get_sequences(["u"]), lambda: store.get_embeddings(["u"], dim=4),
                 lambda: store.append([Action("u", "p3", "click", T0 + 2)]),
                 lambda: store.put_embeddings(["u"], np.zeros((1, 4)), T0)):
        t = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.perf_counter() - t < 0.5
    own_redis.start()
    assert eventually(lambda: store.get_sequences(["u"]))[0].item_ids[0] == "p"
    store.close()


def test_redis_unreachable_host_times_out(tmp_path):
    """Nothing listens on the port: StoreUnavailable, no hang."""
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    t = time.perf_counter()
    with pytest.raises(StoreUnavailable):
        store.get_sequences(["u"])
    assert time.perf_counter() - t < 0.5
    store.close()


# embeddings ---------------------------------------------------------------------------------------
def test_embeddings_roundtrip(make_store):
    store = make_store()
    with pytest.raises(ValueError):
        store.get_embeddings(["a"])                          # nothing stored, no dim known
    emb, found = store.get_embeddings(["a", "b"], dim=3)
    assert emb.shape == (2, 3) and emb.dtype == np.float32 and not found.any()
    vecs = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    store.put_embeddings(["a", "b", "c"], vecs, as_of_ms=T0)
    emb, found = store.get_embeddings(["c", "zz", "a"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(emb[0], vecs[2])
    np.testing.assert_array_equal(emb[1], np.zeros(8, np.float32))
    np.testing.assert_array_equal(emb[2], vecs[0])
    # newer as_of replaces, older does not
    store.put_embeddings(["a"], np.full((1, 8), 7.0), as_of_ms=T0 + 1)
    store.put_embeddings(["a"], np.full((1, 8), -1.0), as_of_ms=T0)
    assert store.get_embeddings(["a"])[0][0].tolist() == [7.0] * 8
    with pytest.raises(ValueError):
        store.put_embeddings(["a"], np.ones((1, 4)), as_of_ms=T0 + 2)     # the store's dim is 8
    with pytest.raises(ValueError):
        store.put_embeddings(["a", "b"], np.ones((1, 8)), as_of_ms=T0)    # shape mismatch
    for bad in (np.nan, np.inf):  # a non-finite vector is refused whole, naming the user; nothing is written
        vecs = np.ones((2, 8))
        vecs[1, 3] = bad
        with pytest.raises(ValueError, match="not finite.*'b'"):
            store.put_embeddings(["a", "b"], vecs, as_of_ms=T0 + 3)
        assert store.get_embeddings(["a"])[0][0].tolist() == [7.0] * 8
    # dim known from stored data even when none of the requested users has one, also in a new client
    assert store.get_embeddings(["zz"])[0].shape == (1, 8)


def test_embedding_dim_persists_for_new_clients(make_store, tmp_path):
    if make_store.kind == "embedded":
        s = make_store()
        s.put_embeddings(["a"], np.ones((1, 5)), T0)
        s2 = EmbeddedStore(s.path, timeout_s=2.0)
    else:
        s = make_store()
        s.put_embeddings(["a"], np.ones((1, 5)), T0)
        s2 = RedisStore(s.url, prefix=s.prefix, timeout_s=2.0)
    assert s2.get_embeddings(["nobody"])[0].shape == (1, 5)
    s2.close()


# freshness --------------------------------------------------------------------------------------
def test_measure_freshness(make_store):
    store = make_store(timeout_s=2.0)
    samples = measure_freshness(store, 20)
    assert len(samples) == 20 and all(s > 0 for s in samples)
    assert max(samples) < 1000


def test_measure_freshness_across_connections_embedded(tmp_path):
    """Writer and reader are separate store objects with their own connections to one file (as the ingest process
    and the Triton stub are): every append is visible to the other connection."""
    path = str(tmp_path / "f.db")
    writer, reader = EmbeddedStore(path), EmbeddedStore(path, timeout_s=2.0)
    samples = measure_freshness(writer, 10, reader=reader)
    assert len(samples) == 10 and all(s > 0 for s in samples)
    writer.close()
    reader.close()


# ingestion: readers, CLI, HTTP ------------------------------------------------------------------
def test_replay_log_skips_the_exposures(make_store):
    """A log replayed into the store (make demo, the bench) keeps the engagements only: exposures would crowd the
    user's bounded sequence (max_len) with rows the model's history drops anyway."""
    import pandas as pd
    from seqrank.ingest import replay_log
    store = make_store(max_len=3)
    ev = pd.DataFrame({"user_id": ["u"] * 6, "item_id": ["a", "b", "c", "d", "e", "f"],
                       "action": ["click", "exposure", "like", "exposure", "exposure", "click"],
                       "timestamp": [T0 + k for k in range(6)]})
    stats = replay_log(store, ev, ["exposure"])
    assert stats.accepted == 3
    assert store.get_sequences(["u"])[0].item_ids == ["a", "c", "f"]
    everything = make_store(max_len=3)
    replay_log(everything, ev, [None])  # a log without exposure rows: nothing is skipped
    assert everything.get_sequences(["u"])[0].item_ids == ["d", "e", "f"]


def test_load_actions_refuses_a_bad_file_naming_row_and_column(tmp_path):
    """A file with a bad row is refused whole (as ``seqrank train`` refuses it), naming file, row and column."""
    good = '{"user_id": "u1", "item_id": "p1", "action": "click", "timestamp": 1700000000000}'
    cases = [  # (second line, expected row, expected column)
        ('{"user_id": "u1", "item_id": "p2", "action": "click"}', 2, "timestamp"),
        ('{"user_id": "u1", "item_id": "p2", "action": "click", "timestamp": "soon"}', 2, "timestamp"),
        ('{"user_id": "u1", "item_id": "", "action": "click", "timestamp": 1700000000001}', 2, "item_id"),
        ('{"user_id": "u1", "item_id": "p2", "action": "click", "timestamp": -3}', 2, "timestamp"),
        ('not json at all', 2, None),
        ('{"user_id": "u1", "item_id": "p\\u001f2", "action": "click", "timestamp": 1700000000001}', None,
         "item_id"),                                       # valid for training, but the store's separator
    ]
    for k, (line, row, column) in enumerate(cases):
        p = tmp_path / f"bad{k}.jsonl"
        p.write_text(good + "\n" + line + "\n")
        with pytest.raises(DataError) as err:
            load_actions(str(p))
        assert (err.value.row, err.value.column) == (row, column), (k, str(err.value))
        assert str(err.value).startswith(str(p))


def test_ingest_reads_the_training_formats(tmp_path, make_store):
    """The canonical file ``seqrank train`` reads, with times in seconds, milliseconds or ISO-8601 (csv, tsv,
    jsonl), and the old ``timestamp_ms`` shape refused naming the missing column."""
    store = make_store()
    files = {
        "s.csv": "user_id,item_id,action,timestamp\nu1,p1,click,1700000000\nu1,p2,like,1700000001\n",
        "ms.tsv": "user_id\titem_id\taction\ttimestamp\nu2,x\tp1\tclick\t1700000000000\n".replace("u2,x", "u2"),
        "iso.jsonl": '{"user_id": "u3", "item_id": "p1", "action": "click", "timestamp": "2023-11-14T22:13:20Z"}\n'
                     '{"user_id": 3, "item_id": 7, "action": "save", "timestamp": "2023-11-14T22:13:21.500+00:00"}\n',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert main_ingest(["--store", f"sqlite:///{store.path}" if make_store.kind == "embedded"
                            else f"{store.url}?prefix={store.prefix}", "--file", str(tmp_path / name)]) == 0
    seqs = store.get_sequences(["u1", "u2", "u3", "3"])
    assert seqs[0].as_tuples() == [("p1", "click", T0), ("p2", "like", T0 + 1000)]
    assert seqs[1].as_tuples() == [("p1", "click", T0)]
    assert seqs[2].as_tuples() == [("p1", "click", T0)]
    assert seqs[3].as_tuples() == [("7", "save", T0 + 1500)]
    old = tmp_path / "old.csv"
    old.write_text("user_id,item_id,action,timestamp_ms\nu9,p1,click,1700000000000\n")
    with pytest.raises(DataError, match="missing required column 'timestamp'") as err:
        load_actions(str(old))
    assert err.value.column == "timestamp"
    assert store.get_sequences(["u9"])[0].item_ids == []


def test_main_ingest_cli(tmp_path, capsys):
    evs = realistic_events(n_users=5, n_events=100, seed=9, messy=False)
    f = write_jsonl(tmp_path / "in.jsonl", evs)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main_ingest(["--store", url, "--file", str(f), "--batch-size", "16"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["accepted"] + out["duplicates"] == len(evs) and out["invalid"] == 0
    s = open_store(url, timeout_s=2.0)
    assert sum(len(x) for x in s.get_sequences(users_of(evs))) == out["accepted"]
    s.close()
    with pytest.raises(SystemExit):
        main_ingest(["--store", url])                         # neither --file nor --serve
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,action,timestamp\nu,p,click,1700000000000\nu,p2,click,later\n")
    assert main_ingest(["--store", url, "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.csv: row 2: column 'timestamp': cannot parse 'later' as a time" in err


# open_store -----------------------------------------------------------------------------------
def test_open_store_urls(tmp_path, monkeypatch, request):
    s = open_store(f"sqlite:///{tmp_path / 'x.db'}?max_len=7", late_bound_ms=5)
    assert isinstance(s, EmbeddedStore) and s.max_len == 7 and s.late_bound_ms == 5
    assert s.path == str(tmp_path / "x.db")
    s.close()
    monkeypatch.setenv("SEQRANK_STORE", f"sqlite:///{tmp_path / 'env.db'}")
    s = open_store(None)
    assert isinstance(s, EmbeddedStore) and s.path.endswith("env.db") and s.max_len == 256
    s.close()
    monkeypatch.delenv("SEQRANK_STORE")
    with pytest.raises(ValueError):
        open_store(None)
    with pytest.raises(ValueError):
        open_store("mysql://x/y")
    srv = request.getfixturevalue("redis_server")
    r = open_store(srv.url + "?prefix=abc:&max_len=9&timeout_s=1.5")
    assert isinstance(r, RedisStore) and r.prefix == "abc:" and r.max_len == 9 and r.timeout_s == 1.5
    assert r.get_sequences(["nobody"])[0].item_ids == []
    r.close()


@pytest.mark.parametrize("max_len,bound", [(1, 5_000), (3, 5_000), (8, 0), (50, 20_000)])
def test_matches_reference_randomized(make_store, max_len, bound):
    """Dense ties, replays, late and out-of-order events against the oracle, small windows and bounds."""
    store = make_store(max_len=max_len, late_bound_ms=bound)
    ref = Reference(max_len=max_len, late_bound_ms=bound)
    rng = random.Random(max_len * 1000 + bound)
    clock = {f"u{i}": T0 for i in range(6)}
    sent = []
    for _ in range(40):
        batch = []
        for _ in range(rng.randint(1, 25)):
            r = rng.random()
            if r < 0.15 and sent:
                a = rng.choice(sent)                                  # replay
            else:
                u = rng.choice(list(clock))
                clock[u] += rng.choice([0, 0, 1, 500, 3_000])
                ts = clock[u] - (rng.choice([0, 1_000, 4_000, 6_000, 30_000]) if r < 0.4 else 0)
                a = Action(u, rng.choice("abcde"), rng.choice(["click", "save"]), ts)
            batch.append(a)
            sent.append(a)
        assert store.append(batch) == ref.append(batch)
    users = sorted(clock)
    assert snapshot(store, users) == {u: ref.sequence(u) for u in users}


def test_ingest_retries_while_redis_restarts(own_redis):
    """The loader survives a short Redis outage (append is idempotent, so retrying a batch is safe)."""
    store = RedisStore(own_redis.url, write_timeout_s=0.5)
    evs = realistic_events(n_users=5, n_events=60, seed=10, messy=False)
    own_redis.stop()
    restarter = threading.Timer(0.3, own_redis.start)
    restarter.start()
    try:
        st = ingest(store, evs, batch_size=20, retries=6, backoff_s=0.1)
    finally:
        restarter.join()
    assert st.accepted + st.duplicates == len(evs) and st.accepted > 0
    ref = Reference()
    ref.append(evs)
    assert snapshot(store, users_of(evs)) == {u: ref.sequence(u) for u in users_of(evs)}
    with pytest.raises(StoreUnavailable):                     # gives up after its retries
        own_redis.stop()
        ingest(store, evs[:1], retries=1, backoff_s=0.01)
    store.close()


def test_embedded_locked_by_another_writer_is_unavailable(tmp_path):
    import sqlite3
    path = str(tmp_path / "locked.db")
    store = EmbeddedStore(path, write_timeout_s=0.1, timeout_s=2.0)
    store.append([Action("u", "p", "click", T0)])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")                         # another process holds the write lock
    try:
        t = time.perf_counter()
        with pytest.raises(StoreUnavailable):
            store.append([Action("u", "p2", "click", T0 + 1)])
        assert time.perf_counter() - t < 0.5
        assert store.get_sequences(["u"])[0].item_ids == ["p"]  # WAL: readers are not blocked by the writer
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.append([Action("u", "p2", "click", T0 + 1)]).accepted == 1
    store.close()


def test_reader_with_smaller_max_len_sees_newest(make_store):
    writer = make_store(max_len=10)
    writer.append([Action("u", f"p{i}", "click", T0 + i) for i in range(10)])
    if make_store.kind == "embedded":
        reader = EmbeddedStore(writer.path, max_len=4, timeout_s=2.0)
    else:
        reader = RedisStore(writer.url, prefix=writer.prefix, max_len=4, timeout_s=2.0)
    assert reader.get_sequences(["u"])[0].item_ids == ["p6", "p7", "p8", "p9"]
    reader.close()
