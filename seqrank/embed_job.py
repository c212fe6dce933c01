"""`seqrank embed`: the paper's daily batch job, every user's long-term PinnerFormer embedding as of a time, written
to the feature store; and the per-user actions that it and `seqrank refresh` learn from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import RunConfig
from .training import embed_users


def todays_actions(events: str | None = None, store=None, batch: int = 2048) -> dict[str, tuple]:
    """The actions the daily jobs learn from, per user: (item ids, action names, timestamps ms), from an events file
    (`events`; its labels play no part) or else from every user with actions in the open feature store `store`
    (the newest actions it keeps per user)."""
    from .data.loaders import load_events
    from .dataset import actions_by_user
    if events is not None:
        return actions_by_user(load_events(events, negative_actions=(), min_users=1).events)
    users = store.user_ids()
    out = {}
    for s in range(0, len(users), batch):
        for u, seq in zip(users[s:s + batch], store.get_sequences(users[s:s + batch])):
            out[u] = (seq.item_ids, seq.actions, seq.timestamps_ms)
    return out


def write_embeddings(run: str | Path, store_url: str, as_of_ms: int | None = None, events: str | None = None,
                     batch: int = 2048) -> int:
    """The daily batch job of the paper: every user's long-term embedding as of a time, into the feature store. The
    actions are today's, not the training log's: every user with actions in the store (new users included), or every
    user of an events file (`events`). as_of_ms: only actions strictly before it count (default: the newest action
    seen + 1). The run gives the model and its vocabulary, with the items `seqrank refresh` added (its newest item
    state); items neither knows are the out-of-vocabulary row."""
    from .exporting import load_user_tower
    from .features import Vocabulary, index_histories_of
    from .refresh import item_state_dir
    from .store import open_store
    run = Path(run)
    state = item_state_dir(run)
    vocab = Vocabulary.load(state / "vocab")
    model = load_user_tower(state, RunConfig.load_saved(run), vocab)
    store = open_store(store_url, timeout_s=5.0)
    try:
        histories = index_histories_of(vocab, todays_actions(events, store, batch))
        users = sorted(histories)
        newest = max((int(h.ts.max()) for h in histories.values() if len(h.ts)), default=0)
        as_of = newest + 1 if as_of_ms is None else int(as_of_ms)
        for s in tqdm(range(0, len(users), batch), desc="embed", unit="batch"):
            part = users[s:s + batch]
            store.put_embeddings(part, embed_users(model, histories, part, np.full(len(part), as_of)), as_of)
    finally:
        store.close()
    print(f"wrote {len(users)} user embeddings as of {as_of} to {redact(store_url)}")
    return len(users)


def redact(url: str) -> str:
    """A store URL fit for a log: any password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
