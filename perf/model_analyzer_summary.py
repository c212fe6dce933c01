"""Summarise a model_analyzer profile (perf/model_analyzer.yaml) as Markdown: every measured configuration of each
model with its instance count and queue delay, and the one model_analyzer ranks first.

    .venv/bin/python perf/model_analyzer_summary.py perf/results/model_analyzer    # -> summary.md there

Reads EXPORT/results/metrics-model-inference.csv and EXPORT/output_models/<config>/config.pbtxt. model_analyzer
writes protobuf text without default values, so a dynamic_batching block with no max_queue_delay_microseconds
means 0 (batch only what queued while the instance was busy).
"""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path


def config_knobs(config: Path) -> dict:
    text = config.read_text()
    delay = re.search(r"max_queue_delay_microseconds:\s*(\d+)", text)
    count = re.search(r"instance_group\s*{[^}]*count:\s*(\d+)", text) or re.search(r"count:\s*(\d+)", text)
    return {"instances": int(count.group(1)) if count else 1,
            "queue_delay_us": (int(delay.group(1)) if delay else 0) if "dynamic_batching" in text else None}


def summarize(export: Path, p99_max_ms: float = 500.0) -> str:
    rows = list(csv.DictReader((export / "results" / "metrics-model-inference.csv").open()))
    if not rows:
        raise ValueError(f"{export}: metrics-model-inference.csv has no rows")
    lines = [f"# model_analyzer profile ({export})", "",
             f"Objective: throughput; constraint: p99 <= {p99_max_ms:g} ms. `default` is the repository's config as "
             "shipped (configs/cpu.pbtxt promoted by perf/prepare_model_analyzer.py).", ""]
    for model in sorted({r["Model"] for r in rows}):
        mine = [r for r in rows if r["Model"] == model]
        configs = sorted({r["Model Config Path"] for r in mine}, key=lambda c: (not c.endswith("default"), c))
        knobs = {c: config_knobs(export / "output_models" / c / "config.pbtxt") for c in configs}
        concurrencies = sorted({int(r["Concurrency"]) for r in mine})
        cell = {(r["Model Config Path"], int(r["Concurrency"])): r for r in mine}
        best = max((r for r in mine if float(r["p99 Latency (ms)"]) <= p99_max_ms),
                   key=lambda r: float(r["Throughput (infer/sec)"]), default=None)
        lines += [f"## {model}", "", "| config | instances | queue delay (us) | "
                  + " | ".join(f"c={c}: req/s (p99 ms)" for c in concurrencies) + " |",
                  "|---" * (3 + len(concurrencies)) + "|"]
        for c in configs:
            k = knobs[c]
            vals = [cell.get((c, n)) for n in concurrencies]
            lines.append(f"| {c.removeprefix(model + '_')} | {k['instances']} | "
                         f"{'off' if k['queue_delay_us'] is None else k['queue_delay_us']} | "
                         + " | ".join(f"{float(v['Throughput (infer/sec)']):.1f} ({float(v['p99 Latency (ms)']):.1f})"
                                      if v else "-" for v in vals) + " |")
        if best:
            k = knobs[best["Model Config Path"]]
            lines += ["", f"Best: **{best['Model Config Path']}** ({k['instances']} instance(s), queue delay "
                      f"{k['queue_delay_us']} us): {float(best['Throughput (infer/sec)']):.1f} req/s at concurrency "
                      f"{best['Concurrency']}, p99 {float(best['p99 Latency (ms)']):.1f} ms."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path, help="model_analyzer's export_path")
    ap.add_argument("--p99-max-ms", type=float, default=500.0)
    args = ap.parse_args()
    (args.export / "summary.md").write_text(summarize(args.export, args.p99_max_ms))
    print(f"wrote {args.export / 'summary.md'}")


if __name__ == "__main__":
    main()
