"""An event log whose like/hate labels depend on the order of the user's actions and on nothing else: the positive
control for the sequence models (research/planted_signal.py writes it; tests/test_planted.py learns from it).

Every user has one current interest (a cluster of items) that survives from one session to the next with probability
`keep` and otherwise jumps to another cluster. A session shows items from the current interest (liked) and from
other clusters (hidden), with `noise` of the labels flipped. Every user likes and hides at the same rate and every
item is liked as often as hidden, so per-user and per-item rates (what averaging the history carries) say little;
what predicts a label is whether the candidate's cluster is the one the user liked in the latest sessions.
Sessions start >= 2 hours apart and show one impression a minute, so with real-time requests (60 s) each impression
is scored with the likes and hides of the session's earlier minutes: the current interest, which is what a sequence
model must read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
START_MS = 1_649_289_600_000  # 2022-04-07 00:00 UTC, where the KuaiRand sample starts
SLOTS_PER_DAY = 8             # session starts at 8:00, 10:00, ..., 22:00


@dataclass
class PlantedLog:
    events: pd.DataFrame        # canonical columns: user_id, item_id ("i<k>"), action (like/hate), timestamp (ms)
    item_cluster: np.ndarray    # [items] the cluster of item "i<k>"


def planted_log(users: int = 400, items: int = 1600, clusters: int = 16, days: int = 14,
                sessions_per_day: float = 1.5, per_session: tuple[int, int] = (4, 10), interest_share: float = 0.5,
                keep: float = 0.75, noise: float = 0.1, seed: int = 0) -> PlantedLog:
    rng = np.random.default_rng(seed)
    item_cluster = rng.integers(0, clusters, size=items)
    members = [np.flatnonzero(item_cluster == c) for c in range(clusters)]
    frames = []
    for u in range(users):
        n_sessions = min(rng.poisson(sessions_per_day * days) + 2, days * SLOTS_PER_DAY)
        slots = np.sort(rng.choice(days * SLOTS_PER_DAY, size=n_sessions, replace=False))
        starts = START_MS + (slots // SLOTS_PER_DAY) * DAY_MS + (8 + 2 * (slots % SLOTS_PER_DAY)) * HOUR_MS
        interest = int(rng.integers(clusters))
        for start in starts:
            if rng.random() > keep:  # the interest moves to another cluster
                interest = int((interest + rng.integers(1, clusters)) % clusters)
            n = int(rng.integers(per_session[0], per_session[1] + 1))
            liked = rng.random(n) < interest_share
            cluster = np.where(liked, interest, (interest + rng.integers(1, clusters, size=n)) % clusters)
            item = np.array([rng.choice(members[c]) for c in cluster])
            action = np.where(liked ^ (rng.random(n) < noise), "like", "hate")
            frames.append(pd.DataFrame({"user_id": f"u{u}", "item_id": [f"i{i}" for i in item], "action": action,
                                        "timestamp": start + 60_000 * np.arange(n)}))  # one impression a minute
    return PlantedLog(pd.concat(frames, ignore_index=True), item_cluster)


def clusters_of(item_ids, item_cluster: np.ndarray) -> np.ndarray:
    """The planted cluster of each item id ("i<k>", str or bytes)."""
    return item_cluster[np.char.lstrip(np.asarray(item_ids).astype(str), "i").astype(int)]
