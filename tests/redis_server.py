"""Start a real ``redis-server`` subprocess, or a real Redis Cluster, for tests (never a mock).

    with RedisServer() as srv:          # free port on 127.0.0.1, temp dir, appendonly yes
        store = open_store(srv.url)
        srv.restart()                   # same dir and port: data persists (AOF)

    with RedisTestCluster(masters=3) as cluster:    # cluster-enabled redis-servers + redis-cli --cluster create
        store = open_store(cluster.url)             # redis://127.0.0.1:P1/0?cluster=1

Pytest fixtures (import them into a test module to use them): ``redis_server`` (one server per session) and
``redis_cluster`` (one 3-master cluster per module). ``RedisServer.available()`` tells whether a redis-server
binary exists.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port for a cluster node: at most 55535, with the cluster bus port (port + 10000) free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


def info(port: int, *command: str, timeout: float = 0.2) -> dict[str, str]:
    """A ``key:value`` report (default ``INFO server``; ``info(port, "CLUSTER", "INFO")``) of the redis answering on
    127.0.0.1:``port``, as a dict; empty when nothing answers (yet)."""
    command = command or ("INFO", "server")
    request = f"*{len(command)}\r\n" + "".join(f"${len(c)}\r\n{c}\r\n" for c in command)
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(request.encode())
            while True:     # one bulk string: $<len>\r\n<payload>\r\n (or an error line)
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n")
                if sep and (not head.startswith(b"$") or len(body) >= int(head[1:]) + 2):
                    break
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value
    return out


def _server_pid(port: int, timeout: float = 0.2) -> Optional[int]:
    """The process_id reported by the redis answering on ``port`` (None when nothing answers yet)."""
    pid = info(port, timeout=timeout).get("process_id")
    return int(pid) if pid and pid.isdigit() else None


class RedisServer:
    def __init__(self, port: Optional[int] = None, data_dir: Optional[str] = None, appendonly: bool = True,
                 appendfsync: str = "everysec", binary: Optional[str] = None, extra_args: tuple = (),
                 pick_port=free_port):
        self.binary = binary or self.find_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (apt-get install redis-server)")
        self._auto_port = port is None       # may move to another free port if the first is taken
        self._pick_port = pick_port
        self.port = port or pick_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="seqrank-redis-")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None

    @staticmethod
    def find_binary() -> Optional[str]:
        return shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)

    @classmethod
    def available(cls) -> bool:
        return cls.find_binary() is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        for attempt in range(3):
            try:
                self._start(timeout_s)
                self._auto_port = False     # restarts keep the port
                return self
            except RuntimeError:
                if not self._auto_port or attempt == 2:
                    raise
                self.port = self._pick_port()   # lost a race for the port: try another one
        return self

    def _start(self, timeout_s: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.data_dir,
                "--daemonize", "no", "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync, "--logfile", os.path.join(self.data_dir, "redis.log"),
                *self.extra_args]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; log: {self.log_tail()}")
            if _server_pid(self.port) == self.proc.pid:     # ours, not another server on that port
                return
            time.sleep(0.02)
        self.stop(kill=True)
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING; log: {self.log_tail()}")

    def stop(self, kill: bool = False, timeout_s: float = 10.0) -> None:
        """SIGTERM (redis flushes the AOF and exits cleanly) or SIGKILL; waits for the exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)       # in case a test paused it
                self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
            except ProcessLookupError:
                pass
        self.proc = None

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (kernel backlog) but nothing answers (a hung server)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.data_dir, "redis.log"), errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


class RedisTestCluster:
    """A real Redis Cluster of ``masters`` cluster-enabled ``redis-server`` processes (no replicas, no persistence)
    on free ports of 127.0.0.1, joined by ``redis-cli --cluster create``; ``start`` returns once every node reports
    ``cluster_state:ok`` with all 16384 slots assigned."""

    def __init__(self, masters: int = 3):
        self.masters = masters
        self.cli = shutil.which("redis-cli") or (
            "/usr/bin/redis-cli" if os.path.exists("/usr/bin/redis-cli") else None)
        if self.cli is None:
            raise FileNotFoundError("redis-cli not found (apt-get install redis-server)")
        self.data_dir = tempfile.mkdtemp(prefix="seqrank-redis-cluster-")
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """A store URL naming the first node (the client learns the others from it)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0?cluster=1"

    def start(self, timeout_s: float = 30.0) -> "RedisTestCluster":
        for i in range(self.masters):
            node_dir = os.path.join(self.data_dir, f"node{i}")
            os.makedirs(node_dir)
            node = RedisServer(data_dir=node_dir, appendonly=False, pick_port=free_cluster_port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", os.path.join(node_dir, "nodes.conf"),
                "--cluster-node-timeout", "5000"))
            self.nodes.append(node)
            node.start()
        create = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s)
        if create.returncode != 0:
            self.cleanup()
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]} {create.stderr[-2000:]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [info(n.port, "CLUSTER", "INFO") for n in self.nodes]
            if all(st.get("cluster_state") == "ok" and st.get("cluster_slots_ok") == "16384"
                   and st.get("cluster_known_nodes") == str(self.masters) for st in states):
                return self
            time.sleep(0.05)
        self.cleanup()
        raise TimeoutError(f"the cluster did not reach cluster_state:ok: {states}")

    def cleanup(self) -> None:
        for n in self.nodes:
            n.stop(kill=True)
        self.nodes = []
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "RedisTestCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session (tests separate their data by key prefix)."""
    srv = RedisServer().start()  # no redis-server: FileNotFoundError with the install hint (make install has one)
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def redis_cluster():
    """A real 3-master Redis Cluster for the module."""
    cluster = RedisTestCluster(masters=3).start()
    yield cluster
    cluster.cleanup()
