"""How far apart do two trainings end that differ only in rounding?

On the first --users users of the shipped sample (default config but dropout 0, ranker batches of 64,
--ranker-epochs), three rankers from the same
PinnerFormer and the same batches: one process (`seqrank train`), two processes (`torchrun --nproc-per-node 2`), and
one process again with one bias of the initial ranker scaled by 1 + 1e-7. Prints the largest weight difference of each
pair and of their test predictions. If the perturbed process lands as far from the first as the 2-process run does,
the gap between 1 and 2 processes is the training's sensitivity to rounding, not a difference in what they compute
(docs/training-at-scale.md).

    .venv/bin/python research/rounding_chaos.py --users 150 --ranker-epochs 2
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def write_slice(out: Path, users: int) -> None:
    """The sample's events of its first `users` users."""
    from seqrank.data.loaders import KUAIRAND_SAMPLE
    seen: set[str] = set()
    with gzip.open(KUAIRAND_SAMPLE, "rt") as src, gzip.open(out, "wt") as dst:
        dst.write(src.readline())
        for line in src:
            user = line.split("\t", 1)[0]
            if user in seen or len(seen) < users:
                seen.add(user)
                dst.write(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--ranker-epochs", type=int, default=2)
    args = parser.parse_args()
    from seqrank import training as T
    from seqrank.pipeline import load_ranker_examples, ranker_test_scores

    work = Path(tempfile.mkdtemp(prefix="rounding-chaos-"))
    events = work / "events.tsv.gz"
    write_slice(events, args.users)
    sets = ["--set", "threads=1", "--set", "pinnerformer.dropout=0", "--set", "transact.dropout=0",
            "--set", "transact.batch_size=64",
            "--set", "pinnerformer.epochs=2", "--set", f"transact.epochs={args.ranker_epochs}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    train = ["-m", "seqrank.cli", "train", "--events", str(events)]
    subprocess.run([sys.executable, *train, "--out", str(work / "one"), *sets], check=True, env=env)
    (work / "two").mkdir()  # the same PinnerFormer: only the ranker differs
    shutil.copy(work / "one" / "pinnerformer.safetensors", work / "two")
    subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", *train,
                    "--out", str(work / "two"), *sets], check=True, env=env)

    # the one-process ranker again, its initial head bias scaled by 1 + 1e-7
    cfg, _, prep, table, data = load_ranker_examples(work / "one")
    build = T.build_ranker

    def perturbed(*a, **kw):
        model = build(*a, **kw)
        with torch.no_grad():
            model.heads.bias.mul_(1 + 1e-7)
        return model

    T.build_ranker = perturbed
    T.seed_everything(cfg.seed, cfg.threads)
    model = T.train_ranker(prep, cfg.transact, table, cfg.pinnerformer.dim, data.train, cfg.seed,
                           work / "perturbed.pt", data.selection)
    T.build_ranker = build
    weights = {"1 process": load_file(work / "one" / "ranker.safetensors"),
               "2 processes": load_file(work / "two" / "ranker.safetensors"), "1 process, perturbed": model.state_dict()}
    probs = {"1 process": ranker_test_scores(work / "one")[0], "2 processes": ranker_test_scores(work / "two")[0],
             "1 process, perturbed": T.predict(model, data.test)}
    names = list(weights)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            w = max(float((weights[a][k] - weights[b][k]).abs().max()) for k in weights[a])
            p = float(np.abs(probs[a] - probs[b]).max())
            print(f"{a} vs {b}: weights {w:.3g}, test predictions {p:.3g} (largest absolute difference)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
