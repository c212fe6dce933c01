#!/usr/bin/env python3
"""Canary inference for the seqrank container: one real ranking request through the whole ensemble over HTTP.

`/v2/health/ready` is not enough: a Python backend stub that crashed is not restarted (tritonserver 2.51) and the
server keeps answering 200 while every request through that model fails. This check sends one ranking request with a
known candidate list and checks the answer, so a dead preprocess/postprocess stub, a ranker that lost its GPU or
lookup tables that failed to load all make it fail.

The request carries its own recent actions, so the check does not depend on the feature store: a Redis outage
degrades ranking quality (preprocess falls back to no sequence) but must not take every replica out of the Service.

Candidates: $SEQRANK_CANARY_CANDIDATES (comma-separated) or evenly spaced ids from the model repository's item
vocabulary (preprocess/1/tables/items.npy) -- known ids, so `oov` must be all False -- or, when neither exists,
synthetic ids (scored as out-of-vocabulary, which still exercises every model).

The request, the checks and their messages are the supervisor's (`seqrank.server.supervise.canary`: one
implementation for `seqrank serve --supervise`, this script and the tests): HTTP 200; every output present;
ranked_ids a permutation of the candidates; head_scores finite in [0, 1] with one row per candidate; utility finite
and sorted best first; oov all False for known ids; sequence_source "request". Exit status 0 = healthy,
1 = unhealthy (the reason on stderr), 2 = bad arguments. Used by Docker's HEALTHCHECK and the Kubernetes readiness
probe; needs the seqrank package installed in the image.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from seqrank.server.supervise import MODEL, canary
from seqrank.server.supervise import CanaryError as Unhealthy
from seqrank.server.supervise import check_response  # noqa: F401 - re-exported for callers of this script

DEFAULT_REPOSITORY = "/opt/seqrank/model_repository"


def env_candidates() -> list[str] | None:
    """$SEQRANK_CANARY_CANDIDATES as a list of ids, None when unset or empty."""
    ids = [c.strip() for c in os.environ.get("SEQRANK_CANARY_CANDIDATES", "").split(",") if c.strip()]
    return ids or None


def probe(url: str, model: str, repository: Path, n: int, timeout_s: float) -> str:
    return canary(url, timeout_s, repository, model, n, candidates=env_candidates())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="seqrank canary inference (exit 0 = healthy)")
    parser.add_argument("--url", default=os.environ.get("SEQRANK_HEALTH_URL", "127.0.0.1:8000"),
                        help="host:port of Triton's HTTP endpoint (default %(default)s)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--repository", type=Path,
                        default=Path(os.environ.get("SEQRANK_REPOSITORY", DEFAULT_REPOSITORY)),
                        help="model repository to take known candidate ids from (default %(default)s)")
    parser.add_argument("--candidates", type=int, default=8, help="number of candidates (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("SEQRANK_HEALTH_TIMEOUT_S", "5")),
                        help="seconds (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print nothing when healthy")
    args = parser.parse_args(argv)
    if args.candidates < 1:
        parser.error("--candidates must be >= 1")
    try:
        summary = probe(args.url, args.model, args.repository, args.candidates, args.timeout)
    except Unhealthy as err:
        print(f"seqrank canary: UNHEALTHY: {err}", file=sys.stderr, flush=True)
        return 1
    if not args.quiet:
        print(f"seqrank canary: ok: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
