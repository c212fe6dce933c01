"""What every system is fed: the log in a feature store, and the ranker tensors the ensemble's preprocess builds for
a request (for the in-process bare ranker and for the ranker model alone behind Triton)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from seqrank.exporting import triton_config
from seqrank.models.transact import INPUT_NAMES


def load_store(url: str, ev, run: Path, skip_actions=()) -> dict:
    """The log's actions into a feature store (``seqrank.ingest.replay_log``, without ``skip_actions``: the
    exposures) + the run's daily user embeddings."""
    from seqrank.ingest import replay_log
    from seqrank.store import open_store
    t0 = time.perf_counter()
    store = open_store(url, timeout_s=5.0, write_timeout_s=30.0)
    try:
        stats = replay_log(store, ev, skip_actions, batch_size=2000)
        users = [x.decode() if isinstance(x, bytes) else str(x) for x in np.load(run / "users.npy").tolist()]
        store.put_embeddings(users, np.load(run / "user_emb.npy").astype(np.float32),
                             int(ev.timestamp.max()) + 1)
    finally:
        store.close()
    return {"url": url, "ingest": stats.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}


def preprocessor(repo: Path, store_url: str | None):
    """The ensemble's preprocess step, in-process, with the repository's own parameters."""
    from seqrank.serving.preprocess import Preprocessor
    from seqrank.store import open_store
    config = triton_config.load(repo / "preprocess" / "config.pbtxt")
    params = {key: value.string_value for key, value in config.parameters.items()}
    return Preprocessor(repo / "preprocess" / "1" / "tables", seq_len=int(params["seq_len"]),
                        buckets=[int(b) for b in params["candidate_buckets"].split(",")],
                        max_candidates=int(params["max_candidates"]),
                        store=open_store(store_url, timeout_s=5.0) if store_url else None)


def request_tensors(pre, req: dict, with_actions: bool = False) -> dict:
    """The ranker's input tensors (batch 1, candidates padded to preprocess's bucket) for a request dict of
    perf/make_inputs.py, the sequence from the store or, ``with_actions``, from the request's raw actions."""
    raw = {"user_id": np.array([req["user_id"]], dtype=object),
           "candidate_ids": np.array(req["candidate_ids"], dtype=object),
           "request_time_ms": np.array([req["request_time_ms"]], dtype=np.int64)}
    if with_actions:
        raw["action_item_ids"] = np.array([a[0] for a in req["actions"]], dtype=object)
        raw["action_types"] = np.array([a[1] for a in req["actions"]], dtype=object)
        raw["action_times_ms"] = np.array([a[2] for a in req["actions"]], dtype=np.int64)
    t = pre.build([pre.parse(raw)])[0]
    return {"seq_item": t.seq_item[None], "seq_action": t.seq_action[None], "seq_mask": t.seq_mask[None],
            "user_emb": np.ascontiguousarray(t.user_emb[None], dtype=np.float32), "context": t.context[None],
            "cand_item": t.cand_item[None], "_source": t.sequence_source, "_n": len(req["candidate_ids"])}


def write_ranker_json(tensors: list[dict], path: Path) -> None:
    """perf_analyzer input for the ranker model alone: each request's real tensors as preprocess builds them."""
    data = [{n: {"content": t[n][0].reshape(-1).tolist(), "shape": list(t[n][0].shape)} for n in INPUT_NAMES}
            for t in tensors]
    path.write_text(json.dumps({"data": data}))
