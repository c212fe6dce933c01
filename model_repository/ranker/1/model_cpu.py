"""Triton Python backend for CPU-only machines: the ranker through ONNX Runtime (model_cpu.onnx, the fused CPU graph
that `seqrank export` writes beside model.onnx: seqrank/serving/cpu_graph.py).

Requests arrive with candidates padded to different buckets (allow_ragged_batch on cand_item), so requests with
different candidate counts share one execution. seqrank.serving.batching scores only the real candidates (the
bucket padding is dropped: a 1 x 100 request costs 100 candidate rows, not 128) in runs of at most max_rows_per_run
candidate rows (pieces of equal width packed together, never padded to a wider request), which fixes the memory
peak; initialize runs the largest shapes once, so ONNX Runtime's arena reaches that peak at load and the stub's
memory stays flat under any mix of batches (docs/operations.md, soak). With run_threads > 1 the runs
go to that many threads, each a single-threaded ONNX Runtime call, and one request's candidates are split over them
(candidate parallelism: lower latency at low load than intra-op threads, the same throughput at saturation). Each
thread has its own session, so each arena sees one run at a time and its warm-up peak holds (a shared session's
arena, with two runs interleaving their allocations, grew past it by 24-35 MB in a burst). A batch that makes one run
(small requests) is scored on the stub's own thread, not handed to the pool (score_in_runs), with sessions[0], which
one pool thread also owns. That is still one run at a time: execute calls do not overlap in a stub, and
score_in_runs returns (or raises) only once every run it gave the pool has finished, so no pool run is in flight
while the stub's thread runs. An extra session for the stub's thread would instead cost another copy of the
weights (the item table: gigabytes for a large catalogue).
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
        self.id_bounds = {name: int(params.get(key, "0")) for name, key in
                          (("seq_item", "n_items"), ("cand_item", "n_items"), ("seq_action", "n_actions"))}
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
        # the stub's thread (no pool, or a one-run batch) uses sessions[0]: never while a pool run is in flight
        session = getattr(self.local, "session", None) or self.sessions[0]
        return session.run(None, feeds)[0]

    def _inputs(self, request) -> dict:
        """The request's tensors, checked: what the ensemble's preprocess always satisfies, and a direct caller
        may not. One bad request must not reach a shared ONNX Runtime run (its Gather would fail them all)."""
        x = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in (*USER_SIDE, "cand_item")}
        rows = len(x["cand_item"])
        for name in USER_SIDE:
            if len(x[name]) != rows:
                raise ValueError(f"{name}: {len(x[name])} rows, cand_item has {rows}")
        for name in ("seq_action", "seq_mask"):
            if x[name].shape != x["seq_item"].shape:
                raise ValueError(f"{name}: shape {list(x[name].shape)}, seq_item has {list(x['seq_item'].shape)}")
        for name, bound in self.id_bounds.items():
            ids = x[name]
            if bound and ids.size and (ids.min() < 0 or ids.max() >= bound):
                bad = ids[(ids < 0) | (ids >= bound)][0]
                raise ValueError(f"{name}: id {bad} is outside the exported table [0, {bound})")
        for name in ("user_emb", "context"):
            if not np.isfinite(x[name]).all():
                raise ValueError(f"{name}: not finite (NaN or inf)")
        return x

    def _score(self, inputs: list) -> list:
        user_side = {name: np.concatenate([x[name] for x in inputs]) for name in USER_SIDE}
        return score_in_runs(self._run, user_side, [x["cand_item"] for x in inputs], self.max_rows, self.pool,
                             self.ways)

    def execute(self, requests):
        responses = [None] * len(requests)
        inputs, slots = [], []
        for i, request in enumerate(requests):
            try:
                inputs.append(self._inputs(request))
                slots.append(i)
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if inputs:
            try:
                scored = self._score(inputs)
            except Exception:  # something the checks did not foresee: score each request alone, fail only its own
                scored = []
                for x in inputs:
                    try:
                        scored.append(self._score([x])[0])
                    except Exception as e:
                        scored.append(e)
            for i, p in zip(slots, scored):
                if isinstance(p, Exception):
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"ranker: {type(p).__name__}: {p}", pb_utils.TritonError.INTERNAL))
                else:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probs", p)])
        return responses

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown()
