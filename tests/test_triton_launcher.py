"""The real tritonserver (nvidia-pytriton wheel) as a managed subprocess: seqrank.server.triton."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from seqrank.server.triton import (
    RESTRICTED_KEY_HEADER,
    RESTRICTED_KEY_HEADER_GRPC,
    ServerOptions,
    ServerStartError,
    TritonServer,
    backend_directory,
    perf_analyzer_binary,
    perf_analyzer_env,
    server_env,
    tritonserver_binary,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "echo_double"
X = np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 0.0]], dtype=np.float32)


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read().decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _shm_regions(prefix: str) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def _wait_until(predicate, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _http(server: TritonServer, path: str, method: str = "GET", headers=None, body: bytes | None = None):
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _infer_http(server: TritonServer, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT")]).as_numpy("OUTPUT")


def _infer_grpc(server: TritonServer, x: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT")]).as_numpy("OUTPUT")


# ----------------------------------------------------------------------------------------------------------------------
# Installation pieces
# ----------------------------------------------------------------------------------------------------------------------


def test_binaries_and_environment():
    assert os.access(tritonserver_binary(), os.X_OK)
    assert os.access(perf_analyzer_binary(), os.X_OK)
    env = server_env()
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    # the stub must load the libpython of the venv's own interpreter (its stdlib's C modules match), then the wheel libs
    base = sysconfig.get_config_var("LIBDIR")
    if (Path(base) / "libpython3.11.so.1.0").exists():
        assert libs[0] == base
        libs = libs[1:]
    assert "nvidia_pytriton.libs" in libs[0]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")
    assert any(Path(p, "libcudart.so.12").exists() for p in perf_analyzer_env()["LD_LIBRARY_PATH"].split(os.pathsep))


def test_backend_directory_is_idempotent_and_safe_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQRANK_CACHE_DIR", str(tmp_path / "cache"))
    results, errors = [], []

    def build():
        try:
            results.append(backend_directory())
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    backends = results[0]
    assert backends == backend_directory()
    python = backends / "python"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so",
        "seqrank",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    # the stubs import the seqrank this process runs (their interpreter ignores PYTHONPATH)
    import seqrank
    assert (python / "seqrank").resolve() == Path(seqrank.__file__).parent.resolve()
    assert os.access(python / "triton_python_backend_stub", os.X_OK)
    # no temporary directories left behind by the losers of the rename race
    assert [p.name for p in (tmp_path / "cache" / "triton-backends").iterdir()] == [backends.parent.name]


# ----------------------------------------------------------------------------------------------------------------------
# Serving the toy repository
# ----------------------------------------------------------------------------------------------------------------------


def test_cpu_config_is_loaded_and_served_over_http_and_grpc(start_server, toy_repository):
    server = start_server(toy_repository)  # model_config_name="cpu" by default
    assert server.is_alive()
    server.wait_models_ready([MODEL], timeout_s=10)
    # configs/cpu.pbtxt multiplies by 3; config.pbtxt would multiply by 2
    np.testing.assert_allclose(_infer_http(server, X), 3 * X)
    np.testing.assert_allclose(_infer_grpc(server, X), 3 * X)
    status, body = _http(server, f"/v2/models/{MODEL}/config")
    assert status == 200
    assert json.loads(body)["parameters"]["multiplier"]["string_value"] == "3"
    assert _http(server, "/v2/health/live")[0] == 200
    assert json.loads(_http(server, "/v2")[1])["name"] == server.server_id  # the --id the readiness probe checks
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as resp:
        assert b"nv_inference_request_success" in resp.read()


def test_default_config_without_model_config_name(start_server, toy_repository):
    server = start_server(toy_repository, model_config_name=None)
    np.testing.assert_allclose(_infer_grpc(server, X), 2 * X)


def test_broken_repository_fails_fast_with_the_server_error(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "toy_repository", repo)
    (repo / MODEL / "configs" / "cpu.pbtxt").write_text('name: "echo_double"\nbackend: "python"\nmax_batch_size: eight\n')
    server = TritonServer(
        ServerOptions(repo, http_port=0, grpc_port=0, metrics_port=0), log_path=tmp_path / "server.log"
    )
    started = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        server.start(timeout_s=120)
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"took {elapsed:.1f}s to report a broken repository"
    message = str(info.value)
    assert "Expected integer, got: eight" in message  # protobuf's own parse error, from the server log
    assert "failed to load all models" in message
    assert info.value.returncode not in (None, 0)
    assert not server.is_alive()
    assert _group_pids(server.pgid) == []


def test_model_that_fails_to_initialize_reports_the_python_error(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "toy_repository", repo)
    model_py = repo / MODEL / "1" / "model.py"
    model_py.write_text(model_py.read_text().replace('["multiplier"]', '["no_such_parameter"]'))
    server = TritonServer(ServerOptions(repo, http_port=0, grpc_port=0, metrics_port=0))
    with pytest.raises(ServerStartError) as info:
        server.start(timeout_s=120)
    assert "no_such_parameter" in info.value.log_errors
    assert _group_pids(server.pgid) == []


def _slow_copy_of_toy_repository(repo: Path) -> None:
    """The toy repository with a model whose initialize() never finishes (the server never becomes ready)."""
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "toy_repository", repo)
    model_py = repo / MODEL / "1" / "model.py"
    slow = "    def initialize(self, args):\n        import time\n\n        time.sleep(600)\n"
    model_py.write_text(model_py.read_text().replace("    def initialize(self, args):\n", slow))


def test_slow_model_times_out_and_is_stopped(tmp_path):
    repo = tmp_path / "repo"
    _slow_copy_of_toy_repository(repo)
    server = TritonServer(ServerOptions(repo, http_port=0, grpc_port=0, metrics_port=0))
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="not ready after"):
        server.start(timeout_s=4)
    assert time.monotonic() - started < 45
    assert not server.is_alive()
    assert _group_pids(server.pgid) == []
    assert _shm_regions(server._shm_prefix) == []


def test_port_in_use_is_reported_before_launching(tmp_path, toy_repository):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = TritonServer(ServerOptions(toy_repository, http_port=port, grpc_port=0, metrics_port=0))
        with pytest.raises(ServerStartError, match=f"http port {port} is already in use"):
            server.start(timeout_s=30)
        assert server.pid is None


# ----------------------------------------------------------------------------------------------------------------------
# No process left behind
# ----------------------------------------------------------------------------------------------------------------------


def _assert_stub_running(server: TritonServer) -> list[int]:
    pids = _group_pids(server.pgid)
    assert server.pid in pids
    stubs = [p for p in pids if "triton_python_backend_stub" in _cmdline(p)]
    assert stubs, f"no python backend stub in the server's process group: {[_cmdline(p) for p in pids]}"
    return pids


def test_stop_leaves_no_process_behind(start_server, toy_repository):
    server = start_server(toy_repository, reuse=False)
    pids = _assert_stub_running(server)
    assert server.start() is server  # no-op while running
    assert _group_pids(server.pgid) == pids
    server.stop()
    assert not server.is_alive()
    assert not [p for p in pids if _pid_alive(p)]
    assert _group_pids(server.pgid) == []
    server.stop()  # idempotent


def test_context_manager_stops_the_server(toy_repository):
    with TritonServer(ServerOptions(toy_repository, http_port=0, grpc_port=0, metrics_port=0)) as server:
        server.start(timeout_s=120)
        pids = _assert_stub_running(server)
        np.testing.assert_allclose(_infer_http(server, X), 3 * X)
    assert not [p for p in pids if _pid_alive(p)]


def test_stop_after_the_server_was_sigkilled_kills_its_stubs(start_server, toy_repository):
    server = start_server(toy_repository, reuse=False)
    pids = _assert_stub_running(server)
    regions = _shm_regions(server._shm_prefix)
    assert regions, "the Python backend's shared memory should carry this launch's prefix"
    os.kill(server.pid, signal.SIGKILL)
    # Until the dead server is reaped, its stub still sees a parent (a zombie) and keeps running: only stop(), which
    # signals the whole process group, gets rid of it. (Once the server is reaped the stub notices and exits.)
    assert _wait_until(lambda: not _pid_alive(server.pid), 10)
    time.sleep(1.0)
    assert [p for p in pids if p != server.pid and _pid_alive(p)], "expected the stub to outlive its killed server"
    server.stop()
    assert not [p for p in pids if _pid_alive(p)]
    assert _group_pids(server.pgid) == []
    assert _shm_regions(server._shm_prefix) == [], "the stub's shared memory was left in /dev/shm"


def test_server_follows_a_sigkilled_launcher(toy_repository):
    """atexit cannot run when the launching Python process is SIGKILLed: PR_SET_PDEATHSIG stops the server then."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    code = (
        "import sys, time\n"
        "from seqrank.server.triton import ServerOptions, TritonServer\n"
        "s = TritonServer(ServerOptions(sys.argv[1], http_port=0, grpc_port=0, metrics_port=0)).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(toy_repository)], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        server_pid = int(proc.stdout.readline())
        pids = _group_pids(server_pid)
        assert len(pids) >= 2
        proc.kill()
        proc.wait()
        assert _wait_until(lambda: not [p for p in pids if _pid_alive(p)], 30), [_cmdline(p) for p in pids]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stale_shared_memory_of_dead_launches_is_removed(start_server, toy_repository):
    live = start_server(toy_repository)  # a running server's regions must survive the clean-up
    stale = Path("/dev/shm", "seqrank_" + "0123456789abcdef" + "_00000000-test-stale")
    stale.write_bytes(b"")
    try:
        server = start_server(toy_repository, reuse=False)
        assert not stale.exists()
        assert _shm_regions(live._shm_prefix) and _shm_regions(server._shm_prefix)
        np.testing.assert_allclose(_infer_grpc(live, X), 3 * X)
        server.stop()
    finally:
        stale.unlink(missing_ok=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_forever_stops_cleanly_on_signal(sig, toy_repository, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [
        sys.executable, "-m", "seqrank.server.triton", "--model-repository", str(toy_repository),
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--log-file", str(tmp_path / "server.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server_pid = None
    try:
        lines = []
        for line in proc.stdout:  # blocks until the ready line (or EOF if it failed)
            lines.append(line)
            if line.startswith("seqrank-triton: ready"):
                fields = dict(f.split("=", 1) for f in line.split()[2:])
                server_pid = int(fields["pid"])
                break
        assert server_pid is not None, "".join(lines)
        pids = _group_pids(server_pid)
        assert len(pids) >= 2  # server + stub
        status, _ = _http_url(f"http://{fields['http']}/v2/health/ready")
        assert status == 200
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "seqrank-triton: stopping" in rest
        assert not [p for p in pids if _pid_alive(p)]
        assert _group_pids(server_pid) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server_pid is not None:
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_serve_forever_stops_on_signal_during_startup(tmp_path):
    repo = tmp_path / "slow_repo"
    _slow_copy_of_toy_repository(repo)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "seqrank.server.triton", "--model-repository", str(repo), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0", "--log-file", str(log)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert _wait_until(lambda: "loading: echo_double" in (log.read_text() if log.exists() else ""), 30)
        server_pids = [p for p in _all_pids() if str(repo) in _cmdline(p)]  # tritonserver + stub
        assert server_pids
        server_cmd = next(c for c in map(_cmdline, server_pids) if "shm-region-prefix-name=" in c)
        prefix = server_cmd.split("shm-region-prefix-name=")[1].split()[0]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "signal during startup" in out
        assert not [p for p in server_pids if _pid_alive(p)]
        assert _shm_regions(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _http_url(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


# ----------------------------------------------------------------------------------------------------------------------
# Restricted admin APIs
# ----------------------------------------------------------------------------------------------------------------------


def test_restricted_api_key_guards_admin_apis_only(start_server, toy_repository):
    key = "test-admin-key-123"
    server = start_server(toy_repository, restricted_api_key=key)
    admin = {RESTRICTED_KEY_HEADER: key}

    # HTTP: repository index, model config, statistics are refused without (or with a wrong) key
    for method, path in [("POST", "/v2/repository/index"), ("GET", f"/v2/models/{MODEL}/config"),
                         ("GET", f"/v2/models/{MODEL}/stats")]:  # fmt: skip
        body = b"{}" if method == "POST" else None
        status, text = _http(server, path, method, body=body)
        assert status == 403 and RESTRICTED_KEY_HEADER in text, (path, status, text)
        assert _http(server, path, method, {RESTRICTED_KEY_HEADER: "wrong"}, body)[0] == 403
        assert _http(server, path, method, admin, body)[0] == 200, path
    status, text = _http(server, "/v2/repository/index", "POST", admin, b"{}")
    assert json.loads(text) == [{"name": MODEL, "version": "1", "state": "READY"}]

    # inference, health and metadata stay open
    assert _http(server, "/v2/health/ready")[0] == 200
    assert _http(server, f"/v2/models/{MODEL}")[0] == 200
    np.testing.assert_allclose(_infer_http(server, X), 3 * X)
    np.testing.assert_allclose(_infer_grpc(server, X), 3 * X)

    # gRPC: the same with the triton-grpc-protocol-<key> metadata
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_config(MODEL)
    index = client.get_model_repository_index(headers={RESTRICTED_KEY_HEADER_GRPC: key})
    assert [m.name for m in index.models] == [MODEL]
    assert client.is_server_ready()
    assert client.get_model_metadata(MODEL).name == MODEL

    # the key is on the command line (Triton has no other input for it) but never in the log
    assert key not in server.log_text()


def test_explicit_model_control_loads_all_models(start_server, toy_repository):
    key = "k"
    server = start_server(toy_repository, model_control_mode="explicit", restricted_api_key=key)
    np.testing.assert_allclose(_infer_grpc(server, X), 3 * X)
    path = f"/v2/repository/models/{MODEL}/unload"
    assert _http(server, path, "POST", body=b"{}")[0] == 403
    assert _http(server, path, "POST", {RESTRICTED_KEY_HEADER: key}, b"{}")[0] == 200
    assert _wait_until(lambda: _http(server, f"/v2/models/{MODEL}/ready")[0] != 200, 30)
    assert _http(server, f"/v2/repository/models/{MODEL}/load", "POST", {RESTRICTED_KEY_HEADER: key}, b"{}")[0] == 200
    server.wait_models_ready(MODEL, timeout_s=30)


# ----------------------------------------------------------------------------------------------------------------------
# perf_analyzer
# ----------------------------------------------------------------------------------------------------------------------


def test_perf_analyzer_runs_against_the_toy_model(start_server, toy_repository, tmp_path):
    server = start_server(toy_repository)
    cmd = [
        str(perf_analyzer_binary()), "-m", MODEL, "-u", server.grpc_url, "-i", "grpc",
        "--shape", "INPUT:4", "--concurrency-range", "1:1",
        "--measurement-mode", "count_windows", "--measurement-request-count", "50",
        "--stability-percentage", "100", "-f", str(tmp_path / "perf.csv"),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Throughput" in result.stdout
    assert (tmp_path / "perf.csv").read_text().startswith("Concurrency")
