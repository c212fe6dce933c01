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

    def execute(self, requests):
        responses = []
        for request in requests:
            probs = pb_utils.get_input_tensor_by_name(request, "probs").as_numpy()[0]
            ids = pb_utils.get_input_tensor_by_name(request, "candidate_ids").as_numpy().reshape(-1)
            oov = pb_utils.get_input_tensor_by_name(request, "cand_oov").as_numpy().reshape(-1)
            top_k = pb_utils.get_input_tensor_by_name(request, "top_k")
            n = len(ids)
            k = n
            if top_k is not None:
                k = int(top_k.as_numpy().reshape(-1)[0])
                if k < 1:
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"top_k: must be >= 1, got {k}", pb_utils.TritonError.INVALID_ARG)))
                    continue
                k = min(k, n)
            probs = probs[:n]
            utility = probs @ self.weights
            order = np.argsort(-utility, kind="stable")[:k]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("ranked_ids", ids[order][None].astype(object)),
                pb_utils.Tensor("head_scores", probs[order][None].astype(np.float32)),
                pb_utils.Tensor("utility", utility[order][None].astype(np.float32)),
                pb_utils.Tensor("oov", oov[:n][order][None]),
            ]))
        return responses
