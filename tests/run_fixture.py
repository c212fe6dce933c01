"""A small but real trained run, exported and loaded into a feature store: what the serving tests serve.

Trained by the real pipeline on the first 150 users of the shipped KuaiRand sample with 1 epoch per model, so it
costs well under a minute; the serving path does not care how good the model is, only that it is the real one.
build_tiny_run: a run of tiny models on a generated log (seconds), for the daily jobs' tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from seqrank.data.loaders import load_events

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "kuairand" / "events.tsv.gz"
SMALL_CONFIG = {"pinnerformer": {"epochs": 1}, "transact": {"epochs": 1}}


def build_small_run(root: Path, n_users: int = 150) -> dict:
    from seqrank.exporting import export_run
    from seqrank.ingest import replay_log
    from seqrank.embed_job import write_embeddings
    from seqrank.pipeline import train
    from seqrank.store import open_store

    root.mkdir(parents=True, exist_ok=True)
    ev = load_events(SAMPLE).events
    users = sorted(ev.user_id.unique())[:n_users]
    ev = ev[ev.user_id.isin(users)]
    events = root / "events.csv"
    ev.to_csv(events, index=False)
    config = root / "config.json"
    config.write_text(json.dumps(SMALL_CONFIG))
    run = train(str(events), root / "run", str(config), negative_actions=["hate"])
    repo = export_run(run, root / "model_repository")
    store_url = f"sqlite:///{root / 'store.db'}"
    store = open_store(store_url, timeout_s=5.0)
    try:
        replay_log(store, ev)  # the shipped sample has no exposure rows
    finally:
        store.close()
    write_embeddings(run, store_url)
    return {"run": Path(run), "repo": repo, "store": store_url, "events": ev, "root": root}


DAY_MS = 86_400_000
TINY_CONFIG = {"pinnerformer": {"max_len": 16, "d_model": 8, "n_layers": 1, "n_heads": 2, "d_ff": 16, "dim": 8,
                                "random_negatives": 16, "positions_per_user": 4, "batch_users": 4, "epochs": 1},
               "transact": {"seq_len": 8, "action_dim": 4, "item_dim": 4, "n_layers": 1, "d_ff": 8, "top_k_rows": 2,
                            "cross_layers": 1, "cross_rank": 4, "mlp": [8], "batch_size": 32, "epochs": 1}}


def build_tiny_run(root: Path) -> Path:
    """Tiny models trained on 12 users x 25 actions over 10 days (items i0..i29; click, like, hate)."""
    from seqrank.pipeline import train

    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{int(rng.integers(30))}", str(rng.choice(["click", "like", "hate"])), int(t))
            for u in range(12) for t in np.sort(rng.integers(0, 10 * DAY_MS, 25))]
    events = root / "events.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]).to_csv(events, index=False)
    config = root / "config.json"
    config.write_text(json.dumps(TINY_CONFIG))
    return train(str(events), root / "run", str(config), negative_actions=["hate"])
