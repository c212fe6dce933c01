"""Triton Python backend: the CPU preprocess step of the seqrank ensemble.

initialize loads the memory-mapped tables once; execute validates every request on its own (a bad request gets
INVALID_ARG naming the field, the others in the batch are unaffected) and builds all valid requests' tensors in
one vectorised pass with seqrank.features, the same code that built the training examples.
"""
import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from seqrank.serving import bytes_tensor
from seqrank.serving.preprocess import ACTION_FIELDS, FALLBACK_SOURCES, Preprocessor, RequestError

bytes_tensor.install(pb_utils)  # BYTES inputs without a Python struct call per element

INPUTS = ("user_id", "candidate_ids", "request_time_ms") + ACTION_FIELDS


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        store = None
        url = os.environ.get("SEQRANK_STORE")
        if url:
            from seqrank.store import open_store
            store = open_store(url, timeout_s=float(params.get("store_timeout_ms", "50")) / 1000.0)
        self.pre = Preprocessor(
            Path(args["model_repository"]) / args["model_version"] / "tables",
            seq_len=int(params["seq_len"]),
            buckets=[int(b) for b in params["candidate_buckets"].split(",")],
            max_candidates=int(params["max_candidates"]),
            max_actions=int(params.get("max_actions", "10000")),
            max_id_bytes=int(params.get("max_id_bytes", "256")),
            store=store)
        # Prometheus counter on :8002 (alert when rankings lose their real-time sequence)
        self._fallback_family = pb_utils.MetricFamily(
            name="seqrank_store_fallback_total",
            description="Rankings served without the user's sequence: the feature store did not answer, "
                        "or the user's record could not be read",
            kind=pb_utils.MetricFamily.COUNTER)
        self._fallbacks = {  # by reason: "unavailable" (an outage) or "error" (one user's unreadable record)
            source: self._fallback_family.Metric(labels={
                "model": args["model_name"], "version": args["model_version"],
                "reason": source.removeprefix("fallback_store_")})
            for source in FALLBACK_SOURCES}

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed, slots = [], []
        for i, request in enumerate(requests):
            raw = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                raw[name] = None if tensor is None else tensor.as_numpy()
            try:
                parsed.append(self.pre.parse(raw))
                slots.append(i)
            except RequestError as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
            except Exception as e:  # never let one request's surprise fail the batch as INTERNAL
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"request could not be parsed: {e}", pb_utils.TritonError.INVALID_ARG))
        built = self._build(parsed)
        sources = [t.sequence_source for t in built if not isinstance(t, Exception)]
        for source, metric in self._fallbacks.items():
            if source in sources:
                metric.increment(sources.count(source))
        for i, t in zip(slots, built):
            if isinstance(t, Exception):
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"preprocess failed for this request: {type(t).__name__}: {t}", pb_utils.TritonError.INTERNAL))
                continue
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("seq_item", t.seq_item[None]),
                pb_utils.Tensor("seq_action", t.seq_action[None]),
                pb_utils.Tensor("seq_mask", t.seq_mask[None]),
                pb_utils.Tensor("user_emb", t.user_emb[None]),
                pb_utils.Tensor("context", t.context[None]),
                pb_utils.Tensor("cand_item", t.cand_item[None]),
                pb_utils.Tensor("oov", t.oov[None]),
                pb_utils.Tensor("sequence_source", np.array([[t.sequence_source.encode()]], dtype=object)),
                pb_utils.Tensor("embedding_source", np.array([[t.embedding_source.encode()]], dtype=object)),
            ])
        return responses

    def _build(self, parsed):
        """All requests' tensors in one pass; if that raises, each request alone, so a failure is its own."""
        if not parsed:
            return []
        try:
            return self.pre.build(parsed)
        except Exception:
            built = []
            for request in parsed:
                try:
                    built.append(self.pre.build([request])[0])
                except Exception as e:
                    built.append(e)
            return built

    def finalize(self):
        self._fallbacks = None  # the Metrics must be released before their MetricFamily
        self._fallback_family = None
        if self.pre.store is not None:
            self.pre.store.close()
