"""Triton Python backend for CPU-only machines: the ranker's ONNX file through ONNX Runtime.

Requests arrive with candidates padded to different buckets (allow_ragged_batch on cand_item), so requests with
different candidate counts share one execution. seqrank.serving.batching scores them in runs of at most
max_rows_per_run candidate rows (pieces of equal width packed together, never padded to a wider request), which
fixes the memory peak; initialize runs the largest shapes once, so ONNX Runtime's arena reaches that peak at load
and the stub's memory stays flat under any mix of batches (docs/robustness.md, soak).
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from seqrank.serving.batching import score_in_runs, warmup_feeds

USER_SIDE = ("seq_item", "seq_action", "seq_mask", "user_emb", "context")
DTYPES = {"TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_, "TYPE_FP32": np.float32}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "2"))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.max_rows = int(params.get("max_rows_per_run", "128"))
        seq_len = int(params.get("seq_len", "100"))
        example = {}
        for spec in config["input"]:
            if spec["name"] in USER_SIDE:
                dims = [seq_len if int(d) == -1 else int(d) for d in spec["dims"]]  # int64 are strings in JSON
                example[spec["name"]] = np.zeros([1, *dims], dtype=DTYPES[spec["data_type"]])
        for feeds in warmup_feeds(example, self.max_rows):
            self.session.run(None, feeds)

    def execute(self, requests):
        user_side = {name: [] for name in USER_SIDE}
        cands = []
        for request in requests:
            for name in USER_SIDE:
                user_side[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            cands.append(pb_utils.get_input_tensor_by_name(request, "cand_item").as_numpy())
        user_side = {name: np.concatenate(parts) for name, parts in user_side.items()}
        probs = score_in_runs(lambda feeds: self.session.run(None, feeds)[0], user_side, cands, self.max_rows)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probs", p)]) for p in probs]
