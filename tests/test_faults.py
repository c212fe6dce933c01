"""Fault injection on the real tritonserver: a killed or hung Python stub under load, a store that is down or hung.

* ``seqrank serve --supervise`` runs as a subprocess on fixed free ports under steady load (4 threads,
  ``RankingClient(retries=12, backoff_s=0.25, timeout_s=30)``). The preprocess stub is SIGKILLed (the supervisor sees
  the stub exit), later the new server's preprocess stub is SIGSTOPped (a hung stub: only the canary sees it). Both
  times the ensemble must answer again within 60 s on the same ports, and no client request may fail: the requests in
  flight get UNAVAILABLE or the dead stub's INTERNAL ``is not healthy``, and the client's retry covers both. SIGTERM then exits 0 and
  leaves no tritonserver or stub behind. Recovery times and failure counts are printed (run with ``-s``).
* A feature store that cannot answer (embedded SQLite file unopenable or corrupted; a Redis SIGSTOPped) never fails a
  ranking: it answers ``sequence_source == "fallback_store_unavailable"`` well within 1 s (the store read timeout is
  50 ms), the canary keeps passing (it sends its own actions) and the store path recovers by itself.

Everything is real: tritonserver 2.51, the small trained run (tests/run_fixture.py), redis-server.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ENSEMBLE_MODELS, REPO_ROOT
from redis_server import RedisServer
from seqrank.client import RankingClient
from seqrank.server.supervise import canary
from seqrank.server.triton import _pdeathsig_preexec, free_ports

THREADS = 4
RECOVERY_LIMIT_S = 60.0


# ----------------------------------------------------------------------------------------------------------------------
# /proc helpers (only ever touching processes this test started: the supervisor's own tree)
# ----------------------------------------------------------------------------------------------------------------------


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ...


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _live_where(field: int, value: int) -> list[int]:
    """Live processes whose /proc stat field (after the name: 1 = ppid, 2 = pgrp) equals value."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] not in ("Z", "X") and int(st[field]) == value:
                out.append(int(entry))
    return out


def _children(pid: int) -> list[int]:
    return _live_where(1, pid)


def _group(pgid: int) -> list[int]:
    return _live_where(2, pgid)


def _server_of(supervisor_pid: int) -> int:
    servers = [p for p in _children(supervisor_pid) if _argv(p) and _argv(p)[0].endswith("/tritonserver")]
    assert len(servers) == 1, f"expected one tritonserver child of the supervisor, got {servers}"
    return servers[0]


def _stub_of(server_pid: int, model: str) -> int:
    for pid in _children(server_pid):
        argv = _argv(pid)
        if argv and argv[0].endswith("triton_python_backend_stub") and len(argv) > 1 \
                and Path(argv[1]).parts[-3:-2] == (model,):
            return pid
    raise AssertionError(f"no stub for {model} among {[_argv(p)[:2] for p in _children(server_pid)]}")


# ----------------------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------------------


def _requests(small_run, n: int = 8) -> list[tuple[str, list[str]]]:
    """(user, candidates) of users the store knows: store-backed rankings, like production traffic."""
    ev = small_run["events"]
    out = []
    for user, g in ev.groupby("user_id"):
        items = [str(i) for i in dict.fromkeys(g.item_id)][:30]
        if len(items) >= 5:
            out.append((str(user), items))
        if len(out) == n:
            break
    return out


class Load:
    """`threads` threads ranking in a loop through their own RankingClient (`retries` each); every request is
    recorded as (thread, started, ended, error or None)."""

    def __init__(self, grpc_url: str, requests, think_s: float = 0.02, http_url: str | None = None,
                 repository: Path | None = None, threads: int = THREADS, retries: int = 12):
        self.grpc_url, self.requests, self.think_s = grpc_url, requests, think_s
        self.http_url, self.repository = http_url, repository
        self.n_threads, self.retries = threads, retries
        self.records: list[tuple[int, float, float, str | None]] = []
        self.probes: list[tuple[float, float, bool]] = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        with RankingClient(self.grpc_url, "grpc", retries=self.retries, backoff_s=0.25, timeout_s=30) as client:
            client.heads  # noqa: B018 - fetched once, before the faults
            i = k
            while not self.stop_flag.is_set():
                user, items = self.requests[i % len(self.requests)]
                i += self.n_threads
                started = time.time()
                try:
                    res = client.rank(user, items)
                    assert sorted(res.item_ids) == sorted(items)
                    err = None
                except Exception as exc:  # noqa: BLE001 - recorded and judged by the test
                    err = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.records.append((k, started, time.time(), err))
                time.sleep(self.think_s)

    def _probe(self) -> None:
        """The service as a new client sees it: a canary ranking (no retries) every 0.1 s, recorded as
        (started, ended, ok)."""
        while not self.stop_flag.is_set():
            started = time.time()
            try:
                canary(self.http_url, 2.0, self.repository)
                ok = True
            except Exception:  # noqa: BLE001
                ok = False
            with self.lock:
                self.probes.append((started, time.time(), ok))
            time.sleep(0.1)

    def __enter__(self) -> "Load":
        if self.http_url:
            self.threads.append(threading.Thread(target=self._probe, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=120)

    def snapshot(self):
        with self.lock:
            return list(self.records)

    def probe_snapshot(self):
        with self.lock:
            return list(self.probes)

    def ok_count(self) -> int:
        return sum(1 for r in self.snapshot() if r[3] is None)

    def failures(self) -> list[str]:
        return [r[3] for r in self.snapshot() if r[3] is not None]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


# ----------------------------------------------------------------------------------------------------------------------
# The supervisor under faults
# ----------------------------------------------------------------------------------------------------------------------


class Supervised:
    def __init__(self, small_run, tmp_path: Path):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.events_path = tmp_path / "events.jsonl"
        self.out_path = tmp_path / "supervisor.out"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "seqrank.cli", "serve", "--supervise", "--repository", str(small_run["repo"]),
               "--store", small_run["store"], "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--events-file", str(self.events_path),
               "--canary-interval", "1", "--canary-timeout", "5"]
        self.out = open(self.out_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
                                     env=env, preexec_fn=_pdeathsig_preexec())

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def started(self) -> list[dict]:
        return [e for e in self.events() if e["event"] == "started"]

    def wait_started(self, count: int, timeout_s: float) -> dict:
        def check():
            assert self.proc.poll() is None, f"supervisor exited with {self.proc.returncode}:\n{self.output()}"
            s = self.started()
            return s[count - 1] if len(s) >= count else None
        return _wait(check, timeout_s, f"server generation {count - 1}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for e in self.started():  # the servers' process groups: never leave one behind, even on failure
            members = _group(e["pid"])
            ours = all(_argv(p)[:1] and _argv(p)[0].endswith(("/tritonserver", "triton_python_backend_stub"))
                       for p in members)
            if members and ours:  # (a reused pid would be someone else's group: never signal that)
                try:
                    os.killpg(e["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.out.close()


def _fault(sup: Supervised, load: Load, sig: int, expect_reason: str, label: str) -> dict:
    """Send ``sig`` to the current server's preprocess stub under load; wait for the incident and the ensemble to
    answer again; return the measured figures."""
    incidents_before = len([e for e in sup.events() if e["event"] == "incident"])
    generation = len(sup.started())
    server = _server_of(sup.proc.pid)
    stub = _stub_of(server, "preprocess")
    _wait(lambda: load.ok_count() >= 20, 60, "steady load")
    fault_at = time.time()
    os.kill(stub, sig)

    incident = _wait(lambda: ([e for e in sup.events() if e["event"] == "incident"][incidents_before:] or [None])[0],
                     RECOVERY_LIMIT_S + 10, f"the supervisor to recover from {label}")
    sup.wait_started(generation + 1, 5)
    # what the load threads (clients with retries and backoff) see: their first success among requests sent after it
    first_ok = _wait(lambda: min((r[2] for r in load.snapshot() if r[1] > fault_at and r[3] is None), default=None),
                     RECOVERY_LIMIT_S, "a successful ranking after the fault")
    # the ensemble answers a new client again: the first canary probe sent after the fault that succeeded
    answered = _wait(lambda: min((p[1] for p in load.probe_snapshot() if p[0] > fault_at and p[2]), default=None),
                     RECOVERY_LIMIT_S, "a successful probe after the fault")
    time.sleep(2.0)  # some load on the new server
    records = [r for r in load.snapshot() if r[2] > fault_at - 1]
    in_flight = sum(1 for r in records if r[1] <= fault_at < r[2])
    failures = [r for r in records if r[3] is not None]
    figures = {
        "fault": label, "reason": incident["reason"], "in_flight_at_fault": in_flight, "failed_requests": len(failures),
        "requests_after_fault": sum(1 for r in records if r[1] > fault_at),
        "detect_s": round(incident["detected_at"] - fault_at, 3),
        "restart_ready_s": round(incident["restarted_at"] - fault_at, 3),
        "supervisor_recovered_s": round(incident["recovered_at"] - fault_at, 3),
        "service_recovery_s": round(answered - fault_at, 3),
        "client_recovery_s": round(first_ok - fault_at, 3),
        "failed_probes": sum(1 for p in load.probe_snapshot() if p[0] > fault_at - 1 and not p[2]),
        "incident_seconds": incident["seconds"],
        "failure_messages": sorted({r[3][:160] for r in failures}),
    }
    print(f"\n[faults] {json.dumps(figures)}", flush=True)

    assert incident["reason"] == expect_reason, incident
    assert incident["detected_at"] <= incident["restarted_at"] <= incident["recovered_at"], incident
    assert answered - fault_at < RECOVERY_LIMIT_S
    assert first_ok - fault_at < RECOVERY_LIMIT_S
    assert incident["recovered_at"] - fault_at < RECOVERY_LIMIT_S
    # the requests that met the broken stub were answered UNAVAILABLE / "is not healthy", and the retry covered them
    assert not failures, figures["failure_messages"]
    return figures


def test_supervisor_recovers_from_killed_and_hung_stub_under_load(small_run, tmp_path):
    sup = Supervised(small_run, tmp_path)
    try:
        first = sup.wait_started(1, 300)
        for name in ("preprocess", "ranker", "postprocess"):
            assert name in first["stubs"], first
        with Load(sup.grpc_url, _requests(small_run), http_url=sup.http_url, repository=small_run["repo"]) as load:
            _fault(sup, load, signal.SIGKILL, "stub_exited", "SIGKILL preprocess stub")
            # a hung stub is seen by the canary only (~1 s for Triton's stub health check + up to one interval)
            _fault(sup, load, signal.SIGSTOP, "stub_unhealthy", "SIGSTOP preprocess stub (hung)")
        # restarts keep the same ports
        ports = {(e["http"], e["grpc"], e["metrics"]) for e in sup.started()}
        assert ports == {(sup.http_url, sup.grpc_url, f"127.0.0.1:{sup.metrics_port}")}, ports
        servers = [e["pid"] for e in sup.started()]
        pids = [p for s in servers for p in _group(s)] + servers
        assert len(servers) == 3
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=90) == 0, sup.output()
        assert "seqrank-supervise: stopping" in sup.output()
        left = [p for p in pids if _alive(p)] + [p for s in servers for p in _group(s)]
        assert not left, [(p, _argv(p)[:2]) for p in left]
    finally:
        sup.close()


# ----------------------------------------------------------------------------------------------------------------------
# Store down, corrupted or hung
# ----------------------------------------------------------------------------------------------------------------------


def _copy_store(small_run, dest: Path) -> str:
    src = sqlite3.connect(small_run["store"].removeprefix("sqlite:///"))
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return f"sqlite:///{dest}"


def _timed_rank(server, user, items, actions=None):
    with RankingClient(server.grpc_url, "grpc", retries=0, timeout_s=5) as client:
        client.heads  # noqa: B018 - not part of the timed call
        started = time.monotonic()
        res = client.rank(user, items, actions=actions)
        return res, time.monotonic() - started


def _fallback_latencies(server, user, items, n: int) -> list[float]:
    """n rankings while the store is out: each answered in full through the no-sequence path; their latencies."""
    latencies = []
    for _ in range(n):
        res, latency = _timed_rank(server, user, items)
        assert res.sequence_source == "fallback_store_unavailable"
        assert sorted(res.item_ids) == sorted(items)
        latencies.append(latency)
    return latencies


def _store_server(small_run, start_server, url: str):
    """A fresh server reading the store at ``url``, warmed up with a request that carries its own actions (so the
    first inference's one-off costs are not counted as store latency, and the store has not been read yet)."""
    server = start_server(small_run["repo"], env={"SEQRANK_STORE": url}, timeout_s=300, reuse=False)
    server.wait_models_ready(ENSEMBLE_MODELS, timeout_s=120)
    (user, items), = _requests(small_run, 1)
    for _ in range(3):
        res, _ = _timed_rank(server, user, items, actions=[(items[0], "click", 1_649_000_000_000)])
        assert res.sequence_source == "request"
    return server


def test_unopenable_embedded_store_falls_back_fast_and_recovers(small_run, start_server, tmp_path):
    """The SQLite file cannot be opened (permissions; as root, whom chmod does not stop, the path is replaced by a
    directory: the same SQLITE_CANTOPEN). Done before the first store read: open connections are pooled, and a file
    that disappears under an open connection goes on being read through it."""
    path = tmp_path / "store.db"
    server = _store_server(small_run, start_server, _copy_store(small_run, path))
    (user, items), = _requests(small_run, 1)
    aside = tmp_path / "store.db.aside"
    os.rename(path, aside)
    if os.geteuid() == 0:
        path.mkdir()
    else:
        shutil.copy2(aside, path)
        path.chmod(0)
    try:
        latencies = _fallback_latencies(server, user, items, 5)
        canary(server.http_url, 5.0, small_run["repo"])  # the canary never needs the store
    finally:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
        os.rename(aside, path)
    res, _ = _timed_rank(server, user, items)
    print(f"\n[faults] embedded store unopenable: fallback latency max {max(latencies) * 1000:.0f} ms "
          f"(median {sorted(latencies)[2] * 1000:.0f} ms); after restore: {res.sequence_source}", flush=True)
    assert max(latencies) < 1.0
    assert res.sequence_source == "store"  # recovered without a restart
    server.stop()


def test_corrupted_embedded_store_falls_back(small_run, start_server, tmp_path):
    """A corrupted file (sqlite3.DatabaseError 'file is not a database', not an OperationalError) is a store outage
    too: fallback, not INTERNAL for the whole batch (regression test for the fix in seqrank/store/embedded.py)."""
    path = tmp_path / "store.db"
    server = _store_server(small_run, start_server, _copy_store(small_run, path))
    (user, items), = _requests(small_run, 1)
    path.write_bytes(b"this is not an SQLite database\n" * 512)
    try:
        latencies = _fallback_latencies(server, user, items, 3)
        # requests that carry their own actions are unaffected
        res, _ = _timed_rank(server, user, items, actions=[(items[0], "click", 1_649_000_000_000)])
        assert res.sequence_source == "request"
    finally:
        server.stop()
    print(f"\n[faults] embedded store corrupted: fallback latency max {max(latencies) * 1000:.0f} ms", flush=True)
    assert max(latencies) < 1.0


def test_one_unreadable_store_record_falls_back_for_that_user_only(small_run, start_server, tmp_path):
    """One user's stored record cannot be parsed (a corrupt row; a wrong key type or embedding dim does the same):
    that user is ranked without the sequence, flagged fallback_store_error and counted; the users batched with
    it are ranked from the store as usual (until this was handled, the whole dynamic batch failed with INTERNAL)."""
    from concurrent.futures import ThreadPoolExecutor

    url = _copy_store(small_run, tmp_path / "store.db")
    requests = _requests(small_run, 4)
    broken = requests[0][0]
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        assert db.execute("UPDATE sequences SET packed = 'not|a|record' WHERE user_id = ?", (broken,)).rowcount == 1
    server = _store_server(small_run, start_server, url)
    try:
        def rank(k):
            user, items = requests[k % len(requests)]
            with RankingClient(server.grpc_url, "grpc", retries=0, timeout_s=30) as client:
                res = client.rank(user, items)
            assert sorted(res.item_ids) == sorted(items)
            return user, res.sequence_source

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(rank, range(32)))
        import urllib.request
        metrics = urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10).read().decode()
    finally:
        server.stop()
    assert {source for user, source in answers if user == broken} == {"fallback_store_error"}
    assert {source for user, source in answers if user != broken} == {"store"}
    counted = [line for line in metrics.splitlines()
               if line.startswith("seqrank_store_fallback_total") and 'reason="error"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == 8, counted


def test_paused_redis_falls_back_well_within_a_second(small_run, start_server):
    from seqrank.store import Action, open_store

    (user, items), = _requests(small_run, 1)
    ev = small_run["events"]
    mine = ev[ev.user_id.astype(str) == user]
    with RedisServer(appendonly=False) as redis:
        store = open_store(redis.url, timeout_s=5.0)
        try:
            store.append([Action(str(u), str(i), a, int(t)) for u, i, a, t in mine.itertuples(index=False, name=None)])
        finally:
            store.close()
        server = _store_server(small_run, start_server, redis.url)
        try:
            res, base = _timed_rank(server, user, items)
            assert res.sequence_source == "store"
            redis.pause()  # SIGSTOP: connections are accepted by the kernel, nothing answers
            try:
                latencies = _fallback_latencies(server, user, items, 5)
                canary(server.http_url, 5.0, small_run["repo"])
            finally:
                redis.resume()
            recovered = _wait(lambda: _timed_rank(server, user, items)[0].sequence_source == "store", 10,
                              "the store path to recover after SIGCONT", poll_s=0.2)
            print(f"\n[faults] redis paused: fallback latency max {max(latencies) * 1000:.0f} ms "
                  f"(median {sorted(latencies)[2] * 1000:.0f} ms, healthy {base * 1000:.0f} ms); "
                  f"recovered after resume: {recovered}", flush=True)
            assert max(latencies) < 1.0
        finally:
            server.stop()
