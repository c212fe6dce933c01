"""Interleaved A/B of CPU ranker layouts through the real server: the evidence behind configs/cpu.pbtxt.

    .venv/bin/python research/ab_layouts.py --run runs/demo --out /tmp/layout_ab    # ~10 minutes on 2 cores

Each layout is a copy of RUN/model_repository with the CPU ranker's parameters, instance count and the queue delay
of every CPU model overridden (layout M also the preprocess/postprocess instance counts; `--layouts C0,M` runs only
those two); all servers run at once and every (concurrency, layout, request) point is measured before the next
concurrency starts, twice over, so background load drifts over all layouts alike. Requests are the
bench's fixed 1 x 100 and 1 x 16 with their actions in the request (no store needed). Writes ab.json and ab.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))  # perf's modules
import make_inputs  # noqa: E402
from load import pa_point  # noqa: E402
from settings import Settings  # noqa: E402
from systems import ranker_variant_copy, start_triton  # noqa: E402
from seqrank.exporting import triton_config  # noqa: E402

# name -> (ranker parameters, ranker instances, max_queue_delay_microseconds of every CPU model or None = as exported,
#          preprocess/postprocess instances or None = as exported)
LAYOUTS = {
    "A: 1 single-threaded run per instance, 2 instances, delay 1000/200 us":
        ({"intra_op_threads": 1, "run_threads": 1}, 2, None, None),
    "B: 1 instance x run_threads 2": ({"intra_op_threads": 1, "run_threads": 2}, 1, None, None),
    "C: 2 instances x run_threads 2": ({"intra_op_threads": 1, "run_threads": 2}, 2, None, None),
    "C0: C with max_queue_delay 0 (shipped)": ({"intra_op_threads": 1, "run_threads": 2}, 2, 0, None),
    # model_analyzer's per-model picks (perf/results/model_analyzer): C0 with 2 preprocess and 2 postprocess instances
    "M: C0 with 2 preprocess + 2 postprocess instances": ({"intra_op_threads": 1, "run_threads": 2}, 2, 0, 2),
}
DELAYS_BEFORE = {"ranker": 1000, "preprocess": 200, "postprocess": 200}  # the values A, B and C were measured with


def layout_copy(src: Path, dst: Path, params: dict, instances: int, delay: int | None,
                cpu_instances: int | None = None) -> None:
    ranker_variant_copy(src, dst, params, instances)
    for model, before in DELAYS_BEFORE.items():
        path = dst / model / ("configs/cpu.pbtxt" if model == "ranker" else "config.pbtxt")

        def layout(config, model=model, before=before, path=path) -> None:
            config.dynamic_batching.max_queue_delay_microseconds = before if delay is None else delay
            if model != "ranker" and cpu_instances is not None:
                triton_config.set_instance_count(config, cpu_instances, path)
        triton_config.edit(path, layout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("perf/results/layout_ab"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrencies", default="1,2,4,8")
    ap.add_argument("--layouts", default=",".join(name.split(":")[0] for name in LAYOUTS),
                    help="which layouts, by the label before the colon (default: all)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="seqrank-ab-"))
    make_inputs.write_inputs(args.run, work / "inputs", None, 16)
    data = {r: work / "inputs" / f"fixed_{r}_actions.json" for r in ("1x100", "1x16")}
    st = Settings(False, pa_window_ms=2000)
    chosen = args.layouts.split(",")
    layouts = {name: spec for name, spec in LAYOUTS.items() if name.split(":")[0] in chosen}
    if len(layouts) != len(chosen):
        ap.error(f"--layouts: unknown label in {args.layouts!r}; known: {[n.split(':')[0] for n in LAYOUTS]}")
    servers, rows = {}, []
    try:
        for i, (name, spec) in enumerate(layouts.items()):
            layout_copy(args.run / "model_repository", work / f"layout{i}", *spec)
            servers[name] = start_triton(work / f"layout{i}", None, work / f"layout{i}.log")
        for srv in servers.values():  # warm every system once
            for f in data.values():
                pa_point(srv.http_url, "seqrank", f, work / "warm.csv", Settings(True, pa_window_ms=300))
        for rnd in range(args.rounds):
            for c in (int(x) for x in args.concurrencies.split(",")):
                for name, srv in servers.items():
                    for r, f in data.items():
                        p = pa_point(srv.http_url, "seqrank", f, work / "pa.csv", st, concurrency=c)
                        rows.append({"round": rnd, "concurrency": c, "layout": name, "request": r,
                                     **{k: p.get(k) for k in ("throughput", "p50_ms", "p99_ms")}})
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    (args.out / "ab.json").write_text(json.dumps(rows, indent=1))
    md = []
    for r in data:
        md += [f"### 1 x {r.split('x')[1]}: throughput req/s (p99 ms), one cell per round", "",
               "| concurrency | " + " | ".join(layouts) + " |", "|---" * (len(layouts) + 1) + "|"]
        for c in sorted({row["concurrency"] for row in rows}):
            cells = [" / ".join(f"{x['throughput']:.1f} ({x['p99_ms']:.0f})" for x in rows
                                if x["layout"] == name and x["request"] == r and x["concurrency"] == c)
                     for name in layouts]
            md.append(f"| {c} | " + " | ".join(cells) + " |")
        md.append("")
    (args.out / "ab.md").write_text("\n".join(md))
    print(f"wrote {args.out}/ab.json and ab.md")


if __name__ == "__main__":
    main()
