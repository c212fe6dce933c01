"""The service a team would otherwise write: FastAPI + uvicorn + PyTorch eager, the same trained model, behind the
KServe v2 HTTP protocol so that perf_analyzer (``-i http``) loads it exactly as it loads Triton.

    SEQRANK_NAIVE_RUN=runs/demo SEQRANK_NAIVE_REPOSITORY=runs/demo/model_repository \
    SEQRANK_STORE=sqlite:///abs/store.db \
    .venv/bin/python -m uvicorn naive_service:app --app-dir perf --port 8080 --http naive_service:NoDelayHTTPProtocol

It serves one model under the ensemble's name with the ensemble's inputs and outputs (the repository's
``seqrank/config.pbtxt``, docs/serving-contract.md), unbatched (``max_batch_size: 0``: one request is one ranking).
Endpoints: ``/v2/health/{live,ready}``, ``/v2/models/{name}`` (metadata), ``/v2/models/{name}/config`` (Triton's
extension perf_analyzer reads), ``/v2/models/{name}/infer`` (JSON tensors or the binary tensor data extension,
perf/kserve.py), ``/v2/models/{name}/stats`` (Triton's statistics extension, which perf_analyzer queries around every
measurement window: request and compute times as Triton counts them) and ``/metrics`` (``seqrank_store_fallback_total``,
the counter the ensemble's preprocess exports). Features are built in-process with
``seqrank.serving.preprocess.Preprocessor`` (the ensemble's preprocess code, the same tables and store); the model is
``seqrank.exporting.load_ranker(run)`` as served (``seqrank.models.inference.ranker_for_serving``) in
``torch.inference_mode`` with ``torch.set_num_threads(1)`` per worker (the usual setting for N workers on N cores),
scoring exactly the request's candidates (no bucket padding) and its real history (no sequence padding, as the
Triton CPU ranker: seqrank.serving.batching.trim_history_padding), unmasked where that history is full
(ranker_for_serving's full_history, as the CPU graph's branch). The endpoint is ``async def`` and computes inline: on
a CPU-bound service that is the cheapest choice (no thread-pool hop per request), i.e. the baseline's best case.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from google.protobuf import json_format
from uvicorn.protocols.http.auto import AutoHTTPProtocol

import kserve
from seqrank.exporting import triton_config
from seqrank.exporting import load_ranker
from seqrank.models.inference import ranker_for_serving
from seqrank.models.transact import INPUT_NAMES
from seqrank.serving.batching import trim_history_padding
from seqrank.serving.preprocess import CANDIDATE_BUCKETS, Preprocessor, RequestError

VERSION = "1"
STAT_KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


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


def model_config(ensemble_config: Path) -> dict:
    """The ensemble's config as this service serves it: same name, inputs and outputs, no ensemble steps, unbatched;
    as Triton prints it for ``/config`` (protobuf JSON field names, dims as numbers)."""
    cfg = triton_config.load(ensemble_config)
    cfg.ClearField("ensemble_scheduling")
    cfg.platform, cfg.backend, cfg.max_batch_size = "", "fastapi_pytorch_eager", 0
    out = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    out["max_batch_size"] = 0
    for tensor in out.get("input", []) + out.get("output", []):
        tensor["dims"] = [int(d) for d in tensor.get("dims", [])]
    return out


def model_metadata(config: dict) -> dict:
    def tensors(key):
        return [{"name": t["name"], "shape": t["dims"],
                 "datatype": "BYTES" if t["data_type"] == "TYPE_STRING" else t["data_type"].removeprefix("TYPE_")}
                for t in config.get(key, [])]
    return {"name": config["name"], "versions": [VERSION], "platform": config["backend"],
            "inputs": tensors("input"), "outputs": tensors("output")}


class NaiveRanker:
    def __init__(self, run: Path, repository: Path, store_url: str | None = None):
        torch.set_num_threads(1)
        self.model, cfg, vocab = load_ranker(run)
        self.served = {full: ranker_for_serving(self.model, full_history=full) for full in (False, True)}
        negative = set(vocab.negative_actions)
        self.weights = np.array([cfg.utility_weights.get(h, 1.0) * (-1.0 if h in negative else 1.0)
                                 for h in vocab.heads], dtype=np.float32)
        store = None
        if store_url:
            from seqrank.store import open_store
            store = open_store(store_url, timeout_s=0.05)
        self.pre = Preprocessor(repository / "preprocess" / "1" / "tables", seq_len=cfg.transact.seq_len,
                                buckets=CANDIDATE_BUCKETS, max_candidates=CANDIDATE_BUCKETS[-1], store=store)
        self.config = model_config(repository / "seqrank" / "config.pbtxt")
        self.metadata = model_metadata(self.config)
        self.fallbacks = 0  # rankings served without the store's sequence (/metrics; the bench compares)
        self.stats = {k: [0, 0] for k in STAT_KEYS}  # Triton's inference_stats: name -> [count, ns]
        self.last_inference_ms = 0

    def _count(self, key: str, ns: int) -> None:
        self.stats[key][0] += 1
        self.stats[key][1] += ns

    def rank(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The ensemble's outputs for one request's input tensors (RequestError names a bad field)."""
        t0 = time.perf_counter_ns()
        req = self.pre.parse(inputs)
        t = self.pre.build([req])[0]
        self.fallbacks += t.sequence_source.startswith("fallback_")
        n = len(req.candidates)
        # exactly the request's candidates and its real history (the same trimming as the Triton CPU ranker)
        feeds = trim_history_padding({"seq_item": t.seq_item[None], "seq_action": t.seq_action[None],
                                      "seq_mask": t.seq_mask[None], "user_emb": t.user_emb[None].copy(),
                                      "context": t.context[None], "cand_item": t.cand_item[None, :n]})
        # the unmasked form where every position is a real action, as the CPU graph's If picks it
        model = self.served[bool(feeds["seq_mask"].all())]
        t1 = time.perf_counter_ns()
        with torch.inference_mode():
            probs = model(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))[0].numpy()
        t2 = time.perf_counter_ns()
        utility = (probs * self.weights).sum(axis=1)  # row-wise: equal rows, equal utilities (postprocess)
        k = n
        if inputs.get("top_k") is not None:
            k = int(np.asarray(inputs["top_k"]).reshape(-1)[0])
            if k < 1:
                raise RequestError("top_k", f"must be >= 1, got {k}")
            k = min(k, n)
        order = np.argsort(-utility, kind="stable")[:k]
        out = {"ranked_ids": np.asarray(req.candidates, dtype=object)[order],
               "head_scores": probs[order].astype(np.float32), "utility": utility[order].astype(np.float32),
               "oov": t.oov[:n][order].astype(bool),
               "sequence_source": np.array([t.sequence_source.encode()], dtype=object),
               "embedding_source": np.array([t.embedding_source.encode()], dtype=object)}
        t3 = time.perf_counter_ns()
        for key, ns in (("compute_input", t1 - t0), ("compute_infer", t2 - t1), ("compute_output", t3 - t2),
                        ("queue", 0)):
            self._count(key, ns)
        return out

    def statistics(self) -> dict:
        """Triton's /v2/models/{name}/stats body (every request is one execution: no batching)."""
        stats = {k: {"count": c, "ns": ns} for k, (c, ns) in self.stats.items()}
        return {"model_stats": [{"name": self.config["name"], "version": VERSION,
                                 "last_inference": self.last_inference_ms, "inference_count": stats["success"]["count"],
                                 "execution_count": stats["success"]["count"], "inference_stats": stats,
                                 "batch_stats": []}]}


_ranker: NaiveRanker | None = None


def _get() -> NaiveRanker:
    global _ranker
    if _ranker is None:
        _ranker = NaiveRanker(Path(os.environ["SEQRANK_NAIVE_RUN"]), Path(os.environ["SEQRANK_NAIVE_REPOSITORY"]),
                              os.environ.get("SEQRANK_STORE") or None)
    return _ranker


@asynccontextmanager
async def _lifespan(_app):
    _get()  # load the model before the worker accepts requests
    yield


app = FastAPI(title="seqrank naive baseline", lifespan=_lifespan)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _model(name: str) -> NaiveRanker | None:
    ranker = _get()
    return ranker if name == ranker.config["name"] else None


@app.get("/v2")
async def server_metadata():
    return {"name": "seqrank-naive", "version": VERSION,
            "extensions": ["binary_tensor_data", "model_configuration", "statistics"]}


@app.get("/v2/health/live")
@app.get("/v2/health/ready")
async def health():
    return Response(status_code=200)


@app.get("/v2/models/{name}/ready")
@app.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, version: str = VERSION):
    return Response(status_code=200 if _model(name) and version == VERSION else 404)


@app.get("/v2/models/{name}")
@app.get("/v2/models/{name}/versions/{version}")
async def metadata(name: str, version: str = VERSION):
    ranker = _model(name)
    return JSONResponse(ranker.metadata) if ranker and version == VERSION else _error(404, f"unknown model {name!r}")


@app.get("/v2/models/{name}/config")
@app.get("/v2/models/{name}/versions/{version}/config")
async def config(name: str, version: str = VERSION):
    ranker = _model(name)
    return JSONResponse(ranker.config) if ranker and version == VERSION else _error(404, f"unknown model {name!r}")


@app.get("/v2/models/stats")
@app.get("/v2/models/{name}/stats")
@app.get("/v2/models/{name}/versions/{version}/stats")
async def stats(name: str | None = None, version: str = VERSION):
    ranker = _get() if name is None else _model(name)
    return JSONResponse(ranker.statistics()) if ranker else _error(404, f"unknown model {name!r}")


@app.get("/metrics")
async def metrics():
    return PlainTextResponse(f"seqrank_store_fallback_total {_get().fallbacks}\n")


@app.post("/v2/models/{name}/infer")
@app.post("/v2/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str = VERSION):
    t0 = time.perf_counter_ns()
    ranker = _model(name)
    if ranker is None or version != VERSION:
        return _error(404, f"unknown model {name!r} version {version!r}")
    try:
        inputs, outputs = kserve.decode_request(await request.body(), request.headers.get(kserve.HEADER_LENGTH))
        unknown = sorted(set(outputs) - {t["name"] for t in ranker.config["output"]})
        if unknown:
            raise kserve.ProtocolError(f"unknown output {unknown[0]!r}")
        body, headers = kserve.encode_response(name, VERSION, ranker.rank(inputs), outputs)
    except (RequestError, kserve.ProtocolError) as err:
        ranker._count("fail", time.perf_counter_ns() - t0)
        return _error(400, str(err))
    ranker._count("success", time.perf_counter_ns() - t0)
    ranker.last_inference_ms = int(time.time() * 1000)
    return Response(content=body, headers={k: v for k, v in headers.items() if k != "content-type"},
                    media_type=headers["content-type"])
