"""The streamed data path (seqrank.data.parquet_events, seqrank.streamed) gives exactly the in-memory path's examples.

The shipped KuaiRand sample is converted in small chunks into a bucketed Parquet dataset; the streaming pass's facts
and the union of the partitions' timelines and impressions are compared with prepare() on the file loaded whole.
Then the conversion's errors (a bad row anywhere in the file names its row and column, and leaves nothing behind),
the partition arithmetic, the generator of large logs, and `seqrank convert` / `seqrank train --events DIR`.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seqrank.config import RunConfig
from seqrank.data.loaders import KUAIRAND_SAMPLE, DataError, load_events
from seqrank.data.parquet_events import (MANIFEST, convert_events, is_events_dataset, open_events_dataset,
                                         user_buckets)
from seqrank.dataset import load_log, prepare
from seqrank.streamed import prepare_events, prepare_partition, scan_events

ROOT = Path(__file__).resolve().parents[1]
OTTO = ROOT / "tests" / "fixtures" / "loaders" / "otto_20sessions.jsonl"
KUAIRAND_LOG = ROOT / "tests" / "fixtures" / "loaders" / "kuairand_log_standard_tiny.csv"
N_BUCKETS = 8
CHUNK_ROWS = 5_000   # the sample's 41,828 rows in 9 chunks: duplicates and users span chunk boundaries
IMPRESSION_COLUMNS = ["user_id", "item_id", "timestamp", "request_time", "is_test"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return convert_events(KUAIRAND_SAMPLE, tmp_path_factory.mktemp("streamed") / "events", N_BUCKETS, None,
                          CHUNK_ROWS)


@pytest.fixture(scope="module", params=["test", "validation"])
def both(request, dataset):
    """(cfg, the in-memory Prepared, the streamed facts) for each data.split."""
    cfg = RunConfig.from_dict({"data": {"split": request.param}})
    return cfg, prepare(load_log(str(KUAIRAND_SAMPLE), cfg), cfg), scan_events(dataset, cfg)


def test_the_conversion_holds_the_loaders_events_bucketed_by_user(dataset):
    log = load_events(KUAIRAND_SAMPLE)
    meta = dataset.meta
    assert (meta["n_events"], meta["n_users"], meta["duplicates_dropped"]) == (len(log.events), 664, 203)
    assert (meta["fmt"], meta["exposure_action"], meta["actions"]) == ("kuairand", None, log.actions)
    events = dataset.read(range(N_BUCKETS))
    pd.testing.assert_frame_equal(events, log.events)   # same rows, same order, same dtypes
    for b in range(N_BUCKETS):
        users = dataset.read([b]).user_id.unique()
        assert len(users) and (user_buckets(users, N_BUCKETS) == b).all()


def test_user_buckets_are_a_fixed_function_of_the_id():
    """Written to disk and read by other machines: a change of hash would split users' timelines."""
    assert user_buckets(["111", "u0", "ü", ""], 64).tolist() == [28, 6, 26, 12]
    # a worker of 8 owns the buckets of 64 congruent to it: the same users whichever count the data was written with
    assert user_buckets(["111", "u0", "ü", ""], 8).tolist() == [28 % 8, 6, 26 % 8, 12 % 8]


def test_the_streaming_pass_gives_the_in_memory_facts(both):
    cfg, mem, facts = both
    assert facts.split_time == mem.split_time
    assert facts.selection_start == mem.selection_start
    assert facts.future_window_ms == mem.future_window_ms
    assert facts.vocab.items.dtype == mem.vocab.items.dtype and (facts.vocab.items == mem.vocab.items).all()
    for field in ("actions", "heads", "negative_actions", "exposure_action"):
        assert getattr(facts.vocab, field) == getattr(mem.vocab, field)
    assert facts.users.tolist() == mem.users.tolist()
    assert facts.pf_test_users == mem.pf_test_users


@pytest.mark.parametrize("n_parts", [1, 4])
def test_the_partitions_together_are_the_in_memory_examples(both, dataset, n_parts):
    cfg, mem, facts = both
    seen_users = []
    for part in range(n_parts):
        prep = prepare_partition(dataset, cfg, part, n_parts, facts)
        users = set(prep.users.tolist())
        seen_users += prep.users.tolist()
        assert prep.pf_test_users == mem.pf_test_users & users
        assert (prep.split_time, prep.selection_start) == (mem.split_time, mem.selection_start)
        for u in prep.users:
            got, want = prep.histories[u], mem.histories[u]
            for field in ("item", "action", "ts"):
                np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        rows = np.flatnonzero(mem.impressions.user_id.isin(users).to_numpy())
        want = mem.impressions.iloc[rows].reset_index(drop=True)
        pd.testing.assert_frame_equal(prep.impressions[IMPRESSION_COLUMNS], want[IMPRESSION_COLUMNS])
        # the same requests, numbered inside the partition in the in-memory order (the whole log: the same numbers)
        np.testing.assert_array_equal(prep.impressions.request.to_numpy(), pd.factorize(want.request)[0])
        np.testing.assert_array_equal(prep.labels, mem.labels[rows])
        assert len(prep.log.events) == int(mem.log.events.user_id.isin(users).sum())
    assert sorted(seen_users) == mem.users.tolist()   # every user once


def test_train_reads_the_dataset_directory_as_it_reads_the_file(dataset):
    cfg = RunConfig()
    from_dir, from_file = prepare_events(str(dataset.directory), cfg), prepare_events(str(KUAIRAND_SAMPLE), cfg)
    pd.testing.assert_frame_equal(from_dir.impressions, from_file.impressions)
    pd.testing.assert_frame_equal(from_dir.log.events, from_file.log.events)
    assert from_dir.log.duplicates_dropped == from_file.log.duplicates_dropped == 203
    assert from_dir.log.negative_actions == from_file.log.negative_actions == ("hate",)


def test_a_worker_count_must_divide_the_buckets(dataset):
    assert dataset.buckets_of(1, 4) == [1, 5]
    with pytest.raises(ValueError, match="must divide"):
        dataset.buckets_of(0, 3)
    with pytest.raises(ValueError, match="not in 0..3"):
        dataset.buckets_of(4, 4)


# ------------------------------------------------------------------------------------------------ conversion errors

HEADER = "user_id,item_id,action,timestamp\n"


def good_rows(n: int, t0: int = 1_649_581_149_287) -> str:
    return "".join(f"u{i % 7},i{i},click,{t0 + i}\n" for i in range(n))


@pytest.mark.parametrize("name, text, row, column, words", [
    ("bad_time.csv", HEADER + good_rows(25) + "u3,i3,click,abc\n" + good_rows(5), 26, "timestamp",
     ["cannot parse 'abc' as a time"]),
    ("empty_item.csv", HEADER + good_rows(25) + "u3,,click,1649581149289\n", 26, "item_id", ["empty"]),
    ("too_many_fields.csv", HEADER + good_rows(25) + "u3,i3,click,3,extra\n", 26, None, ["malformed"]),
    ("seconds_then_ms.csv", HEADER + good_rows(25, t0=1_649_581_149) + "u3,i3,click,1649581149287\n", 26,
     "timestamp", ["'1649581149287' is a time in milliseconds, but the earlier rows hold seconds"]),
    ("records.jsonl", "".join(json.dumps({"user_id": f"u{i}", "item_id": "a", "action": "click", "timestamp": i})
                              + "\n" for i in range(25)) + '{"user_id": "u9", "item_id": "a", "action": "click"}\n',
     26, "timestamp", ["missing value"]),
    ("bad_line.jsonl", "".join(json.dumps({"session": i, "events": [{"aid": 1, "ts": 5, "type": "clicks"}]})
                               + "\n" for i in range(25)) + "{not json\n", 26, None, ["not valid JSON"]),
    ("bad_label.tsv", "user_id\tvideo_id\ttime_ms\tlabel\n" + "1\t2\t1649581149287\t1\n" * 25
     + "2\t2\t1649581149287\t7\n", 26, "label", ["expected 1 (like) or 0 (hate)"]),
])
def test_a_bad_row_in_any_chunk_names_its_row_and_column_and_leaves_nothing(tmp_path, name, text, row, column,
                                                                            words):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "dataset"
    with pytest.raises(DataError) as info:
        convert_events(path, out, 4, None, 10)   # the bad row is in the third chunk
    err = info.value
    assert (err.file, err.row, err.column) == (str(path), row, column)
    for word in words:
        assert word in str(err)
    assert not out.exists() and not (tmp_path / "dataset.tmp").exists()


def write_parquet(path: Path) -> Path:
    frame = pd.read_csv(io.StringIO(HEADER + good_rows(40)), dtype={"user_id": str, "item_id": str})
    frame.to_parquet(path, row_group_size=7)
    return path


@pytest.mark.parametrize("name, make", [
    ("seconds.csv", lambda p: p.write_text(HEADER + good_rows(40, t0=1_649_581_149))),  # seconds stay seconds
    ("events.parquet", write_parquet),
    ("records.jsonl", lambda p: p.write_text("".join(json.dumps(
        {"user_id": f"u{i % 3}", "item_id": f"i{i}", "action": "like", "timestamp": 1_649_581_149 + i}) + "\n"
        for i in range(40)))),
    ("otto.jsonl", lambda p: p.write_bytes(OTTO.read_bytes())),
    ("u.data", lambda p: p.write_text("".join(f"{i % 4}\t{i}\t{1 + i % 5}\t{881250949 + i}\n" for i in range(40)))),
    ("log_standard_tiny.csv", lambda p: p.write_bytes(KUAIRAND_LOG.read_bytes())),
])
def test_a_good_file_converted_in_chunks_is_the_file_read_whole(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    whole = load_events(path)
    ds = convert_events(path, tmp_path / "dataset", 4, None, 3)   # 3 rows (OTTO: events) a chunk
    pd.testing.assert_frame_equal(ds.read(range(4)), whole.events)
    assert (ds.meta["fmt"], ds.meta["exposure_action"]) == (whole.fmt, whole.exposure_action)
    assert ds.meta["duplicates_dropped"] == whole.duplicates_dropped


def test_an_existing_output_is_refused_and_a_directory_must_be_a_dataset(tmp_path, dataset):
    with pytest.raises(FileExistsError, match="choose a new --out"):
        convert_events(KUAIRAND_SAMPLE, dataset.directory)
    with pytest.raises(DataError, match="not an events dataset"):
        open_events_dataset(tmp_path)
    assert is_events_dataset(dataset.directory) and not is_events_dataset(tmp_path)


def test_a_log_that_needs_sampled_negatives_is_refused_naming_the_way_out(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text(HEADER + good_rows(40))
    ds = convert_events(path, tmp_path / "dataset", 2)
    with pytest.raises(DataError, match="neither negative actions nor logged exposures") as info:
        prepare_partition(ds, RunConfig(), 0, 1)
    assert info.value.column == "action"


# ------------------------------------------------------------------------------------------ generator and command line

def generate(out: Path, events: int = 4000, buckets: int = 4) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/generate_log.py", "--out", str(out), "--events", str(events),
                           "--buckets", str(buckets), "--seed", "3"], cwd=ROOT, capture_output=True, text=True,
                          check=True)


def test_the_generator_is_deterministic_and_has_the_samples_shape(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    a, b = open_events_dataset(tmp_path / "a"), open_events_dataset(tmp_path / "b")
    events = a.read(range(4))
    pd.testing.assert_frame_equal(events, b.read(range(4)))
    assert 3_000 < len(events) < 5_000 and a.meta["n_users"] == 80
    assert a.meta["actions"] == load_events(KUAIRAND_SAMPLE).actions
    impressions = len(events[["user_id", "item_id", "timestamp"]].drop_duplicates())
    share = events.action.value_counts() / impressions
    assert share["like"] == pytest.approx(0.81, abs=0.05) and share["click"] == pytest.approx(0.66, abs=0.05)
    top = events.item_id.value_counts()
    assert top.iloc[0] > 20 * top.median()   # Zipf: a head of popular items
    prep = prepare_partition(a, RunConfig(), 0, 2)   # its log trains: hate is its negative action, as in KuaiRand
    assert prep.vocab.negative_actions == ["hate"] and len(prep.impressions)


def test_seqrank_convert_then_train_on_the_directory(tmp_path):
    source = tmp_path / "events.csv"
    generate(tmp_path / "generated", events=3000)
    open_events_dataset(tmp_path / "generated").read(range(4)).to_csv(source, index=False)
    cli = [sys.executable, "-m", "seqrank.cli"]
    done = subprocess.run(cli + ["convert", "--events", str(source), "--out", str(tmp_path / "ds"), "--buckets", "2",
                                 "--chunk-rows", "500"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "duplicate rows dropped" in done.stdout and (tmp_path / "ds" / MANIFEST).is_file()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "threads": 1, "data": {"selection_fraction": 0.0, "negative_actions": ["hate"]},
        "pinnerformer": {"epochs": 1, "max_len": 8, "d_model": 8, "n_heads": 1, "n_layers": 1, "d_ff": 8, "dim": 8,
                         "random_negatives": 8, "positions_per_user": 2},
        "transact": {"epochs": 1, "seq_len": 8, "action_dim": 4, "item_dim": 4, "d_ff": 8, "n_layers": 1,
                     "top_k_rows": 1, "mlp": [8], "cross_rank": 4, "cross_layers": 1}}))
    done = subprocess.run(cli + ["train", "--events", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
                                 "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    from_file = prepare_events(str(source), RunConfig.load_saved(tmp_path / "run"))
    assert info["events"] == str((tmp_path / "ds").resolve())
    assert (info["n_events"], info["split_time_ms"]) == (len(from_file.log.events), from_file.split_time)
