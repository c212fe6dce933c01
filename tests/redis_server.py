"""Start a real ``redis-server`` subprocess for tests (never a mock).

    with RedisServer() as srv:          # free port on 127.0.0.1, temp dir, appendonly yes
        store = open_store(srv.url)
        srv.restart()                   # same dir and port: data persists (AOF)

``RedisServer.available()`` tells whether a redis-server binary exists (tests skip otherwise).
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_pid(port: int, timeout: float = 0.2) -> Optional[int]:
    """The process_id reported by the redis answering on ``port`` (None when nothing answers yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("process_id:"):
                return int(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


class RedisServer:
    def __init__(self, port: Optional[int] = None, data_dir: Optional[str] = None, appendonly: bool = True,
                 appendfsync: str = "everysec", binary: Optional[str] = None, extra_args: tuple = ()):
        self.binary = binary or self.find_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (apt-get install redis-server)")
        self._auto_port = port is None       # may move to another free port if the first is taken
        self.port = port or free_port()
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
                self.port = free_port()     # lost a race for the port: try another one
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
