"""Load on the systems under test, from the client's cores: perf_analyzer (one load point, or a search over load points
for the highest throughput within a p99 budget) and an open-loop Poisson client for overload, which perf_analyzer
cannot measure (it ends its run at the first failed request, and under overload a bounded queue fails requests on
purpose)."""
from __future__ import annotations

import asyncio
import csv
import io
import os
import resource
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np

from machine import pinned
from settings import Settings
from systems import model_stats, stats_delta, store_fallbacks

PROTOCOL = "http"  # one protocol for every system: the naive service speaks KServe v2 over HTTP only


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def parse_pa_csv(path: Path) -> list[dict]:
    """perf_analyzer's -f CSV rows (one per reported load level); none if it reported nothing."""
    if not path.exists():
        return []
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [r for r in rows if r.get("Inferences/Second")]


def _row_point(row: dict) -> dict:
    return {"throughput": float(row["Inferences/Second"]), "concurrency": int(float(row.get("Concurrency") or 0)),
            **{f"p{q}_ms": float(row[f"p{q} latency"]) / 1e3 for q in (50, 90, 95, 99)},
            "server_queue_ms": float(row.get("Server Queue", 0) or 0) / 1e3,
            "server_compute_infer_ms": float(row.get("Server Compute Infer", 0) or 0) / 1e3}


def _run_pa(args: list[str], out_csv: Path, cores: frozenset[int] | None, timeout: float,
            logs: Path | None) -> tuple[int, str, float]:
    """perf_analyzer with ``args`` (pinned to ``cores``): exit status, its output, its CPU seconds."""
    from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env
    cmd = [str(perf_analyzer_binary()), *args, "-f", str(out_csv)]
    if out_csv.exists():
        out_csv.unlink()
    cpu0 = _children_cpu()
    try:
        if cores is None:
            r = subprocess.run(cmd, capture_output=True, text=True, env=perf_analyzer_env(), timeout=timeout)
        else:
            with pinned(cores):
                r = subprocess.run(cmd, capture_output=True, text=True, env=perf_analyzer_env(), timeout=timeout)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = -1, f"timeout after {timeout}s: {e}"
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / (out_csv.stem + ".log")).write_text(" ".join(cmd) + "\n\n" + text[-6000:])
    return rc, text, _children_cpu() - cpu0


def _common(http_url: str, model: str, data: Path, st: Settings, window_ms: int) -> list[str]:
    # -s 1000 -r 3: three windows, always reported merged (a shared VM never passes a tight stability check)
    args = ["-m", model, "-i", PROTOCOL, "-u", http_url, "--input-data", str(data), "-b", "1",
            "-p", str(window_ms), "-s", "1000", "-r", "3"]
    if st.pa_count_window > 0:
        args += ["--measurement-mode", "count_windows", "--measurement-request-count", str(st.pa_count_window)]
    return args


def pa_point(http_url: str, model: str, data: Path, out_csv: Path, st: Settings, concurrency: int = 1,
             rate: float | None = None, cores: frozenset[int] | None = None, logs: Path | None = None,
             metrics_url: str | None = None) -> dict:
    """One perf_analyzer load point (closed loop at ``concurrency``, or Poisson arrivals at ``rate`` req/s)."""
    window = st.pa_window_ms if rate is None else max(st.pa_window_ms, 1500)  # Poisson at a few req/s needs time
    args = _common(http_url, model, data, st, window)
    if rate is not None:
        args += ["--request-rate-range", f"{rate:.3f}", "--request-distribution", "poisson", "--max-threads", "16"]
    else:
        args += ["--concurrency-range", str(concurrency)]
    before = model_stats(http_url)
    fallbacks = store_fallbacks(metrics_url) if metrics_url else None
    load = os.getloadavg()[0]
    rc, text, cpu = _run_pa(args, out_csv, cores, max(60, window / 1000 * 12 + 30), logs)
    point = {"model": model, "mode": "rate" if rate is not None else "concurrency",
             "load": rate if rate is not None else concurrency, "loadavg": load, "ok": False}
    rows = parse_pa_csv(out_csv) if rc == 0 else []
    if rows:
        point.update(ok=True, **_row_point(rows[-1]), csv_row=rows[-1])
        n = point["throughput"] * 3 * window / 1000 if st.pa_count_window <= 0 else 3 * st.pa_count_window
        point.update(requests_measured=round(n), client_cpu_ms_per_request=cpu * 1e3 / max(n, 1))
    else:
        point["error"] = text[-800:]
    point["model_stats"] = stats_delta(before, model_stats(http_url))
    if metrics_url:
        after = store_fallbacks(metrics_url)
        point["store_fallbacks"] = None if fallbacks is None or after is None else after - fallbacks
    return point


def pa_search(http_url: str, model: str, data: Path, budgets_ms, out_csv: Path, st: Settings,
              cores: frozenset[int] | None = None, logs: Path | None = None) -> dict[float, dict]:
    """The highest throughput within each p99 budget: concurrency 1, 2, 4, ... up to ``st.max_concurrency`` until a
    level misses the budget, then a bisection between the last level within it and the first past it. Every level
    is its own perf_analyzer run (pa_point: three merged windows, ``--percentile=99``), as model_analyzer runs it,
    and is measured once for all the budgets (a level's p99 does not depend on the budget it is compared with).

    Not perf_analyzer's ``--binary-search``: it measures the range's upper end second, and once a level far past
    the budget has run (64 synchronous clients), every lower level of the same process reports a p99 over it
    (perf_analyzer 2.50, the bare ranker, 25 ms: 1:64 finds concurrency 1 alone within, 710 req/s; 1:8 finds 8,
    1,034 req/s at p99 16 ms). Per budget: throughput 0 when not even concurrency 1 is within it."""
    load = os.getloadavg()[0]
    points: dict[int, dict] = {}

    def point(concurrency: int) -> dict:
        if concurrency not in points:
            points[concurrency] = pa_point(http_url, model, data, out_csv.with_name(f"{out_csv.stem}_c{concurrency}.csv"),
                                           st, concurrency, cores=cores, logs=logs)
        return points[concurrency]

    out = {}
    for budget in sorted(budgets_ms):
        visited = []

        def fits(concurrency: int) -> bool:
            p = point(concurrency)
            visited.append(concurrency)
            return p["ok"] and p["p99_ms"] <= budget

        if fits(1):
            good, bad = 1, None
            while bad is None and good < st.max_concurrency:
                level = min(2 * good, st.max_concurrency)
                good, bad = (level, None) if fits(level) else (good, level)
            while bad is not None and bad - good > 1:
                level = (good + bad) // 2
                good, bad = (level, bad) if fits(level) else (good, level)
        within = [{k: points[c][k] for k in ("throughput", "concurrency", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
                                             "server_queue_ms", "server_compute_infer_ms")}
                  for c in sorted(set(visited)) if points[c]["ok"] and points[c]["p99_ms"] <= budget]
        errors = [points[c].get("error", "") for c in visited if not points[c]["ok"]]
        best = max(within, key=lambda p: p["throughput"], default=None)
        out[budget] = {"model": model, "budget_ms": budget, "ok": not errors or bool(within), "loadavg": load,
                       "visited": visited, "within_budget": within,
                       "throughput": best["throughput"] if best else 0.0,
                       "concurrency": best["concurrency"] if best else None, "p99_ms": best["p99_ms"] if best else None}
        if errors:
            out[budget]["error"] = errors[-1]
    return out


def background_load(http_url: str, model: str, data: Path, concurrency: int, seconds: float,
                    keep_output: bool = False, cores: frozenset[int] | None = None) -> subprocess.Popen:
    """perf_analyzer holding ``concurrency`` requests in flight on ``model`` in the background, for three windows of
    ``seconds`` + 3 s each (no stability check), i.e. ~3 x (``seconds`` + 3) s: the load under which a profile or a
    CPU sample of ``seconds`` is taken. ``keep_output``: its report (the rate over all three windows, not over the
    sample) can be read from stdout (text) when it exits."""
    from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env
    out = subprocess.PIPE if keep_output else subprocess.DEVNULL
    cmd = [str(perf_analyzer_binary()), "-m", model, "-i", PROTOCOL, "-u", http_url, "--input-data", str(data),
           "-b", "1", "--concurrency-range", str(concurrency), "-p", str(int(seconds * 1000 + 3000)), "-s", "1000",
           "-r", "3"]
    with pinned(cores or frozenset(os.sched_getaffinity(0))):
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if keep_output else subprocess.DEVNULL,
                                env=perf_analyzer_env(), text=True)


# ----------------------------------------------------------------------------------------------------------------------
# open-loop overload
# ----------------------------------------------------------------------------------------------------------------------


def error_kind(message: str) -> str:
    """A failed request by cause: Triton's queue policy rejections (timeout, full queue) apart from everything else."""
    text = message.lower()
    if "request timeout expired" in text:
        return "rejected_queue_timeout"
    if "exceeds maximum queue size" in text:
        return "rejected_queue_full"
    return "other: " + message[:120]


async def _open_loop(http_url: str, model: str, requests: list, rate: float, seconds: float, seed: int) -> dict:
    import tritonclient.http.aio as aio
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 10))
    arrivals = arrivals[arrivals < seconds]
    results: list[tuple[str, float, float]] = []
    client = aio.InferenceServerClient(http_url, conn_limit=max(64, len(arrivals)))

    async def one(i: int, due: float) -> None:
        start = time.perf_counter()
        try:
            await client.infer(model, requests[i % len(requests)])
            kind = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is counted by its kind
            kind = error_kind(str(e) or type(e).__name__)
        end = time.perf_counter()
        results.append((kind, end - due, start - due))  # from the scheduled send: no coordinated omission

    t0 = time.perf_counter()
    tasks = []
    for i, at in enumerate(arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, t0 + at)))
    sent_s = time.perf_counter() - t0
    done, pending = await asyncio.wait(tasks, timeout=max(60.0, 2 * seconds))
    drained_s = time.perf_counter() - t0  # until the last answer: a server that queues answers late, not more
    for task in pending:
        task.cancel()
    await client.close()
    ok = np.array([lat for kind, lat, _ in results if kind == "ok"]) * 1e3
    lag = np.array([lag for *_, lag in results]) * 1e3
    pct = (lambda q: float(np.percentile(ok, q))) if len(ok) else (lambda q: float("nan"))
    return {"offered_rate": rate, "sent": len(arrivals), "send_seconds": sent_s, "unfinished": len(pending),
            "outcomes": dict(Counter(kind for kind, *_ in results)), "drained_seconds": drained_s,
            "goodput_rps": len(ok) / max(seconds, drained_s),
            "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": float(ok.max()) if len(ok) else float("nan"),
            "client_lag_p99_ms": float(np.percentile(lag, 99)) if len(lag) else float("nan")}


def open_loop(http_url: str, model: str, requests: list[dict], rate: float, seconds: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` req/s for ``seconds`` whatever the server does (open loop: late answers do not
    slow the sender), every request's outcome counted by kind and the successes' latency from their scheduled send.
    Requests (perf/make_inputs.py's, the store form) are sent in turn. Run it under ``machine.pinned`` for the
    client's cores."""
    import tritonclient.http as http

    from seqrank.client import build_inputs
    inputs = [build_inputs(http, r["user_id"], r["candidate_ids"], request_time=r["request_time_ms"])
              for r in requests]
    return asyncio.run(_open_loop(http_url, model, inputs, rate, seconds, seed))
