"""Train ranker variants on an existing run (its PinnerFormer, item table and split) and print each one's test AUC
per head: how the session-10 ranker default was chosen on the validation split (docs/results/README.md).

    python scripts/validation_split.py --events data/kuairand/events.tsv.gz --out /tmp/val/events.csv
    seqrank train --events /tmp/val/events.csv --out /tmp/val/run --negative-actions hate --config CONFIG
    python scripts/ranker_variants.py /tmp/val/run '{"output_gate_init": 1.0, "sequence_mean": true, "seed": 1}' ...

Each argument is a JSON object of TransActConfig fields, plus optional "encoder" (transact | avg_pool | no_sequence)
and "seed". Nothing is written into the run directory.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


from seqrank import metrics as M
from seqrank.pipeline import _fit_ranker, load_ranker_examples
from seqrank.train import predict


def main() -> None:
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
            gate = None if model.output_gate is None else round(float(model.output_gate.detach()), 4)
            print(json.dumps({"variant": spec, "encoder": encoder, "seed": seed, "test_auc": aucs, "gate": gate,
                              "seconds": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    main()
