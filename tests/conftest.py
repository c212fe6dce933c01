"""Shared pytest fixtures.

Triton server fixtures: ``start_server(repo, **options)`` starts the real tritonserver (free ports, readiness wait,
fails fast with the server's log in the error) and stops every server it started at the end of the session.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY_REPOSITORY = FIXTURES / "toy_repository"


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory ``start_server(repo, *, timeout_s=120, reuse=True, **ServerOptions fields) -> TritonServer``.

    Ports default to 0 (free ports). With ``reuse`` a live server started earlier in the session with the same
    repository and options is returned instead of a new one (startup costs seconds); a test that must own its server
    (to stop or kill it) passes ``reuse=False``. Every server is stopped at the end of the session.
    """
    from seqrank.server.triton import ServerOptions, TritonServer

    started: dict[tuple, TritonServer] = {}
    owned: list[TritonServer] = []
    log_dir = tmp_path_factory.mktemp("tritonserver-logs")

    def _start(repo: Path, *, timeout_s: float = 120, reuse: bool = True, **options) -> TritonServer:
        for port in ("http_port", "grpc_port", "metrics_port"):
            options.setdefault(port, 0)
        key = (str(Path(repo).resolve()), repr(sorted(options.items())))
        if reuse and key in started and started[key].is_alive():
            return started[key]
        server = TritonServer(
            ServerOptions(model_repository=Path(repo), **options),
            log_path=log_dir / f"tritonserver-{len(owned)}.log",
        )
        owned.append(server)
        server.start(timeout_s=timeout_s)
        if reuse:
            started[key] = server
        return server

    yield _start
    with ThreadPoolExecutor(max_workers=8) as pool:  # each stop takes ~2-3 s: Triton unloads on a 1 s poll
        list(pool.map(lambda server: server.stop(), owned))


@pytest.fixture(scope="session")
def toy_repository() -> Path:
    """A tiny Python-backend model repository (model ``echo_double``; see tests/fixtures/toy_repository/README.md)."""
    return TOY_REPOSITORY


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A small real trained run, exported and loaded into an embedded store (tests/run_fixture.py)."""
    from run_fixture import build_small_run
    return build_small_run(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run of tiny models on a generated log (tests/run_fixture.py build_tiny_run); copy it before changing it."""
    from run_fixture import build_tiny_run
    return build_tiny_run(tmp_path_factory.mktemp("tiny"))


ENSEMBLE_MODELS = ("seqrank", "preprocess", "ranker", "postprocess")


@pytest.fixture(scope="session")
def server(small_run, start_server):
    """The real tritonserver serving the small run's ensemble, preprocess reading the embedded store."""
    s = start_server(small_run["repo"], env={"SEQRANK_STORE": small_run["store"]}, timeout_s=300)
    s.wait_models_ready(ENSEMBLE_MODELS, timeout_s=120)
    return s


def rss_by_process(pids) -> dict[str, int]:
    """VmRSS (kB) per process, keyed ``tritonserver`` or ``<model> stub <pid>``."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
            with open(f"/proc/{pid}/status") as fh:
                kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        if argv and argv[0].endswith("triton_python_backend_stub") and len(argv) > 1:
            out[f"{Path(argv[1]).parts[-3]} stub {pid}"] = kb
        else:
            out["tritonserver" if argv and argv[0].endswith("tritonserver") else str(pid)] = kb
    return out
