"""Smoke test of the serving benchmark: `perf/bench.py --quick` on a small real run (tests/run_fixture.py).

It checks that the bench runs end to end against the real tritonserver, perf_analyzer, uvicorn and redis-server and
writes what it promises (summary.json with its keys and targets, every system searched at every budget, the pinning
checked, the wire bytes, the overload runs; CSVs that parse, the report, the plots). It never asserts a speed: on a
shared 2-core machine the numbers are noise.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_fixture import build_small_run  # noqa: E402

KEYS = ("dedup_bytes_ratio", "roofline_fraction", "p99_ms", "freshness_p99_ms")
RATIO_KEYS = ("ensemble_vs_bare_throughput", "tuned_vs_untuned_throughput", "ensemble_vs_naive_throughput")
TARGETED = ("ensemble_vs_bare_throughput", "ensemble_vs_bare_paired", "tuned_vs_untuned_throughput",
            "ensemble_vs_naive_throughput", "dedup_bytes_ratio", "roofline_fraction", "freshness_p99_ms",
            "overload_p99_ms")


def _deps_missing() -> str | None:
    for mod in ("fastapi", "uvicorn", "httpx", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (requirements.txt)"
    return None


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
    missing = _deps_missing()  # installed by `make install`: a missing one is a broken setup, not a skip
    assert missing is None, missing
    from redis_server import RedisServer
    assert RedisServer.available(), "redis-server not installed (scripts/install_system.sh installs it)"
    root = tmp_path_factory.mktemp("bench")
    built = build_small_run(root / "fixture")
    out = root / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench.py"), "--quick", "--run", str(built["run"]),
                           "--repository", str(built["repo"]), "--out", str(out)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout


@pytest.mark.timeout(900)
def test_summary_has_every_key_finite_and_positive(bench_results):
    out, _ = bench_results
    summary = json.loads((out / "summary.json").read_text())
    for key in KEYS:
        value = summary[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert summary["freshness_store"] == "redis"
    for key in TARGETED:
        t = summary["targets"][key]
        assert isinstance(t["met"], bool) and t["op"] in (">=", "<=")
        assert t["value"] == summary[key] or not math.isfinite(summary[key])
    # a ratio key is a ratio (infinite where only the first system serves the budget), or the budgets it reads (50
    # ms; every budget for ensemble / bare, its worst) say why it is undefined (neither system serves them)
    ratios = summary["details"]["ratios"]["fixed_1x100"]
    for key in RATIO_KEYS:
        name = key.removesuffix("_throughput")
        read = ratios[name]["per_budget"].values() if name == "ensemble_vs_bare" else [ratios[name]["per_budget"]["50"]]
        if math.isnan(summary[key]):
            assert all(not r["defined"] and r["note"] for r in read), (key, ratios)
        else:
            assert summary[key] >= 0, (key, summary[key])
    m = summary["machine"]
    assert m["cpu_model"] and m["logical_cpus"] >= 1 and m["versions"]["tritonserver"]
    # the analytic FLOP count agrees with torch's counter on the same tensors (matrix products only)
    flops = summary["details"]["flops"]
    assert isinstance(flops["flop_counter"], int) and flops["flop_counter"] > 0, flops
    assert abs(flops["total"] - flops["flop_counter"]) / flops["flop_counter"] < 0.02
    # the fused CPU graph and history trimming score what the portable graph scores on padded histories
    details = summary["details"]
    assert details["bare_graph"] == "model_cpu.onnx"
    assert details["cpu_graph"]["max_abs_diff"] < 1e-5 and details["history_trimming"]["max_abs_diff"] < 1e-5
    assert set(details["cpu_graph"]["median_ms"]) == {"portable", "fused_masked_only", "cpu_graph"}
    paired = details["roofline_paired"]
    assert len(paired["fractions"]) == len(paired["peak_gflops"]) == len(paired["bare_rps"]) >= 1
    assert 0 < summary["roofline_fraction_paired"] == paired["median_fraction"] < 1
    # perf_analyzer's own search ran for every system, request set and budget (the naive service included: it
    # speaks KServe v2), once per repeat
    settings = summary["settings"]
    for rset in settings["request_sets"]:
        for name, per_budget in details["budget_throughput"][rset].items():
            expected = [50] if name == "untuned" else settings["budgets_ms"]
            assert sorted(int(b) for b in per_budget) == sorted(expected), (rset, name)  # JSON keys are strings
            for t in per_budget.values():
                assert t["n"] == settings["repeats"] and t["failed"] == 0, (rset, name, t)
    assert details["budget_throughput"]["log"]["naive"]["100"]["median"] > 0
    # the search climbs from concurrency 1 by doubling, each level its own perf_analyzer run; never perf_analyzer's
    # --binary-search, whose second level is the range's end and whose later levels inherit its over-budget state
    import re
    visited = [[int(c) for c in v.split(",")] for v in re.findall(r"visited \[([\d, ]+)\]", bench_results[1])]
    assert visited and all(v[0] == 1 and (len(v) == 1 or v[1] == 2) for v in visited), visited
    assert any(len(v) >= 2 for v in visited)  # the small run's log requests fit 100 ms past concurrency 1
    # the systems ran on the server's cores, perf_analyzer on the client's
    pinning = summary["machine"]["pinning"]
    assert set(pinning["client_cores"]).isdisjoint(pinning["server_cores"]) or len(pinning["server_cores"]) == 1
    for system, pids in pinning["checked"].items():
        assert pids and all(cpus == pinning["server_cores"] for cpus in pids.values()), (system, pids)
    # de-duplication on the wire: the same probabilities for far fewer bytes
    wire = details["wire"]
    assert wire["max_abs_prob_diff"] < 1e-5 and wire["requests_repeated"] == 2 and wire["ratio"] > 10
    assert summary["dedup_bytes_ratio"] == wire["ratio"]
    # overload: both systems loaded open loop; the guarded one failed requests only by its queue policy
    over = details["overload"]
    assert over["offered_rate"] > 0 and set(over["runs"]) == {"shipped", "guarded"}
    guard = over["guarded_config"]
    assert set(guard) == {"preprocess/config.pbtxt", "ranker/configs/cpu.pbtxt", "postprocess/config.pbtxt"}
    assert all("rate_limiter" in block for block in guard.values()) and over["server_args"]
    assert all("default_queue_policy" in guard[k] for k in ("preprocess/config.pbtxt", "ranker/configs/cpu.pbtxt"))
    for run in over["runs"].values():
        assert run["sent"] > 0 and sum(run["outcomes"].values()) + run["unfinished"] == run["sent"]
    assert set(over["runs"]["guarded"]["outcomes"]) <= {"ok", "rejected_queue_timeout", "rejected_queue_full"}
    trim = details["history_trimming"]
    assert trim["requests"] > 0 and trim["history_mean"] <= trim["scored_width_mean"] <= trim["history_mean"] + 1
    # the ensemble and the FastAPI baseline rank the same request alike (ONNX Runtime vs torch eager)
    assert summary["details"]["parity"]["max_abs_utility_diff"] < 1e-3


@pytest.mark.timeout(900)
def test_csvs_parse_and_report_and_plots_exist(bench_results):
    out, _ = bench_results
    summary = json.loads((out / "summary.json").read_text())
    files = [out / f for f in summary["csv_files"]]
    assert files, "no CSV written"
    names = {f.name for f in files}
    for required in ("ensemble_log_budgets.csv", "ranker_log_budgets.csv", "naive_log_budgets.csv",
                     "untuned_log_budgets.csv"):
        assert required in names, (required, sorted(names))
    for f in files:
        rows = list(csv.DictReader(f.open()))
        assert rows, f
        for row in rows:
            thr = float(row["Inferences/Second"])
            p99 = float(row["p99 latency"])
            assert math.isfinite(thr) and thr > 0 and math.isfinite(p99) and p99 > 0, (f.name, row)
    report = (out / "report.md").read_text()
    for section in ("## Results against the targets", "## Throughput at fixed p99 budgets", "## Overload",
                    "## De-duplication on the wire", "What bounds"):
        assert section in report, section
    for png in summary["plots"]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png


def test_layout_copies_override_the_cpu_configs(tmp_path):
    """research/ab_layouts.py: each layout is the shipped repository with the CPU ranker's parameters, its instance count
    and every CPU model's queue delay overridden -- and nothing else changed."""
    sys.path.insert(0, str(ROOT / "research"))
    import ab_layouts

    from seqrank.exporting import triton_config

    src = ROOT / "model_repository"
    ab_layouts.layout_copy(src, tmp_path / "a", {"intra_op_threads": 1, "run_threads": 1}, 3, None)
    ranker = triton_config.load(tmp_path / "a" / "ranker" / "configs" / "cpu.pbtxt")
    assert ranker.parameters["run_threads"].string_value == "1"
    assert ranker.instance_group[0].count == 3 and ranker.dynamic_batching.max_queue_delay_microseconds == 1000
    assert triton_config.load(tmp_path / "a" / "preprocess" / "config.pbtxt").dynamic_batching \
        .max_queue_delay_microseconds == 200
    ab_layouts.layout_copy(src, tmp_path / "c0", {"intra_op_threads": 1, "run_threads": 2}, 2, 0)
    for cfg in ("ranker/configs/cpu.pbtxt", "preprocess/config.pbtxt", "postprocess/config.pbtxt"):
        assert (tmp_path / "c0" / cfg).read_text() == (src / cfg).read_text()  # C0 is what the repository ships
    assert (tmp_path / "c0" / "ranker" / "config.pbtxt").read_text() == (src / "ranker" / "config.pbtxt").read_text()
    ab_layouts.layout_copy(src, tmp_path / "m", {"intra_op_threads": 1, "run_threads": 2}, 2, 0, 2)
    for model in ("preprocess", "postprocess"):
        cfg, shipped = (triton_config.load(repo / model / "config.pbtxt") for repo in (tmp_path / "m", src))
        assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == triton_config.KIND_CPU
        cfg.instance_group[0].count = shipped.instance_group[0].count
        assert cfg == shipped  # nothing else changed


def test_untuned_guarded_and_ranker_variant_copies_edit_the_configs_as_protobuf(tmp_path):
    """perf/systems.py: the untuned copy has no dynamic batching and one instance per model; the guarded copy adds a
    queue policy to the named models only; a ranker variant sets the CPU ranker's parameters and instances; configs
    an edit leaves alone keep their text; a missing key names the file."""
    sys.path.insert(0, str(ROOT / "perf"))
    import systems
    from seqrank.exporting import triton_config

    src = ROOT / "model_repository"
    changed = systems.untuned_copy(src, tmp_path / "untuned")
    assert "seqrank/config.pbtxt" not in changed  # the ensemble has neither batching nor instances
    for path in sorted((tmp_path / "untuned").rglob("*.pbtxt")):
        cfg, shipped = triton_config.load(path), triton_config.load(src / path.relative_to(tmp_path / "untuned"))
        assert not cfg.HasField("dynamic_batching") and all(g.count == 1 for g in cfg.instance_group[:1])
        assert (str(path.relative_to(tmp_path / "untuned")) in changed) == (cfg != shipped)
    assert "ranker/configs/cpu.pbtxt" in changed and "preprocess/config.pbtxt" in changed

    blocks = systems.guarded_copy(src, tmp_path / "g", {"ranker": 30000, "preprocess": 10000},
                                  take_turns=("preprocess", "ranker", "postprocess"), unbatched=("ranker",))
    assert set(blocks) == {"ranker/configs/cpu.pbtxt", "preprocess/config.pbtxt", "postprocess/config.pbtxt"}
    for path in sorted((tmp_path / "g").rglob("*.pbtxt")):
        rel = str(path.relative_to(tmp_path / "g"))
        cfg, shipped = triton_config.load(path), triton_config.load(src / rel)
        if rel in blocks:
            if not rel.startswith("postprocess"):
                assert cfg.dynamic_batching.default_queue_policy.default_timeout_microseconds == (
                    30000 if rel.startswith("ranker") else 10000)
            assert list(cfg.dynamic_batching.preferred_batch_size) == ([1] if rel.startswith("ranker") else [])
            (resource,) = cfg.instance_group[0].rate_limiter.resources
            assert (resource.name, resource.count) == (systems.TURN_RESOURCE, 1)
            cfg.dynamic_batching.ClearField("default_queue_policy")
            cfg.dynamic_batching.ClearField("preferred_batch_size")
            for group in cfg.instance_group:
                group.ClearField("rate_limiter")
        assert cfg == shipped, rel
    files = systems.ranker_variant_copy(src, tmp_path / "v", {"intra_op_threads": 2, "run_threads": 1}, 1)
    assert files == ["ranker/configs/cpu.pbtxt"]
    cfg = triton_config.load(tmp_path / "v" / "ranker" / "configs" / "cpu.pbtxt")
    shipped = triton_config.load(src / "ranker" / "configs" / "cpu.pbtxt")
    assert [cfg.parameters[k].string_value for k in ("intra_op_threads", "run_threads")] == ["2", "1"]
    assert cfg.instance_group[0].count == 1
    for key in ("intra_op_threads", "run_threads"):
        cfg.parameters[key].string_value = shipped.parameters[key].string_value
    cfg.instance_group[0].count = shipped.instance_group[0].count
    assert cfg == shipped
    with pytest.raises(ValueError, match=r"configs/cpu\.pbtxt.*no_such_knob"):
        systems.ranker_variant_copy(src, tmp_path / "bad", {"no_such_knob": 1})


def test_model_analyzer_summary_reads_its_csv_and_configs(tmp_path):
    """perf/model_analyzer_summary.py: a delay left out of dynamic_batching is 0 (protobuf text omits defaults), no
    dynamic_batching is 'off', and the best config is the highest throughput within the p99 constraint."""
    sys.path.insert(0, str(ROOT / "perf"))
    import model_analyzer_summary as mas

    configs = {"ranker_config_default": "instance_group [ { count: 2, kind: KIND_CPU } ]\ndynamic_batching { }",
               "ranker_config_0": "instance_group {\n  count: 1\n}\ndynamic_batching {\n"
                                  "  max_queue_delay_microseconds: 1000\n}",
               "ranker_config_1": "instance_group {\n  count: 1\n}"}
    for name, text in configs.items():
        (tmp_path / "output_models" / name).mkdir(parents=True)
        (tmp_path / "output_models" / name / "config.pbtxt").write_text(text)
    (tmp_path / "results").mkdir()
    head = "Model,Batch,Concurrency,Model Config Path,Instance Group,Max Batch Size,Satisfies Constraints," \
           "Throughput (infer/sec),p99 Latency (ms)\n"
    body = ["ranker,1,1,ranker_config_default,2:CPU,64,Yes,30.0,40.0",
            "ranker,1,8,ranker_config_0,1:CPU,64,No,90.0,900.0",   # fastest, but over the p99 constraint
            "ranker,1,8,ranker_config_1,1:CPU,64,Yes,50.0,300.0"]
    (tmp_path / "results" / "metrics-model-inference.csv").write_text(head + "\n".join(body) + "\n")
    assert mas.config_knobs(tmp_path / "output_models/ranker_config_default/config.pbtxt") == \
        {"instances": 2, "queue_delay_us": 0}
    assert mas.config_knobs(tmp_path / "output_models/ranker_config_0/config.pbtxt")["queue_delay_us"] == 1000
    md = mas.summarize(tmp_path, p99_max_ms=500)
    assert "| config_default | 2 | 0 | 30.0 (40.0) | - |" in md
    assert "| config_1 | 1 | off | - | 50.0 (300.0) |" in md
    assert "Best: **ranker_config_1**" in md


def test_fixed_requests_are_distinct_items_the_model_knows(bench_results):
    """perf/make_inputs.py: the fixed 1 x 100 request holds 100 distinct vocabulary items (unknown items would all be
    the one OOV row, which the CPU ranker scores once per request but the bare ranker and the naive service score
    per column), and 1 x 16 is its first 16."""
    import numpy as np

    out, _ = bench_results
    vocab = {x.decode() for x in np.load(out.parent / "fixture" / "run" / "vocab" / "items.npy").tolist()}
    ids = {}
    for name in ("fixed_1x100", "fixed_1x16"):
        (request,) = json.loads((out / "inputs" / f"{name}_store.json").read_text())["data"]
        ids[name] = [x.decode() if isinstance(x, bytes) else str(x) for x in request["candidate_ids"]["content"]]
    assert len(ids["fixed_1x100"]) == len(set(ids["fixed_1x100"])) == 100
    assert set(ids["fixed_1x100"]) <= vocab
    assert ids["fixed_1x16"] == ids["fixed_1x100"][:16]


def test_backend_floor_models_return_their_input_as_each_output(tmp_path, start_server):
    """research/backend_floor.py: the trivial models it measures load in the real server and answer with `outputs`
    copies of the input (so the 1-vs-8-output comparison compares what it says)."""
    import numpy as np
    import tritonclient.http as http

    sys.path.insert(0, str(ROOT / "research"))
    import backend_floor

    names = {k: backend_floor.write_model(tmp_path / "repo", k) for k in (1, 8)}
    server = start_server(tmp_path / "repo", reuse=False)
    x = np.arange(100, dtype=np.int64).reshape(1, 100)
    with http.InferenceServerClient(server.http_url) as client:
        for k, name in names.items():
            inp = http.InferInput("x", [1, 100], "INT64")
            inp.set_data_from_numpy(x)
            result = client.infer(name, [inp])
            outputs = [o["name"] for o in result.get_response()["outputs"]]
            assert sorted(outputs) == sorted(f"y{i}" for i in range(k))
            assert all(np.array_equal(result.as_numpy(o), x) for o in outputs)


def test_a_repository_exported_from_another_template_is_refused(tmp_path):
    """The bench measures today's model.py files and configs: a repository from an older template (the demo run's,
    after an upgrade) stops it before any server starts, naming the fix."""
    run = tmp_path / "run"
    (run / "model_repository" / "ranker" / "1").mkdir(parents=True)
    (run / "model_repository" / "ranker" / "1" / "model.onnx").write_bytes(b"")
    (run / "export").mkdir()
    (run / "export" / "export.json").write_text(json.dumps({"template_digest": "0" * 16}))
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "bench.py"), "--quick", "--run", str(run),
                           "--out", str(tmp_path / "out")], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "exported from another version of seqrank's model repository template" in proc.stderr
    assert f"seqrank export --run {run}" in proc.stderr
    assert not (tmp_path / "out").exists()
