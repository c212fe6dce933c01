#!/usr/bin/env python3
"""Canary inference for the seqrank container: one real ranking request through the whole ensemble over HTTP.

`/v2/health/ready` is not enough: a Python backend stub that crashed is not restarted (tritonserver 2.51) and the
server keeps answering 200 while every request through that model fails. This check sends one ranking request with a
known candidate list and checks the answer, so a dead preprocess/postprocess stub, a ranker that lost its GPU or
lookup tables that failed to load all make it fail.

The request carries its own recent actions, so the check does not depend on the feature store: a Redis outage
degrades ranking quality (preprocess falls back to no sequence) but must not take every replica out of the Service.

Candidates: $SEQRANK_CANARY_CANDIDATES (comma-separated) or evenly spaced ids from the model repository's item
vocabulary (preprocess/1/tables/items.npy, read without numpy) -- known ids, so `oov` must be all False -- or, when
neither exists, synthetic ids (scored as out-of-vocabulary, which still exercises every model).

Checks: HTTP 200; every output present; ranked_ids is a permutation of the candidates; head_scores finite in [0, 1]
with one row per candidate; utility finite and sorted best first; oov all False for known ids; sequence_source is
"request". Exit status 0 = healthy, 1 = unhealthy (the reason on stderr), 2 = bad arguments.
Standard library plus the installed seqrank package (its shared checks); used by Docker's HEALTHCHECK and the Kubernetes readiness probe.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL = "seqrank"
OUTPUTS = ("ranked_ids", "head_scores", "utility", "oov", "sequence_source")
CANARY_USER = "__seqrank_canary__"
DEFAULT_REPOSITORY = "/opt/seqrank/model_repository"


# One implementation of the response checks, shared with the supervisor (`seqrank serve --supervise`); the seqrank
# package is installed in the image.
from seqrank.serving.supervise import CanaryError as Unhealthy  # noqa: E402
from seqrank.serving.supervise import check_response  # noqa: E402,F401


def read_npy_strings(path: Path, count: int) -> list[str]:
    """`count` evenly spaced entries of a 1-D numpy 'S<n>' array file (the item vocabulary), without numpy."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path} is not a .npy file")
        major = f.read(2)[0]
        header_len = int.from_bytes(f.read(2 if major == 1 else 4), "little")
        header = ast.literal_eval(f.read(header_len).decode("latin1"))
        descr, shape = header["descr"], header["shape"]
        if not (isinstance(descr, str) and descr.lstrip("|").startswith("S")) or len(shape) != 1:
            raise ValueError(f"{path}: expected a 1-D bytes array, got {descr} {shape}")
        width, n = int(descr.lstrip("|")[1:]), shape[0]
        if n == 0:
            return []
        start = f.tell()
        k = min(count, n)
        picks = [(i * n) // k for i in range(k)]  # evenly spaced, distinct
        out = []
        for i in picks:
            f.seek(start + i * width)
            out.append(f.read(width).rstrip(b"\0").decode("utf-8", errors="replace"))
        return [x for x in out if x]


def canary_inputs(repository: Path, n: int) -> tuple[list[str], bool, str | None]:
    """(candidates, known, action name) for the canary request; action None = the vocabulary is unreadable, send no
    actions (an unknown action name would be a bad request)."""
    env = os.environ.get("SEQRANK_CANARY_CANDIDATES", "")
    tables = repository / "preprocess" / "1" / "tables"
    action = None
    try:
        actions = json.loads((tables / "vocab.json").read_text()).get("actions") or []
        action = str(actions[0]) if actions else None
    except (OSError, ValueError, AttributeError):
        pass
    if env.strip():
        return [c.strip() for c in env.split(",") if c.strip()], True, action
    try:
        items = read_npy_strings(tables / "items.npy", n)
        if items:
            return items, True, action
    except (OSError, ValueError, KeyError, SyntaxError):
        pass
    return [f"seqrank-canary-{i}" for i in range(n)], False, action


def build_request(candidates: list[str], action: str | None, now_ms: int) -> dict:
    inputs = [
        {"name": "user_id", "datatype": "BYTES", "shape": [1, 1], "data": [CANARY_USER]},
        {"name": "candidate_ids", "datatype": "BYTES", "shape": [1, len(candidates)], "data": candidates},
        {"name": "request_time_ms", "datatype": "INT64", "shape": [1, 1], "data": [now_ms]},
    ]
    if action is not None:  # the canary's own recent actions: the newest first, one minute apart
        k = min(len(candidates), 5)
        inputs += [
            {"name": "action_item_ids", "datatype": "BYTES", "shape": [1, k], "data": candidates[:k]},
            {"name": "action_types", "datatype": "BYTES", "shape": [1, k], "data": [action] * k},
            {"name": "action_times_ms", "datatype": "INT64", "shape": [1, k],
             "data": [now_ms - 60_000 * (i + 1) for i in range(k)]},
        ]
    return {"inputs": inputs,
            "outputs": [{"name": name, "parameters": {"binary_data": False}} for name in OUTPUTS]}


def probe(url: str, model: str, repository: Path, n: int, timeout_s: float) -> str:
    candidates, known, action = canary_inputs(repository, n)
    payload = json.dumps(build_request(candidates, action, int(time.time() * 1000))).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=payload, method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise Unhealthy(f"inference answered HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise Unhealthy(f"inference request failed: {err}") from None
    except ValueError as err:
        raise Unhealthy(f"inference answer is not JSON: {err}") from None
    summary = check_response(body, candidates, known, with_actions=action is not None)
    return f"{summary} ranked in {(time.monotonic() - started) * 1000:.1f} ms"


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
