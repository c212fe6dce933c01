"""Train ranker variants on an existing run (its PinnerFormer, item table and split) and print each one's test AUC
per head: how the ranker defaults of sessions 10 and 11 were chosen on the validation split (docs/results/README.md).

    python scripts/validation_split.py --events data/kuairand/events.tsv.gz --out /tmp/val/events.csv
    seqrank train --events /tmp/val/events.csv --out /tmp/val/run --negative-actions hate --config CONFIG
    python scripts/ranker_variants.py /tmp/val/run '{"sequence_mean": false, "seed": 1}' ...

Each argument is a JSON object of TransActConfig fields, plus optional "encoder" (transact | avg_pool | no_sequence)
and "seed". Nothing is written into the run directory. One JSON line per variant and seed goes to stdout;

    python scripts/ranker_variants.py --summarize LINES.jsonl ...

prints each variant's mean AUC over its seeds and, for TransAct, on how many heads it is above average pooling
trained with the same candidate_oov_rate (the README's selection tables).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path


from seqrank import metrics as M
from seqrank.pipeline import _fit_ranker, load_ranker_examples
from seqrank.train import predict


def summarize(paths: list[str]) -> None:
    runs = defaultdict(list)
    for line in (ln for path in paths for ln in Path(path).read_text().splitlines() if ln.strip()):
        row = json.loads(line)
        fields = {k: v for k, v in json.loads(row["variant"]).items() if k not in ("seed", "encoder")}
        runs[row["encoder"], json.dumps(fields, sort_keys=True)].append(row["test_auc"])
    heads = sorted({h for aucs in runs.values() for a in aucs for h in a})

    def mean(aucs):
        return {h: sum(a[h] for a in aucs) / len(aucs) for h in heads}

    print(f"{'encoder':<12} {'variant':<60} " + " ".join(f"{h[:8]:>8}" for h in heads) + "     mean seeds above")
    for (encoder, fields), aucs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = mean(aucs)
        rate = json.dumps({"candidate_oov_rate": json.loads(fields).get("candidate_oov_rate")}, sort_keys=True)
        pool = runs.get(("avg_pool", rate))
        above = sum(m[h] > mean(pool)[h] for h in heads) if pool and encoder == "transact" else "-"
        print(f"{encoder:<12} {fields:<60} " + " ".join(f"{m[h]:8.4f}" for h in heads)
              + f" {sum(m.values()) / len(heads):8.4f} {len(aucs):5d} {above:>5}")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--summarize":
        return summarize(sys.argv[2:])
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    cfg, _, prep, table, train, test = load_ranker_examples(Path(sys.argv[1]))
    with tempfile.TemporaryDirectory() as scratch:
        for i, spec in enumerate(sys.argv[2:]):
            fields = json.loads(spec)
            encoder, seed = fields.pop("encoder", "transact"), fields.pop("seed", cfg.seed)
            variant = replace(cfg, seed=seed, transact=replace(cfg.transact, **fields))
            started = time.time()
            model = _fit_ranker(Path(scratch), variant, prep, table, train, encoder,
                                Path(scratch) / f"ranker_{i}.safetensors", tag=f"_{i}")
            probs = predict(model, test)
            aucs = {h: round(M.auc(test.labels[:, j], probs[:, j]), 4) for j, h in enumerate(prep.vocab.heads)}
            print(json.dumps({"variant": spec, "encoder": encoder, "seed": seed, "test_auc": aucs,
                              "seconds": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    main()
