"""Large item catalogues (seqrank/exporting/onnx_files.py): weights of at least the threshold, the item table above all, go to
ONNX external data beside each graph, so a catalogue past a protobuf's 2 GB exports. On the real tritonserver a
repository whose graphs keep the table in external data, laid out as the container entrypoint lays it out (a
symlink per file), ranks exactly as the in-protobuf export; a table past 2 GiB exports, and ONNX Runtime reads its
last rows right from both graphs."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.external_data_helper import uses_external_data

from seqrank.client import RankingClient
from seqrank.exporting import example_inputs, export_cpu_graph, export_ranker_onnx, export_run
from seqrank.models.transact import INPUT_NAMES
from seqrank.exporting.onnx_files import external_data_path
from seqrank.serving.cpu_graph import CPU_ONNX

from conftest import ENSEMBLE_MODELS
from test_deploy import run_entrypoint
from test_serving import _requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
from large_catalogue import random_ranker  # noqa: E402

PROTOBUF_LIMIT = 2 ** 31  # bytes: protobuf's hard limit on one serialized message


def _table_initializers(path, shape) -> list:
    """The initializers of the graph at ``path`` with the item table's shape, read without their data."""
    return [i for i in onnx.load(str(path), load_external_data=False).graph.initializer if list(i.dims) == list(shape)]


def test_a_ranker_with_its_table_in_external_data_serves_the_same_rankings(small_run, server, start_server, tmp_path):
    run = shutil.copytree(small_run["run"], tmp_path / "run")  # export writes RUN/export/: not the shared run's
    repo = export_run(run, tmp_path / "model_repository", external_data_threshold=1024)
    version = repo / "ranker" / "1"
    shape = np.load(run / "item_table.npy", mmap_mode="r").shape
    table_bytes = shape[0] * shape[1] * 4
    for name in ("model.onnx", CPU_ONNX):
        (table,) = _table_initializers(version / name, shape)  # once, also in the CPU graph's two branches
        assert uses_external_data(table), name
        assert (version / name).stat().st_size < table_bytes <= external_data_path(version / name).stat().st_size
    default = small_run["repo"] / "ranker" / "1"  # the default threshold keeps a small catalogue in the protobuf
    assert not list(default.glob("*.data")) and not uses_external_data(_table_initializers(default / CPU_ONNX, shape)[0])

    result, runtime = run_entrypoint(repo, tmp_path, SEQRANK_MODEL_CONFIG_NAME="cpu")
    assert result.returncode == 0, result.stderr
    assert (runtime / "ranker" / "1" / "model_cpu.onnx.data").is_symlink()
    external = start_server(runtime, env={"SEQRANK_STORE": small_run["store"]}, timeout_s=300)
    external.wait_models_ready(ENSEMBLE_MODELS, timeout_s=120)
    ev = small_run["events"]
    compared = 0
    with RankingClient(server.grpc_url, "grpc", timeout_s=60) as a, RankingClient(external.grpc_url, "grpc",
                                                                                   timeout_s=60) as b:
        for user, start, items in _requests(small_run, 6):
            mine = ev[ev.user_id == user]
            actions = list(zip(mine.item_id, mine.action, mine.timestamp.astype(int)))
            for sequence in ({}, {"actions": actions}):  # the store's sequence, then the request's own
                want = a.rank(user, items, request_time=start, **sequence)
                got = b.rank(user, items, request_time=start, **sequence)
                assert got.item_ids == want.item_ids, user
                assert [i.scores for i in got.items] == [i.scores for i in want.items], user
                compared += 1
    assert compared >= 10


LARGE_ROWS = 8_500_000  # x 64 dims x 4 bytes = 2.18 GB (2.03 GiB): no protobuf can hold the table
LARGE_RAM_GIB = 10  # the export peaks at 8.4 GiB (docs/deployment.md, "Large catalogues")


def _available_gib() -> float:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")) / 2 ** 20


@pytest.mark.large_catalogue
def test_a_table_past_the_protobuf_limit_exports_and_its_last_rows_are_read_right(tmp_path):
    available = _available_gib()
    if available < LARGE_RAM_GIB:
        reason = f"needs {LARGE_RAM_GIB} GiB of available memory, this machine has {available:.1f} GiB"
        print(f"SKIPPED test_a_table_past_the_protobuf_limit_exports_and_its_last_rows_are_read_right: {reason}")
        pytest.skip(reason)
    model = random_ranker(LARGE_ROWS)  # every row of its table differs from every other
    table = model.item_table
    assert table.numel() * 4 > PROTOBUF_LIMIT

    portable = export_ranker_onnx(model, tmp_path / "model.onnx")
    fused, branch = export_cpu_graph(model, portable, tmp_path / CPU_ONNX)
    assert fused == 4 and branch  # the CPU graph's rewrites did not lose track of the shapes
    for path in (portable, tmp_path / CPU_ONNX):
        assert path.stat().st_size < 1 << 20 and external_data_path(path).stat().st_size >= table.numel() * 4
        (stored,) = _table_initializers(path, table.shape)
        assert uses_external_data(stored)

    inputs = list(example_inputs(model, batch=2, seq_len=9, n_cand=6, seed=1))
    # the last rows, the first row stored past the 2 GiB offset, and one before it, beside random ones
    inputs[-1][:, :4] = torch.tensor([LARGE_ROWS - 1, LARGE_ROWS - 2, PROTOBUF_LIMIT // table[0].nbytes + 1, 1])
    inputs[0][0, 0] = LARGE_ROWS - 1
    with torch.no_grad():
        want = model(*inputs).numpy()
    for path in (portable, tmp_path / CPU_ONNX):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=path.name)
