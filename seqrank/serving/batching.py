"""Score a dynamic batch of ranking requests in ranker runs of bounded size.

The CPU ranker (ONNX Runtime in the Python backend) receives a dynamic batch of requests whose candidate lists
are padded to different buckets. Scoring them as one [B, max width] tensor has two costs that grow without bound:
small requests are padded to the widest one's width, and ONNX Runtime's arena keeps every peak it ever reached
(about 0.6 MB per candidate row with S = 100), so one rare large batch raises the stub's memory for good -- the
step a long soak shows as "growth". Here every request row is cut into pieces of at most ``max_rows`` candidates,
pieces of equal width are packed together, and each run holds at most ``max_rows`` candidate rows: the memory peak
is fixed (``warmup_feeds`` reaches it at load time), no request is padded beyond its own bucket, and runs stay in
the size range that is also the fastest per candidate on CPU (docs/performance.md).

Scoring candidates separately is exact: the ranker scores each candidate from the user's side and that candidate
alone (user-side tensors are one row per user, broadcast over the candidates inside the model).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Mapping, Sequence

import numpy as np

from ..features import PAD


def score_in_runs(run: Callable[[dict], np.ndarray], user_side: Mapping[str, np.ndarray],
                  cand_items: Sequence[np.ndarray], max_rows: int) -> list[np.ndarray]:
    """``user_side``: name -> [U, ...], one row per user, the requests' rows concatenated in request order;
    ``cand_items``: per request [n_r, w_r] candidate ids (sum of n_r = U); ``run(feeds)`` -> probs [k, P, H] for
    feeds of k users x P candidates. Returns per request probs [n_r, w_r, H], as one run over everything would."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    # pieces: (request, row in request, user row, first candidate), grouped by piece width
    by_width: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    user = 0
    for r, cand in enumerate(cand_items):
        n, w = cand.shape
        width = min(w, max_rows)
        for i in range(n):
            for start in range(0, max(w, 1), max(width, 1)):  # a row without candidates is one empty piece
                by_width[width].append((r, i, user, start))
            user += 1
    user_rows = len(next(iter(user_side.values())))
    if user != user_rows:
        raise ValueError(f"{user} request rows but {user_rows} user-side rows")
    outputs: list[np.ndarray | None] = [None] * len(cand_items)
    for width, pieces in by_width.items():
        per_run = max(1, max_rows // max(width, 1))
        for first in range(0, len(pieces), per_run):
            chunk = pieces[first:first + per_run]
            users = np.fromiter((p[2] for p in chunk), dtype=np.int64, count=len(chunk))
            cand = np.full((len(chunk), width), PAD, dtype=np.int64)
            for j, (r, i, _, start) in enumerate(chunk):
                part = cand_items[r][i, start:start + width]
                cand[j, : part.shape[0]] = part
            feeds = {name: np.ascontiguousarray(value[users]) for name, value in user_side.items()}
            feeds["cand_item"] = cand
            probs = run(feeds)
            for j, (r, i, _, start) in enumerate(chunk):
                if outputs[r] is None:
                    n, w = cand_items[r].shape
                    outputs[r] = np.empty((n, w, probs.shape[-1]), dtype=probs.dtype)
                stop = min(start + width, cand_items[r].shape[1])
                outputs[r][i, start:stop] = probs[j, : stop - start]
    return outputs


def warmup_feeds(user_side_example: Mapping[str, np.ndarray], max_rows: int) -> list[dict]:
    """The two run shapes with the largest memory footprint under ``max_rows``: max_rows users x 1 candidate (the
    most user-side work) and 1 user x max_rows candidates. Running both at load time makes ONNX Runtime's arena
    reach its peak before the first request, so serving never raises it. ``user_side_example``: name -> one
    user's row [1, ...] (any valid values)."""
    feeds = []
    for users, width in ((max_rows, 1), (1, max_rows)):
        f = {name: np.repeat(value[:1], users, axis=0) for name, value in user_side_example.items()}
        f["cand_item"] = np.full((users, width), PAD, dtype=np.int64)
        feeds.append(f)
    return feeds
