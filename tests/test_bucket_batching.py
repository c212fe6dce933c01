"""research/bucket_batching.py: the stand-in GPU ranker batches as the GPU backends do (equal candidate buckets
only, in queue order), its costs fit make gpu-check's points, and requests are padded to their bucket."""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "research"))
import bucket_batching  # noqa: E402


def test_costs_are_fitted_to_the_fp16_cuda_graph_points():
    points = [{"dtype": "fp16", "mode": "cuda_graph", "batch": b, "candidates": n, "mean_ms": (120 + 0.05 * b * n) / 1e3}
              for b in (1, 8, 32) for n in (128, 512)]
    points += [{"dtype": "fp16", "mode": "eager", "batch": 1, "candidates": 128, "mean_ms": 9.0},   # not used
               {"dtype": "fp32", "mode": "cuda_graph", "batch": 1, "candidates": 128, "mean_ms": 5.0}]
    exec_us, candidate_us = bucket_batching.fit_costs(points)
    assert exec_us == pytest.approx(120, abs=1e-6) and candidate_us == pytest.approx(0.05, abs=1e-9)
    with pytest.raises(ValueError, match="fewer than 2 fp16 points"):
        bucket_batching.fit_costs(points[-1:])


def test_each_request_is_padded_to_the_smallest_bucket_that_holds_it():
    widths = bucket_batching.padded(np.array([1, 16, 17, 300, 1024]), [16, 256, 1024])
    assert widths.tolist() == [16, 16, 256, 1024, 1024]


def test_a_mix_can_be_your_own_candidate_counts(tmp_path):
    counts = tmp_path / "counts.txt"
    counts.write_text("3\n100\n100\n700\n")
    drawn = bucket_batching.candidate_counts(str(counts), 200, np.random.default_rng(0))
    assert set(drawn.tolist()) == {3, 100, 700} and len(drawn) == 200
    counts.write_text("3\n2000\n")
    with pytest.raises(ValueError, match="candidate counts must be 1..1024"):
        bucket_batching.candidate_counts(str(counts), 10, np.random.default_rng(0))


def test_the_stand_in_batches_only_requests_of_one_bucket(tmp_path, start_server):
    """Sent together, requests of one bucket share executions and requests of alternating buckets do not: the
    batching rule of the TensorRT and ONNX Runtime backends (no ragged batching), which the study relies on."""
    import tritonclient.http as http

    bucket_batching.write_model(tmp_path / "repo", exec_us=4000, candidate_us=0.0, scale=10)  # 40 ms per execution
    server = start_server(tmp_path / "repo", reuse=False)
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{bucket_batching.MODEL}/config") as r:
        config = json.loads(r.read())
    from seqrank.exporting import triton_config
    gpu = triton_config.load(bucket_batching.GPU_CONFIG)
    assert config["max_batch_size"] == gpu.max_batch_size
    assert config["dynamic_batching"]["preferred_batch_size"] == list(gpu.dynamic_batching.preferred_batch_size)
    assert not config["input"][0].get("allow_ragged_batch", False)

    def stats():
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{bucket_batching.MODEL}/stats") as r:
            s = json.loads(r.read())["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])

    def send(widths):
        def one(width):
            with http.InferenceServerClient(server.http_url) as client:
                x = http.InferInput("cand_item", [1, width], "INT64")
                x.set_data_from_numpy(np.zeros((1, width), dtype=np.int64))
                return client.infer(bucket_batching.MODEL, [x]).as_numpy("probs").shape
        before = stats()
        with ThreadPoolExecutor(len(widths)) as pool:
            futures = []
            for width in widths:  # 5 ms apart: they queue in this order behind 40 ms executions
                futures.append(pool.submit(one, width))
                time.sleep(0.005)
            shapes = [f.result() for f in futures]
        after = stats()
        assert shapes == [(1, w) for w in widths]
        return after[0] - before[0], after[1] - before[1]

    requests, executions = send([16] * 24)
    assert requests == 24 and executions <= 8           # one bucket: requests share executions
    requests, executions = send([16, 256] * 12)
    assert requests == 24 and executions >= 22          # alternating buckets: one execution per request
