"""A small but real trained run, exported and loaded into a feature store: what the serving tests serve.

Trained by the real pipeline on the first 150 users of the shipped KuaiRand sample with 1 epoch per model, so it
costs well under a minute; the serving path does not care how good the model is, only that it is the real one.
"""
from __future__ import annotations

import json
from pathlib import Path


from seqrank.data.loaders import load_events

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "kuairand" / "events.tsv.gz"
SMALL_CONFIG = {"pinnerformer": {"epochs": 1}, "transact": {"epochs": 1}}


def build_small_run(root: Path, n_users: int = 150) -> dict:
    from seqrank.exporting import export_run
    from seqrank.ingest import replay_log
    from seqrank.pipeline import train, write_embeddings
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
