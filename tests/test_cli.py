"""The command line and the Python API a user meets first: the version, one clear line on bad input (a traceback only
with --debug), config overrides, and `from seqrank import train, evaluate, export, Client`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import seqrank
from seqrank.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seqrank.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"seqrank {seqrank.__version__}"


def test_bad_input_is_one_line_naming_the_problem_and_a_traceback_only_with_debug(tmp_path):
    missing = cli("train", "--events", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "run"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "nope.csv" in missing.stderr and "file not found" in missing.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,action,timestamp\nu1,i1,click,later\n")
    row = cli("train", "--events", str(bad), "--out", str(tmp_path / "run"))
    assert row.returncode == 1 and "timestamp" in row.stderr and "Traceback" not in row.stderr
    field = cli("train", "--events", str(bad), "--out", str(tmp_path / "run2"), "--set", "transact.nope=3")
    assert field.returncode == 1 and "transact.nope" in field.stderr and not (tmp_path / "run2").exists()
    debug = cli("--debug", "train", "--events", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "run"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    unreachable = cli("rank", "--user-id", "u", "--candidates", "a", "--url", "127.0.0.1:9", "--timeout", "1")
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr and unreachable.stderr.strip()
    negative = cli("evaluate", "--run", str(tmp_path / "run"), "--refreshes", "-1")
    assert negative.returncode == 2 and "--refreshes" in negative.stderr and ">= 0" in negative.stderr


def test_set_overrides_typed_fields_and_refuses_unknown_ones():
    cfg = RunConfig().with_overrides(["data.split=validation", "transact.epochs=5", "seed=3",
                                      "transact.mlp=[64, 32]", "data.negative_actions=null"])
    assert cfg.data.split == "validation" and cfg.transact.epochs == 5 and cfg.seed == 3
    assert cfg.transact.mlp == [64, 32] and cfg.data.negative_actions is None
    assert RunConfig().transact.epochs != 5                      # a copy: the defaults are untouched
    for bad, message in (("nosuch.field=1", "no config section"), ("data.nope=1", "no config field"),
                         ("data.split", "expected section.field=value"),
                         ("transact.epochs=0", "transact.epochs: Input should be greater than 0"),
                         ("data.split=train", "data.split: Input should be 'test' or 'validation'"),
                         ("transact.mlp=[64, -1]", r"transact.mlp.1: Input should be greater than 0"),
                         ("threads=two", "threads: Input should be a valid integer")):
        with pytest.raises(ValueError, match=message):
            RunConfig().with_overrides([bad])


def test_a_run_written_by_another_version_fails_naming_both(tmp_path):
    (tmp_path / "config.json").write_text(RunConfig().to_json())
    (tmp_path / "run.json").write_text(json.dumps({"seqrank_version": "0.0.1"}))
    with pytest.raises(ValueError, match=r"seqrank 0\.0\.1.*seqrank " + seqrank.__version__.replace(".", r"\.")):
        RunConfig.load_saved(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"seqrank_version": seqrank.__version__}))
    assert RunConfig.load_saved(tmp_path) == RunConfig()


def test_the_python_api():
    from seqrank import Client, evaluate, export, train
    from seqrank.client import RankingClient
    from seqrank.evaluation import evaluate as evaluate_fn
    from seqrank.pipeline import train as train_fn
    assert train is train_fn and evaluate is evaluate_fn and Client is RankingClient
    assert callable(export) and export.__name__ == "export_run"
    for fn in (train, evaluate, export, Client):
        assert fn.__doc__ and len(fn.__doc__) > 40
    import seqrank.training  # noqa: F401 - a submodule import must not shadow the API names
    assert seqrank.train is train_fn
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        seqrank.nope  # noqa: B018


def test_every_option_of_every_command_has_help():
    import argparse

    from seqrank.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {opt.option_strings[0]}" for name, sub in [("seqrank", parser), *commands.items()]
               for opt in sub._actions if opt.option_strings and not opt.help and opt.dest != "help"]
    assert not missing, f"options without help: {missing}"
