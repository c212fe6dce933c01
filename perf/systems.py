"""The systems under test, each started pinned to the server's cores: Triton over the exported repository as
shipped (tuned), over a copy without dynamic batching (untuned), over a copy with a bounded queue (guarded), and the
naive FastAPI + PyTorch eager service (perf/naive_service.py) behind the same KServe v2 HTTP protocol. Plus what can
be read from a running system: its version, per-model statistics, store fallbacks, its Python backend stubs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from machine import cpus_allowed, pinned
from seqrank.exporting import triton_config
from seqrank.server.triton import ServerOptions, TritonServer, free_port

PERF = Path(__file__).resolve().parent


def _copy(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))


def served_config(repo: Path, model: str) -> Path:
    """The config the server loads for ``model`` with --model-config-name=cpu: configs/cpu.pbtxt where it exists."""
    cpu = repo / model / "configs" / "cpu.pbtxt"
    return cpu if cpu.is_file() else repo / model / "config.pbtxt"


def untuned_copy(src: Path, dst: Path) -> list[str]:
    """Copy the repository; remove every dynamic_batching block, one instance per model (seqrank.exporting.triton_config)."""
    _copy(src, dst)

    def untuned(cfg) -> None:
        if cfg.WhichOneof("scheduling_choice") == "dynamic_batching":
            cfg.ClearField("dynamic_batching")
        if cfg.instance_group:
            cfg.instance_group[0].count = 1
    return [str(cfg.relative_to(dst)) for cfg in sorted(dst.rglob("*.pbtxt")) if triton_config.edit(cfg, untuned)]


def ranker_variant_copy(src: Path, dst: Path, params: dict[str, int], instances: int | None = None) -> list[str]:
    """Copy the repository with the CPU ranker's parameters (intra_op_threads, run_threads) set to ``params`` and,
    when given, ``instances`` ranker instances: diagnostic layouts of the same cores (research/ab_layouts.py)."""
    _copy(src, dst)
    cfg = dst / "ranker" / "configs" / "cpu.pbtxt"

    def variant(config) -> None:
        for key, value in params.items():
            triton_config.set_parameter(config, key, value, cfg)
        if instances is not None:
            triton_config.set_instance_count(config, instances, cfg)
    return [str(cfg.relative_to(dst))] if triton_config.edit(cfg, variant) else []


RATE_LIMIT_ARGS = ("--rate-limit=execution_count",)  # the server flag that makes instances' rate_limiter count
TURN_RESOURCE = "server_core"


def guarded_copy(src: Path, dst: Path, timeouts_us: dict[str, int], take_turns: tuple[str, ...] = (),
                 unbatched: tuple[str, ...] = ()) -> dict[str, str]:
    """Copy the repository with the overload guard, all through seqrank.exporting.triton_config: a bounded queue on the models
    of ``timeouts_us`` (set_queue_policy: a request queued longer than its model's timeout is rejected explicitly),
    one shared rate-limiter resource for the models in ``take_turns`` (set_rate_limit_resource; the server must run
    with RATE_LIMIT_ARGS: one of their executions at a time, so an admitted request does not share the core with
    the others' steps), and batches of one for the models in ``unbatched`` (preferred_batch_size 1: the dynamic
    batcher then sends one request per execution, so no admitted request waits for a batch of others; on a CPU a
    batch costs as much as its requests apart). Returns what the guard set in each edited config, as served."""
    _copy(src, dst)
    out = {}
    for model in dict.fromkeys([*timeouts_us, *take_turns, *unbatched]):
        path = served_config(dst, model)

        def guard(cfg, p=path, model=model) -> None:
            if model in timeouts_us:
                triton_config.set_queue_policy(cfg, timeouts_us[model], source=p)
            if model in unbatched:
                cfg.dynamic_batching.preferred_batch_size[:] = [1]
            if model in take_turns:
                triton_config.set_rate_limit_resource(cfg, TURN_RESOURCE, 1, p)
        triton_config.edit(path, guard)
        cfg = triton_config.load(path)
        parts = triton_config.dump(cfg.dynamic_batching).split() if model in timeouts_us or model in unbatched else []
        if model in take_turns:
            parts += ["rate_limiter", *triton_config.dump(cfg.instance_group[0].rate_limiter).split()]
        out[str(path.relative_to(dst))] = " ".join(parts)
    return out


def start_triton(repo: Path, store_url: str | None, log_path: Path, cores: frozenset[int] | None = None,
                 extra_args: tuple[str, ...] = ()):
    """tritonserver over ``repo`` (CPU configs, ports picked free), started pinned to ``cores`` when given."""
    env = {"SEQRANK_STORE": store_url} if store_url else {}
    server = TritonServer(ServerOptions(model_repository=repo, http_port=0, grpc_port=0, metrics_port=0,
                                        model_config_name="cpu", env=env, extra_args=extra_args), log_path=log_path)
    if cores is None:
        return server.start(timeout_s=180)
    with pinned(cores):
        return server.start(timeout_s=180)


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except Exception:  # noqa: BLE001
        return None


def triton_version(server) -> str | None:
    return (_get_json(f"http://{server.http_url}/v2") or {}).get("version")


def model_stats(http_url: str) -> dict:
    """Per model: request and execution counts and cumulative ns (Triton's statistics extension; the naive service
    answers it too)."""
    out = {}
    for m in (_get_json(f"http://{http_url}/v2/models/stats") or {}).get("model_stats", []):
        s = m.get("inference_stats", {})
        out[m["name"]] = {"inference_count": int(m.get("inference_count", 0)),
                          "execution_count": int(m.get("execution_count", 0)),
                          **{k: int(s.get(k, {}).get("ns", 0)) for k in
                             ("success", "queue", "compute_input", "compute_infer", "compute_output")},
                          "fail_count": int(s.get("fail", {}).get("count", 0))}
    return out


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        d = {k: a[k] - b.get(k, 0) for k in a}
        inf, ex = d["inference_count"], d["execution_count"]
        if inf <= 0:
            continue
        out[name] = {"requests": inf, "executions": ex, "avg_batch": inf / ex if ex else None,
                     "failed": d["fail_count"], "queue_ms_per_request": d["queue"] / inf / 1e6,
                     "compute_ms_per_execution": (d["compute_input"] + d["compute_infer"] + d["compute_output"])
                     / max(ex, 1) / 1e6,
                     "infer_ms_per_execution": d["compute_infer"] / max(ex, 1) / 1e6}
    return out


def prometheus(url: str) -> dict[str, float] | None:
    """A Prometheus text page as {'name{labels}': value}; None if it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#") and " " in line}


def store_fallbacks(metrics_url: str) -> float | None:
    """Rankings served without the store's sequence so far (seqrank_store_fallback_total, exported by the ensemble's
    preprocess and by the naive service); None if the page cannot be read."""
    page = prometheus(metrics_url)
    return None if page is None else sum(v for k, v in page.items() if k.startswith("seqrank_store_fallback_total"))


def stub_models(server) -> dict[int, str]:
    """pid -> model name, for every Python backend stub process of the server (each instance has its own)."""
    out = {}
    for pid in server.group_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"triton_python_backend_stub") and len(cmd) > 1:
            out[pid] = Path(cmd[1].decode()).parent.parent.name
    return out


def stub_pids(server) -> dict:
    """model name -> the pid of one of its stubs (the models that have a live stub)."""
    return {model: pid for pid, model in stub_models(server).items()}


class TritonSystem:
    """One Triton server over one repository, pinned to the server's cores. ``server()`` restarts it if a Python
    backend stub died (Triton 2.51 does not restart a stub and keeps reporting ready), recording the incident."""

    def __init__(self, name: str, repo: Path, store_url: str | None, logs: Path, cores: frozenset[int],
                 incidents: list, extra_args: tuple[str, ...] = ()):
        self.name, self.repo, self.store_url, self.logs, self.cores = name, repo, store_url, logs, cores
        self.incidents, self.extra_args = incidents, extra_args
        self._server = start_triton(repo, store_url, logs / f"tritonserver-{name}.log", cores, extra_args)
        self.n_stubs = len(stub_models(self._server))

    def server(self):
        srv = self._server
        alive = stub_models(srv)
        if srv.is_alive() and len(alive) >= self.n_stubs:
            return srv
        self.incidents.append({"system": self.name, "time": time.strftime("%H:%M:%S"),
                               "server_alive": srv.is_alive(), "stubs_alive": sorted(set(alive.values())),
                               "log_tail": srv.log_text()[-1500:]})
        srv.stop()
        self._server = start_triton(self.repo, self.store_url,
                                    self.logs / f"tritonserver-{self.name}-restart{len(self.incidents)}.log",
                                    self.cores, self.extra_args)
        return self._server

    @property
    def http_url(self) -> str:
        return self._server.http_url

    @property
    def metrics_url(self) -> str:
        return f"http://{self._server.metrics_url}/metrics"

    def pinning(self) -> dict[int, list[int] | None]:
        return {pid: cpus_allowed(pid) for pid in self._server.group_pids()}

    def stop(self) -> None:
        self._server.stop()


class NaiveService:
    """perf/naive_service.py under uvicorn, one worker process per server core (torch single-threaded in each), on
    one port, pinned to the server's cores. With several workers the kernel spreads keep-alive connections over them
    unevenly (measured on 2 cores: 3 of 4 connections on one worker); on a 1-core server share there is one."""

    def __init__(self, run: Path, repo: Path, store_url: str | None, cores: frozenset[int], log_path: Path):
        self.port = free_port()
        self.http_url = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://{self.http_url}/metrics"
        env = dict(os.environ, SEQRANK_NAIVE_RUN=str(run.resolve()), SEQRANK_NAIVE_REPOSITORY=str(repo.resolve()),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if store_url:
            env["SEQRANK_STORE"] = store_url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        with pinned(cores):
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "naive_service:app", "--app-dir", str(PERF), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(len(cores)), "--log-level", "warning", "--no-access-log",
                 "--http", "naive_service:NoDelayHTTPProtocol"],  # Nagle off (see naive_service.py)
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(PERF.parent),
                start_new_session=True)

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Ready when /v2/health/ready answers 200 (each worker loads the model before it accepts requests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"naive service not ready after {timeout_s}s: {self.log_path.read_text()[-2000:]}")

    def pinning(self) -> dict[int, list[int] | None]:
        return {self.proc.pid: cpus_allowed(self.proc.pid)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
