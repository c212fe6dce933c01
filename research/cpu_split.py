"""Where the two cores go while the tuned server is saturated: CPU seconds per process (each Python backend stub,
tritonserver, perf_analyzer) and the machine's idle share, for the ranker model alone and for the ensemble, in
alternating rounds. The evidence behind "what bounds ensemble_vs_bare" in docs/performance.md.

    .venv/bin/python research/cpu_split.py --run runs/demo          # ~2 minutes on 2 cores

Requests: the bench's fixed 1 x 100 (or, with --candidates 16, 1 x 16) with its actions in the request (no store
needed), or with --candidates log the bench's 256 requests drawn from the log (1.1 candidates each), their sequences
read from the run's feature store (`make demo` fills runs/demo/store.db); for the ranker alone the tensors
preprocess builds for them. Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))  # perf's modules
import make_inputs  # noqa: E402
from features import preprocessor, request_tensors, write_ranker_json  # noqa: E402
from load import background_load, pa_point  # noqa: E402
from settings import Settings  # noqa: E402
from systems import start_triton, stub_models  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (command name, user + system CPU seconds so far), every process."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, idle + iowait ticks) since boot."""
    values = list(map(int, Path("/proc/stat").read_text().splitlines()[0].split()[1:]))
    return sum(values), values[3] + values[4]


def split(server, model: str, data: Path, concurrency: int, seconds: float) -> dict:
    """Load ``model`` with perf_analyzer and sample every process's CPU over ``seconds`` in the middle of it."""
    names = {pid: f"{name} stubs" for pid, name in stub_models(server).items()}
    load = background_load(server.http_url, model, data, concurrency, seconds + 1, keep_output=True)
    time.sleep(3)
    cpu0, ticks0, t0 = process_cpu_seconds(), machine_ticks(), time.time()
    time.sleep(seconds)
    cpu1, ticks1, wall = process_cpu_seconds(), machine_ticks(), time.time() - t0
    out = load.communicate()[0]
    lines = [line for line in out.splitlines() if "throughput:" in line]
    cores: dict[str, float] = {}
    for pid, (name, used) in cpu1.items():
        if pid in cpu0 and used - cpu0[pid][1] > 0.01 * wall:
            key = names.get(pid, name)
            cores[key] = cores.get(key, 0.0) + (used - cpu0[pid][1]) / wall
    return {"model": model, "concurrency": concurrency, "perf_analyzer": lines[-1].strip() if lines else out[-300:],
            "idle_share": (ticks1[1] - ticks0[1]) / max(1, ticks1[0] - ticks0[0]),
            "cores": dict(sorted(((k, round(v, 3)) for k, v in cores.items()), key=lambda kv: -kv[1]))}


def alternating_splits(server, cases: list[tuple[str, Path]], rounds: int, concurrency: int, seconds: float) -> None:
    """`split` for each (model, perf_analyzer input) in turn, ``rounds`` times; one JSON line per measurement."""
    for _ in range(rounds):
        for model, data in cases:
            print(json.dumps(split(server, model, data, concurrency, seconds)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--candidates", choices=("100", "16", "log"), default="100",
                    help="the fixed 1 x 100 or 1 x 16 request, or the log's requests")
    ap.add_argument("--store", help="feature store URL for --candidates log (default: sqlite:///RUN/store.db)")
    args = ap.parse_args()
    repo = args.run / "model_repository"
    work = Path(tempfile.mkdtemp(prefix="seqrank-cpu-split-"))
    store = None
    if args.candidates == "log":
        store = args.store or f"sqlite:///{args.run.resolve() / 'store.db'}"
        make_inputs.write_inputs(args.run, work / "inputs", None, 256)
        ensemble_data = work / "inputs" / "log_store.json"
        reqs = json.loads((work / "inputs" / "requests.json").read_text())["log"]
    else:
        make_inputs.write_inputs(args.run, work / "inputs", None, 16)
        fixed = f"fixed_1x{args.candidates}"
        ensemble_data = work / "inputs" / f"{fixed}_actions.json"
        reqs = json.loads((work / "inputs" / "requests.json").read_text())[fixed][:1]
    ranker_data = work / f"ranker_{args.candidates}.json"
    pre = preprocessor(repo, store)
    write_ranker_json([request_tensors(pre, r, with_actions=store is None) for r in reqs], ranker_data)
    server = start_triton(repo, store, work / "server.log")
    cases = [("ranker", ranker_data), ("seqrank", ensemble_data)]
    try:
        for model, data in cases:
            pa_point(server.http_url, model, data, work / "warm.csv", Settings(True, pa_window_ms=300),
                           concurrency=2)
        alternating_splits(server, cases, args.rounds, args.concurrency, args.seconds)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
