"""Client library for the seqrank ensemble over gRPC or HTTP, sync and asyncio.

    from seqrank.client import RankingClient
    with RankingClient("127.0.0.1:8001", protocol="grpc") as client:
        result = client.rank("111", ["3892024", "2629583"], top_k=10)
        for item in result.items: print(item.item_id, item.utility, item.scores["like"])

Inputs are validated before sending; every call has a timeout. Only transient failures are retried: UNAVAILABLE
(server down or restarting) and the INTERNAL "is not healthy" of a Python stub that died or hung under the request
(the supervisor restarts it; ranking is read-only, so a retry is safe). Backoff is exponential, capped and jittered so
that clients do not retry in lockstep. A bad request is never retried.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MODEL = "seqrank"
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
MAX_CANDIDATES = 1024
OUTPUTS = ("ranked_ids", "head_scores", "utility", "oov", "sequence_source", "embedding_source")


class ClientInputError(ValueError):
    pass


@dataclass
class RankedItem:
    item_id: str
    utility: float
    scores: dict[str, float]
    oov: bool


@dataclass
class RankResult:
    items: list[RankedItem]
    sequence_source: str
    embedding_source: str  # the user's long-term embedding: "store", "exported" or "none" (docs/serving-contract.md)

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as m
    elif protocol == "http":
        import tritonclient.http as m
    else:
        raise ClientInputError(f"protocol must be grpc or http, got {protocol!r}")
    return m


def _async_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc.aio as m
    elif protocol == "http":
        import tritonclient.http.aio as m
    else:
        raise ClientInputError(f"protocol must be grpc or http, got {protocol!r}")
    return m


def _strings(values, name) -> np.ndarray:
    out = []
    for i, v in enumerate(values):
        s = str(v)
        if not s:
            raise ClientInputError(f"{name}[{i}] is empty")
        out.append(s.encode())
    return np.array([out], dtype=object)


def build_inputs(module, user_id, candidates, actions=None, request_time=None, top_k=None) -> list:
    """Validated request tensors (batch dimension 1). actions: [(item_id, action, timestamp_ms), ...]."""
    if user_id is None or str(user_id) == "":
        raise ClientInputError("user_id is required")
    candidates = list(candidates)
    if not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise ClientInputError(f"candidates: need 1..{MAX_CANDIDATES}, got {len(candidates)}")
    tensors = [("user_id", _strings([user_id], "user_id"), "BYTES"),
               ("candidate_ids", _strings(candidates, "candidates"), "BYTES")]
    if request_time is not None:
        tensors.append(("request_time_ms", np.array([[int(request_time)]], dtype=np.int64), "INT64"))
    if actions is not None:
        actions = list(actions)
        for i, a in enumerate(actions):
            if len(a) != 3:
                raise ClientInputError(f"actions[{i}] must be (item_id, action, timestamp_ms)")
        tensors += [("action_item_ids", _strings([a[0] for a in actions], "actions.item_id"), "BYTES"),
                    ("action_types", _strings([a[1] for a in actions], "actions.action"), "BYTES"),
                    ("action_times_ms", np.array([[int(a[2]) for a in actions]], dtype=np.int64), "INT64")]
    if top_k is not None:
        if int(top_k) < 1:
            raise ClientInputError(f"top_k must be >= 1, got {top_k}")
        tensors.append(("top_k", np.array([[int(top_k)]], dtype=np.int32), "INT32"))
    out = []
    for name, value, dtype in tensors:
        t = module.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        out.append(t)
    return out


def parse_result(response, heads: Sequence[str]) -> RankResult:
    ids = response.as_numpy("ranked_ids").reshape(-1)
    scores = response.as_numpy("head_scores").reshape(len(ids), -1)
    utility = response.as_numpy("utility").reshape(-1)
    oov = response.as_numpy("oov").reshape(-1)
    items = [RankedItem(i.decode() if isinstance(i, bytes) else str(i), float(u),
                        dict(zip(heads, map(float, s))), bool(o))
             for i, s, u, o in zip(ids, scores, utility, oov)]
    return RankResult(items, _one_string(response, "sequence_source"), _one_string(response, "embedding_source"))


def _one_string(response, name: str) -> str:
    value = response.as_numpy(name).reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


STUB_FAILURE = "is not healthy"  # python backend: the model instance's stub died or stopped answering


def is_unavailable(exc: BaseException) -> bool:
    """Retry only when the server could not be reached, said UNAVAILABLE, or lost the stub serving the request —
    never on a bad request."""
    if isinstance(exc, (ConnectionError, OSError, asyncio.TimeoutError)):
        return True
    status = str(getattr(exc, "status", lambda: "")() or "")
    if "UNAVAILABLE" in status.upper() or "503" in status:
        return True
    return STUB_FAILURE in str(exc)


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half of min(cap, base * 2^attempt) plus a uniform share of the
    other half, so retries spread out instead of arriving together when a restarted server comes back."""
    ceiling = min(cap_s, base_s * 2 ** attempt)
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class HeadsUnavailable(RuntimeError):
    """The server refuses the ensemble's config, where the head names are (a restricted model-config API)."""


def _config_refused(exc: Exception, url: str) -> HeadsUnavailable | None:
    """HeadsUnavailable naming the fix when ``exc`` is the server refusing its model config, else None."""
    if "restricted" not in str(exc) and "admin" not in str(exc):
        return None
    return HeadsUnavailable(f"{url}: the server refuses the ensemble's model config, which names the heads (its "
                            f"model-config API is restricted?): pass heads=[...] (the run's run.json \"heads\", or "
                            f"its export.json) to the client; server said: {exc}")


def _heads_from_config(config) -> list[str]:
    params = config.get("config", config).get("parameters", {}) if isinstance(config, dict) else {}
    if not params and not isinstance(config, dict):  # gRPC protobuf
        params = {k: {"string_value": v.string_value} for k, v in config.config.parameters.items()}
    return params["heads"]["string_value"].split(",")


class RankingClient:
    """A client of the served `seqrank` ensemble over gRPC (default, 127.0.0.1:8001) or HTTP (127.0.0.1:8000).
    `rank(user_id, candidates, actions=None, request_time=None, top_k=None)` returns a RankResult: the candidates
    ordered by utility with every head's probability; bad input raises ClientInputError before anything is sent,
    and only transient server failures are retried (module docstring). Use it as a context manager."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 2.0,
                 retries: int = 3, backoff_s: float = 0.2, model: str = MODEL, max_backoff_s: float = 2.0,
                 heads: Sequence[str] | None = None):
        self.m = _module(protocol)
        self.protocol, self.model, self.timeout_s = protocol, model, timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.url = url = url or DEFAULT_URLS[protocol]
        kw = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self.client = self.m.InferenceServerClient(url, **kw)
        self._heads: list[str] | None = list(heads) if heads else None

    @property
    def heads(self) -> list[str]:
        """The head names, in the order of the probabilities output: given to the constructor, or read once from the
        ensemble's config (HeadsUnavailable where the server restricts its model-config API)."""
        if self._heads is None:
            try:
                cfg = self._retry(lambda: self.client.get_model_config(self.model, **self._cfg_kw()))
            except Exception as exc:  # noqa: BLE001 - a refusal is named, anything else passes through
                refused = _config_refused(exc, self.url)
                if refused is None:
                    raise
                raise refused from exc
            self._heads = _heads_from_config(cfg)
        return self._heads

    def _cfg_kw(self):
        return {"as_json": False} if self.protocol == "grpc" else {}

    def _retry(self, call):
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - classified below
                if attempt == self.retries or not is_unavailable(exc):
                    raise
                time.sleep(backoff_delay(attempt, self.backoff_s, self.max_backoff_s))

    def rank(self, user_id, candidates, actions=None, request_time=None, top_k=None) -> RankResult:
        inputs = build_inputs(self.m, user_id, candidates, actions, request_time, top_k)
        outputs = [self.m.InferRequestedOutput(n) for n in OUTPUTS]
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        response = self._retry(lambda: self.client.infer(self.model, inputs, outputs=outputs, **kw))
        return parse_result(response, self.heads)

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRankingClient:
    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 2.0,
                 retries: int = 3, backoff_s: float = 0.2, model: str = MODEL, max_backoff_s: float = 2.0,
                 heads: Sequence[str] | None = None):
        self.m = _async_module(protocol)
        self.sync_m = _module(protocol)
        self.protocol, self.model, self.timeout_s = protocol, model, timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.url = url or DEFAULT_URLS[protocol]
        self.client = self.m.InferenceServerClient(self.url)
        self._heads: list[str] | None = list(heads) if heads else None

    async def _retry(self, make_call):
        for attempt in range(self.retries + 1):
            try:
                return await asyncio.wait_for(make_call(), self.timeout_s)
            except Exception as exc:  # noqa: BLE001
                if attempt == self.retries or not is_unavailable(exc):
                    raise
                await asyncio.sleep(backoff_delay(attempt, self.backoff_s, self.max_backoff_s))

    async def heads(self) -> list[str]:
        if self._heads is None:
            kw = {"as_json": False} if self.protocol == "grpc" else {}
            try:
                cfg = await self._retry(lambda: self.client.get_model_config(self.model, **kw))
            except Exception as exc:  # noqa: BLE001 - a refusal is named, anything else passes through
                refused = _config_refused(exc, self.url)
                if refused is None:
                    raise
                raise refused from exc
            self._heads = _heads_from_config(cfg)
        return self._heads

    async def rank(self, user_id, candidates, actions=None, request_time=None, top_k=None) -> RankResult:
        inputs = build_inputs(self.sync_m, user_id, candidates, actions, request_time, top_k)
        outputs = [self.sync_m.InferRequestedOutput(n) for n in OUTPUTS]
        response = await self._retry(lambda: self.client.infer(self.model, inputs, outputs=outputs))
        return parse_result(response, await self.heads())

    async def close(self):
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
