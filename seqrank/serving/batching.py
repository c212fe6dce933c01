"""Score a dynamic batch of ranking requests in ranker runs of bounded size, without scoring padding.

The CPU ranker (ONNX Runtime in the Python backend) receives a dynamic batch of requests whose candidate lists
are padded to different buckets. Scoring them as one [B, max width] tensor has three costs: the bucket padding
itself (a 1 x 100 request arrives padded to 128: 28 % of the ranker's work scores PAD), small requests padded to
the widest one's width, and ONNX Runtime's arena keeping every peak it ever reached (about 0.6 MB per candidate row
with S = 100), so one rare large batch raises the stub's memory for good -- the step a long soak shows as "growth".
Here each request row's trailing padding is dropped (preprocess pads only at the end, and a real candidate is never
PAD: unknown items are OOV), the real candidates are cut into pieces of at most ``max_rows``, pieces of equal width
are packed together, and each run holds at most ``max_rows`` candidate rows: only real candidates are scored, the
memory peak is fixed (``warmup_feeds`` reaches it at load time), and runs stay in the size range that is also the
fastest per candidate on CPU (docs/performance.md). Padding columns score 0 (postprocess returns only the real N).

With ``ways`` > 1 the runs go to a thread pool of single-threaded ONNX Runtime calls (run releases the GIL), and
the run size shrinks so that even one request's candidates are spread over the threads (1 x 100 on 2 threads: two
runs of 50): candidates are independent, so this parallelism scales almost linearly, where ONNX Runtime's
intra-op threads synchronise inside every operator (1.25x on 2 threads, docs/performance.md). A batch that the plan
leaves as one run (with a pool: at most ``min_rows`` candidate rows, of one width: a lone request of the log's, 1-5
candidates) runs on the caller's thread instead: the pool would add two thread switches and no parallelism
(57 us of the 607 us such a call took on one core, docs/performance.md). Runs that went to the pool have all
finished when ``score_in_runs`` returns or raises, so between calls the caller may use any thread's session
(model_cpu.py does).

Each run is also scored on its real history width: preprocess pads every history to seq_len, and the columns after
the longest real history among a run's users are padding for all of them, so ``trim_history_padding`` drops them
(exact: padding is never attended or pooled). A user with 30 actions then costs a 30-step transformer, not 100.

Scoring candidates separately is exact: the ranker scores each candidate from the user's side and that candidate
alone (user-side tensors are one row per user, broadcast over the candidates inside the model). So each distinct id
of a request row is scored once and copied to its columns: a request that names an item twice, or several items
unknown to the model (all the one OOV id), costs one row per distinct id, and equal ids get bitwise-equal scores
whatever run they land in (runs of different widths round differently in the last bit, which used to reorder
tied candidates between calls).
"""
from __future__ import annotations

from collections import defaultdict
from concurrent.futures import Executor, wait
from typing import Callable, Mapping, Sequence

import numpy as np

from ..features import PAD


SEQUENCE_INPUTS = ("seq_item", "seq_action", "seq_mask")  # [users, S]: newest first, padding after the last action


def trim_history_padding(feeds: Mapping[str, np.ndarray]) -> dict:
    """Drop the sequence columns after the longest real history among the feeds' users: preprocess pads every
    history to seq_len, and those columns are padding for every row, which the ranker never attends or pools, so
    scoring without them is exact (up to the summation order of the matrix products), and the transformer's cost,
    linear to quadratic in the length, follows the real history. One column always stays: an empty history
    attends to position 0."""
    mask = feeds.get("seq_mask")
    if mask is None or mask.shape[1] <= 1:
        return dict(feeds)
    real = mask.any(axis=0)
    width = max(1, len(real) - int(np.argmax(real[::-1]))) if real.any() else 1
    if width == mask.shape[1]:
        return dict(feeds)
    return {name: np.ascontiguousarray(value[:, :width]) if name in SEQUENCE_INPUTS else value
            for name, value in feeds.items()}


def real_widths(cand: np.ndarray) -> np.ndarray:
    """[n, w] candidate ids -> [n]: each row's length without its trailing PAD columns."""
    if cand.shape[1] == 0:
        return np.zeros(len(cand), dtype=np.int64)
    real = cand != PAD
    return np.where(real.any(axis=1), cand.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)


def score_in_runs(run: Callable[[dict], np.ndarray], user_side: Mapping[str, np.ndarray],
                  cand_items: Sequence[np.ndarray], max_rows: int, pool: Executor | None = None, ways: int = 1,
                  min_rows: int = 8) -> list[np.ndarray]:
    """``user_side``: name -> [U, ...], one row per user, the requests' rows concatenated in request order;
    ``cand_items``: per request [n_r, w_r] candidate ids (sum of n_r = U); ``run(feeds)`` -> probs [k, P, H] for
    feeds of k users x P candidates. Returns per request probs [n_r, w_r, H]: for every real candidate what one run
    over everything would give, 0 for the trailing padding. ``pool`` (with ``ways`` threads): the runs execute
    there, sized so that their number is a multiple of ``ways`` and their rows about equal (at least ``min_rows``):
    every thread gets the same work (3 x 100 candidates on 2 threads: 4 runs of 75, not 3 of 100); a plan of one
    run executes on the calling thread, and every pool run has finished when this returns or raises."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    # one entry per request row (= user row, in request order): its distinct real ids and where each column's id is
    rows = []
    for r, cand in enumerate(cand_items):
        for i, real in enumerate(real_widths(cand)):
            ids, where = np.unique(cand[i, :real], return_inverse=True)
            rows.append((r, i, ids, where))
    user_rows = len(next(iter(user_side.values())))
    if len(rows) != user_rows:
        raise ValueError(f"{len(rows)} request rows but {user_rows} user-side rows")
    if pool is not None and ways > 1:
        total = sum(len(ids) for _, _, ids, _ in rows)
        n_runs = ways * -(-total // (ways * max_rows))
        max_rows = min(max_rows, max(min_rows, -(-total // max(n_runs, 1))))
    # pieces: (user row, first id), grouped by piece width
    by_width: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, (_, _, ids, _) in enumerate(rows):
        if len(ids) == 0:  # nothing to score; one empty piece still runs, so every request learns the head count
            by_width[0].append((u, 0))
        for start in range(0, len(ids), max_rows):
            by_width[min(max_rows, len(ids) - start)].append((u, start))
    runs = []  # (width, pieces, feeds)
    for width, pieces in by_width.items():
        per_run = max(1, max_rows // max(width, 1))
        for first in range(0, len(pieces), per_run):
            chunk = pieces[first:first + per_run]
            users = np.fromiter((u for u, _ in chunk), dtype=np.int64, count=len(chunk))
            feeds = {name: np.ascontiguousarray(value[users]) for name, value in user_side.items()}
            feeds["cand_item"] = np.stack([rows[u][2][start:start + width] for u, start in chunk])
            runs.append((width, chunk, trim_history_padding(feeds)))
    if pool is None or len(runs) == 1:  # one run: the pool's threads would only hand it over
        results = [run(feeds) for _, _, feeds in runs]
    else:
        futures = [pool.submit(run, feeds) for _, _, feeds in runs]
        wait(futures)  # all of them, even when one failed: none may still be running once this returns or raises
        results = [f.result() for f in futures]
    scored: list[np.ndarray | None] = [None] * len(rows)  # per user row: probs of its distinct ids
    for (width, chunk, _), probs in zip(runs, results):
        for j, (u, start) in enumerate(chunk):
            if scored[u] is None:
                scored[u] = np.zeros((len(rows[u][2]), probs.shape[-1]), dtype=probs.dtype)
            scored[u][start:start + width] = probs[j]
    outputs: list[np.ndarray | None] = [None] * len(cand_items)
    for (r, i, _, where), probs in zip(rows, scored):
        if outputs[r] is None:
            outputs[r] = np.zeros((*cand_items[r].shape, probs.shape[-1]), dtype=probs.dtype)
        outputs[r][i, :len(where)] = probs[where]
    return outputs


def warmup_feeds(user_side_example: Mapping[str, np.ndarray], max_rows: int) -> list[dict]:
    """The two run shapes with the largest memory footprint under ``max_rows``: max_rows users x 1 candidate (the
    most user-side work) and 1 user x max_rows candidates. Running both at load time makes ONNX Runtime's arena
    reach its peak before the first request, so serving never raises it. Each shape runs with the example's history
    mask and with every position real, so both branches of the CPU graph (masked, full history) are warmed up.
    ``user_side_example``: name -> one user's row [1, ...] (any valid values)."""
    feeds = []
    for users, width in ((max_rows, 1), (1, max_rows)):
        f = {name: np.repeat(value[:1], users, axis=0) for name, value in user_side_example.items()}
        f["cand_item"] = np.full((users, width), PAD, dtype=np.int64)
        feeds.append(f)
        if "seq_mask" in f and not f["seq_mask"].all():
            feeds.append({**f, "seq_mask": np.ones_like(f["seq_mask"])})
    return feeds
