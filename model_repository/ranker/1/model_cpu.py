"""Triton Python backend for CPU-only machines: the ranker's ONNX file through ONNX Runtime.

Requests arrive with candidates padded to different buckets (allow_ragged_batch on cand_item): they are padded
to the largest in the batch and scored in ONE session run, then split back, so requests with different candidate
counts are batched together. User-side tensors stay one row per request (the model broadcasts them).
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUTS = ("seq_item", "seq_action", "seq_mask", "user_emb", "context")


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "2"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        feeds = {name: [] for name in INPUTS}
        cands = []
        for request in requests:
            for name in INPUTS:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            cands.append(pb_utils.get_input_tensor_by_name(request, "cand_item").as_numpy())
        width = max(c.shape[1] for c in cands)
        cand = np.zeros((sum(c.shape[0] for c in cands), width), dtype=np.int64)  # PAD = 0
        row = 0
        for c in cands:
            cand[row:row + c.shape[0], : c.shape[1]] = c
            row += c.shape[0]
        inputs = {name: np.concatenate(parts) for name, parts in feeds.items()}
        inputs["cand_item"] = cand
        probs = self.session.run(None, inputs)[0]
        responses, row = [], 0
        for c in cands:
            out = probs[row:row + c.shape[0], : c.shape[1]]
            row += c.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probs", out)]))
        return responses
