"""A smaller log cut from the shipped KuaiRand sample: the events of its first N users, in the sample's own format
(quick runs, tests/test_distributed.py, research/rounding_chaos.py)."""
from __future__ import annotations

import gzip
from pathlib import Path

from .loaders import KUAIRAND_SAMPLE


def write_first_users(out: str | Path, users: int) -> Path:
    """Every event of the first `users` distinct users of the sample (in file order), header included, to `out`
    (gzip TSV, like the sample)."""
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    out = Path(out)
    seen: set[str] = set()
    with gzip.open(KUAIRAND_SAMPLE, "rt") as src, gzip.open(out, "wt") as dst:
        dst.write(src.readline())
        for line in src:
            user = line.split("\t", 1)[0]
            if user in seen or len(seen) < users:
                seen.add(user)
                dst.write(line)
    return out
