"""A small closed-loop HTTP load generator (asyncio), measuring like perf_analyzer's concurrency mode.

``concurrency`` workers, each with its own keep-alive HTTP/1.1 connection (spread round-robin over the given URLs),
send one request, wait for the whole response, send the next (request bodies cycle through ``bodies``). After a
warm-up window, ``windows`` windows of ``window_s`` seconds are measured: throughput = responses completed inside the
measured span / its length, latency percentiles over those responses (client side: from writing the request to reading
the last response byte), as perf_analyzer reports them. Any non-200 response counts as an error (and is reported).
The client is deliberately thin (pre-encoded bodies, no JSON decoding of responses, no per-request objects beyond a
few bytes) so that, on a machine where client and server share the cores, it takes as little CPU from the service as
perf_analyzer takes from Triton; ``client_cpu_s`` reports what it used.
"""
from __future__ import annotations

import asyncio
import json
import resource
import time
from typing import Sequence

import numpy as np


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _worker(host: str, port: int, path: str, bodies: Sequence[bytes], offset: int, stop_at: float,
                  record_from: float, record_to: float, lat: list, errors: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    heads = [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    i = offset
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            writer.write(heads[i % len(heads)])
            i += 1
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
                    break
            if length:
                await reader.readexactly(length)
            t1 = time.perf_counter()
            if record_from <= t1 <= record_to:
                if status == 200:
                    lat.append(t1 - t0)
                else:
                    errors.append(status)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:  # noqa: BLE001
            pass


def _split(url: str) -> tuple[str, int, str]:
    assert url.startswith("http://"), url
    hostport, _, path = url[len("http://"):].partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port or 80), "/" + path


async def _run(urls: Sequence[str], bodies: Sequence[bytes], concurrency: int, warmup_s: float, window_s: float,
               windows: int) -> dict:
    targets = [_split(u) for u in urls]
    start = time.perf_counter()
    record_from = start + warmup_s
    record_to = record_from + window_s * windows
    lat: list[float] = []
    errors: list[int] = []
    cpu0 = _cpu_s()
    await asyncio.gather(*(_worker(*targets[k % len(targets)], bodies, k * 7, record_to, record_from, record_to,
                                   lat, errors) for k in range(concurrency)))
    cpu = _cpu_s() - cpu0
    span = record_to - record_from
    us = np.asarray(lat) * 1e6
    pct = (lambda q: float(np.percentile(us, q))) if len(us) else (lambda q: float("nan"))
    return {"Concurrency": concurrency, "Inferences/Second": len(lat) / span, "p50 latency": pct(50),
            "p90 latency": pct(90), "p95 latency": pct(95), "p99 latency": pct(99),
            "Avg latency": float(us.mean()) if len(us) else float("nan"), "requests": len(lat),
            "errors": len(errors), "error_statuses": sorted(set(errors)), "window_s": span,
            "client_cpu_s": cpu, "wall_s": time.perf_counter() - start}


def closed_loop(url: str | Sequence[str], bodies: Sequence[bytes | dict], concurrency: int, warmup_s: float = 1.0,
                window_s: float = 3.0, windows: int = 3) -> dict:
    """One load point: {"Concurrency", "Inferences/Second", "p50 latency" .. "p99 latency" (usec), ...}. Several
    URLs (replicas of one service): connection k goes to url[k % len(url)], a client-side round-robin balancer."""
    enc = [b if isinstance(b, bytes) else json.dumps(b).encode() for b in bodies]
    urls = [url] if isinstance(url, str) else list(url)
    return asyncio.run(_run(urls, enc, concurrency, warmup_s, window_s, windows))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, nargs="+", help="http://host:port/path (several: round-robin)")
    p.add_argument("--body", required=True, help="a JSON file: one request body or a list of them")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--window", type=float, default=3.0)
    args = p.parse_args()
    data = json.loads(open(args.body).read())
    print(json.dumps(closed_loop(args.url, data if isinstance(data, list) else [data], args.concurrency,
                                 window_s=args.window), indent=2))
