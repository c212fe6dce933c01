"""How long and how much the bench measures (full run vs the CI smoke run), and its log line."""
from __future__ import annotations

import time
from dataclasses import dataclass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Settings:
    quick: bool
    budgets_ms: tuple = (25, 50, 100)    # p99 budgets of the fixed-budget comparisons
    repeats: int = 3                     # searches per (system, request set, budget), interleaved over systems
    max_concurrency: int = 64            # the budget search climbs concurrency 1, 2, 4, ... up to this
    pa_window_ms: int = 2000             # perf_analyzer: windows of this; 3 of them merged per point
    pa_count_window: int = 0             # > 0: count windows of at least this many requests instead (quick mode)
    request_sets: tuple = ("fixed_1x100", "log")
    overload_factor: float = 2.0         # open-loop load at this multiple of the saturated throughput
    overload_s: float = 20.0
    # the overload's requests: the fixed 1 x 100 request (its saturated rate, tens per second, is one a Python
    # open-loop client sends on time; the log's one-candidate requests saturate the server core at hundreds)
    overload_set: str = "fixed_1x100"
    overload_budget_ms: int = 100        # the budget the guard protects (p99 <= 2x this at overload)
    saturation_concurrency: int = 8      # closed-loop level that saturates the server core with that request
    # the guarded copy's queue timeouts as shares of that budget: a request is rejected once it has queued this long
    # before preprocess or before the ranker; the rest of 2x the budget is left for computing (postprocess, the
    # cheap last step, has none: rejecting there would throw away the ranker's work)
    queue_shares: tuple = (("preprocess", 0.2), ("ranker", 0.4))
    bare_s: float = 3.0                  # in-process bare ranker: seconds per point
    peak_s: float = 2.0
    freshness_n: int = 200
    profile_s: float = 8.0
    n_requests: int = 256

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        if not quick:
            return cls(False)
        return cls(True, budgets_ms=(50, 100), repeats=1, max_concurrency=4, pa_window_ms=400, pa_count_window=6,
                   overload_s=4.0, saturation_concurrency=4, bare_s=0.4, peak_s=0.4, freshness_n=10, profile_s=2.0, n_requests=64)
