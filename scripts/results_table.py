"""Write the results tables and plot from evaluated runs: the block between `<!-- RESULTS:BEGIN -->` and
`<!-- RESULTS:END -->` in README.md (short) and docs/results.md (full), and docs/img/results.png.

    python scripts/results_table.py --run KuaiRand=runs/kuairand --run MovieLens-100K=runs/movielens

Every number comes from RUN/metrics.json and RUN/run.json; `make results` runs this last.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("no_sequence", "avg_pool")
METRICS = (("auc", "AUC"), ("gauc", "GAUC"), ("moment_gauc", "moment GAUC"))


def load(run: Path) -> tuple[dict, dict]:
    return json.loads((run / "metrics.json").read_text()), json.loads((run / "run.json").read_text())


def diff(entry: dict, digits: int = 3) -> str:
    if entry["ci"] is None:
        return "n/a"
    lo, hi = entry["ci"]
    mark = "**" if lo > 0 or hi < 0 else ""
    return f"{mark}{entry['value']:+.{digits}f}{mark} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def mean_sd(entry: dict, digits: int = 3) -> str:
    sd = entry["sd"]
    return f"{entry['mean']:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{entry['mean']:.{digits}f}"


def lift(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    sd = entry["sd"]
    return f"{entry['mean']:+.1%}" + (f" ± {sd:.1%}" if sd is not None else "")


def verdict_line(m: dict) -> str:
    v = m["verdict"]
    counted = v["counted_heads"]
    parts = []
    for base, name in (("no_sequence", "no-sequence"), ("avg_pool", "average pooling")):
        for metric, label in METRICS:
            above = [h for h in counted if v[base][h][metric] == "above"]
            below = [h for h in counted if v[base][h][metric] == "below"]
            parts.append(f"above {name} by {label} on {len(above)} of "
                         f"{len(counted)}" + (f" (below on {', '.join(below)})" if below else ""))
    twice = ", ".join(f"{b} = 1 - {a}" for b, a in v["complement_of"].items())
    return (f"Heads counted (>= {v['min_positives']} test positives, one per complement pair"
            + (f": {twice}" if twice else "") + f"): {', '.join(counted)}. TransAct is, at 95%, "
            + "; ".join(parts) + ".")


def full_table(name: str, m: dict, info: dict) -> str:
    seeds = m["ranker_seeds"]["seeds"]
    sm, u, d = m["ranker_seeds"], m["uncertainty"], m["data"]
    heads = list(m["ranker"]["transact"])
    lines = [f"### {name}", "",
             f"{d['test_users']} test users, {d['test_requests']} requests, {d['test_impressions']} impressions; "
             f"seeds {', '.join(map(str, seeds))}; best epoch per seed (TransAct): "
             f"{sm['selected_epoch']['transact']}; {training(info)}.", "",
             "| head | test pos. | AUC TransAct | no sequence | avg-pool | TransAct − no seq. | TransAct − avg-pool |"
             " GAUC TransAct | GAUC − no seq. | GAUC − avg-pool |",
             "|---|---:|---|---|---|---|---|---|---|---|"]
    complement = m["verdict"]["complement_of"]
    for h in heads:
        label = f"{h} (= 1 − {complement[h]})" if h in complement else h
        lines.append(f"| {label} | {d['test_positives'][h]} | {mean_sd(sm['transact'][h]['auc'])} | "
                     f"{mean_sd(sm['no_sequence'][h]['auc'])} | {mean_sd(sm['avg_pool'][h]['auc'])} | "
                     f"{diff(u['auc_difference']['no_sequence'][h])} | {diff(u['auc_difference']['avg_pool'][h])} | "
                     f"{mean_sd(sm['transact'][h]['gauc'])} | {diff(u['gauc_difference']['no_sequence'][h])} | "
                     f"{diff(u['gauc_difference']['avg_pool'][h])} |")
    known = u.get("gauc_difference_by_candidate")
    if known:
        cells = "; ".join(f"{h} vs no seq. {diff(known['no_sequence']['in_vocabulary'][h])}, vs avg-pool "
                          f"{diff(known['avg_pool']['in_vocabulary'][h])}" for h in m["verdict"]["counted_heads"])
        lines += ["", f"GAUC of TransAct minus each baseline on the candidates in the vocabulary that served them "
                      f"only ({d['item_refresh']['test_candidates_in_vocabulary']:.0%} of test impressions): {cells}."]
    lines += ["", f"Moment GAUC: at each request of a user-day group, the group's impressions from that request on "
                  f"ranked with its features ({d['moments']} moments, {d['moment_pairs']} pairs; what one ranking "
                  f"orders, without the user's estimate moving over time):", "",
              "| head | moment GAUC TransAct | no sequence | avg-pool | TransAct − no seq. | TransAct − avg-pool |",
              "|---|---|---|---|---|---|"]
    for h in heads:
        lines.append(f"| {h} | " + " | ".join(mean_sd(sm[e][h]["moment_gauc"]) for e in ("transact", *BASELINES))
                     + " | " + " | ".join(diff(u["moment_gauc_difference"][b][h]) for b in BASELINES) + " |")
    refresh = d["item_refresh"]
    lines += ["", f"Item rows: {len(refresh['refresh_times_ms'])} daily refreshes replayed over the test period "
                  f"({sum(refresh['new_items_per_refresh'])} items added); test candidates in the vocabulary "
                  f"that served them: {refresh['test_candidates_in_vocabulary']:.0%} (training vocabulary alone: "
                  f"{d['test_candidates_seen_in_training']:.0%} seen in training)."]
    lines += ["", verdict_line(m), "",
              "| head | HIT@3 TransAct | no sequence | avg-pool | lift vs no seq. (per seed) | 95% (users × seeds) |"
              " reachable lift |", "|---|---|---|---|---|---|---|"]
    for h in heads:
        l95 = u["hit@3_lift"]["no_sequence"][h]
        ci = f"[{l95['ci'][0]:+.1%}, {l95['ci'][1]:+.1%}]" if l95["ci"] else "n/a"
        lines.append(f"| {h} | {mean_sd(sm['transact'][h]['hit@3'])} | {mean_sd(sm['no_sequence'][h]['hit@3'])} | "
                     f"{mean_sd(sm['avg_pool'][h]['hit@3'])} | "
                     f"{lift(m['lifts_of_transact']['no_sequence'][h]['hit@3_lift_per_seed'])} | {ci} | "
                     f"{m['hit@3_bounds'][h]['reachable_lift_over_no_sequence']:+.1%} |")
    lines += ["", seed_spread_line(m), "", user_model_line(m)]
    if m.get("warnings"):
        lines += ["", "Warnings: " + "; ".join(m["warnings"]) + "."]
    return "\n".join(lines)


def sd_ratio_interval(ratio: float, n_a: int, n_b: int, level: float = 0.95) -> tuple[float, float]:
    """The interval of a ratio of two seed sds measured over n_a and n_b seeds, for normally spread seed outcomes:
    the observed squared ratio is the true one times an F(n_a - 1, n_b - 1) draw (quantiles by a fixed Monte Carlo
    stream: no scipy)."""
    rng = np.random.default_rng(0)
    f = (rng.chisquare(n_a - 1, 400_000) / (n_a - 1)) / (rng.chisquare(n_b - 1, 400_000) / (n_b - 1))
    lo, hi = np.quantile(f, [(1 - level) / 2, (1 + level) / 2])
    return ratio / float(np.sqrt(hi)), ratio / float(np.sqrt(lo))


def seed_spread_line(m: dict) -> str:
    """TransAct's seed sd of the AUC against the larger of the baselines' on each head (target: at most 1.5x), with
    the interval a few seeds allow."""
    sm = m["ranker_seeds"]
    ratios = {}
    for h in m["ranker"]["transact"]:
        base = max((sm[b][h]["auc"]["sd"] or 0.0) for b in BASELINES)
        own = sm["transact"][h]["auc"]["sd"]
        if own is not None and base > 0:
            ratios[h] = own / base
    if not ratios:
        return "Seed spread: one seed, not measured."
    n = len(next(iter(sm["transact"].values()))["auc"]["values"])
    cis = {h: sd_ratio_interval(r, n, n) for h, r in ratios.items()}
    over = [f"{h} {r:.1f}x [{cis[h][0]:.1f}, {cis[h][1]:.1f}]" for h, r in ratios.items() if r > 1.5]
    surely = [h for h in ratios if cis[h][0] > 1.5]
    width = sd_ratio_interval(1.0, n, n)[1]  # the factor either way, the same for every head
    return (f"Seed spread of the AUC, TransAct's sd over the larger baseline sd: at most {max(ratios.values()):.1f}x"
            + (f"; above 1.5x on {', '.join(over)}" if over else " (within 1.5x on every head)")
            + f". With {n} seeds per model an sd ratio is known only within a factor of {width:.1f} either way "
            + f"(95%, F({n - 1}, {n - 1})); "
            + (f"above 1.5x at 95% on {', '.join(surely)}." if surely else "above 1.5x at 95% on no head."))


def training(info: dict) -> str:
    if info.get("pinnerformer_reused"):
        return f"{info['train_seconds']:.0f} s (ranker; PinnerFormer reused)"
    return f"{info['train_seconds']:.0f} s (both models)"


def user_model_line(m: dict) -> str:
    out = []
    for part in (m["user_model"], m["user_model"].get("folds")):
        if part is None:
            continue
        ci = part.get("dense_vs_next_ratio_ci")
        where = f"{part['k']} user folds" if "k" in part else "the held-out users"
        out.append(f"dense all-action / next-action Recall@10 = {part['dense_vs_next_ratio']:.2f}x"
                   + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                   + f" over {part['dense_all_action']['users']} users ({where}; "
                   f"{part['dense_all_action']['recall@10']:.4f} vs {part['next_action']['recall@10']:.4f})")
    return "PinnerFormer: " + "; ".join(out) + "."


def short_table(runs: list[tuple[str, dict, dict]], command: str) -> str:
    lines = ["| data | counted heads | TransAct above no-sequence (AUC / GAUC / moment GAUC) | above avg-pool (same) |"
             " dense / next Recall@10 | training |", "|---|---:|---|---|---|---:|"]
    for name, m, info in runs:
        v = m["verdict"]
        n = len(v["counted_heads"])

        def count(base):
            return " / ".join(f"{sum(v[base][h][k] == 'above' for h in v['counted_heads'])} of {n}"
                              for k, _ in METRICS)
        um = m["user_model"].get("folds") or m["user_model"]
        ci = um.get("dense_vs_next_ratio_ci")
        lines.append(f"| {name} | {n} | {count('no_sequence')} | {count('avg_pool')} | "
                     f"{um['dense_vs_next_ratio']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                     + f" | {training(info)} |")
    lines += ["", f"Reproduce: `{command}`. Per head, with intervals, HIT@3 and what bounds each miss: "
              "[docs/results.md](docs/results.md)."]
    return "\n".join(lines)


def plot(runs: list[tuple[str, dict, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.6), squeeze=False)
    for ax, (name, m, _) in zip(axes[0], runs):
        heads = list(m["ranker"]["transact"])
        for k, (base, color) in enumerate((("no_sequence", "tab:blue"), ("avg_pool", "tab:orange"))):
            e = m["uncertainty"]["auc_difference"][base]
            ys = [e[h]["value"] if e[h]["ci"] else float("nan") for h in heads]
            lo = [e[h]["value"] - e[h]["ci"][0] if e[h]["ci"] else 0 for h in heads]
            hi = [e[h]["ci"][1] - e[h]["value"] if e[h]["ci"] else 0 for h in heads]
            xs = [i + (k - 0.5) * 0.3 for i in range(len(heads))]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, capsize=3,
                        label=f"TransAct − {base.replace('_', ' ')}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(heads)), heads, rotation=30, ha="right")
        ax.set_ylabel("AUC difference (95%: users × seeds)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def replace_block(path: Path, text: str) -> None:
    old = path.read_text()
    new, n = re.subn(r"(<!-- RESULTS:BEGIN -->\n).*?(\n<!-- RESULTS:END -->)",
                     lambda mt: mt.group(1) + text + mt.group(2), old, flags=re.S)
    if n != 1:
        raise SystemExit(f"{path}: expected one RESULTS:BEGIN/END block, found {n}")
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN")
    parser.add_argument("--command", default="make results` and `make results-movielens",
                        help="the command(s) named under the README table")
    args = parser.parse_args()
    runs = []
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs.append((name, *load(Path(path))))
    replace_block(REPO / "README.md", short_table(runs, args.command))
    replace_block(REPO / "docs" / "results.md", "\n\n".join(full_table(*r) for r in runs))
    plot(runs, REPO / "docs" / "img" / "results.png")
    print("wrote README.md, docs/results.md and docs/img/results.png")


if __name__ == "__main__":
    main()
