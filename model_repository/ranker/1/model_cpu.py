"""Triton Python backend for CPU-only machines: the ranker through ONNX Runtime (model_cpu.onnx, the fused CPU graph
that `seqrank export` writes beside model.onnx: seqrank/serving/cpu_graph.py).

Requests arrive with candidates padded to different buckets (allow_ragged_batch on cand_item), so requests with
different candidate counts share one execution. seqrank.serving.batching scores only the real candidates (the
bucket padding is dropped: a 1 x 100 request costs 100 candidate rows, not 128) in runs of at most max_rows_per_run
candidate rows (pieces of equal width packed together, never padded to a wider request), which fixes the memory
peak; initialize runs the largest shapes once, so ONNX Runtime's arena reaches that peak at load and the stub's
memory stays flat under any mix of batches (docs/robustness.md, soak). With run_threads > 1 the runs
go to that many threads, each a single-threaded ONNX Runtime call, and one request's candidates are split over them
(candidate parallelism: lower latency at low load than intra-op threads, the same throughput at saturation). Each
thread has its own session, so each arena sees one run at a time and its warm-up peak holds (a shared session's
arena, with two runs interleaving their allocations, grew past it by 24-35 MB in a burst).
"""
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from seqrank.serving.batching import score_in_runs, warmup_feeds
from seqrank.serving.cpu_graph import cpu_graph_path

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
        # Candidate widths vary per request (no bucket padding): a memory pattern is planned and kept per input shape,
        # which grew the stub by ~50 MB over a mix of widths; the arena alone stays flat (and is as fast here).
        options.enable_mem_pattern = False
        path = cpu_graph_path(Path(args["model_repository"]) / args["model_version"])
        self.max_rows = int(params.get("max_rows_per_run", "128"))
        self.ways = int(params.get("run_threads", "1"))
        self.sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                         for _ in range(self.ways)]
        seq_len = int(params.get("seq_len", "100"))
        example = {}
        for spec in config["input"]:
            if spec["name"] in USER_SIDE:
                dims = [seq_len if int(d) == -1 else int(d) for d in spec["dims"]]  # int64 are strings in JSON
                example[spec["name"]] = np.zeros([1, *dims], dtype=DTYPES[spec["data_type"]])
        for session in self.sessions:
            for feeds in warmup_feeds(example, self.max_rows):
                session.run(None, feeds)
        self.local = threading.local()  # a pool thread's own session
        self.pool = None
        if self.ways > 1:
            free = list(self.sessions)
            self.pool = ThreadPoolExecutor(self.ways, thread_name_prefix="ranker-run",
                                           initializer=lambda: setattr(self.local, "session", free.pop()))

    def _run(self, feeds):
        session = getattr(self.local, "session", None) or self.sessions[0]  # no pool: the stub's thread
        return session.run(None, feeds)[0]

    def execute(self, requests):
        user_side = {name: [] for name in USER_SIDE}
        cands = []
        for request in requests:
            for name in USER_SIDE:
                user_side[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            cands.append(pb_utils.get_input_tensor_by_name(request, "cand_item").as_numpy())
        user_side = {name: np.concatenate(parts) for name, parts in user_side.items()}
        probs = score_in_runs(self._run, user_side, cands, self.max_rows, self.pool, self.ways)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probs", p)]) for p in probs]

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown()
