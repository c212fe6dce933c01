"""The machine the bench runs on: what it is (CPU, versions, load) and how its cores are split between the load
generator and the systems under test (the client pinned to its own core, the server to the others)."""
from __future__ import annotations

import os
import platform
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def command_output(cmd: list[str], env=None) -> str:
    """A command's stdout + stderr, or why it could not run (for version strings and py-spy dumps)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
        return (r.stdout + r.stderr).strip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable ({e})"


@dataclass(frozen=True)
class CoreSplit:
    """Which cores the load generator (client) and the systems under test (server) may run on."""
    client: frozenset[int]
    server: frozenset[int]

    @classmethod
    def of_this_process(cls) -> "CoreSplit":
        """The first allowed core for the client, the rest for the server (both on the one core of a 1-core box)."""
        cores = sorted(os.sched_getaffinity(0))
        return cls(frozenset(cores[:1]), frozenset(cores[1:] or cores[:1]))

    def describe(self) -> dict:
        return {"client_cores": sorted(self.client), "server_cores": sorted(self.server),
                "how": "sched_setaffinity of the starting thread (what `taskset -c` does): processes started under "
                       "it, their threads and children inherit the mask"}


@contextmanager
def pinned(cores: frozenset[int]):
    """Run the block with the calling thread's CPU affinity set to ``cores``: every process it starts (a server,
    perf_analyzer) inherits the mask, as with ``taskset -c``. The thread's own mask is restored afterwards."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpus_allowed(pid: int) -> list[int] | None:
    """The cores process ``pid`` may run on (from /proc: the check that pinning took), or None if it is gone."""
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return None


def machine_description() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    from redis_server import RedisServer
    from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env
    redis_bin = RedisServer.find_binary()
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "virtualized": "hypervisor" in flags,
        "memory_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "versions": {
            **{m: _version(m) for m in ("torch", "onnxruntime", "numpy", "tritonclient", "nvidia-pytriton", "fastapi",
                                        "uvicorn", "starlette", "matplotlib", "redis", "py-spy")},
            "perf_analyzer": f"{_version('tritonclient')} (tritonclient wheel; binary: "
                             f"{command_output([str(perf_analyzer_binary()), '--version'], env=perf_analyzer_env())})",
            "redis-server": command_output([redis_bin, "--version"]) if redis_bin else None,
        },
        "note": "shared 2-core VM: other workloads run next to the bench (see loadavg per point); numbers are noisy",
    }
