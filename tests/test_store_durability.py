"""The embedded SQLite store across a killed writer: a subprocess appends events one transaction at a time and
acknowledges each after its commit returned (prints the count); it is SIGKILLed mid-stream. Reopening the store
shows every acknowledged event, at most the one batch in flight beyond them, and no torn row (every row parses,
SQLite's integrity check passes). Plus the synchronous mode the store runs with, and what a commit costs."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

from seqrank.store import Action, open_store

USERS = 7          # each batch touches every user: a kill mid-commit would tear several rows at once
T0 = 1_700_000_000_000

WRITER = textwrap.dedent("""
    import sys
    from seqrank.store import Action, open_store
    url, users, t0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = open_store(url, max_len=64)  # trimmed sequences: each append rewrites the packed rows
    batch = 0
    while True:
        store.append([Action(f"u{u}", f"i{batch}-{u}", "click", t0 + batch) for u in range(users)])
        batch += 1
        print(batch, flush=True)  # acknowledged: the commit returned
""")


def _expected_items(batches: int, user: int, max_len: int = 64) -> list[str]:
    return [f"i{b}-{user}" for b in range(max(0, batches - max_len), batches)]


def test_a_killed_writer_loses_no_acknowledged_event_and_tears_no_row(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url, str(USERS), str(T0)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    acked = 0
    deadline = time.monotonic() + 120
    try:
        while acked < 150 and time.monotonic() < deadline:  # mid-stream: the writer is appending as fast as it can
            line = proc.stdout.readline()
            assert line, "the writer stopped before it was killed"
            acked = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert acked >= 150 and proc.returncode == -signal.SIGKILL
    for line in proc.stdout:  # acknowledgements printed before the kill that the reader had not read yet
        acked = int(line)

    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with open_store(url, max_len=64) as store:
        sequences = store.get_sequences([f"u{u}" for u in range(USERS)])
    stored = {len(s.item_ids) and int(s.item_ids[-1].split("-")[0][1:]) + 1 for s in sequences}
    assert len(stored) == 1, f"users disagree on the last batch: a torn transaction ({stored})"
    batches = stored.pop()
    assert acked <= batches <= acked + 1  # every acknowledged batch; at most the one in flight beyond it
    for u, seq in enumerate(sequences):
        assert list(seq.item_ids) == _expected_items(batches, u)
        assert list(seq.timestamps_ms) == [T0 + b for b in range(max(0, batches - 64), batches)]
        assert set(seq.actions) == {"click"}


def test_the_store_commits_with_synchronous_full_and_what_a_commit_costs(tmp_path):
    """synchronous=FULL (2): a commit is fsynced, so an acknowledged event survives a power cut too. The cost of
    one single-action append is printed (pytest -s)."""
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        with store._connection(write=True) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        n = 100
        started = time.perf_counter()
        for i in range(n):
            store.append([Action("u", f"i{i}", "click", T0 + i)])
        per_append_ms = (time.perf_counter() - started) / n * 1000
    finally:
        store.close()
    print(f"\nembedded store: {per_append_ms:.2f} ms per single-action append (synchronous=FULL, {n} appends)")
