"""Offline metrics: per-head AUC, HIT@3 on shuffled sessions, Recall@k of future positives."""
from __future__ import annotations

import numpy as np
import pandas as pd


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get average ranks); NaN when one class is absent."""
    labels = np.asarray(labels) > 0
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def utility(probs: np.ndarray, heads: list[str], negative: list[str], weights: dict[str, float]) -> np.ndarray:
    """Weighted sum of heads; negative heads subtract. probs [..., H] -> [...]."""
    w = np.array([weights.get(h, 1.0) * (-1.0 if h in negative else 1.0) for h in heads], dtype=np.float32)
    return probs @ w


def hit_at_k(sessions: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int = 3, min_size: int = 4,
             seed: int = 0) -> np.ndarray:
    """Per head: mean over sessions (with > k impressions) of the positives ranked in the top k.
    Sessions are shuffled before ranking so the logged order can never break ties."""
    rng = np.random.default_rng(seed)
    hits = []
    for idx in pd.Series(np.arange(len(sessions))).groupby(sessions).indices.values():
        if len(idx) < min_size:
            continue
        idx = rng.permutation(idx)
        top = idx[np.argsort(-scores[idx], kind="stable")[:k]]
        hits.append(labels[top].sum(0))
    return np.mean(hits, axis=0) if hits else np.full(labels.shape[1], np.nan)


def recall_at_k(user_emb: np.ndarray, item_table: np.ndarray, future: list[set[int]], k: int = 10,
                first_id: int = 2) -> float:
    """Mean over users of |top-k retrieved ∩ future positives| / |future positives| (padding/OOV rows excluded)."""
    scores = user_emb @ item_table[first_id:].T
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k] + first_id
    vals = [len(set(t.tolist()) & f) / len(f) for t, f in zip(top, future) if f]
    return float(np.mean(vals)) if vals else float("nan")


def lift(value: float, baseline: float) -> float:
    return float((value - baseline) / baseline) if baseline else float("nan")
