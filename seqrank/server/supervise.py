"""Keep the real tritonserver answering: a canary inference every interval, a restart when the ensemble is broken.

Why a supervisor: in tritonserver 2.51 a Python backend stub that crashed (or hangs) is never restarted, and
``/v2/health/ready`` keeps answering 200 while every request through that model fails with INTERNAL
``Stub process '<model>_0_0' is not healthy``. :func:`serve_forever` cannot see that; :func:`supervise` can:

* every 0.2 s it checks that the server process and every Python backend stub it started are alive (a stub that
  exited is never normal with ``--model-control-mode=none``: that is how a SIGKILLed or OOM-killed stub shows);
* every ``interval_s`` it runs :func:`canary`: one real ranking through the whole ensemble, carrying its own recent
  actions (so a feature-store outage, which only degrades ranking to ``fallback_store_unavailable``, never causes a
  restart), and checks the outputs are sane;
* it restarts the server (hard stop + start on the SAME ports) when the server died, a stub exited, the canary got
  Triton's definitive ``... is not healthy`` answer (a hung stub), or ``failures_before_restart`` canaries in a row
  failed for any other reason (timeouts, wrong outputs, connection errors).

The restart kills the broken server's process group with SIGKILL instead of a graceful SIGTERM, on purpose: a graceful
shutdown of a server with a dead stub first unloads the ensemble and then answers NOT_FOUND ("'seqrank' has no
available versions", which clients do not retry) for the whole ``--exit-timeout-secs`` while it waits for the dead
model; a killed server just closes its sockets, and clients see UNAVAILABLE, which ``seqrank.client`` retries with
backoff until the new server answers. The only requests that fail are those that got Triton's INTERNAL answer from
the broken model before the restart (for a killed stub usually none: the stub watch restarts within ~0.2 s, before
Triton's ~1 s stub health check answers); nothing sent after the restart began fails, as long as the client's retries
cover the restart (a few seconds). Measured figures: docs/operations.md.

Each incident is one JSON line in the events file (``event: "incident"``): ``reason``, ``detail``, ``detected_at``,
``restarted_at`` (the new server is ready), ``recovered_at`` (its first successful canary), ``seconds``
(``recovered_at - detected_at``), ``restarts``, ``stop_s``, ``startup_s``, ``backoff_s``; times are Unix epoch seconds.
The other events (``started``, ``start_failed``, ``canary_failed``, ``detected``, ``restart_failed``, ``stopping``) go
to the same file, to stdout (``seqrank-supervise: {...}``) and to ``on_event``.

SIGINT/SIGTERM behave as in :func:`serve_forever`: the server is stopped gracefully, the function returns 0 (also for
a signal during a start); the server and its stubs never outlive the supervisor (``TritonServer.stop`` kills the
whole process group, ``atexit`` and ``PR_SET_PDEATHSIG`` cover the supervisor's own death).

Command line: ``seqrank serve --supervise --repository R [--canary-interval S] [--events-file F]``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from .triton import ServerOptions, ServerStartError, TritonServer

__all__ = ["CANARY_USER", "CanaryError", "canary", "canary_inputs", "canary_request", "check_response", "supervise"]

MODEL = "seqrank"
OUTPUTS = ("ranked_ids", "head_scores", "utility", "oov", "sequence_source")
CANARY_USER = "__seqrank_canary__"
#: Triton's own verdict on a dead or hung Python backend stub: never transient, so it restarts at once.
STUB_UNHEALTHY = "is not healthy"
STUB_BINARY = "triton_python_backend_stub"
#: a server that breaks again within this many seconds of its last restart is restarted after a growing delay
QUICK_RESTART_S = 30.0
_POLL_S = 0.2


class CanaryError(RuntimeError):
    """The canary ranking failed or its outputs are not sane (the message says which)."""


class _StopRequested(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# Canary
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def canary_inputs(repository: str | None, n: int) -> tuple[tuple[str, ...], bool, str | None]:
    """(candidates, known ids?, action name) from the repository's preprocess tables (evenly spaced item ids and the
    first action name); synthetic ids (scored out-of-vocabulary) and no action when the tables cannot be read.
    The tables of the oldest version: refreshes only append items, so its ids are known to every later version."""
    action = None
    if repository:
        versions = sorted(int(p.name) for p in (Path(repository) / "preprocess").glob("[0-9]*") if p.name.isdigit())
        tables = Path(repository) / "preprocess" / str(versions[0] if versions else 1) / "tables"
        try:
            actions = json.loads((tables / "vocab.json").read_text()).get("actions") or []
            action = str(actions[0]) if actions else None
        except (OSError, ValueError, AttributeError):
            pass
        try:
            import numpy as np
            items = np.load(tables / "items.npy", mmap_mode="r")
            if items.ndim == 1 and len(items):
                k = min(n, len(items))
                picks = [items[(i * len(items)) // k] for i in range(k)]
                ids = tuple(dict.fromkeys(x.decode() if isinstance(x, bytes) else str(x) for x in picks))
                ids = tuple(i for i in ids if i)
                if ids:
                    return ids, True, action
        except (OSError, ValueError, ImportError):
            pass
    return tuple(f"seqrank-canary-{i}" for i in range(n)), False, action


def _flat(values):
    for v in values:
        if isinstance(v, list):
            yield from _flat(v)
        else:
            yield v


def check_response(body: dict, candidates: list[str], known: bool, with_actions: bool = True) -> str:
    """The canary's checks of one ensemble response (KServe v2 JSON); shared with docker/healthcheck.py."""
    outputs = {o.get("name"): o for o in body.get("outputs", [])}
    missing = [n for n in OUTPUTS if n not in outputs]
    if missing:
        raise CanaryError(f"response lacks outputs {missing}")
    n = len(candidates)
    ranked = [str(x) for x in _flat(outputs["ranked_ids"]["data"])]
    if sorted(ranked) != sorted(candidates):
        raise CanaryError(f"ranked_ids {ranked[:4]}... is not a permutation of the {n} candidates")
    shape = outputs["head_scores"].get("shape") or []
    scores = [float(x) for x in _flat(outputs["head_scores"]["data"])]
    heads = int(shape[-1]) if shape else 0
    if heads < 1 or len(scores) != n * heads:
        raise CanaryError(f"head_scores has shape {shape}, expected one row of heads per candidate ({n})")
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores):
        raise CanaryError("head_scores has values outside [0, 1] or non-finite values")
    utility = [float(x) for x in _flat(outputs["utility"]["data"])]
    if len(utility) != n or not all(math.isfinite(u) for u in utility):
        raise CanaryError(f"utility has {len(utility)} values (expected {n}) or non-finite values")
    if any(b > a + 1e-5 for a, b in zip(utility, utility[1:])):
        raise CanaryError("candidates are not ordered by utility")
    oov = [bool(x) for x in _flat(outputs["oov"]["data"])]
    if len(oov) != n:
        raise CanaryError(f"oov has {len(oov)} values, expected {n}")
    if known and any(oov):
        raise CanaryError(f"{sum(oov)} of {n} known candidates came back out-of-vocabulary: lookup tables broken?")
    source = [str(x) for x in _flat(outputs["sequence_source"]["data"])]
    expected = ["request"] if (with_actions and known) else None
    if expected and source != expected:
        raise CanaryError(f"sequence_source is {source}, expected {expected} (the canary sends its own actions)")
    return f"{n} candidates x {heads} heads"


def canary_request(candidates: Sequence[str], action: str | None, now_ms: int) -> dict:
    """The canary's KServe v2 JSON request: the candidates and, with an action name, the canary's own recent actions
    (newest first, a minute apart, before ``request_time_ms`` = now), so it never reads the feature store."""
    candidates = list(candidates)
    inputs = [
        {"name": "user_id", "datatype": "BYTES", "shape": [1, 1], "data": [CANARY_USER]},
        {"name": "candidate_ids", "datatype": "BYTES", "shape": [1, len(candidates)], "data": candidates},
        {"name": "request_time_ms", "datatype": "INT64", "shape": [1, 1], "data": [now_ms]},
    ]
    if action is not None:
        k = min(len(candidates), 5)
        inputs += [
            {"name": "action_item_ids", "datatype": "BYTES", "shape": [1, k], "data": candidates[:k]},
            {"name": "action_types", "datatype": "BYTES", "shape": [1, k], "data": [action] * k},
            {"name": "action_times_ms", "datatype": "INT64", "shape": [1, k],
             "data": [now_ms - 60_000 * (i + 1) for i in range(k)]},
        ]
    return {"inputs": inputs, "outputs": [{"name": o, "parameters": {"binary_data": False}} for o in OUTPUTS]}


def canary(http_url: str, timeout_s: float = 5.0, repository: Path | str | None = None, model: str = MODEL,
           n_candidates: int = 8, candidates: Sequence[str] | None = None) -> str:
    """One real ranking through the ensemble over HTTP; returns a one-line summary when healthy, raises
    :class:`CanaryError` otherwise. Used by the supervisor and by ``docker/healthcheck.py``.

    With ``repository`` the candidates are known item ids from its preprocess tables and the checks are strict
    (``oov`` all False, ``sequence_source == "request"``); without it they are synthetic ids (out-of-vocabulary, which
    still runs every model). ``candidates`` overrides the ids (treated as known). Checks: HTTP 200, every output
    present, ``ranked_ids`` a permutation of the candidates, ``head_scores`` one row per candidate, finite and in
    [0, 1], ``utility`` finite and sorted best first. Inference stays open when the admin APIs are restricted (the
    canary needs no model config)."""
    ids, known, action = canary_inputs(str(repository) if repository else None, int(n_candidates))
    ids = list(candidates) if candidates else list(ids)
    known = known or bool(candidates)
    payload = json.dumps(canary_request(ids, action, int(time.time() * 1000))).encode()
    request = urllib.request.Request(f"http://{http_url}/v2/models/{model}/infer", data=payload, method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise CanaryError(f"inference answered HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise CanaryError(f"inference request failed: {err}") from None
    except ValueError as err:
        raise CanaryError(f"inference answer is not JSON: {err}") from None
    summary = check_response(body, ids, known, with_actions=action is not None)
    return f"{summary} ranked in {(time.monotonic() - started) * 1000:.1f} ms"


# ----------------------------------------------------------------------------------------------------------------------
# Process checks
# ----------------------------------------------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ... (starttime is field 22, index 19 here)
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _stub_model(argv: list[str]) -> str:
    """The model a stub serves: its first argument is ``<repository>/<model>/<version>/model.py``."""
    if len(argv) > 1:
        parts = Path(argv[1]).parts
        if len(parts) >= 3:
            return parts[-3]
    return "?"


def _stubs(server: TritonServer) -> dict[int, tuple[int, str]]:
    """pid -> (start time, model) of the server's Python backend stubs."""
    out = {}
    for pid in server.group_pids():
        argv = _cmdline(pid)
        if argv and os.path.basename(argv[0]) == STUB_BINARY:
            start = _proc_start_time(pid)
            if start is not None:
                out[pid] = (start, _stub_model(argv))
    return out


def _dead_stub(stubs: dict[int, tuple[int, str]]) -> str | None:
    for pid, (start, model) in stubs.items():
        if _proc_start_time(pid) != start:
            return f"python backend stub of model '{model}' (pid {pid}) exited"
    return None


class _CanaryRunner:
    """At most one canary in flight, in a daemon thread; its result is tagged with the server generation."""

    def __init__(self, probe: Callable[[str], None]):
        self._probe = probe
        self._thread: threading.Thread | None = None
        self._result: tuple[int, str | None] | None = None
        self._lock = threading.Lock()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, generation: int, url: str) -> None:
        def run():
            try:
                self._probe(url)
                error = None
            except CanaryError as err:
                error = str(err)
            except Exception as err:  # noqa: BLE001 - any surprise is a failed canary, never a dead supervisor
                error = f"canary raised {type(err).__name__}: {err}"
            with self._lock:
                self._result = (generation, error)

        self._thread = threading.Thread(target=run, name="seqrank-canary", daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, str | None] | None:
        with self._lock:
            result, self._result = self._result, None
        return result


# ----------------------------------------------------------------------------------------------------------------------
# Events
# ----------------------------------------------------------------------------------------------------------------------


class _Events:
    def __init__(self, path: Path, on_event: Callable[[dict], None] | None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event

    def emit(self, event: str, **fields) -> dict:
        record = {"event": event, "at": round(time.time(), 3), **fields}
        line = json.dumps(record, sort_keys=False, default=str)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
        try:
            print(f"seqrank-supervise: {line}", flush=True)
        except OSError:  # stdout gone (a closed pipe): the events file still has it
            pass
        if self.on_event is not None:
            try:
                self.on_event(dict(record))
            except Exception as err:  # noqa: BLE001 - a broken callback must not stop supervision
                print(f"seqrank-supervise: on_event raised {err!r}", file=sys.stderr, flush=True)
        return record


def _generation_log(log_path: Path | None, generation: int) -> Path | None:
    if log_path is None or generation == 0:
        return log_path
    return log_path.with_name(f"{log_path.stem}.restart{generation}{log_path.suffix}")


def _hard_stop(server: TritonServer) -> None:
    """SIGKILL the whole process group of a broken server (see the module doc), then reap it and clean up."""
    pgid = server.pgid
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    server.stop(timeout_s=5)


# ----------------------------------------------------------------------------------------------------------------------
# Supervisor
# ----------------------------------------------------------------------------------------------------------------------


def supervise(options: ServerOptions, interval_s: float = 1.0, failures_before_restart: int = 2,
              log_path: Path | None = None, on_event: Callable[[dict], None] | None = None, *,
              events_path: Path | None = None, canary_timeout_s: float = 5.0, startup_timeout_s: float = 300,
              max_failed_starts: int = 5, stop_event: threading.Event | None = None) -> int:
    """Serve ``options`` in the foreground like :func:`serve_forever`, restarting the server when it breaks.

    ``log_path``: the tritonserver log of the first server (restart ``k`` logs to ``<stem>.restart<k><suffix>``;
    default: temporary files). ``events_path``: the JSON-lines events file (default ``<log_path>.events.jsonl``, or a
    temporary file; the ``ready`` line on stdout names it). ``on_event(record)`` is called for every event.
    ``stop_event`` stops supervision like a signal (for callers outside the main thread, where no signal handler can
    be installed).

    Returns 0 after SIGINT/SIGTERM (or ``stop_event``), 2 if the first start failed, 1 after ``max_failed_starts``
    restarts in a row failed to start.
    """
    if interval_s <= 0 or failures_before_restart < 1:
        raise ValueError("interval_s must be > 0 and failures_before_restart >= 1")
    log_path = Path(log_path) if log_path is not None else None
    if events_path is None:
        if log_path is not None:
            events_path = log_path.with_name(log_path.stem + ".events.jsonl")
        else:
            fd, name = tempfile.mkstemp(prefix="seqrank-supervise-", suffix=".events.jsonl")
            os.close(fd)
            events_path = Path(name)
    events = _Events(Path(events_path), on_event)
    stop_requested = stop_event or threading.Event()
    watch_stubs = options.model_control_mode == "none"  # explicit mode loads/unloads models (and stubs) at will
    state = {"starting": False}
    previous = {}

    def on_signal(signum, frame):  # noqa: ARG001
        stop_requested.set()
        if state["starting"]:  # interrupt start() (it polls for up to startup_timeout_s); finally stops the server
            raise _StopRequested()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    server: TritonServer | None = None
    generation = 0
    pinned = options

    def start(opts: ServerOptions) -> TritonServer:
        nonlocal server
        server = TritonServer(opts, log_path=_generation_log(log_path, generation))
        state["starting"] = True
        try:
            server.start(timeout_s=startup_timeout_s)
        finally:
            state["starting"] = False
        return server

    try:
        try:
            start(options)
        except ServerStartError as err:
            print(f"seqrank-supervise: failed to start: {err}", file=sys.stderr, flush=True)
            events.emit("start_failed", generation=0, error=str(err).splitlines()[0])
            return 2
        # restarts reuse the ports the first server got (0 = picked once, then kept)
        pinned = replace(options, http_port=server.http_port, grpc_port=server.grpc_port,
                         metrics_port=server.metrics_port)
        stubs = _stubs(server) if watch_stubs else {}
        print(f"seqrank-supervise: ready http={server.http_url} grpc={server.grpc_url} metrics={server.metrics_url} "
              f"pid={server.pid} log={server.log_path} events={events.path} startup_s={server.startup_seconds:.1f}",
              flush=True)
        events.emit("started", generation=0, pid=server.pid, http=server.http_url, grpc=server.grpc_url,
                    metrics=server.metrics_url, log=str(server.log_path), startup_s=round(server.startup_seconds, 3),
                    stubs=sorted(m for _, m in stubs.values()))

        # The canary runs in a thread so that the 0.2 s liveness checks go on while it waits for an answer (a request
        # to a dead stub takes ~1 s to fail): a killed stub is then restarted before its requests get INTERNAL.
        runner = _CanaryRunner(lambda url: canary(url, canary_timeout_s, options.model_repository))
        failures, quick = 0, 0
        first_failure_at = last_restart_at = None
        incident: dict | None = None  # open incident: detected, not yet recovered
        next_canary = time.monotonic() + interval_s
        while not stop_requested.is_set():
            # -- liveness (every _POLL_S) and canary (every interval_s) -----------------------------------------
            reason = detail = None
            if not server.is_alive():
                reason, detail = "server_exited", f"tritonserver exited with status {server.returncode}"
            elif watch_stubs and (dead := _dead_stub(stubs)):
                reason, detail = "stub_exited", dead
            elif (result := runner.take()) is not None and result[0] == generation:
                err = result[1]  # results of a canary against an earlier generation are dropped
                if err is not None:
                    failures += 1
                    if failures == 1:
                        first_failure_at = round(time.time(), 3)
                    events.emit("canary_failed", generation=generation, consecutive=failures, error=err)
                    if STUB_UNHEALTHY in err:
                        reason, detail = "stub_unhealthy", err
                    elif failures >= failures_before_restart:
                        reason, detail = "canary_failed", f"{failures} canaries in a row failed; last: {err}"
                else:
                    failures, first_failure_at = 0, None
                    if incident is not None:
                        incident["recovered_at"] = round(time.time(), 3)
                        incident["seconds"] = round(incident["recovered_at"] - incident["detected_at"], 3)
                        events.emit("incident", **incident)
                        incident = None
            if reason is None and time.monotonic() >= next_canary and not runner.busy():
                runner.start(generation, server.http_url)
                next_canary = time.monotonic() + interval_s
            if stop_requested.is_set():
                break
            if reason is None:
                stop_requested.wait(_POLL_S)
                continue

            # -- restart ------------------------------------------------------------------------------------------
            now = round(time.time(), 3)
            if incident is None:
                incident = {"reason": reason, "detail": detail, "detected_at": now, "restarts": 0}
                if reason in ("stub_unhealthy", "canary_failed") and first_failure_at is not None:
                    incident["first_failure_at"] = first_failure_at
            events.emit("detected", generation=generation, reason=reason, detail=detail)
            _hard_stop(server)
            stopped_at = time.time()
            # crash-loop guard: breaking again within QUICK_RESTART_S of the last restart waits 2, 4 ... 30 s
            quick = quick + 1 if last_restart_at is not None and stopped_at - last_restart_at < QUICK_RESTART_S else 0
            if quick:
                incident["backoff_s"] = min(2.0 ** quick, 30.0)
                stop_requested.wait(incident["backoff_s"])
            failed_starts = 0
            while not stop_requested.is_set():
                generation += 1
                try:
                    start(pinned)
                except ServerStartError as err:
                    failed_starts += 1
                    events.emit("restart_failed", generation=generation, attempt=failed_starts,
                                error=str(err).splitlines()[0])
                    if failed_starts >= max_failed_starts:
                        print(f"seqrank-supervise: giving up after {failed_starts} failed restarts: {err}",
                              file=sys.stderr, flush=True)
                        return 1
                    stop_requested.wait(min(2.0 ** failed_starts, 30.0))
                    continue
                break
            if stop_requested.is_set():
                break
            incident["restarts"] += 1
            incident["generation"] = generation
            incident["restarted_at"] = last_restart_at = round(time.time(), 3)
            if incident["restarts"] == 1:
                incident["stop_s"] = round(stopped_at - incident["detected_at"], 3)
            incident["startup_s"] = round(server.startup_seconds, 3)
            incident.pop("recovered_at", None)
            stubs = _stubs(server) if watch_stubs else {}
            failures, first_failure_at = 0, None
            events.emit("started", generation=generation, pid=server.pid, http=server.http_url, grpc=server.grpc_url,
                        metrics=server.metrics_url, log=str(server.log_path),
                        startup_s=round(server.startup_seconds, 3), stubs=sorted(m for _, m in stubs.values()))
            next_canary = time.monotonic()  # check the new server at once: that is when it has recovered
        print("seqrank-supervise: stopping", flush=True)
        events.emit("stopping", generation=generation, open_incident=incident)
        return 0
    except _StopRequested:
        print("seqrank-supervise: stopping (signal during startup)", flush=True)
        events.emit("stopping", generation=generation, during_startup=True)
        return 0
    finally:
        state["starting"] = False
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
