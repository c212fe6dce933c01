"""perf_analyzer ``--input-data`` JSON for the ``seqrank`` ensemble, generated from the real action log.

    .venv/bin/python perf/make_inputs.py --run runs/demo --out perf/results/inputs

One request = one request of the shipped log, exactly as training defines it (seqrank.dataset.build_impressions: a
user's impressions up to ``request_gap_s`` after the first one, made at that first impression's time): the user, the
request time as ``request_time_ms``, and the request's distinct items as candidates. Only requests at or after the
run's ``split_time_ms`` are used (the held-out period: what serving sees after training), and only requests whose
user has at least one action before the request time (perf_analyzer cannot send an empty BYTES tensor, and a cold
start has no raw actions to carry). The candidate counts and the action-sequence lengths are therefore the log's own
distributions.

Every set comes in two forms (same requests):

* ``*_store.json``: ``user_id``, ``candidate_ids``, ``request_time_ms`` only; preprocess reads the user's sequence
  from the feature store (the store must hold the log: seqrank ingest).
* ``*_actions.json``: the user's raw actions before the request time in the request (``action_item_ids``,
  ``action_types``, ``action_times_ms``), the newest ``max_actions`` (default 256, the store's ``max_len``: the same
  actions the store path would read).

Sets: ``log`` (up to ``--requests`` requests sampled from the held-out period), ``fixed_1x100`` and ``fixed_1x16``
(ONE request: the held-out request of the user with the longest history, its own items that the model knows first
and then other vocabulary item ids, drawn with a fixed seed, until there are 100 distinct ones, resp. the first 16).

The JSON is perf_analyzer's per-request form: ``{"data": [{"<input>": {"content": [...], "shape": [...]}}]}``, the
shape without the batch dimension (run perf_analyzer with ``-b 1``). ``manifest.json`` describes the sets
(counts, candidate-count and sequence-length percentiles) and ``requests.json`` holds the same requests in plain
form (bench.py builds the bare ranker's tensors and the FastAPI bodies from it, so every system gets the same
requests).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MAX_ACTIONS = 256      # seqrank.store.DEFAULT_MAX_LEN: what a store keeps per user
SETS = ("log", "fixed_1x100", "fixed_1x16")


def _run_info(run: Path) -> tuple[dict, dict]:
    info = json.loads((run / "run.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    return info, cfg


def events_path(run: Path, events: str | None = None) -> Path:
    """The log the run was trained on (run.json ``events``), unless ``events`` is given."""
    if events:
        return Path(events)
    info, _ = _run_info(run)
    path = Path(info.get("events", ""))
    if not path.is_file():
        from seqrank.data.loaders import KUAIRAND_SAMPLE
        path = KUAIRAND_SAMPLE
    return path


def load_event_log(run: Path, events: str | None = None):
    """The run's log as loaded for training (an EventLog: its events and its exposure action)."""
    from seqrank.data.loaders import load_events
    return load_events(events_path(run, events))


def load_log(run: Path, events: str | None = None):
    """The canonical event table (user_id, item_id, action, timestamp) of the run's log."""
    return load_event_log(run, events).events


def _vocab_items(run: Path) -> list[str]:
    items = np.load(run / "vocab" / "items.npy")
    return [x.decode() for x in items.tolist()]


def build_requests(run: Path, events: str | None = None, n_requests: int = 256, seed: int = 0,
                   max_actions: int = DEFAULT_MAX_ACTIONS, ev=None) -> dict:
    """{set name: [request dict]}; a request dict has user_id, request_time_ms, candidate_ids and actions
    ([(item_id, action, timestamp_ms)], oldest first)."""
    from seqrank.dataset import build_impressions

    run = Path(run)
    info, cfg = _run_info(run)
    if ev is None:
        ev = load_log(run, events)
    gap_s = float(cfg["data"]["request_gap_s"])
    imp, _ = build_impressions(ev, list(info.get("heads", [])), gap_s)
    split = int(info.get("split_time_ms", 0))
    held_out = imp[imp.request_time >= split]
    if held_out.empty:                                  # a log without a held-out period: use every request
        held_out = imp
    requests = held_out.groupby("request", sort=True).agg(
        user_id=("user_id", "first"), request_time_ms=("request_time", "first"),
        items=("item_id", lambda s: list(dict.fromkeys(s))))

    by_user = {u: g.sort_values(["timestamp", "item_id", "action"]) for u, g in ev.groupby("user_id", sort=False)}

    def actions_before(user: str, t: int) -> list[tuple[str, str, int]]:
        g = by_user.get(user)
        if g is None:
            return []
        ts = g.timestamp.to_numpy()
        end = int(np.searchsorted(ts, t, side="left"))          # strictly before the request time
        start = max(0, end - max_actions)
        part = g.iloc[start:end]
        return list(zip(part.item_id.astype(str), part.action.astype(str), part.timestamp.astype(np.int64).tolist()))

    rows = []
    for s in requests.itertuples():
        acts = actions_before(str(s.user_id), int(s.request_time_ms))
        if acts:
            rows.append({"user_id": str(s.user_id), "request_time_ms": int(s.request_time_ms),
                         "candidate_ids": [str(i) for i in s.items], "actions": acts})
    if not rows:
        raise SystemExit("no held-out request has a user with earlier actions; cannot build requests")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rows), size=min(n_requests, len(rows)), replace=False)
    log_set = [rows[i] for i in sorted(pick)]

    # the fixed request: the user with the longest history before a held-out request (S = 100 full when possible)
    # Its candidates: the request's items the model knows, then other vocabulary items, all distinct. Items new in
    # the held-out period would all be the one OOV row, which the CPU ranker scores once per request
    # (seqrank/serving/batching.py) but the bare ranker and the naive service score per column.
    best = max(rows, key=lambda r: (len(r["actions"]), len(r["candidate_ids"]), -r["request_time_ms"]))
    vocab = _vocab_items(run)
    known = set(vocab)
    own = [i for i in best["candidate_ids"] if i in known]
    pool = [i for i in vocab if i not in set(own)]
    extra = [pool[i] for i in rng.permutation(len(pool))[: max(0, 100 - len(own))]]
    cands100 = (own + extra)[:100]
    fixed100 = dict(best, candidate_ids=cands100)
    fixed16 = dict(best, candidate_ids=cands100[:16])
    return {"log": log_set, "fixed_1x100": [fixed100], "fixed_1x16": [fixed16]}


def to_perf_analyzer(requests: list[dict], with_actions: bool) -> dict:
    """perf_analyzer --input-data JSON (per-request shapes, batch dimension excluded: -b 1)."""
    data = []
    for r in requests:
        entry = {
            "user_id": {"content": [r["user_id"]], "shape": [1]},
            "candidate_ids": {"content": list(r["candidate_ids"]), "shape": [len(r["candidate_ids"])]},
            "request_time_ms": {"content": [int(r["request_time_ms"])], "shape": [1]},
        }
        if with_actions:
            acts = r["actions"]
            entry["action_item_ids"] = {"content": [a[0] for a in acts], "shape": [len(acts)]}
            entry["action_types"] = {"content": [a[1] for a in acts], "shape": [len(acts)]}
            entry["action_times_ms"] = {"content": [int(a[2]) for a in acts], "shape": [len(acts)]}
        data.append(entry)
    return {"data": data}


def _pcts(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"min": float(v.min()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max()), "mean": float(v.mean())}


def write_inputs(run: Path, out: Path, events: str | None = None, n_requests: int = 256, seed: int = 0,
                 max_actions: int = DEFAULT_MAX_ACTIONS, ev=None) -> dict:
    """Write ``<set>_{store,actions}.json``, ``requests.json`` and ``manifest.json`` into ``out``; returns the
    manifest (with ``files``: {"<set>_<form>": path})."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sets = build_requests(Path(run), events, n_requests, seed, max_actions, ev=ev)
    seq_len = int(json.loads((Path(run) / "run.json").read_text()).get("seq_len", 100))
    manifest = {"run": str(run), "events": str(events_path(Path(run), events)), "seed": seed,
                "max_actions": max_actions, "seq_len": seq_len, "sets": {}, "files": {}}
    for name, reqs in sets.items():
        for form, with_actions in (("store", False), ("actions", True)):
            path = out / f"{name}_{form}.json"
            path.write_text(json.dumps(to_perf_analyzer(reqs, with_actions)))
            manifest["files"][f"{name}_{form}"] = str(path)
        manifest["sets"][name] = {
            "requests": len(reqs),
            "candidates": _pcts([len(r["candidate_ids"]) for r in reqs]),
            "raw_actions": _pcts([len(r["actions"]) for r in reqs]),
            "sequence_length": _pcts([min(len(r["actions"]), seq_len) for r in reqs]),
            "users": len({r["user_id"] for r in reqs}),
        }
    (out / "requests.json").write_text(json.dumps(sets))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="a trained, exported run")
    p.add_argument("--out", type=Path, default=Path("perf/results/inputs"))
    p.add_argument("--events", help="the action log (default: the run's, from run.json)")
    p.add_argument("--requests", type=int, default=256, help="requests in the log-drawn set")
    p.add_argument("--max-actions", type=int, default=DEFAULT_MAX_ACTIONS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    m = write_inputs(args.run, args.out, args.events, args.requests, args.seed, args.max_actions)
    print(json.dumps(m["sets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
