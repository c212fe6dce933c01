"""Load new model versions into a running tritonserver (model control mode ``explicit``) in a given order.

A refreshed release is two versions that must go live in order: the ranker with the larger item table first, then
the preprocess whose vocabulary maps the new items. Until preprocess switches, new items stay out of the vocabulary
(the OOV row), never out of the ranker's range. Each load goes through Triton's repository API
(``POST /v2/repository/models/<name>/load``, behind the admin key when the server restricts it); Triton loads the
version its ``version_policy`` asks for (default: the latest) beside the serving one, moves new requests to it once
it is ready and unloads the old one after its in-flight requests finish.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from .triton import RESTRICTED_KEY_HEADER


class LoadError(RuntimeError):
    """A load that Triton refused, or a version that did not become ready in time; the message names the model."""


def version_numbers(model_dir: Path) -> list[int]:
    """The numbered version directories of a model in a repository, ascending."""
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit())


def _request(url: str, method: str = "GET", admin_key: str | None = None, timeout_s: float = 10.0) -> tuple[int, str]:
    headers = {RESTRICTED_KEY_HEADER: admin_key} if admin_key else {}
    request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def version_ready(server: str, model: str, version: int) -> bool:
    """Whether ``model`` version ``version`` answers ready on the server (``host:port`` of its HTTP endpoint)."""
    try:
        return _request(f"http://{server}/v2/models/{model}/versions/{version}/ready", timeout_s=2.0)[0] == 200
    except OSError:
        return False


def load_in_order(server: str, models: Sequence[tuple[str, int]], admin_key: str | None = None,
                  timeout_s: float = 300.0) -> None:
    """Load each (model, version) on ``server`` (``host:port``, HTTP) and wait until that version is ready before
    the next one: the order is the contract. Raises LoadError naming the model when Triton refuses a load (the
    message is Triton's) or a version is not ready within ``timeout_s``."""
    for model, version in models:
        try:
            status, body = _request(f"http://{server}/v2/repository/models/{model}/load", "POST", admin_key,
                                    timeout_s=timeout_s)
        except OSError as err:
            raise LoadError(f"{model}: the load request to {server} failed: {err}") from err
        if status != 200:
            try:
                body = json.loads(body).get("error", body)
            except ValueError:
                pass
            raise LoadError(f"{model}: {server} refused the load (HTTP {status}): {body}")
        deadline = time.monotonic() + timeout_s
        while not version_ready(server, model, version):
            if time.monotonic() >= deadline:
                raise LoadError(f"{model}: version {version} is not ready on {server} after {timeout_s:g} s")
            time.sleep(0.1)


def wait_live(server: str, timeout_s: float) -> None:
    """Wait until the server answers ``/v2/health/live`` (it may still be starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if _request(f"http://{server}/v2/health/live", timeout_s=2.0)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise LoadError(f"{server} is not live after {timeout_s:g} s")
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m seqrank.server.model_control --server HOST:PORT MODEL:VERSION ...``: load in that order (the
    admin key from $SEQRANK_ADMIN_KEY, never the command line). docker/entrypoint.sh's release watcher runs it."""
    import argparse
    import os
    import sys
    parser = argparse.ArgumentParser(prog="python -m seqrank.server.model_control", description=main.__doc__)
    parser.add_argument("--server", required=True, help="HTTP host:port of the tritonserver")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per step (default 600)")
    parser.add_argument("models", nargs="+", metavar="MODEL:VERSION")
    args = parser.parse_args(argv)
    models = []
    for spec in args.models:
        name, _, version = spec.rpartition(":")
        if not name or not version.isdigit():
            parser.error(f"expected MODEL:VERSION, got {spec!r}")
        models.append((name, int(version)))
    try:
        wait_live(args.server, args.timeout)
        load_in_order(args.server, models, os.environ.get("SEQRANK_ADMIN_KEY") or None, args.timeout)
    except LoadError as err:
        print(f"seqrank.server.model_control: {err}", file=sys.stderr)
        return 1
    print(f"loaded {', '.join(args.models)} on {args.server}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
