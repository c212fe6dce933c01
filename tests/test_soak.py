"""Soak: perf_analyzer over the ensemble at ~80% of the measured capacity, on the real tritonserver.

1. capacity: a short concurrency sweep (1, 2, 4; a fixed request count each) -> the best throughput;
2. soak: ``--request-rate-range 0.8 x capacity`` for ``$SEQRANK_SOAK_SECONDS`` (default 60; the 10-minute soak is
   ``SEQRANK_SOAK_SECONDS=600``), as back-to-back windows of WINDOW_S seconds (``--request-count`` = rate x window, so
   each window is one fixed measurement), every request's latency taken from ``--profile-export-file``;
3. meanwhile the server's total RSS (tritonserver + its Python stubs, VmRSS from /proc) is sampled every 2 s.

Asserted: 0 errors (every perf_analyzer run exits 0, every request got its response, the ensemble's failure count
in Triton's statistics does not move); the p99 of the last interval (20 s when the soak is under 3 minutes, else 60 s)
is within 1.5x the early p99 (the median of the per-window p99s of the soak's first half) -- when it is not, one
more interval is measured and the better of the two
counts: a leak or a growing queue stays slow, a noisy neighbour on a shared machine usually does not (both figures
are printed); the RSS after the warm-up (the first interval) grows by less than 5%. The figures are printed (``-s``)
as one ``[soak]`` JSON line, with the machine's load average: on a busy shared machine the capacity, and so the
rate, are that moment's. perf_analyzer itself occasionally hangs part-way through a window (see PerfAnalyzerHang):
such a window is killed after 3x its length, the server is checked (the canary ranks, nothing is pending) and the
soak goes on until SEQRANK_SOAK_SECONDS of completed windows; the hangs are printed, and at most
max(2, windows / 3) may occur (2 in 8 attempts at ~260 req/s in one fresh-clone run, 1 in 15 at lower rates before).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time

import numpy as np

from conftest import ENSEMBLE_MODELS, rss_by_process
from seqrank.server.supervise import canary
from seqrank.server.triton import perf_analyzer_binary, perf_analyzer_env

SOAK_S = float(os.environ.get("SEQRANK_SOAK_SECONDS", "60"))
WINDOW_S = 10.0
INTERVAL_S = 20.0 if SOAK_S < 180 else 60.0
RSS_EVERY_S = 2.0
LOAD_FACTOR = 0.8


def _input_data(small_run, path, n=16):
    """Held-out sessions (as in test_serving): store-backed requests with up to 40 candidates."""
    info = json.loads((small_run["run"] / "run.json").read_text())
    ev = small_run["events"]
    test = ev[ev.timestamp >= info["split_time_ms"]]
    data = []
    for user, g in test.groupby("user_id"):
        items = [str(i) for i in dict.fromkeys(g.item_id)][:40]
        if len(items) >= 3:
            data.append({"user_id": [str(user)], "candidate_ids": {"content": items, "shape": [len(items)]},
                         "request_time_ms": [int(g.timestamp.min())]})
        if len(data) == n:
            break
    assert len(data) >= 4
    path.write_text(json.dumps({"data": data}))
    return path


class PerfAnalyzerHang(Exception):
    """perf_analyzer 2.50 (request-rate mode with --request-count) now and then stops sending part-way through a
    window and waits forever, every thread in a futex wait, while the server has answered every request it got and has
    nothing pending (seen about once in 15 windows here). Such a window is killed, the server is checked, the soak
    goes on; the hangs are counted and printed."""


def _pending_requests(server) -> dict[str, float]:
    """``nv_inference_pending_request_count`` per model, from the metrics endpoint."""
    import urllib.request
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count{"):
            model = line.split('model="', 1)[1].split('"', 1)[0]
            out[model] = float(line.rsplit(" ", 1)[1])
    return out


def _perf_analyzer(server, data, tmp_path, *load_args, count: int, timeout_s: float = 600) -> list[tuple[int, float]]:
    """One perf_analyzer run of ``count`` requests; returns (send time ns, latency s) of every request (raises on
    errors)."""
    export = tmp_path / "profile.json"
    export.unlink(missing_ok=True)
    cmd = [str(perf_analyzer_binary()), "-m", "seqrank", "-u", server.grpc_url, "-i", "grpc", "--input-data",
           str(data), *load_args, "--request-count", str(count), "--profile-export-file", str(export)]
    try:
        out = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:  # subprocess.run has killed it
        raise PerfAnalyzerHang(f"perf_analyzer {' '.join(load_args)} did not finish in {timeout_s:.0f}s") from err
    assert out.returncode == 0, f"perf_analyzer {' '.join(load_args)} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    requests = json.loads(export.read_text())["experiments"][0]["requests"]
    export.unlink()
    missing = [r for r in requests if not r.get("response_timestamps")]
    assert not missing, f"{len(missing)} of {len(requests)} requests got no response"
    return [(r["timestamp"], (r["response_timestamps"][-1] - r["timestamp"]) / 1e9) for r in requests]


class RssSampler(threading.Thread):
    def __init__(self, server):
        super().__init__(daemon=True)
        self.server = server
        self.samples: list[tuple[float, int, int]] = []  # (time, total RSS kB, processes)
        self.by_process: list[tuple[float, dict[str, int]]] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            now, rss = time.monotonic(), rss_by_process(self.server.group_pids())
            self.samples.append((now, sum(rss.values()), len(rss)))
            self.by_process.append((now, rss))
            self.stop_flag.wait(RSS_EVERY_S)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)


def _ensemble_failures(server) -> tuple[int, int]:
    import tritonclient.http as http
    client = http.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics("seqrank")["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]), int(stats["fail"]["count"])


def _per_process(sampler: RssSampler, started: float, elapsed: float) -> dict[str, list[float]]:
    """Per process: [RSS after the warm-up, final RSS] in MB (which process grows, if any)."""
    after = next((rss for t, rss in sampler.by_process if t - started >= INTERVAL_S), sampler.by_process[0][1])
    final = sampler.by_process[-1][1]
    return {name: [round(after.get(name, 0) / 1024, 1), round(kb / 1024, 1)] for name, kb in sorted(final.items())}


def _p(values, q) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def test_soak_at_80_percent_of_capacity(small_run, start_server, tmp_path):
    server = start_server(small_run["repo"], env={"SEQRANK_STORE": small_run["store"]}, timeout_s=300, reuse=False)
    server.wait_models_ready(ENSEMBLE_MODELS, timeout_s=120)
    data = _input_data(small_run, tmp_path / "input.json")
    success0, fail0 = _ensemble_failures(server)

    # -- capacity -----------------------------------------------------------------------------------------------------
    _perf_analyzer(server, data, tmp_path, "--concurrency-range", "1", count=40, timeout_s=120)  # warm-up
    sweep = {}
    for c in (1, 2, 4):
        got = _perf_analyzer(server, data, tmp_path, "--concurrency-range", str(c), count=80 * c, timeout_s=120)
        span_s = (max(ts + lat * 1e9 for ts, lat in got) - min(ts for ts, _ in got)) / 1e9
        sweep[c] = round(len(got) / span_s, 1)
    capacity = max(sweep.values())
    rate = round(LOAD_FACTOR * capacity, 1)

    # -- soak ---------------------------------------------------------------------------------------------------------
    load_before = os.getloadavg()[0]  # a shared machine's other tenants show here (2 cores: 2.0 = busy)
    sampler = RssSampler(server)
    sampler.start()
    latencies: list[tuple[float, float]] = []  # (seconds since the soak started, latency s)
    windows = []
    hangs: list[float] = []  # soak times at which a perf_analyzer window hung (see PerfAnalyzerHang)
    started = time.monotonic()
    started_ns = None

    def run_for(seconds: float, into: list) -> None:
        """Windows of load until ``seconds`` of them completed (a hung window does not count; see PerfAnalyzerHang)."""
        nonlocal started_ns
        begin, loaded = time.monotonic(), 0.0
        while loaded < seconds - 0.5 and time.monotonic() - begin < 3 * seconds:
            length = min(WINDOW_S, seconds - loaded)
            try:
                got = _perf_analyzer(server, data, tmp_path, "--request-rate-range", str(rate),
                                     count=max(1, int(round(rate * length))), timeout_s=max(30.0, 3 * length))
            except PerfAnalyzerHang as hang:
                # the load generator hung, not the server: it must still rank and have nothing stuck in it
                canary(server.http_url, 5.0, small_run["repo"])
                pending = _pending_requests(server)
                assert not any(pending.values()), (str(hang), pending)
                hangs.append(round(time.monotonic() - started, 1))
                continue
            if started_ns is None:
                started_ns = min(ts for ts, _ in got)
            loaded += length
            into += [((ts - started_ns) / 1e9, lat) for ts, lat in got]
            lat_ms = [x * 1000 for _, x in got]
            windows.append({"t": round(time.monotonic() - started, 1), "n": len(got),
                            "p50_ms": round(_p(lat_ms, 50), 1), "p99_ms": round(_p(lat_ms, 99), 1)})

    try:
        run_for(SOAK_S, latencies)
    finally:
        sampler.stop()
    elapsed = time.monotonic() - started
    success1, fail1 = _ensemble_failures(server)

    # -- figures ------------------------------------------------------------------------------------------------------
    span = max(t for t, _ in latencies)
    first = [lat * 1000 for t, lat in latencies if t < INTERVAL_S]
    # the baseline tail: the median of the first half's window p99s (one lucky first window, 19 ms among 34-44 ms
    # ones, failed a healthy soak when the first interval alone was the baseline)
    p99_early = statistics.median(w["p99_ms"] for w in windows[:max(1, len(windows) // 2)])
    last = [lat * 1000 for t, lat in latencies if t >= span - INTERVAL_S]
    rss = [(t - started, kb) for t, kb, _ in sampler.samples]
    baseline = ([kb for t, kb in rss if INTERVAL_S <= t < INTERVAL_S + 10]
                or [kb for t, kb in rss if t >= INTERVAL_S][:3])
    final = [kb for t, kb in rss if t >= elapsed - 10]
    rss_base, rss_final = statistics.median(baseline), statistics.median(final)
    growth = (rss_final - rss_base) / rss_base
    figures = {
        "soak_s": round(elapsed, 1), "capacity_sweep_rps": sweep, "capacity_rps": capacity, "rate_rps": rate,
        "requests": len(latencies), "achieved_rps": round(len(latencies) / elapsed, 1),
        "errors": fail1 - fail0, "p50_ms": round(_p([x * 1000 for _, x in latencies], 50), 1),
        "p99_ms": round(_p([x * 1000 for _, x in latencies], 99), 1),
        "interval_s": INTERVAL_S, "p99_first_ms": round(_p(first, 99), 1), "p99_last_ms": round(_p(last, 99), 1),
        "p99_early_windows_median_ms": round(p99_early, 1), "p99_ratio": round(_p(last, 99) / p99_early, 2),
        "rss_start_mb": round(rss[0][1] / 1024, 1), "rss_after_warmup_mb": round(rss_base / 1024, 1),
        "rss_final_mb": round(rss_final / 1024, 1), "rss_max_mb": round(max(kb for _, kb in rss) / 1024, 1),
        "rss_growth_pct": round(100 * growth, 2), "processes": sampler.samples[-1][2],
        "rss_by_process_mb_after_warmup_final": _per_process(sampler, started, elapsed),
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
        "perf_analyzer_hangs": hangs,
        "windows": windows,
    }
    p99_last = _p(last, 99)
    if p99_last > 1.5 * p99_early:
        # Persistent or transient? A leak or a growing queue stays slow; a noisy neighbour on a shared machine usually
        # does not. One more interval decides (both figures are printed).
        confirm: list[tuple[float, float]] = []
        run_for(INTERVAL_S, confirm)
        figures["p99_confirm_ms"] = round(_p([lat * 1000 for _, lat in confirm], 99), 1)
        p99_last = min(p99_last, figures["p99_confirm_ms"])
        success1, fail1 = _ensemble_failures(server)
        figures["errors"] = fail1 - fail0
        figures["windows"] = windows
    print(f"\n[soak] {json.dumps(figures)}", flush=True)

    assert fail1 - fail0 == 0, figures
    assert success1 - success0 >= len(latencies), figures
    assert len(latencies) >= 0.5 * rate * SOAK_S, figures  # the load really ran
    # each hang was checked against the server above (it ranks, nothing pending); this only keeps them from
    # replacing the load (which the count of latencies above also guards)
    assert len(hangs) <= max(2, len(windows) // 3), figures
    assert p99_last <= 1.5 * p99_early, figures
    assert growth < 0.05, figures
    server.stop()
