"""How far apart do two trainings end that differ only in rounding?

On the first --users users of the shipped sample (the default config but dropout 0, ranker batches of 64 and
--ranker-epochs), three rankers trained from the same PinnerFormer on the same batches: one process with one thread,
one process with two threads (its matrix products sum in another order), and two processes with one thread each
(`torchrun --nproc-per-node 2`). Prints, for each pair, the largest difference of their weights and of their test
predictions, and each ranker's kept epoch and AUCs. If 1 and 2 threads end as far apart as 1 and 2 processes, the gap
between 1 and 2 processes is the training's sensitivity to rounding (docs/training-at-scale.md).

    .venv/bin/python research/rounding_chaos.py --users 150 --ranker-epochs 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--ranker-epochs", type=int, default=2)
    args = parser.parse_args()
    from seqrank.data.sample import write_first_users
    from seqrank.evaluation import ranker_test_scores

    work = Path(tempfile.mkdtemp(prefix="rounding-chaos-"))
    events = work / "events.tsv.gz"
    write_first_users(events, args.users)
    sets = ["--set", "pinnerformer.dropout=0", "--set", "transact.dropout=0", "--set", "transact.batch_size=64",
            "--set", "pinnerformer.epochs=2", "--set", f"transact.epochs={args.ranker_epochs}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    train = ["-m", "seqrank.cli", "train", "--events", str(events), *sets]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    runs = {"1 process, 1 thread": [sys.executable, *train, "--set", "threads=1"],
            "1 process, 2 threads": [sys.executable, *train, "--set", "threads=2"],
            "2 processes, 1 thread each": [*torchrun, *train, "--set", "threads=1"]}
    for i, (name, command) in enumerate(runs.items()):
        out = work / str(i)
        if i:  # the first run's PinnerFormer: only the rankers differ
            out.mkdir()
            shutil.copy(work / "0" / "pinnerformer.safetensors", out)
        subprocess.run([*command, "--out", str(out)], check=True, env=env, capture_output=True)
    names = list(runs)
    weights = {name: load_file(work / str(i) / "ranker.safetensors") for i, name in enumerate(names)}
    scores = {name: ranker_test_scores(work / str(i)) for i, name in enumerate(names)}
    for i, name in enumerate(names):
        kept = json.loads((work / str(i) / "run.json").read_text())["ranker_selected_epoch"]
        print(f"{name}: epoch kept {kept}, AUC " + ", ".join(f"{h} {scores[name][1][h]:.4f}"
                                                              for h in ("like", "hate", "click", "long_view")))
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            w = max(float(np.abs(weights[a][k] - weights[b][k]).max()) for k in weights[a])
            p = float(np.abs(scores[a][0] - scores[b][0]).max())
            print(f"{a} vs {b}: weights {w:.3g}, test predictions {p:.3g} (largest absolute difference)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
