"""py-spy profiles of the Python backend stubs of a running Triton while perf_analyzer loads the ensemble: where the
stubs' CPU goes (the evidence behind what bounds the ensemble)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from load import background_load
from machine import command_output
from systems import stub_pids


def parse_collapsed(path: Path, top: int = 12) -> dict:
    """py-spy raw (collapsed) stacks -> top self frames and top inclusive frames, as shares of the samples."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    fmt = lambda c: [{"frame": f, "share": k / total} for f, k in c.most_common(top)] if total else []  # noqa: E731
    return {"samples": total, "self": fmt(self_c), "inclusive": fmt(incl)}


def profile_stubs(server, data: Path, concurrency: int, seconds: float, outdir: Path,
                  client_cores: frozenset[int]) -> dict:
    """py-spy record (raw, non-blocking) of every Python backend stub of ``server`` (a running TritonServer) while
    perf_analyzer, on the client's cores, loads the ensemble."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        spy = Path(shutil.which("py-spy") or "py-spy")
    pids = stub_pids(server)
    outdir.mkdir(parents=True, exist_ok=True)
    load = background_load(server.http_url, "seqrank", data, concurrency, seconds, cores=client_cores)
    result = {"concurrency": concurrency, "seconds": seconds, "stubs": {}}
    try:
        time.sleep(1.0)
        dumps = {}
        for name, pid in pids.items():
            dumps[name] = command_output([str(spy), "dump", "--pid", str(pid), "--nonblocking"])[:3000]
        procs = {name: subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                         "--rate", "50", "--format", "raw", "--nonblocking",
                                         "-o", str(outdir / f"pyspy_{name}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for name, pid in pids.items()}
        for name, p in procs.items():
            try:
                _, err = p.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                err = b"timeout"
            f = outdir / f"pyspy_{name}.txt"
            entry = {"pid": pids[name], "dump": dumps.get(name, "")}
            if f.exists():
                entry.update(parse_collapsed(f))
            else:
                entry["error"] = err.decode(errors="replace")[-500:]
            result["stubs"][name] = entry
    finally:
        load.terminate()
        try:
            load.wait(timeout=10)
        except subprocess.TimeoutExpired:
            load.kill()
    return result
