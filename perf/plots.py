"""The bench's figures: throughput at each p99 budget per system (with its interval over repeats), the freshness CDF,
each target's measured / target."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from measure import BUDGET_SYSTEMS
from report import TARGETS

COLORS = {"ensemble": "tab:green", "ranker": "k", "naive": "tab:blue", "untuned": "tab:red"}


def _save(fig, path: Path, files: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    files.append(str(path))


def plots(summary: dict, outdir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files: list[str] = []
    details = summary["details"]
    for rset, per_system in details["budget_throughput"].items():
        budgets = sorted({b for per in per_system.values() for b in per})
        names = [name for name, *_ in BUDGET_SYSTEMS if per_system.get(name)]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            xs, med, lo, hi = [], [], [], []
            for i, b in enumerate(budgets):
                t = per_system[name].get(b)
                if t and t["n"]:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    med.append(t["median"])
                    lo.append(t["median"] - t["min"])
                    hi.append(t["max"] - t["median"])
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, color=COLORS.get(name, "tab:purple"), label=name)
        ax.set_xticks(range(len(budgets)))
        ax.set_xticklabels([f"p99 <= {b} ms" for b in budgets])
        ax.set_ylabel("throughput (requests/s), median and range")
        ax.set_title(f"{rset}: throughput within each p99 budget (perf_analyzer binary search)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        _save(fig, outdir / f"budgets_{rset}.png", files)
        plt.close(fig)
    fr = details.get("freshness", {}).get("samples_ms")
    if fr:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = np.sort(fr)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
        ax.set_xscale("log")
        ax.set_xlabel("append -> visible in an ensemble ranking (ms)")
        ax.set_ylabel("CDF")
        ax.set_title("feature-store freshness through the ensemble (Redis)")
        ax.grid(alpha=0.3)
        _save(fig, outdir / "freshness_cdf.png", files)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    vals, cols, labels = [], [], []
    for key in TARGETS:
        t = summary["targets"][key]
        v, target = t["value"], t["target"]
        ok = isinstance(v, (int, float)) and math.isfinite(v) and v > 0 and math.isfinite(target)
        vals.append((v / target if t["op"] == ">=" else target / v) if ok else 0.0)
        cols.append("tab:green" if t["met"] else "tab:red")
        labels.append(key.replace("_throughput", "").replace("_", "\n"))
    ax.bar(range(len(vals)), vals, color=cols)
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("measured / target (>= 1 is met; 0: not measurable)")
    ax.set_title("targets on this machine")
    _save(fig, outdir / "targets.png", files)
    plt.close(fig)
    return files
