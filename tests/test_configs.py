"""Triton model configs: every template config parses as Triton's ModelConfig protobuf; the ranker variants agree;
the H200 config; the renderer edits through the protobuf (seqrank.exporting.triton_config), whatever the template's layout; a
repository rendered from the template agrees with an exported ONNX file; export/build_trt.py's optimization profiles
and tensorrt_plan config; the TensorRT build itself where TensorRT is installed."""
from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from seqrank.exporting import triton_config
from seqrank.config import TransActConfig
from seqrank.exporting import export_ranker_onnx, render_config
from seqrank.serving import preprocess
from seqrank.serving.preprocess import CANDIDATE_BUCKETS
from seqrank.features import N_CONTEXT
from seqrank.models.transact import INPUT_NAMES, OUTPUT_NAMES, TransActRanker

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_repository"
RANKER_VARIANTS = ["config.pbtxt", "configs/cpu.pbtxt", "configs/h200.pbtxt"]
ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL",
                  onnx.TensorProto.FLOAT: "TYPE_FP32"}


def load_build_trt():
    spec = importlib.util.spec_from_file_location("build_trt", ROOT / "export" / "build_trt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_trt", module)
    spec.loader.exec_module(module)
    return module


build_trt = load_build_trt()


def parse(source: Path | str) -> mc.ModelConfig:
    text = source.read_text() if isinstance(source, Path) else source
    return text_format.Parse(text, mc.ModelConfig())


def dtype_name(value: int) -> str:
    return mc.DataType.Name(value)


def tensors(cfg: mc.ModelConfig, kind: str) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (dtype_name(t.data_type), list(t.dims)) for t in getattr(cfg, kind)}


def template_configs() -> list[Path]:
    found = set(TEMPLATE.rglob("config.pbtxt")) | set(TEMPLATE.rglob("configs/*.pbtxt"))
    return sorted(found)


# ---------------------------------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", template_configs(), ids=lambda p: str(p.relative_to(TEMPLATE)))
def test_every_template_config_parses_as_a_model_config(path):
    cfg = parse(path)
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert cfg.name == model_dir.name
    assert cfg.max_batch_size > 0
    assert cfg.platform == "ensemble" or cfg.backend, f"{path}: neither a backend nor the ensemble platform"
    for t in list(cfg.input) + list(cfg.output):
        assert t.dims, f"{path}: tensor {t.name} has no dims"


def test_ranker_variants_declare_the_same_tensors_and_batch():
    base = parse(TEMPLATE / "ranker" / RANKER_VARIANTS[0])
    for variant in RANKER_VARIANTS[1:]:
        cfg = parse(TEMPLATE / "ranker" / variant)
        assert tensors(cfg, "input") == tensors(base, "input"), variant
        assert tensors(cfg, "output") == tensors(base, "output"), variant
        assert cfg.max_batch_size == base.max_batch_size, variant
    assert set(tensors(base, "input")) == set(INPUT_NAMES)
    assert set(tensors(base, "output")) == set(OUTPUT_NAMES)


def test_h200_config_runs_on_the_gpu_with_tensorrt_batching_and_warmup():
    cfg = parse(TEMPLATE / "ranker" / "configs" / "h200.pbtxt")
    pre = parse(TEMPLATE / "preprocess" / "config.pbtxt")
    seq_len = int(pre.parameters["seq_len"].string_value)
    assert cfg.backend == "onnxruntime" and cfg.default_model_filename == "model.onnx"
    assert cfg.instance_group and all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group)
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    assert accelerators[0].parameters["precision_mode"] == "FP16"
    assert accelerators[0].parameters["trt_engine_cache_path"] == "/cache/trt"  # the entrypoint's cache volume
    preferred = list(cfg.dynamic_batching.preferred_batch_size)
    assert preferred and all(1 <= b <= cfg.max_batch_size for b in preferred)
    # CUDA graphs are a TensorRT-backend option: only the tensorrt_plan variant may set them
    assert not cfg.optimization.cuda.graphs

    inputs = tensors(cfg, "input")
    assert cfg.model_warmup
    warm_buckets = set()
    for sample in cfg.model_warmup:
        assert 1 <= sample.batch_size <= cfg.max_batch_size, sample.name
        assert set(sample.inputs) == set(inputs), f"warmup {sample.name} must feed every ranker input"
        for name, value in sample.inputs.items():
            dtype, dims = inputs[name]
            assert dtype_name(value.data_type) == dtype, (sample.name, name)
            assert len(value.dims) == len(dims), (sample.name, name)
            for got, declared in zip(value.dims, dims):
                assert declared == -1 or got == declared, (sample.name, name)
            if name.startswith("seq_"):
                assert list(value.dims) == [seq_len], (sample.name, name)
            if dtype in ("TYPE_INT64", "TYPE_BOOL"):
                assert value.zero_data, f"{sample.name}/{name}: integer ids must be zeros (0 = padding, in range)"
        warm_buckets.add(sample.inputs["cand_item"].dims[0])
    assert warm_buckets <= set(CANDIDATE_BUCKETS)
    assert {min(CANDIDATE_BUCKETS), max(CANDIDATE_BUCKETS)} <= warm_buckets
    assert any(s.batch_size == cfg.max_batch_size for s in cfg.model_warmup)


def test_no_warmup_on_the_ensemble_and_ranker_inputs_come_from_preprocess():
    ensemble = parse(TEMPLATE / "seqrank" / "config.pbtxt")
    assert ensemble.platform == "ensemble" and not ensemble.model_warmup
    pre_out = tensors(parse(TEMPLATE / "preprocess" / "config.pbtxt"), "output")
    ranker_in = tensors(parse(TEMPLATE / "ranker" / "config.pbtxt"), "input")
    steps = {s.model_name: s for s in ensemble.ensemble_scheduling.step}
    internal = {v: k for k, v in steps["preprocess"].output_map.items()}
    for name, value in steps["ranker"].input_map.items():
        source = internal[value]
        assert pre_out[source][0] == ranker_in[name][0], name
        assert len(pre_out[source][1]) == len(ranker_in[name][1]), name


def test_build_trt_reads_the_repository_settings_and_imports_the_buckets():
    settings = build_trt.read_repository_settings(TEMPLATE)
    pre, ranker = parse(TEMPLATE / "preprocess" / "config.pbtxt"), parse(TEMPLATE / "ranker" / "config.pbtxt")
    assert settings == {"seq_len": int(pre.parameters["seq_len"].string_value), "buckets": list(CANDIDATE_BUCKETS),
                        "max_batch": ranker.max_batch_size, "user_dim": tensors(ranker, "input")["user_emb"][1][-1],
                        "n_context": tensors(ranker, "input")["context"][1][-1],
                        "preferred_batch_sizes": list(ranker.dynamic_batching.preferred_batch_size)}
    assert build_trt.CANDIDATE_BUCKETS is preprocess.CANDIDATE_BUCKETS  # imported from seqrank, not a copy
    h200 = build_trt.read_repository_settings(TEMPLATE, TEMPLATE / "ranker" / "configs" / "h200.pbtxt")
    assert h200["max_batch"] == parse(TEMPLATE / "ranker" / "configs" / "h200.pbtxt").max_batch_size


# ---------------------------------------------------------------------------------------------------------------------
# The renderer: Triton's ModelConfig protobuf, never the template's text
# ---------------------------------------------------------------------------------------------------------------------

RUN_VALUES = {"user_dim": 32, "n_context": N_CONTEXT, "n_heads": 3, "seq_len": 20, "heads": "a,b,c",
              "utility_weights": "1,-1,1", "candidate_buckets": "16,32", "max_candidates": 32, "n_items": 50,
              "n_actions": 10}

# The same model as a template could be written: one parameter spread over several lines, fields in another order,
# dims as a repeated scalar instead of a list, a warmup input, and comments where a line-based editor would look.
SPREAD_TEMPLATE = """
max_batch_size: 8
output { dims: -1 dims: 8  # probs
         data_type: TYPE_FP32 name: "probs" }
input [ { dims: [ 100 ], name: "seq_item", data_type: TYPE_INT64 },
        { name: "seq_mask"
          data_type: TYPE_BOOL
          dims: [ -1 ] } ]
input { data_type: TYPE_FP32
        dims: 64 name: "user_emb" }
parameters {
  value {
    string_value:
      "100"
  }
  key: "seq_len"
}
parameters [ { key: "heads" value: { string_value: "x" } }, { key: "max_actions", value { string_value: "7" } } ]
model_warmup { name: "w" batch_size: 1
  inputs { value: { dims: [ 100 ] data_type: TYPE_INT64 zero_data: true } key: "seq_item" } }
name: "spread"  # name comes last
backend: "python"
"""


def test_render_config_edits_the_protobuf_whatever_the_template_layout():
    cfg = parse(render_config(SPREAD_TEMPLATE, RUN_VALUES, "spread.pbtxt"))
    assert tensors(cfg, "output") == {"probs": ("TYPE_FP32", [-1, 3])}
    assert tensors(cfg, "input") == {"seq_item": ("TYPE_INT64", [20]), "seq_mask": ("TYPE_BOOL", [-1]),
                                     "user_emb": ("TYPE_FP32", [32])}  # a -1 the template declares stays -1
    assert {k: v.string_value for k, v in cfg.parameters.items()} == {"seq_len": "20", "heads": "a,b,c",
                                                                       "max_actions": "7"}
    assert list(cfg.model_warmup[0].inputs["seq_item"].dims) == [20]
    # nothing else moved: the rendered config is the template's message with exactly these fields changed
    expected = parse(SPREAD_TEMPLATE)
    expected.output[0].dims[:] = [-1, 3]
    expected.input[0].dims[:] = [20]
    expected.input[2].dims[:] = [32]
    expected.parameters["seq_len"].string_value = "20"
    expected.parameters["heads"].string_value = "a,b,c"
    expected.model_warmup[0].inputs["seq_item"].dims[:] = [20]
    assert cfg == expected


@pytest.mark.parametrize("path", template_configs(), ids=lambda p: str(p.relative_to(TEMPLATE)))
def test_render_config_is_the_same_message_for_every_template_layout(path):
    """Each template, rendered as written and rendered after a round trip through the protobuf printer (one field a
    line, other order of maps, no comments), gives the same config."""
    as_written = render_config(path.read_text(), RUN_VALUES, path)
    reprinted = render_config(triton_config.dump(parse(path)), RUN_VALUES, path)
    assert parse(as_written) == parse(reprinted)
    assert render_config(as_written, RUN_VALUES, path) == as_written  # rendering is idempotent


@pytest.mark.parametrize("broken", ['name: "x"\nmax_batch_size: eight\n', 'name: "x"\nno_such_field: 1\n',
                                    'name: "x"\ninput [ { name: "a" ]\n'])
def test_an_unparsable_config_raises_naming_the_file(broken, tmp_path):
    with pytest.raises(triton_config.ConfigError, match=r"broken\.pbtxt"):
        render_config(broken, RUN_VALUES, "model_repository/broken.pbtxt")
    path = tmp_path / "broken.pbtxt"
    path.write_text(broken)
    with pytest.raises(triton_config.ConfigError, match=re.escape(str(path))):
        triton_config.load(path)


def test_a_template_dim_of_another_rank_is_an_error_naming_the_file():
    with pytest.raises(triton_config.ConfigError, match=r"odd\.pbtxt.*probs"):
        render_config('name: "x" output { name: "probs" data_type: TYPE_FP32 dims: [ 8 ] }', RUN_VALUES, "odd.pbtxt")


def test_queue_policy_renders_as_tritons_default_queue_policy(tmp_path):
    """set_queue_policy (perf/bench.py's guarded overload system): REJECT after the timeout, no client override, the
    queue bound; the shipped CPU ranker's other settings untouched; a model without a dynamic batcher names its file."""
    src = ROOT / "model_repository" / "ranker" / "configs" / "cpu.pbtxt"
    path = tmp_path / "cpu.pbtxt"
    shutil.copy(src, path)
    assert triton_config.edit(path, lambda c: triton_config.set_queue_policy(c, 25000, 8, path))
    text = path.read_text()
    block = text[text.index("default_queue_policy"):]
    block = block[: block.index("}") + 1]
    # REJECT is the enum's zero value, which protobuf text leaves out (and Triton reads back as REJECT)
    assert re.sub(r"\s+", " ", block) == ("default_queue_policy { default_timeout_microseconds: 25000 "
                                          "max_queue_size: 8 }")
    cfg, shipped = triton_config.load(path), triton_config.load(src)
    assert cfg.dynamic_batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert not cfg.dynamic_batching.default_queue_policy.allow_timeout_override
    cfg.dynamic_batching.ClearField("default_queue_policy")
    assert cfg == shipped
    ensemble = triton_config.load(ROOT / "model_repository" / "seqrank" / "config.pbtxt")
    with pytest.raises(triton_config.ConfigError, match=r"seqrank\.pbtxt.*dynamic_batching"):
        triton_config.set_queue_policy(ensemble, 25000, source="seqrank.pbtxt")
    with pytest.raises(triton_config.ConfigError, match="timeout_us > 0"):
        triton_config.set_queue_policy(cfg, 0, source="cpu.pbtxt")


def test_rate_limit_resource_renders_on_every_instance_group(tmp_path):
    """set_rate_limit_resource (the guarded overload system's turn-taking): every instance group needs the named
    resource; setting it twice replaces it; a config without instances names its file."""
    path = tmp_path / "cpu.pbtxt"
    shutil.copy(ROOT / "model_repository" / "ranker" / "configs" / "cpu.pbtxt", path)
    for count in (2, 1):
        triton_config.edit(path, lambda c, n=count: triton_config.set_rate_limit_resource(c, "core", n, path))
    text = re.sub(r"\s+", " ", path.read_text())
    assert 'rate_limiter { resources { name: "core" count: 1 } }' in text
    assert [(r.name, r.count) for g in triton_config.load(path).instance_group for r in g.rate_limiter.resources] \
        == [("core", 1)]
    ensemble = triton_config.load(ROOT / "model_repository" / "seqrank" / "config.pbtxt")
    with pytest.raises(triton_config.ConfigError, match=r"seqrank\.pbtxt.*no instance_group"):
        triton_config.set_rate_limit_resource(ensemble, "core", source="seqrank.pbtxt")


# ---------------------------------------------------------------------------------------------------------------------
# A repository rendered from the template next to a real exported ONNX file
# ---------------------------------------------------------------------------------------------------------------------

CASES = {
    # the shapes of the issue: TransActConfig defaults, D=64, C=4, 8 heads
    "d64_h8": dict(user_dim=64, n_heads=8, seq_len=100),
    # different numbers, so a dim or parameter the renderer missed cannot pass by coincidence
    "d32_h3": dict(user_dim=32, n_heads=3, seq_len=20),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    case = CASES[request.param]
    torch.manual_seed(0)
    cfg = TransActConfig(seq_len=case["seq_len"])
    model = TransActRanker(cfg, item_table=np.zeros((50, 64), dtype=np.float32), n_actions=10,
                           user_dim=case["user_dim"], n_context=N_CONTEXT, n_heads=case["n_heads"]).eval()
    repo = tmp_path_factory.mktemp(f"repo-{request.param}") / "model_repository"
    shutil.copytree(TEMPLATE, repo, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "tables"))
    onnx_path = export_ranker_onnx(model, repo / "ranker" / "1" / "model.onnx")
    heads = [f"head{i}" for i in range(case["n_heads"])]
    values = {"user_dim": case["user_dim"], "n_context": N_CONTEXT, "n_heads": case["n_heads"],
              "seq_len": case["seq_len"], "heads": ",".join(heads), "utility_weights": ",".join("1" for _ in heads),
              "candidate_buckets": ",".join(map(str, CANDIDATE_BUCKETS)), "max_candidates": CANDIDATE_BUCKETS[-1],
                  "n_items": 50, "n_actions": 10}
    for config in repo.rglob("*.pbtxt"):
        config.write_text(render_config(config.read_text(), values, config))
    return {"repo": repo, "onnx": onnx_path, "model": onnx.load(str(onnx_path)), **case}


def onnx_signature(graph_values) -> dict[str, tuple[str, list]]:
    out = {}
    for v in graph_values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        out[v.name] = (ONNX_TO_TRITON[t.elem_type], dims)
    return out


def assert_config_matches_onnx(cfg: mc.ModelConfig, model: onnx.ModelProto, where: str) -> None:
    for kind, graph_values in (("input", model.graph.input), ("output", model.graph.output)):
        declared = tensors(cfg, kind)
        actual = onnx_signature(graph_values)
        assert set(declared) == set(actual), f"{where}: {kind} names {sorted(declared)} vs ONNX {sorted(actual)}"
        for name, (dtype, dims) in declared.items():
            onnx_dtype, onnx_dims = actual[name]
            assert dtype == onnx_dtype, f"{where}: {name} is {dtype}, the ONNX file says {onnx_dtype}"
            # Triton dims exclude the batch dimension (max_batch_size > 0)
            assert len(dims) + 1 == len(onnx_dims), f"{where}: {name} rank {len(dims)}+1 vs ONNX {onnx_dims}"
            assert isinstance(onnx_dims[0], str), f"{where}: ONNX {name} has a fixed batch dimension"
            for got, want in zip(dims, onnx_dims[1:]):
                if isinstance(want, int) and want > 0:
                    assert got == want, f"{where}: {name} dims {dims} vs ONNX {onnx_dims}"
                else:
                    assert got == -1, f"{where}: {name} dim is dynamic in ONNX ({want}) but fixed ({got}) in Triton"


def test_rendered_ranker_configs_agree_with_the_exported_onnx(exported):
    for variant in RANKER_VARIANTS:
        cfg = parse(exported["repo"] / "ranker" / variant)
        assert_config_matches_onnx(cfg, exported["model"], variant)
    probs = tensors(parse(exported["repo"] / "ranker" / "config.pbtxt"), "output")["probs"]
    assert probs == ("TYPE_FP32", [-1, exported["n_heads"]])


def test_rendered_pipeline_dims_agree_with_the_exported_model(exported):
    repo, S, D, H = exported["repo"], exported["seq_len"], exported["user_dim"], exported["n_heads"]
    pre = parse(repo / "preprocess" / "config.pbtxt")
    pre_out = tensors(pre, "output")
    assert pre_out["seq_item"][1] == pre_out["seq_action"][1] == pre_out["seq_mask"][1] == [S]
    assert pre_out["user_emb"][1] == [D] and pre_out["context"][1] == [N_CONTEXT]
    assert pre.parameters["seq_len"].string_value == str(S)
    assert pre.parameters["candidate_buckets"].string_value == ",".join(map(str, CANDIDATE_BUCKETS))
    assert pre.parameters["max_candidates"].string_value == str(CANDIDATE_BUCKETS[-1])
    cpu = parse(repo / "ranker" / "configs" / "cpu.pbtxt")
    assert [cpu.parameters[k].string_value for k in ("seq_len", "n_items", "n_actions")] == [str(S), "50", "10"]
    heads = ",".join(f"head{i}" for i in range(H))
    post = parse(repo / "postprocess" / "config.pbtxt")
    assert post.parameters["heads"].string_value == heads
    assert post.parameters["utility_weights"].string_value == ",".join("1" for _ in range(H))
    assert parse(repo / "seqrank" / "config.pbtxt").parameters["heads"].string_value == heads
    assert tensors(parse(repo / "postprocess" / "config.pbtxt"), "input")["probs"][1] == [-1, H]
    assert tensors(parse(repo / "seqrank" / "config.pbtxt"), "output")["head_scores"][1] == [-1, H]
    h200 = parse(repo / "ranker" / "configs" / "h200.pbtxt")
    for sample in h200.model_warmup:
        assert [list(sample.inputs[n].dims) for n in ("seq_item", "seq_action", "seq_mask")] == [[S]] * 3
        assert list(sample.inputs["user_emb"].dims) == [D]
        assert list(sample.inputs["context"].dims) == [N_CONTEXT]


def test_the_onnx_file_runs_at_every_warmup_shape(exported):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    h200 = parse(exported["repo"] / "ranker" / "configs" / "h200.pbtxt")
    np_types = {"TYPE_INT64": np.int64, "TYPE_BOOL": np.bool_, "TYPE_FP32": np.float32}
    for sample in h200.model_warmup:  # batch 1 at each warmup's shapes (the full batches are a GPU's job)
        feeds = {name: np.zeros([1, *v.dims], dtype=np_types[dtype_name(v.data_type)])
                 for name, v in sample.inputs.items()}
        (probs,) = sess.run(None, feeds)
        assert probs.shape == (1, sample.inputs["cand_item"].dims[0], exported["n_heads"])
        assert np.isfinite(probs).all()


# ---------------------------------------------------------------------------------------------------------------------
# export/build_trt.py: optimization profiles, trtexec command, tensorrt_plan config, the build
# ---------------------------------------------------------------------------------------------------------------------


def test_profile_shapes_cover_every_bucket_and_match_the_onnx_inputs(exported):
    s = build_trt.read_repository_settings(exported["repo"])
    assert (s["seq_len"], s["user_dim"], s["n_context"]) == (exported["seq_len"], exported["user_dim"], N_CONTEXT)
    profiles = build_trt.profile_shapes(s["buckets"], s["max_batch"], s["seq_len"], s["user_dim"], s["n_context"])
    onnx_inputs = onnx_signature(exported["model"].graph.input)
    assert len(profiles) == len(CANDIDATE_BUCKETS)
    previous = 0
    for bucket, profile in zip(CANDIDATE_BUCKETS, profiles):
        assert list(profile) == list(INPUT_NAMES) and set(profile) == set(onnx_inputs)
        for name, (mn, opt, mx) in profile.items():
            rank = len(onnx_inputs[name][1])
            assert len(mn) == len(opt) == len(mx) == rank, name
            assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), (bucket, name, mn, opt, mx)
            assert (mn[0], mx[0]) == (1, s["max_batch"]), name
            for axis, want in enumerate(onnx_inputs[name][1]):
                if axis and isinstance(want, int) and want > 0:  # static ONNX dims are fixed in every profile
                    assert mn[axis] == opt[axis] == mx[axis] == want, (name, axis)
        for name in ("seq_item", "seq_action", "seq_mask"):
            mn, opt, mx = profile[name]
            assert mn[1] == opt[1] == mx[1] == s["seq_len"], "the sequence length is fixed at S"
        mn, opt, mx = profile["cand_item"]
        assert (mn[1], opt[1], mx[1]) == (previous + 1, bucket, bucket)
        previous = bucket
    # every candidate count 1..max falls in exactly one profile
    for n in range(1, CANDIDATE_BUCKETS[-1] + 1):
        hits = [i for i, p in enumerate(profiles) if p["cand_item"][0][1] <= n <= p["cand_item"][2][1]]
        assert len(hits) == 1, n


@pytest.mark.parametrize("bad", [[], [32, 16], [16, 16], [0, 16]])
def test_profile_shapes_reject_bad_buckets(bad):
    with pytest.raises(ValueError):
        build_trt.profile_shapes(bad, 64, 100, 64, 4)


def test_trtexec_command_has_one_shape_group_per_profile(exported):
    s = build_trt.read_repository_settings(exported["repo"])
    profiles = build_trt.profile_shapes(s["buckets"], s["max_batch"], s["seq_len"], s["user_dim"], s["n_context"])
    cmd = build_trt.trtexec_command(exported["onnx"], "model.plan", profiles, fp16=True, workspace_mib=2048)
    assert cmd[0] == "trtexec" and f"--onnx={exported['onnx']}" in cmd and "--saveEngine=model.plan" in cmd
    assert "--fp16" in cmd and "--memPoolSize=workspace:2048M" in cmd
    for flag, which in (("--minShapes=", 0), ("--optShapes=", 1), ("--maxShapes=", 2)):
        groups = [a[len(flag):] for a in cmd if a.startswith(flag)]
        assert len(groups) == len(profiles)
        for group, profile in zip(groups, profiles):
            parsed = dict(part.split(":") for part in group.split(","))
            assert set(parsed) == set(INPUT_NAMES)
            for name, dims in parsed.items():
                assert tuple(int(d) for d in dims.split("x")) == profile[name][which]


@pytest.mark.parametrize("variant", ["config.pbtxt", "configs/h200.pbtxt"])
@pytest.mark.parametrize("graphs", [True, False])
def test_plan_config_is_a_valid_tensorrt_config_for_the_onnx_tensors(exported, variant, graphs):
    src = exported["repo"] / "ranker" / variant
    s = build_trt.read_repository_settings(exported["repo"], src)
    text = build_trt.plan_config(src.read_text(), s["buckets"], s["seq_len"], s["user_dim"], s["n_context"],
                                 cuda_graphs=graphs)
    cfg, base = parse(text), parse(src)
    assert cfg.platform == "tensorrt_plan" and not cfg.backend and cfg.default_model_filename == "model.plan"
    assert_config_matches_onnx(cfg, exported["model"], f"plan from {variant}")
    assert cfg.max_batch_size == base.max_batch_size
    assert list(cfg.dynamic_batching.preferred_batch_size) == list(base.dynamic_batching.preferred_batch_size)
    assert len(cfg.model_warmup) == len(base.model_warmup)
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    every_profile = [str(i) for i in range(len(CANDIDATE_BUCKETS))]
    for group in cfg.instance_group:
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU and list(group.profile) == every_profile
    assert [g.count for g in cfg.instance_group] == [g.count for g in base.instance_group]
    assert cfg.optimization.cuda.graphs == graphs
    if graphs:
        specs = cfg.optimization.cuda.graph_spec
        sizes = sorted(set(base.dynamic_batching.preferred_batch_size) | {base.max_batch_size})
        assert len(specs) == len(CANDIDATE_BUCKETS) * len(sizes)
        for bucket in CANDIDATE_BUCKETS:  # every batch size 1..max_batch_size has exactly one graph per bucket
            ranges = [(s.graph_lower_bound.batch_size, s.batch_size) for s in specs if s.input["cand_item"].dim == [bucket]]
            covered = [b for lo, hi in ranges for b in range(lo, hi + 1)]
            assert covered == list(range(1, base.max_batch_size + 1)), (bucket, ranges)
        for spec in specs:
            assert spec.batch_size in sizes
            assert {k: list(v.dim) for k, v in spec.graph_lower_bound.input.items()} == \
                {k: list(v.dim) for k, v in spec.input.items()}
            assert set(spec.input) == set(INPUT_NAMES)
            assert list(spec.input["cand_item"].dim) in [[b] for b in CANDIDATE_BUCKETS]
            assert list(spec.input["seq_mask"].dim) == [exported["seq_len"]]
            assert list(spec.input["user_emb"].dim) == [exported["user_dim"]]
    else:
        assert not cfg.optimization.cuda.graph_spec


def test_plan_config_refuses_a_cpu_config():
    text = (TEMPLATE / "ranker" / "configs" / "cpu.pbtxt").read_text()
    with pytest.raises(ValueError, match="KIND_CPU"):
        build_trt.plan_config(text, CANDIDATE_BUCKETS, 100, 64, 4)


def test_cache_key_separates_gpu_tensorrt_onnx_and_settings():
    sha = "ab" * 32
    settings = build_trt.build_settings(build_trt.profile_shapes(CANDIDATE_BUCKETS, 64, 100, 64, 4), True, 4096)
    key = build_trt.cache_key("NVIDIA H200", "10.13.0.35", sha, settings)
    assert re.fullmatch(r"[a-z0-9.\-_]+", key)
    assert key.startswith("nvidia-h200__trt-10.13.0.35__onnx-abababababababab__cfg-")
    others = {
        build_trt.cache_key("NVIDIA H200 NVL", "10.13.0.35", sha, settings),
        build_trt.cache_key("NVIDIA H200", "10.14.0.1", sha, settings),
        build_trt.cache_key("NVIDIA H200", "10.13.0.35", "cd" * 32, settings),
        build_trt.cache_key("NVIDIA H200", "10.13.0.35", sha, {**settings, "fp16": False}),
    }
    assert key not in others and len(others) == 4


def test_engine_cache_key_covers_the_external_data(tmp_path):
    """A graph republished with new item rows in its external data (same model.onnx bytes) gets a new engine."""
    import hashlib

    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"graph")
    alone = build_trt.onnx_files_sha256(graph)
    assert alone == hashlib.sha256(b"graph").hexdigest()  # no data file: the keys cached before stay valid
    data = tmp_path / "model.onnx.data"
    data.write_bytes(b"old rows")
    old = build_trt.onnx_files_sha256(graph)
    data.write_bytes(b"new rows")
    assert len({alone, old, build_trt.onnx_files_sha256(graph)}) == 3


def test_cli_print_trtexec_and_missing_tensorrt(exported, capsys):
    argv = ["--onnx", str(exported["onnx"]), "--repository", str(exported["repo"]), "--output", "x.plan", "--fp16"]
    assert build_trt.main(argv + ["--print-trtexec"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("trtexec ") and printed.count("--minShapes=") == len(CANDIDATE_BUCKETS)
    if importlib.util.find_spec("tensorrt") is None:
        assert build_trt.main(argv) == build_trt.EXIT_NO_TENSORRT
        assert "TensorRT Python module is not available" in capsys.readouterr().err


def test_tensorrt_engine_build(exported, tmp_path):
    """The real build: needs the TensorRT Python module and a GPU (the Triton/TensorRT containers)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        reason = f"TensorRT is not installed here ({err}); the engine build runs in the GPU container"
        print(f"SKIPPED test_tensorrt_engine_build: {reason}")
        pytest.skip(reason)
    if build_trt.gpu_name() is None:
        print("SKIPPED test_tensorrt_engine_build: TensorRT is installed but no NVIDIA GPU is visible")
        pytest.skip("TensorRT is installed but no NVIDIA GPU is visible")
    plan = tmp_path / "model.plan"
    rc = build_trt.main(["--onnx", str(exported["onnx"]), "--repository", str(exported["repo"]),
                         "--output", str(plan), "--fp16", "--workspace", "1024"])
    assert rc == 0 and plan.stat().st_size > 0


def test_gpu_pod_configs_size_the_cpu_steps_from_their_measured_cost(tmp_path):
    from seqrank.exporting import sizing
    repo = tmp_path / "model_repository"
    shutil.copytree(TEMPLATE, repo, ignore=shutil.ignore_patterns("__pycache__"))
    counts = sizing.write_gpu_pod_configs(repo)
    rate = sizing.pod_requests_per_s()
    # the pod's cores cover the three CPU consumers at that rate, and each step has enough busy cores for it
    assert rate * (sizing.PREPROCESS_CPU_MS + sizing.POSTPROCESS_CPU_MS + sizing.SERVER_CPU_MS) / 1000 \
        == pytest.approx(sizing.POD_CPUS)
    assert counts["preprocess"] >= rate * sizing.PREPROCESS_CPU_MS / 1000 > counts["preprocess"] - 1
    assert counts["postprocess"] >= rate * sizing.POSTPROCESS_CPU_MS / 1000 > counts["postprocess"] - 1
    assert counts == {"preprocess": 9, "postprocess": 2}  # 16 CPUs / 2.85 ms = 5,614 requests/s
    for step, count in counts.items():
        gpu, base = parse(repo / step / "configs" / "h200.pbtxt"), parse(repo / step / "config.pbtxt")
        assert [(g.count, g.kind) for g in gpu.instance_group] == [(count, mc.ModelInstanceGroup.KIND_CPU)]
        del gpu.instance_group[:], base.instance_group[:]
        assert gpu == base  # only the instance count differs from the CPU pod's config
    assert sizing.cpu_step_instances(pod_cpus=2) == {"preprocess": 2, "postprocess": 1}


def test_an_export_pads_to_the_candidate_buckets_it_is_given(tiny_run, tmp_path):
    """`seqrank export --candidate-buckets`: preprocess pads to the chosen buckets and caps a request at the last,
    and the TensorRT build reads the same list (one profile per bucket); a list that is not increasing is refused."""
    from seqrank.exporting import export_run
    repo = export_run(tiny_run, tmp_path / "repo", check=False, candidate_buckets=(4, 64))
    pre = parse(repo / "preprocess" / "config.pbtxt")
    params = {k: v.string_value for k, v in pre.parameters.items()}
    assert (params["candidate_buckets"], params["max_candidates"]) == ("4,64", "64")
    assert build_trt.read_repository_settings(repo)["buckets"] == [4, 64]
    served = preprocess.Preprocessor(repo / "preprocess" / "1" / "tables", seq_len=int(params["seq_len"]),
                                     buckets=[int(b) for b in params["candidate_buckets"].split(",")],
                                     max_candidates=int(params["max_candidates"]))
    items = [f"item{k}" for k in range(65)]  # unknown ids are served as OOV: only the count matters here

    def request(n):
        return served.parse({"user_id": np.array(["u"], dtype=object),
                             "candidate_ids": np.array(items[:n], dtype=object)})
    assert [len(served.build([request(n)])[0].cand_item) for n in (1, 4, 5, 64)] == [4, 4, 64, 64]
    with pytest.raises(preprocess.RequestError, match="65 candidates, the cap is 64"):
        request(65)
    with pytest.raises(ValueError, match="candidate_buckets must be positive and strictly increasing"):
        export_run(tiny_run, tmp_path / "bad", check=False, candidate_buckets=(64, 4))
    with pytest.raises(ValueError, match="candidate_buckets must be positive and strictly increasing"):  # a config
        preprocess.Preprocessor(repo / "preprocess" / "1" / "tables", seq_len=8, buckets=[64, 4], max_candidates=64)
