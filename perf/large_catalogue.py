"""What a large item catalogue costs: the export of a table past ONNX's 2 GB protobuf limit, and the CPU ranker's
memory with the table inside the graph against the table in external data (seqrank/exporting/onnx_files.py). The numbers in
docs/deployment.md ("Large catalogues") come from these two commands:

    python perf/large_catalogue.py export --rows 8500000               # 2.03 GiB table: time, peak RAM, file sizes
    python perf/large_catalogue.py memory --rows 2000000 --count 4  # 488 MiB table: RSS per ONNX Runtime session

The ranker is a small random TransAct ranker (one head, as shipped) around a random ROWS x 64 fp32 item table; the
table, not the transformer, is what these measure. tests/test_large_catalogue.py builds its >2 GiB ranker here.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TABLE_DIM = 64  # PinnerFormer's item embedding size (seqrank/config.py)
N_ACTIONS, USER_DIM, N_CONTEXT, SEQ_LEN = 6, 6, 4, 7  # the random ranker's other inputs: small, they do not matter


def random_table(rows: int, seed: int = 0) -> np.ndarray:
    """rows x 64 fp32, every row different (column 0 = row / rows): a random block tiled, since drawing 544M
    random numbers costs 10-30 s on a 2-core machine."""
    block = np.random.default_rng(seed).standard_normal((4096, TABLE_DIM), dtype=np.float32)
    table = np.empty((rows, TABLE_DIM), dtype=np.float32)
    for start in range(0, rows, len(block)):
        table[start:start + len(block)] = block[:rows - start]
    table[:, 0] = np.arange(rows, dtype=np.float32) / rows
    return table


def random_ranker(rows: int):
    """A small TransAct ranker (one head, the raw sequence mean, as shipped) around random_table(rows)."""
    import torch

    from seqrank.config import TransActConfig
    from seqrank.models.transact import TransActRanker
    torch.manual_seed(0)
    cfg = TransActConfig(action_dim=4, item_dim=6, n_layers=2, n_heads=1, d_ff=12, top_k_rows=3, cross_layers=2,
                         cross_rank=4, mlp=[16, 8], seq_len=SEQ_LEN, sequence_mean=True)
    return TransActRanker(cfg, random_table(rows), N_ACTIONS, USER_DIM, N_CONTEXT, n_heads=3).eval()


def _peak_mib() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not start from the parent's at fork)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) // 1024


def export(rows: int, out: Path, threshold: int | None = None) -> dict:
    """Export the portable graph and the CPU graph of random_ranker(rows) into ``out``: seconds, peak RAM, sizes."""
    from seqrank.exporting import export_cpu_graph, export_ranker_onnx
    from seqrank.exporting.onnx_files import EXTERNAL_DATA_THRESHOLD
    from seqrank.serving.cpu_graph import CPU_ONNX

    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    t0 = time.perf_counter()
    model = random_ranker(rows)
    report = {"rows": rows, "table_gib": model.item_table.numel() * 4 / 2 ** 30, "threshold_bytes": threshold}
    t1 = time.perf_counter()
    portable = export_ranker_onnx(model, out / "model.onnx", threshold)
    t2 = time.perf_counter()
    fused, branch = export_cpu_graph(model, portable, out / CPU_ONNX, threshold)
    t3 = time.perf_counter()
    report |= {"build_s": round(t1 - t0, 1), "portable_export_s": round(t2 - t1, 1), "cpu_graph_s": round(t3 - t2, 1),
               "fused_skip_layernorm": fused, "full_history_branch": branch, "peak_rss_mib": _peak_mib(),
               "files": {f.name: f.stat().st_size for f in sorted(out.iterdir())}}
    return report


def _smaps() -> dict[str, int]:
    """This process's memory in MiB: resident, proportional (shared pages split between their users), anonymous."""
    keys = {"Rss", "Pss", "Anonymous"}
    with open("/proc/self/smaps_rollup") as fh:
        fields = (line.split() for line in fh)
        return {p[0].rstrip(":"): int(p[1]) // 1024 for p in fields if p[0].rstrip(":") in keys}


def open_sessions(model: Path, sessions: int) -> list[dict]:
    """Open ``sessions`` ONNX Runtime CPU sessions of ``model`` one after the other, as the CPU ranker's stubs do
    (single-threaded, ORT_ENABLE_ALL), and score one request on each: seconds and memory after each."""
    import onnx
    import onnxruntime as ort
    rows = next(i.dims[0] for i in onnx.load(str(model), load_external_data=False).graph.initializer
                if list(i.dims[1:]) == [TABLE_DIM])
    rng = np.random.default_rng(0)
    feeds = {"seq_item": rng.integers(1, rows, (1, SEQ_LEN)), "seq_action": rng.integers(1, N_ACTIONS, (1, SEQ_LEN)),
             "seq_mask": np.ones((1, SEQ_LEN), dtype=bool), "cand_item": rng.integers(1, rows, (1, 100)),
             "user_emb": rng.standard_normal((1, USER_DIM), dtype=np.float32),
             "context": rng.standard_normal((1, N_CONTEXT), dtype=np.float32)}
    opened, out = [], [{"sessions": 0, **_smaps()}]
    for k in range(sessions):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t = time.perf_counter()
        opened.append(ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]))
        load_s = time.perf_counter() - t
        opened[-1].run(None, feeds)
        out.append({"sessions": k + 1, "load_s": round(load_s, 2), **_smaps(), "peak_mib": _peak_mib()})
    return out


def sessions(rows: int, n: int) -> dict:
    """The CPU graph of random_ranker(rows) exported twice, the table inside the protobuf and in external data;
    each opened ``n`` times in a fresh process."""
    from seqrank.serving.cpu_graph import CPU_ONNX
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout, threshold in (("inside the protobuf", 1 << 62), ("external data", None)):
            out = Path(tmp) / layout.replace(" ", "_")
            out.mkdir()
            exported = export(rows, out, threshold)
            child = subprocess.run([sys.executable, __file__, "open", str(out / CPU_ONNX), "--count", str(n)],
                                   capture_output=True, text=True, check=True)
            report[layout] = {"files": exported["files"], "sessions": json.loads(child.stdout)}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="export a random ranker with ROWS items: time, peak RAM, file sizes")
    e.add_argument("--rows", type=int, default=8_500_000)
    s = sub.add_parser("memory", help="RSS per ONNX Runtime session: table inside the protobuf vs external data")
    s.add_argument("--rows", type=int, default=2_000_000)
    s.add_argument("--count", type=int, default=4, help="ONNX Runtime sessions to open")
    o = sub.add_parser("open")  # the child process of `memory`
    o.add_argument("model", type=Path)
    o.add_argument("--count", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "export":
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(export(args.rows, Path(tmp)), indent=1))
    elif args.command == "memory":
        print(json.dumps(sessions(args.rows, args.count), indent=1))
    else:
        print(json.dumps(open_sessions(args.model, args.count)))


if __name__ == "__main__":
    main()
