"""The service a team would otherwise write: FastAPI + uvicorn + PyTorch eager, the same trained model.

    SEQRANK_NAIVE_RUN=runs/demo SEQRANK_NAIVE_TABLES=runs/demo/model_repository/preprocess/1/tables \
    SEQRANK_STORE=sqlite:///abs/store.db \
    .venv/bin/python -m uvicorn naive_service:app --app-dir perf --workers 2 --port 8080 \
        --http naive_service:NoDelayHTTPProtocol

Same request semantics as the ensemble (docs/serving-contract.md), as JSON:
``POST /rank`` ``{"user_id": str, "candidate_ids": [str], "request_time_ms": int (optional),
"actions": [[item_id, action, timestamp_ms], ...] (optional), "top_k": int (optional)}`` ->
``{"ranked_ids", "utility", "head_scores", "oov", "sequence_source"}``. Features are built in-process with
``seqrank.serving.preprocess.Preprocessor`` (the ensemble's preprocess code, the same tables and store); the model is
``seqrank.exporting.load_ranker(run)`` as served (``seqrank.models.inference.ranker_for_serving``) in
``torch.inference_mode`` with ``torch.set_num_threads(1)`` per worker (the usual setting for N workers on N cores),
scoring exactly the request's candidates (no bucket padding) and its real history (no sequence padding, as the
Triton CPU ranker: seqrank.serving.batching.trim_history_padding), unmasked where that history is full
(ranker_for_serving's full_history, as the CPU graph's branch). The
endpoint is ``async def`` and computes inline: on a CPU-bound service that is the cheapest choice (no thread-pool
hop per request), i.e. the baseline's best case. Its connections have Nagle's algorithm off
(``NoDelayHTTPProtocol``): with ``--workers`` > 1 uvicorn leaves it on, which alone added ~44 ms to every keep-alive
request (56 ms instead of 12 ms for 1 x 16 at concurrency 1).
"""
from __future__ import annotations

import json
import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from seqrank.exporting import load_ranker
from seqrank.models.inference import ranker_for_serving
from seqrank.models.transact import INPUT_NAMES
from seqrank.serving.batching import trim_history_padding
from seqrank.serving.preprocess import CANDIDATE_BUCKETS, Preprocessor, RequestError

class NoDelayHTTPProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol with TCP_NODELAY on every connection. ``--workers N`` binds the listening socket with
    proto 0; accepted sockets inherit it and asyncio only disables Nagle when proto is IPPROTO_TCP, so each
    keep-alive response (headers and body written separately) waited for the client's delayed ACK, ~40 ms on Linux
    (uvicorn issue #3149). A team that measured its service would turn it off; so does this baseline."""

    def connection_made(self, transport):
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)



class NaiveRanker:
    def __init__(self, run: Path, tables: Path, store_url: str | None = None):
        torch.set_num_threads(1)
        self.model, cfg, vocab = load_ranker(run)
        self.served = {full: ranker_for_serving(self.model, full_history=full) for full in (False, True)}
        self.heads = list(vocab.heads)
        negative = set(vocab.negative_actions)
        self.weights = np.array([cfg.utility_weights.get(h, 1.0) * (-1.0 if h in negative else 1.0)
                                 for h in vocab.heads], dtype=np.float32)
        store = None
        if store_url:
            from seqrank.store import open_store
            store = open_store(store_url, timeout_s=0.05)
        self.pre = Preprocessor(tables, seq_len=cfg.transact.seq_len, buckets=CANDIDATE_BUCKETS,
                                max_candidates=CANDIDATE_BUCKETS[-1], store=store)
        self.fallbacks = 0  # rankings served without the store's sequence (GET /stats; the bench compares)

    def rank(self, body: dict) -> dict:
        raw = {"user_id": np.array([str(body.get("user_id", ""))], dtype=object) if "user_id" in body else None,
               "candidate_ids": (np.array([str(c) for c in body["candidate_ids"]], dtype=object)
                                 if isinstance(body.get("candidate_ids"), list) else None),
               "request_time_ms": (np.array([int(body["request_time_ms"])], dtype=np.int64)
                                   if body.get("request_time_ms") is not None else None)}
        actions = body.get("actions")
        if actions is not None:
            raw["action_item_ids"] = np.array([str(a[0]) for a in actions], dtype=object)
            raw["action_types"] = np.array([str(a[1]) for a in actions], dtype=object)
            raw["action_times_ms"] = np.array([int(a[2]) for a in actions], dtype=np.int64)
        req = self.pre.parse(raw)
        t = self.pre.build([req])[0]
        self.fallbacks += t.sequence_source.startswith("fallback_")
        n = len(req.candidates)
        # exactly the request's candidates and its real history (the same trimming as the Triton CPU ranker)
        feeds = trim_history_padding({"seq_item": t.seq_item[None], "seq_action": t.seq_action[None],
                                      "seq_mask": t.seq_mask[None], "user_emb": t.user_emb[None].copy(),
                                      "context": t.context[None], "cand_item": t.cand_item[None, :n]})
        # the unmasked form where every position is a real action, as the CPU graph's If picks it
        model = self.served[bool(feeds["seq_mask"].all())]
        with torch.inference_mode():
            probs = model(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))
        probs = probs[0].numpy()  # only the real candidates are scored (no bucket padding)
        utility = (probs * self.weights).sum(axis=1)  # row-wise: equal rows, equal utilities (postprocess)
        k = n if body.get("top_k") is None else max(1, min(int(body["top_k"]), n))
        order = np.argsort(-utility, kind="stable")[:k]
        ids = [req.candidates[i].decode() if isinstance(req.candidates[i], bytes) else str(req.candidates[i])
               for i in order]
        return {"ranked_ids": ids, "utility": utility[order].tolist(), "head_scores": probs[order].tolist(),
                "oov": t.oov[:n][order].tolist(), "sequence_source": t.sequence_source}


_ranker: NaiveRanker | None = None


def _get() -> NaiveRanker:
    global _ranker
    if _ranker is None:
        _ranker = NaiveRanker(Path(os.environ["SEQRANK_NAIVE_RUN"]), Path(os.environ["SEQRANK_NAIVE_TABLES"]),
                              os.environ.get("SEQRANK_STORE") or None)
    return _ranker


@asynccontextmanager
async def _lifespan(_app):
    _get()  # load the model before the worker accepts requests
    yield


app = FastAPI(title="seqrank naive baseline", lifespan=_lifespan)


@app.get("/healthz")
async def healthz():
    return {"ok": True, "pid": os.getpid()}


@app.get("/stats")
async def stats():
    return {"fallbacks": _get().fallbacks, "pid": os.getpid()}


@app.post("/rank")
async def rank(request: Request):
    try:
        body = json.loads(await request.body())
        return JSONResponse(_get().rank(body))
    except RequestError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None
    except (ValueError, KeyError, TypeError) as e:
        raise HTTPException(status_code=400, detail=f"bad request: {e}") from None
