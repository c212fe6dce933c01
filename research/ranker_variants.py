"""Which ranker setting wins on the validation split? Trains each variant with several seeds on a validation run
(`--set data.split=validation`, so the test period is never read) and prints, per head, its AUC and GAUC
(mean +- sd over seeds) and each variant minus the first with a 95% interval over users and seeds. Each request
is scored as `seqrank evaluate` scores it: with the item rows the daily refresh learned before it.

    seqrank train --events data/kuairand/events.tsv.gz --out runs/val --set data.split=validation
    python research/ranker_variants.py --run runs/val --seeds 0,1,2,3,4 \
        '{"time_window_max_h": 0}' '{"time_window_max_h": 1}' '{"time_window_max_h": 24}'

A variant is a JSON object of TransActConfig fields, plus an optional "encoder" (transact | avg_pool | no_sequence).
Models are kept under RUN/variants/ (a re-run only scores them); the table also goes to RUN/variants/summary.json
(with `--store-down`: every request scored as in a feature-store outage, to RUN/variants/store_down.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from seqrank import metrics as M
from seqrank.pipeline import fit_ranker, load_ranker_examples
from seqrank.daily_items import RefreshedTest, replay_refreshes


def variant_ranker(run: Path, cfg, prep, table, data, spec: str, seed: int):
    """The ranker of one variant (a JSON object of TransActConfig fields, plus an optional "encoder") and seed, kept
    under RUN/variants/ by the spec's digest: trained once, then reused (also by research/within_user.py)."""
    fields = json.loads(spec)
    encoder = fields.pop("encoder", "transact")
    key = hashlib.sha1(spec.encode()).hexdigest()[:10]
    variant = replace(cfg, seed=seed, transact=replace(cfg.transact, **fields))
    return fit_ranker(run, variant, prep, table, data, encoder, run / "variants" / f"{key}_seed{seed}.safetensors",
                      tag=f"_{key}_seed{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a run trained with data.split validation")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--refreshes", type=int, default=8, help="as seqrank evaluate --refreshes: score each "
                        "request with the item rows the daily refresh learned before it (0: the training vocabulary)")
    parser.add_argument("--store-down", action="store_true", help="score every request as during a feature-store "
                        "outage (RefreshedTest.store_down) instead of as served")
    parser.add_argument("variants", nargs="+", help="JSON objects of TransActConfig fields (+ encoder)")
    args = parser.parse_args()
    cfg, _, prep, table, data = load_ranker_examples(args.run)
    if cfg.data.split != "validation":
        raise SystemExit(f"{args.run} was trained on the test split; choices are made on data.split validation")
    seeds = [int(s) for s in args.seeds.split(",")]
    heads, ex = prep.vocab.heads, data.test
    served = RefreshedTest(cfg, prep, prep.test_rows(), replay_refreshes(args.run, prep, prep.test_rows(),
                                                                         args.refreshes))
    served = served.store_down() if args.store_down else served
    scores = {}
    for spec in args.variants:
        scores[spec] = []
        for seed in seeds:
            model = variant_ranker(args.run, cfg, prep, table, data, spec, seed)
            scores[spec].append(served.predict(model))
    first = args.variants[0]
    summary = {"seeds": seeds, "heads": heads, "variants": {}}
    for spec, per_seed in scores.items():
        row = {}
        for j, h in enumerate(heads):
            aucs = [M.auc(ex.labels[:, j], p[:, j]) for p in per_seed]
            gaucs = [M.gauc(ex.labels[:, j], p[:, j], ex.user) for p in per_seed]
            row[h] = {"auc": [float(np.mean(aucs)), float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0],
                      "gauc": [float(np.mean(gaucs)), float(np.std(gaucs, ddof=1)) if len(gaucs) > 1 else 0.0]}
            if spec != first:
                for m, fn in (("auc", M.auc_difference_ci), ("gauc", M.gauc_difference_ci)):
                    d = fn(ex.labels[:, j], [p[:, j] for p in per_seed], [p[:, j] for p in scores[first]], ex.user,
                           n_boot=500)
                    row[h][f"{m}_minus_first"] = [d["value"], *(d["ci"] or [None, None])]
        summary["variants"][spec] = row
    (args.run / "variants").mkdir(exist_ok=True)
    summary["scored"] = "store down" if args.store_down else "as served"
    (args.run / "variants" / ("store_down.json" if args.store_down else "summary.json")).write_text(
        json.dumps(summary, indent=2))
    for m in ("auc", "gauc"):
        print(f"\n{m.upper()} on the validation slice ({summary['scored']}), mean +- sd over seeds {seeds}; "
              f"minus {first} [95%]")
        for spec, row in summary["variants"].items():
            mean = np.mean([row[h][m][0] for h in heads])
            print(f"{spec:<50} mean over heads {mean:.4f}")
            for h in heads:
                cell = row[h][m]
                diff = row[h].get(f"{m}_minus_first")
                extra = f"  {diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]" if diff and diff[1] is not None else ""
                print(f"    {h:<14} {cell[0]:.4f} +- {cell[1]:.4f}{extra}")


if __name__ == "__main__":
    main()
