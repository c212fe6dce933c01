"""Run the real Triton Inference Server (tritonserver 2.51.0 from the nvidia-pytriton wheel) as a managed subprocess.

No Docker and no GPU needed (see docs / DESIGN section 5):

* the binary is ``site-packages/pytriton/tritonserver/bin/tritonserver`` and needs ``nvidia_pytriton.libs`` on
  ``LD_LIBRARY_PATH``;
* the Python backend lives in a writable backend directory built once per installation by
  :func:`backend_directory` (``libtriton_python.so``, ``triton_python_backend_utils.py`` and the Python 3.11
  ``triton_python_backend_stub``, which links the system ``libpython3.11``);
* the venv's ``bin`` goes first on ``PATH`` so the stub imports the venv's packages;
* ``--model-config-name=cpu`` makes every model load ``<model>/configs/cpu.pbtxt`` when it exists.

The server runs in its own process group (it is the leader); the Python backend stubs are its children in the same
group, so :meth:`TritonServer.stop` signals the whole group and nothing is left behind, even when the server itself
was SIGKILLed. Every started server is also stopped at interpreter exit (``atexit``); one started from the main thread
also gets SIGTERM when the Python process dies without running atexit (``PR_SET_PDEATHSIG``, Linux).

Readiness means ``/v2/health/ready`` answers 200 *and* the answering server reports this launch's ``--id`` (so a
stale server on the same port is never mistaken for the new one); requested ports are checked to be free first.

Command line: ``python -m seqrank.server.triton --model-repository model_repository`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import ctypes.util
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "RESTRICTED_APIS",
    "RESTRICTED_KEY_HEADER",
    "RESTRICTED_KEY_HEADER_GRPC",
    "ServerOptions",
    "ServerStartError",
    "TritonServer",
    "backend_directory",
    "free_port",
    "free_ports",
    "perf_analyzer_binary",
    "perf_analyzer_env",
    "serve_forever",
    "server_command",
    "server_env",
    "tritonserver_binary",
]

#: HTTP header that carries the key for the restricted (admin) APIs.
RESTRICTED_KEY_HEADER = "admin-key"
#: gRPC metadata key for the same: Triton prefixes the configured key with ``triton-grpc-protocol-``.
RESTRICTED_KEY_HEADER_GRPC = "triton-grpc-protocol-" + RESTRICTED_KEY_HEADER
#: API groups put behind the key when ``ServerOptions.restricted_api_key`` is set. ``inference``, ``health`` and
#: ``metadata`` stay open (clients and Kubernetes probes need them).
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")

STUB_PYTHON_VERSION = "3.11"
_LOG_TAIL_LINES = 60


class ServerStartError(RuntimeError):
    """The server exited, or did not become ready, during :meth:`TritonServer.start`.

    The message ends with the last lines of the server log; ``log_tail`` holds them, ``returncode`` is the exit status
    (``None`` when the server was still running and was stopped after the timeout).
    """

    def __init__(self, message: str, log_tail: str = "", returncode: int | None = None, log_errors: str = ""):
        parts = [message]
        if log_errors:
            parts.append(f"--- errors in the tritonserver log ---\n{log_errors}")
        if log_tail:
            parts.append(f"--- last lines of the tritonserver log ---\n{log_tail}")
        super().__init__("\n".join(parts))
        self.log_tail = log_tail
        self.log_errors = log_errors
        self.returncode = returncode


# Error lines every CPU-only start prints; they say nothing about the models.
_HARMLESS_ERRORS = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML")
_ERROR_LINE = re.compile(r"^(E\d{4} |\[libprotobuf ERROR|error:|Error:|Bad option)")


def _error_lines(log: str, limit: int = 30) -> str:
    lines = [
        line.rstrip()
        for line in log.splitlines()
        if _ERROR_LINE.match(line) and not any(h in line for h in _HARMLESS_ERRORS)
    ]
    return "\n".join(lines[-limit:])


# ----------------------------------------------------------------------------------------------------------------------
# Locating the binaries and libraries shipped by the pip wheels
# ----------------------------------------------------------------------------------------------------------------------


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {name!r} is not installed in {sys.prefix}; {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _pytriton_dir() -> Path:
    return _package_dir("pytriton", "install it with: pip install nvidia-pytriton==0.7.0 (see requirements.txt)")


def _tritonserver_dir() -> Path:
    return _pytriton_dir() / "tritonserver"


def _cuda_runtime_lib_dir() -> Path:
    lib = _package_dir("nvidia.cuda_runtime", "install it with: pip install nvidia-cuda-runtime-cu12") / "lib"
    if not lib.is_dir():
        raise FileNotFoundError(f"{lib} does not exist (broken nvidia-cuda-runtime-cu12 install?)")
    return lib


def _venv_bin() -> Path:
    return Path(sys.prefix) / "bin" if sys.prefix != sys.base_prefix else Path(sys.executable).parent


def tritonserver_binary() -> Path:
    """The tritonserver executable shipped in the nvidia-pytriton wheel."""
    binary = _tritonserver_dir() / "bin" / "tritonserver"
    if not binary.is_file():
        raise FileNotFoundError(f"tritonserver binary not found at {binary}; reinstall nvidia-pytriton==0.7.0")
    if not os.access(binary, os.X_OK):
        raise PermissionError(f"{binary} is not executable")
    return binary


def perf_analyzer_binary() -> Path:
    """The perf_analyzer executable installed by ``tritonclient[all]`` in the venv's ``bin``."""
    for candidate in (_venv_bin() / "perf_analyzer", Path(sys.executable).parent / "perf_analyzer"):
        if candidate.is_file():
            return candidate
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"perf_analyzer not found in {_venv_bin()}; install it with: pip install 'tritonclient[all]==2.50.0'"
    )


def _prepend_path_var(env: dict[str, str], name: str, entries: Iterable[Path | str]) -> None:
    new = [str(e) for e in entries]
    old = [p for p in env.get(name, "").split(os.pathsep) if p and p not in new]
    env[name] = os.pathsep.join(new + old)


def server_env() -> dict[str, str]:
    """Environment for tritonserver: ``os.environ`` plus the wheel libraries on ``LD_LIBRARY_PATH`` and this venv's
    ``bin`` first on ``PATH`` (the Python backend stub then imports the venv's packages)."""
    env = dict(os.environ)
    libs = [_pytriton_dir().parent / "nvidia_pytriton.libs"]
    try:
        libs.append(_cuda_runtime_lib_dir())
    except FileNotFoundError:
        pass  # the server's own libcudart copy lives in nvidia_pytriton.libs; the pip runtime is optional for it
    # The stub embeds libpython3.11; it must be the same build as the venv's base interpreter, or the stdlib's C
    # modules fail to load (pyenv's 3.11.7 _ssl against Debian's 3.11.2 libpython: undefined _PyModule_Add).
    base_lib = sysconfig.get_config_var("LIBDIR")
    if base_lib and (Path(base_lib) / "libpython3.11.so.1.0").exists():
        libs.insert(0, Path(base_lib))
    _prepend_path_var(env, "LD_LIBRARY_PATH", libs)
    _prepend_path_var(env, "PATH", [_venv_bin()])
    return env


def perf_analyzer_env() -> dict[str, str]:
    """Environment for perf_analyzer: it links ``libcudart.so.12`` even on CPU, which the nvidia-cuda-runtime-cu12
    wheel provides (it also needs the system ``libb64-0d``: scripts/install_system.sh)."""
    env = dict(os.environ)
    _prepend_path_var(env, "LD_LIBRARY_PATH", [_cuda_runtime_lib_dir()])
    _prepend_path_var(env, "PATH", [_venv_bin()])
    return env


# ----------------------------------------------------------------------------------------------------------------------
# Backend directory
# ----------------------------------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    if os.environ.get("SEQRANK_CACHE_DIR"):
        return Path(os.environ["SEQRANK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqrank"


def backend_directory() -> Path:
    """The directory to pass as ``--backend-directory``: it holds ``python/{libtriton_python.so,
    triton_python_backend_utils.py, triton_python_backend_stub}``.

    Layout: ``~/.cache/seqrank/triton-backends/<hash>/backends`` (``$SEQRANK_CACHE_DIR`` or ``$XDG_CACHE_HOME``
    override the root). The hash covers the source files (path, size, mtime), so a reinstalled wheel gets a fresh
    copy. Built once into a temporary directory and renamed into place: idempotent and safe under concurrent callers.

    ``python/seqrank`` links to the seqrank package this process runs: the stub's embedded interpreter ignores
    PYTHONPATH, and the backend directory is on its sys.path, so the models import the same seqrank code as the
    launcher (a checkout run with PYTHONPATH, not another installed copy). The hash covers that path too.
    """
    server_dir = _tritonserver_dir()
    sources = {
        "libtriton_python.so": server_dir / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": server_dir / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": server_dir / "python_backend_stubs" / STUB_PYTHON_VERSION
        / "triton_python_backend_stub",
    }
    digest = hashlib.sha256()
    for name, src in sorted(sources.items()):
        if not src.is_file():
            raise FileNotFoundError(f"{src} is missing from the nvidia-pytriton wheel; reinstall nvidia-pytriton==0.7.0")
        st = src.stat()
        digest.update(f"{name}\0{src.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    package = Path(__file__).resolve().parents[1]
    digest.update(f"seqrank\0{package}\n".encode())
    root = _cache_root() / "triton-backends"
    final = root / digest.hexdigest()[:16]
    result = final / "backends"
    if (result / "python" / "triton_python_backend_stub").is_file():
        return result

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        python_dir = tmp / "backends" / "python"
        python_dir.mkdir(parents=True)
        for name, src in sources.items():
            shutil.copy2(src, python_dir / name)
        (python_dir / "triton_python_backend_stub").chmod(0o755)
        (python_dir / "seqrank").symlink_to(package, target_is_directory=True)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)  # atomic; fails if another process renamed its copy first
        except OSError:
            if not (result / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Ports
# ----------------------------------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free right now on all interfaces (all sockets held open together)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port that is free right now (another process may still take it before it is used)."""
    return free_ports(1)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Options and command line
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ServerOptions:
    model_repository: Path
    http_port: int = 8000  # 0 = pick a free port at start()
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_config_name: str | None = "cpu"  # --model-config-name; None on a GPU deployment (config.pbtxt)
    model_control_mode: str = "none"  # "none" | "explicit" (then --load-model=* unless extra_args load models)
    restricted_api_key: str | None = None  # puts RESTRICTED_APIS behind the RESTRICTED_KEY_HEADER header
    python_shm_default_bytes: int = 16 * 1024 * 1024
    extra_args: Sequence[str] = ()
    log_verbose: int = 0
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for the server (e.g. SEQRANK_STORE)
    bind_address: str = "127.0.0.1"  # --http/--grpc/--metrics-address; "0.0.0.0" to serve other hosts
    exit_timeout_s: int = 10  # --exit-timeout-secs: how long SIGTERM waits for in-flight inferences

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository)
        if self.model_control_mode not in ("none", "explicit"):
            raise ValueError(f"model_control_mode must be 'none' or 'explicit', got {self.model_control_mode!r}")
        if self.restricted_api_key is not None:
            key = self.restricted_api_key
            if not key or any(c.isspace() or c in ",:=" for c in key):
                raise ValueError("restricted_api_key must be non-empty, without whitespace, ',', ':' or '='")


def _restricted_flags(key: str) -> list[str]:
    group = ",".join(RESTRICTED_APIS) + f":{RESTRICTED_KEY_HEADER}={key}"
    return [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]


def server_command(options: ServerOptions, backend_dir: Path | None = None, server_id: str | None = None) -> list[str]:
    """The tritonserver argv for ``options`` (ports used as given: resolve 0 first). ``server_id`` -> ``--id``."""
    repo = options.model_repository.resolve()
    cmd = [
        str(tritonserver_binary()),
        *([f"--id={server_id}"] if server_id else []),
        f"--model-repository={repo}",
        f"--backend-directory={backend_dir or backend_directory()}",
        f"--http-address={options.bind_address}",
        f"--http-port={options.http_port}",
        f"--grpc-address={options.bind_address}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-address={options.bind_address}",
        f"--metrics-port={options.metrics_port}",
        f"--model-control-mode={options.model_control_mode}",
        f"--backend-config=python,shm-default-byte-size={int(options.python_shm_default_bytes)}",
        f"--log-verbose={int(options.log_verbose)}",
        f"--exit-timeout-secs={int(options.exit_timeout_s)}",
        "--exit-on-error=true",
        "--strict-readiness=true",
    ]
    if options.model_config_name:
        cmd.append(f"--model-config-name={options.model_config_name}")
    if options.model_control_mode == "explicit" and not any(a.startswith("--load-model") for a in options.extra_args):
        cmd.append("--load-model=*")
    if options.restricted_api_key is not None:
        cmd += _restricted_flags(options.restricted_api_key)
    cmd += [str(a) for a in options.extra_args]
    return cmd


# ----------------------------------------------------------------------------------------------------------------------
# The managed server
# ----------------------------------------------------------------------------------------------------------------------

_LIVE_SERVERS: "set[TritonServer]" = set()  # strong refs: a server nobody holds any more is still stopped at exit


@atexit.register
def _stop_all_servers() -> None:
    for server in list(_LIVE_SERVERS):
        try:
            server.stop(timeout_s=10)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _pdeathsig_preexec():
    """preexec_fn: SIGTERM the server if the thread that started it dies (Linux only, no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)  # loaded in the parent: the child only calls it
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


def _group_members(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group ``pgid`` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return sorted(pids)


def _unlink_shm_regions(prefix: str) -> None:
    """Remove /dev/shm files named ``<prefix>*`` (the Python backend's regions of one server launch)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


_OUR_SHM = re.compile(r"^(seqrank_[0-9a-f]{16}_)")


def _unlink_stale_shm_regions() -> None:
    """Remove Python-backend regions of earlier launches whose processes are all gone (their launcher was killed
    before it could clean up). A live server always has its prefix on its command line, so its regions are kept."""
    try:
        prefixes = {m.group(1) for m in map(_OUR_SHM.match, os.listdir("/dev/shm")) if m}
    except OSError:
        return
    if not prefixes:
        return
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read().decode(errors="replace")
            except OSError:
                continue
            prefixes = {p for p in prefixes if p not in cmdline}
            if not prefixes:
                return
    for prefix in prefixes:
        _unlink_shm_regions(prefix)


class TritonServer:
    """A tritonserver subprocess.

    As a context manager it always stops the server on exit; starting is explicit, so the startup timeout is yours::

        with TritonServer(options).start(timeout_s=300) as server: ...
        with TritonServer(options) as server:
            server.start(timeout_s=300)
    """

    def __init__(self, options: ServerOptions, log_path: Path | None = None):
        self.options = options
        self._requested_log_path = Path(log_path) if log_path is not None else None
        self.log_path: Path | None = self._requested_log_path
        self._proc: subprocess.Popen | None = None
        self._pgid: int | None = None
        self._ports: tuple[int, int, int] | None = None
        self._lock = threading.RLock()
        self.command: list[str] = []
        self.server_id: str | None = None
        self._shm_prefix: str | None = None
        self.startup_seconds: float | None = None

    # -- properties --------------------------------------------------------------------------------------------------
    def _port(self, index: int) -> int:
        if self._ports is None:
            raise RuntimeError("the server has not been started")
        return self._ports[index]

    @property
    def http_port(self) -> int:
        return self._port(0)

    @property
    def grpc_port(self) -> int:
        return self._port(1)

    @property
    def metrics_port(self) -> int:
        return self._port(2)

    @property
    def _client_host(self) -> str:
        addr = self.options.bind_address
        return "127.0.0.1" if addr in ("0.0.0.0", "", "localhost") else addr

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self._client_host}:{self.metrics_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def pgid(self) -> int | None:
        """Process group of the server and its Python backend stubs."""
        return self._pgid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _resolve_ports(self) -> tuple[int, int, int]:
        wanted = [self.options.http_port, self.options.grpc_port, self.options.metrics_port]
        fresh = iter(free_ports(sum(1 for p in wanted if p == 0)))
        return tuple(p if p else next(fresh) for p in wanted)  # type: ignore[return-value]

    def start(self, timeout_s: float = 120) -> "TritonServer":
        """Start the server and wait until ``/v2/health/ready`` answers 200 (all models loaded).

        Raises :class:`ServerStartError` (with the log tail) as soon as the process exits, or after ``timeout_s``.
        When the ports were picked (0), a lost race for one of them is retried with fresh ports (3 tries in all).
        A no-op on a server that is already running; after :meth:`stop` it starts a new process."""
        if self.is_alive():
            return self
        picks_ports = 0 in (self.options.http_port, self.options.grpc_port, self.options.metrics_port)
        attempts = 3 if picks_ports else 1
        deadline = time.monotonic() + timeout_s
        for attempt in range(attempts):
            try:
                return self._start_once(deadline)
            except ServerStartError as err:
                lost_port_race = "already in use" in str(err)
                if attempt + 1 < attempts and lost_port_race and time.monotonic() < deadline:
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self, deadline: float) -> "TritonServer":
        with self._lock:
            repo = self.options.model_repository
            if not repo.is_dir():
                raise ServerStartError(f"model repository {repo} is not a directory")
            self._ports = self._resolve_ports()
            for name, port in zip(("http", "grpc", "metrics"), self._ports):
                if not _port_is_free(self.options.bind_address, port):
                    raise ServerStartError(f"{name} port {port} is already in use on {self.options.bind_address}")
            opts = replace(
                self.options, http_port=self._ports[0], grpc_port=self._ports[1], metrics_port=self._ports[2]
            )
            # The id lets the readiness probe tell this server from another process answering on the same port.
            self.server_id = _id_in_args(self.options.extra_args) or f"seqrank-{uuid.uuid4().hex[:12]}"
            self.command = server_command(opts, server_id=None if _id_in_args(opts.extra_args) else self.server_id)
            if any("shm-region-prefix-name" in str(a) for a in opts.extra_args):
                self._shm_prefix = None  # the caller names the regions: never clean up what may be shared
            else:
                _unlink_stale_shm_regions()
                self._shm_prefix = f"seqrank_{uuid.uuid4().hex[:16]}_"
                self.command.append(f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}")
            env = server_env()
            env.update({str(k): str(v) for k, v in self.options.env.items()})
            if self._requested_log_path is None:
                fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            else:
                self.log_path = self._requested_log_path
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(repo.resolve()),
                    start_new_session=True,  # own session + process group: stop() signals the whole group
                    # SIGTERM the server if this process dies; only from the main thread, because the kernel ties
                    # it to the thread that forked (a worker thread's exit would stop the server).
                    preexec_fn=_pdeathsig_preexec() if threading.current_thread() is threading.main_thread() else None,
                    close_fds=True,
                )
            self._pgid = self._proc.pid
            _LIVE_SERVERS.add(self)

        ready_url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise ServerStartError(
                    f"tritonserver exited with status {code} during startup "
                    f"(repository {self.options.model_repository}, log {self.log_path})",
                    self._log_tail(),
                    code,
                    _error_lines(self.log_text()),
                )
            if _http_status(ready_url) == 200 and _server_name(f"http://{self.http_url}/v2") == self.server_id:
                self.startup_seconds = time.monotonic() - started
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise ServerStartError(
                    f"tritonserver was not ready after {time.monotonic() - started:.1f}s "
                    f"(repository {self.options.model_repository}, log {self.log_path})",
                    self._log_tail(),
                    None,
                    _error_lines(self.log_text()),
                )
            time.sleep(0.1)

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def group_pids(self) -> list[int]:
        """Live processes in the server's process group (the server and its Python backend stubs)."""
        return _group_members(self._pgid) if self._pgid is not None else []

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the server's process group, wait up to ``timeout_s``, then SIGKILL whatever is left of the group.
        Idempotent; also cleans up stubs left behind by a server that died or was killed."""
        with self._lock:
            proc, pgid = self._proc, self._pgid
            if proc is None or pgid is None:
                return
            if proc.poll() is None:
                _killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            # The server is gone (or hung): make sure no member of its group survives it.
            _killpg(pgid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            end = time.monotonic() + 5
            while _group_members(pgid) and time.monotonic() < end:
                time.sleep(0.05)
            # A graceful shutdown unlinks the Python backend's shared memory; a crash, a SIGKILL or a stop during model
            # loading leaves it in /dev/shm. The prefix is unique to this launch, so only its regions are touched.
            if self._shm_prefix and not _group_members(pgid):
                _unlink_shm_regions(self._shm_prefix)
            _LIVE_SERVERS.discard(self)

    # -- readiness and logs ------------------------------------------------------------------------------------------
    def wait_models_ready(self, names: Iterable[str] | str, timeout_s: float = 60) -> None:
        """Wait until ``GET /v2/models/<name>/ready`` answers 200 for every name (raises TimeoutError otherwise)."""
        pending = [names] if isinstance(names, str) else list(names)
        deadline = time.monotonic() + timeout_s
        while pending:
            if not self.is_alive():
                raise ServerStartError(
                    f"tritonserver died while waiting for models {pending}",
                    self._log_tail(),
                    self.returncode,
                    _error_lines(self.log_text()),
                )
            pending = [n for n in pending if _http_status(f"http://{self.http_url}/v2/models/{n}/ready") != 200]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"models not ready after {timeout_s}s: {pending}\n{self._log_tail()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(line.rstrip() for line in deque(self.log_text().splitlines(), maxlen=lines))

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        ports = f" http={self.http_url} grpc={self.grpc_url}" if self._ports else ""
        return f"<TritonServer {state} pid={self.pid}{ports} repo={self.options.model_repository}>"


def _id_in_args(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith("--id="):
            return arg.split("=", 1)[1]
        if arg == "--id" and i + 1 < len(args):
            return args[i + 1]
    return None


def _port_is_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the server: TIME_WAIT does not count
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _server_name(url: str) -> str | None:
    """``name`` from the server metadata (``GET /v2``), i.e. the server's ``--id``."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return json.loads(resp.read()).get("name")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _http_status(url: str, timeout_s: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Foreground serving
# ----------------------------------------------------------------------------------------------------------------------


class _StopRequested(Exception):
    pass


def serve_forever(options: ServerOptions, log_path: Path | None = None, timeout_s: float = 300) -> int:
    """Start the server, print its URLs, block until SIGINT/SIGTERM or until the server dies; always stop it.

    Returns 0 after a signal (also one received during startup), the server's exit status if it died (128 + signal
    number if it was killed by a signal, 1 if it exited with 0), 2 if it failed to start."""
    stop_requested = threading.Event()
    starting = True
    previous = {}

    def on_signal(signum, frame):  # noqa: ARG001
        stop_requested.set()
        if starting:  # interrupt start() (it polls for up to timeout_s); the finally below stops the server
            raise _StopRequested()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    server = TritonServer(options, log_path=log_path)
    try:
        try:
            server.start(timeout_s=timeout_s)
        except ServerStartError as err:
            print(f"seqrank-triton: failed to start: {err}", file=sys.stderr, flush=True)
            return 2
        finally:
            starting = False
        print(
            f"seqrank-triton: ready http={server.http_url} grpc={server.grpc_url} metrics={server.metrics_url} "
            f"pid={server.pid} log={server.log_path} startup_s={server.startup_seconds:.1f}",
            flush=True,
        )
        while not stop_requested.wait(0.2):
            if not server.is_alive():
                code = server.returncode or 0
                print(f"seqrank-triton: tritonserver exited with status {code}; log {server.log_path}",
                      file=sys.stderr, flush=True)
                return code if code > 0 else (128 - code if code < 0 else 1)
        print("seqrank-triton: stopping", flush=True)
        return 0
    except _StopRequested:
        print("seqrank-triton: stopping (signal during startup)", flush=True)
        return 0
    finally:
        starting = False
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seqrank.server.triton",
        description="Run tritonserver (from the nvidia-pytriton wheel) in the foreground until SIGINT/SIGTERM. "
        "Arguments after '--' go to tritonserver unchanged.",
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--http-port", type=int, default=8000, help="0 = pick a free port")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--bind-address", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
    parser.add_argument("--model-config-name", default="cpu", help="'' for config.pbtxt (GPU deployment)")
    parser.add_argument("--model-control-mode", choices=("none", "explicit"), default="none")
    parser.add_argument("--restricted-api-key-env", metavar="VAR",
                        help="name of an environment variable holding the admin key for the restricted APIs")
    parser.add_argument("--python-shm-default-bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file", type=Path, help="server log (default: a temporary file)")
    parser.add_argument("--timeout", type=float, default=300, help="startup timeout in seconds")
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    key = None
    if args.restricted_api_key_env:
        key = os.environ.get(args.restricted_api_key_env)
        if not key:
            parser.error(f"environment variable {args.restricted_api_key_env} is empty or unset")
    options = ServerOptions(
        model_repository=args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        bind_address=args.bind_address,
        model_config_name=args.model_config_name or None,
        model_control_mode=args.model_control_mode,
        restricted_api_key=key,
        python_shm_default_bytes=args.python_shm_default_bytes,
        log_verbose=args.log_verbose,
        extra_args=tuple(extra),
    )
    return serve_forever(options, log_path=args.log_file, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
