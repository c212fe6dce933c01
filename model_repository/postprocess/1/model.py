"""Triton Python backend: utility (weighted heads, negative heads subtract), ordering, top-k.

The ranker scored the candidates padded to a bucket; only the request's real N candidates are returned.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from seqrank.serving import bytes_tensor

bytes_tensor.install(pb_utils)  # BYTES inputs without a Python struct call per element


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.weights = np.array([float(w) for w in params["utility_weights"].split(",")], dtype=np.float32)
        heads = params["heads"].split(",")
        if len(self.weights) != len(heads):
            raise ValueError(f"utility_weights has {len(self.weights)} values for {len(heads)} heads ({heads})")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._rank(request)))
            except ValueError as e:  # a direct caller's inconsistent tensors: this request only
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
        return responses

    def _rank(self, request) -> list:
        probs = pb_utils.get_input_tensor_by_name(request, "probs").as_numpy()
        ids = pb_utils.get_input_tensor_by_name(request, "candidate_ids").as_numpy()
        oov = pb_utils.get_input_tensor_by_name(request, "cand_oov").as_numpy()
        top_k = pb_utils.get_input_tensor_by_name(request, "top_k")
        if len(probs) != 1 or len(ids) != 1 or len(oov) != 1:
            raise ValueError(f"probs: one user per request, got batch {len(probs)} "
                             f"(candidate_ids {len(ids)}, cand_oov {len(oov)})")
        probs, ids, oov = probs[0], ids[0], oov[0]
        n = len(ids)
        # the ranker's rows and the oov flags are padded to a bucket >= n; fewer than n would drop candidates
        for name, have in (("probs", len(probs)), ("cand_oov", len(oov))):
            if have < n:
                raise ValueError(f"{name}: {have} rows for {n} candidate_ids")
        probs = probs[:n]
        if not np.isfinite(probs).all():
            raise ValueError("probs: not finite (NaN or inf)")
        k = n
        if top_k is not None:
            k = int(top_k.as_numpy().reshape(-1)[0])
            if k < 1:
                raise ValueError(f"top_k: must be >= 1, got {k}")
            k = min(k, n)
        # a row-wise sum, not a BLAS product: equal rows (e.g. every out-of-vocabulary candidate, scored once by
        # the ranker) get bitwise-equal utilities whatever their position, so ties keep the request's order
        utility = (probs * self.weights).sum(axis=1)
        order = np.argsort(-utility, kind="stable")[:k]
        return [
            pb_utils.Tensor("ranked_ids", ids[order][None].astype(object)),
            pb_utils.Tensor("head_scores", probs[order][None].astype(np.float32)),
            pb_utils.Tensor("utility", utility[order][None].astype(np.float32)),
            pb_utils.Tensor("oov", oov[:n][order][None]),
        ]
