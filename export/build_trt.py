#!/usr/bin/env python3
"""Build a TensorRT engine (plan) for the seqrank ranker from its ONNX file, on the GPU it will run on.

Engines are specific to the GPU model and the TensorRT version, so they are never committed or baked into the image:
the container entrypoint (docker/entrypoint.sh) runs this script on first start and caches the plan on a volume,
keyed by GPU name + TensorRT version + the sha256 of the ONNX file and its external data (+ a hash of the build
settings).

One optimization profile per candidate bucket (seqrank.serving.preprocess.CANDIDATE_BUCKETS; preprocess pads N up
to a bucket): profile i accepts batch 1..max_batch and candidates (bucket[i-1], bucket[i]]; the sequence length is
fixed at S (preprocess always sends exactly S rows). Triton's dynamic batcher only batches requests of the same shape, so every
batch falls inside exactly one profile, and the TensorRT backend picks it (the ranker config lists every profile).

    # build a plan (TensorRT Python API; prints the equivalent trtexec command first)
    python export/build_trt.py --onnx REPO/ranker/1/model.onnx --repository REPO --output model.plan --fp16
    # what the entrypoint does: build once per (GPU, TensorRT, ONNX) into a cache, print the plan path
    python export/build_trt.py --onnx REPO/ranker/1/model.onnx --repository REPO --cache-dir /cache/trt --fp16
    # only print the trtexec command line (no TensorRT needed)
    python export/build_trt.py --onnx model.onnx --repository REPO --output model.plan --fp16 --print-trtexec
    # the tensorrt_plan config for a ranker config (no TensorRT needed)
    python export/build_trt.py --plan-config REPO/ranker/config.pbtxt --repository REPO

Exit status: 0 ok; 1 build failed; 2 bad arguments; 3 the TensorRT Python module is not installed (it ships in the
Triton and TensorRT containers, not in the CPU install); 4 no NVIDIA GPU visible.

Pure functions (profile_shapes, trtexec_command, plan_config, cache_key, read_repository_settings) need neither
TensorRT nor a GPU, so the tests check them anywhere. Configs are read and written as Triton's ModelConfig protobuf
(seqrank.exporting.triton_config), and the ranker's constants come from the seqrank package: the image installs it with the
serving requirements (deploy/requirements-serving.txt).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from seqrank.exporting import triton_config
from seqrank.exporting.onnx_files import external_data_path
from seqrank.serving.batching import SEQUENCE_INPUTS
from seqrank.serving.preprocess import CANDIDATE_BUCKETS, check_buckets

DEFAULT_MAX_BATCH = 64
# opt batch per profile = OPT_CANDIDATES_PER_BATCH // bucket (clamped to [1, max_batch]): TensorRT tunes kernels for
# about this many (request, candidate) pairs per execution, which is what the dynamic batcher forms under load
# (e.g. 16 requests of 512 candidates; preferred_batch_size [8, 16, 32] in the ranker config).
OPT_CANDIDATES_PER_BATCH = 8192
DEFAULT_WORKSPACE_MIB = 4096
DEFAULT_GRAPH_BATCH_SIZES = (8, 16, 32)

EXIT_BUILD_FAILED = 1
EXIT_NO_TENSORRT = 3
EXIT_NO_GPU = 4

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]


def log(message: str) -> None:
    print(f"[build_trt] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Optimization profiles and the trtexec equivalent
# ----------------------------------------------------------------------------------------------------------------------


def opt_batch(bucket: int, max_batch: int, opt_candidates: int = OPT_CANDIDATES_PER_BATCH) -> int:
    return max(1, min(max_batch, opt_candidates // bucket))


def profile_shapes(buckets, max_batch: int, seq_len: int, user_dim: int, n_context: int,
                   opt_candidates: int = OPT_CANDIDATES_PER_BATCH) -> list[Profile]:
    """One optimization profile per candidate bucket: {input name: (min, opt, max)} with full shapes incl. batch,
    one entry per ranker input (in the ONNX file's order).

    Batch: 1 .. max_batch (opt: opt_batch(bucket)); candidates: (previous bucket, bucket] (opt = max = bucket, the
    shape preprocess actually sends); sequence inputs fixed at seq_len; user_emb/context static."""
    buckets = list(check_buckets(buckets))
    if max_batch < 1 or seq_len < 1 or user_dim < 1 or n_context < 1:
        raise ValueError("max_batch, seq_len, user_dim and n_context must be >= 1")
    profiles = []
    lower = 0
    for bucket in buckets:
        ob = opt_batch(bucket, max_batch, opt_candidates)
        p: Profile = {}
        for name in SEQUENCE_INPUTS:
            p[name] = ((1, seq_len), (ob, seq_len), (max_batch, seq_len))
        p["user_emb"] = ((1, user_dim), (ob, user_dim), (max_batch, user_dim))
        p["context"] = ((1, n_context), (ob, n_context), (max_batch, n_context))
        p["cand_item"] = ((1, lower + 1), (ob, bucket), (max_batch, bucket))
        profiles.append(p)
        lower = bucket
    return profiles


def _shape_spec(profile: Profile, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def trtexec_command(onnx: str | Path, plan: str | Path, profiles: list[Profile], fp16: bool = True,
                    workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: str | Path | None = None) -> list[str]:
    """The trtexec argv that builds the same engine: one --minShapes/--optShapes/--maxShapes group per profile
    (trtexec adds a profile for each repeated group), fp16, workspace pool limit."""
    cmd = ["trtexec", f"--onnx={onnx}", f"--saveEngine={plan}"]
    for profile in profiles:
        cmd += [f"--minShapes={_shape_spec(profile, 0)}", f"--optShapes={_shape_spec(profile, 1)}",
                f"--maxShapes={_shape_spec(profile, 2)}"]
    if fp16:
        cmd.append("--fp16")
    cmd.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    cmd.append("--skipInference")
    return cmd


# ----------------------------------------------------------------------------------------------------------------------
# Settings from a rendered model repository, and the tensorrt_plan ranker config (seqrank.exporting.triton_config)
# ----------------------------------------------------------------------------------------------------------------------


def ranker_settings(config: triton_config.ModelConfig, source: str | Path = "<config>") -> dict:
    """Max batch, user/context dims and preferred batch sizes of a ranker config."""
    dims = {t.name: list(t.dims) for t in config.input}
    missing = [name for name in ("user_emb", "context") if not dims.get(name)]
    if missing:
        raise triton_config.ConfigError(f"{source}: no input {' or '.join(missing)} with dims")
    return {"max_batch": config.max_batch_size, "user_dim": dims["user_emb"][-1], "n_context": dims["context"][-1],
            "preferred_batch_sizes": list(config.dynamic_batching.preferred_batch_size)}


def read_repository_settings(repository: str | Path, ranker_config: str | Path | None = None) -> dict:
    """seq_len and candidate buckets from preprocess/config.pbtxt (the parameters preprocess pads with), max batch,
    user/context dims and preferred batch sizes from the ranker config (default ranker/config.pbtxt)."""
    repository = Path(repository)
    pre_path = repository / "preprocess" / "config.pbtxt"
    pre = triton_config.load(pre_path)
    seq_len = triton_config.parameter(pre, "seq_len")
    buckets = triton_config.parameter(pre, "candidate_buckets")
    if seq_len is None or buckets is None:
        raise ValueError(f"{pre_path} lacks the seq_len / candidate_buckets parameters")
    ranker_path = Path(ranker_config or repository / "ranker" / "config.pbtxt")
    return {"seq_len": int(seq_len), "buckets": [int(b) for b in buckets.split(",") if b.strip()],
            **ranker_settings(triton_config.load(ranker_path), ranker_path)}


def plan_config(config_text: str, buckets, seq_len: int, user_dim: int, n_context: int, cuda_graphs: bool = True,
                graph_batch_sizes=None, source: str = "") -> str:
    """Turn a rendered GPU ranker config (onnxruntime + TensorRT accelerator) into the tensorrt_plan config for the
    engine this script builds: platform tensorrt_plan, model.plan, every optimization profile listed on every GPU
    instance group (otherwise the TensorRT backend uses profile 0 only), the ONNX Runtime accelerator block dropped,
    and CUDA graphs (TensorRT backend only) captured for each (preferred batch size, bucket) shape.
    Inputs, outputs, batching, instance counts and warmup stay as they were."""
    buckets = [int(b) for b in buckets]
    config = triton_config.parse(config_text, source or "<config>")
    kinds = {group.kind for group in config.instance_group}
    if triton_config.KIND_CPU in kinds:
        raise ValueError("a TensorRT plan runs on the GPU: the config has a KIND_CPU instance group")
    if triton_config.KIND_GPU not in kinds:
        raise ValueError("no KIND_GPU instance group in the config")
    config.ClearField("backend")
    config.platform = "tensorrt_plan"
    config.default_model_filename = "model.plan"
    for group in config.instance_group:
        del group.profile[:]
        group.profile.extend(str(i) for i in range(len(buckets)))
    sizes = graph_batch_sizes if graph_batch_sizes is not None else (
        list(config.dynamic_batching.preferred_batch_size) or list(DEFAULT_GRAPH_BATCH_SIZES))
    # the largest batch the dynamic batcher may form gets a graph too, so every batch size has one (lower_bound below)
    sizes = sorted({int(s) for s in sizes if 1 <= int(s) <= config.max_batch_size} | {config.max_batch_size})
    config.ClearField("optimization")
    optimization = config.optimization
    if cuda_graphs:
        optimization.cuda.graphs = True
        static = {**{name: seq_len for name in SEQUENCE_INPUTS}, "user_emb": user_dim, "context": n_context}
        for bucket in buckets:
            for lower, batch in zip([1] + [b + 1 for b in sizes[:-1]], sizes):
                # A partial batch (lower..batch) runs the graph captured at `batch`: the rows past the real ones are
                # uninitialised, harmless here because the ranker's rows never mix (no op reduces over the batch).
                spec = optimization.cuda.graph_spec.add(batch_size=batch)
                spec.graph_lower_bound.batch_size = lower
                for name, dim in {**static, "cand_item": bucket}.items():
                    spec.input[name].dim.append(dim)
                    spec.graph_lower_bound.input[name].dim.append(dim)
    optimization.input_pinned_memory.enable = True
    optimization.output_pinned_memory.enable = True
    header = ("# Generated by export/build_trt.py" + (f" from {source}" if source else "")
              + ": the TensorRT engine built on this GPU (one optimization profile per candidate bucket"
              + (", CUDA graphs per preferred batch size x bucket, each serving the batches down to the next smaller size" if cuda_graphs else "") + ").\n")
    return header + triton_config.dump(config)


# ----------------------------------------------------------------------------------------------------------------------
# Cache key, GPU name
# ----------------------------------------------------------------------------------------------------------------------


def onnx_files_sha256(path: str | Path) -> str:
    """sha256 of the ONNX file and, where export wrote one, its external data file (seqrank/exporting/onnx_files.py): a large
    item table lives there, and a graph republished with new rows must not reuse the engine built with the old
    ones. Without a data file it is the ONNX file's own sha256."""
    h = hashlib.sha256()
    data = external_data_path(path)
    for part in (Path(path), data) if data.is_file() else (Path(path),):
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


def build_settings(profiles: list[Profile], fp16: bool, workspace_mib: int) -> dict:
    return {"profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles], "fp16": bool(fp16),
            "workspace_mib": int(workspace_mib)}


def cache_key(gpu_name: str, trt_version: str, onnx_sha256: str, settings: dict | None = None) -> str:
    """Directory name of a cached engine: GPU name + TensorRT version + ONNX sha256 (+ a short hash of the build
    settings, so a different bucket list or precision never reuses a stale plan)."""
    key = f"{_slug(gpu_name)}__trt-{_slug(trt_version)}__onnx-{onnx_sha256[:16]}"
    if settings is not None:
        key += "__cfg-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return key


def gpu_name() -> str | None:
    """Name of the first visible NVIDIA GPU: $SEQRANK_GPU_NAME, nvidia-smi, or /proc/driver/nvidia."""
    if os.environ.get("SEQRANK_GPU_NAME"):
        return os.environ["SEQRANK_GPU_NAME"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            continue
    return None


# ----------------------------------------------------------------------------------------------------------------------
# The build (TensorRT Python API)
# ----------------------------------------------------------------------------------------------------------------------


def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - only inside the GPU container
    except ImportError as err:
        return None, err
    return trt, None


def build_engine(trt, onnx: Path, plan: Path, profiles: list[Profile], fp16: bool, workspace_mib: int,
                 timing_cache: Path | None = None) -> dict:
    """Parse the ONNX file, add one optimization profile per bucket, build and write the serialized plan
    (atomically). Returns build facts for build.json."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # implicit in TensorRT >= 10
    if explicit is not None:
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx}:\n{errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profiles[0]):
        raise RuntimeError(f"ONNX inputs {names} are not the ranker's {list(profiles[0])}")
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        static = profiles[0][tensor.name][0]
        for axis, (dim, want) in enumerate(zip(tensor.shape, static)):
            if dim >= 0 and axis > 0 and dim != want:
                raise RuntimeError(f"input {tensor.name} has static dim {dim} on axis {axis}, the profile says {want}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if fp16:
        if hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            log("this TensorRT has no BuilderFlag.FP16 (strongly typed only): building in the ONNX file's precision")
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (mn, op, mx) in shapes.items():
            profile.set_shape(name, mn, op, mx)
        config.add_optimization_profile(profile)
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT build_serialized_network returned None (see the TensorRT log above)")
    seconds = time.monotonic() - started
    data = bytes(memoryview(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is None or engine.num_optimization_profiles != len(profiles):
        raise RuntimeError("the built engine does not deserialize with one profile per bucket")
    plan.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.with_name(f".{plan.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, plan)
    if cache is not None:
        tmp = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.tmp")
        tmp.write_bytes(bytes(memoryview(cache.serialize())))
        os.replace(tmp, timing_cache)
    return {"build_seconds": round(seconds, 1), "plan_bytes": len(data)}


def _build_cached(trt, args, profiles: list[Profile], onnx: Path) -> Path:
    import fcntl  # noqa: PLC0415 - POSIX only, like the container

    name = gpu_name()
    if not name:
        log("no NVIDIA GPU visible (nvidia-smi and /proc/driver/nvidia found none)")
        raise SystemExit(EXIT_NO_GPU)
    sha = onnx_files_sha256(onnx)
    settings = build_settings(profiles, args.fp16, args.workspace)
    cache_dir = Path(args.cache_dir)
    key_dir = cache_dir / cache_key(name, trt.__version__, sha, settings)
    plan = key_dir / "model.plan"
    key_dir.mkdir(parents=True, exist_ok=True)
    with open(key_dir / ".lock", "w") as lock:  # another replica on the same volume may be building this engine
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building {key_dir.name}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if plan.is_file() and (key_dir / "build.json").is_file():
            log(f"cached engine {plan} (GPU {name}, TensorRT {trt.__version__}, ONNX sha256 {sha[:16]})")
            return plan
        log(f"building engine for GPU {name!r}, TensorRT {trt.__version__}, ONNX sha256 {sha[:16]} "
            f"({len(profiles)} profiles, fp16={args.fp16}); this takes minutes, once per GPU type")
        timing = cache_dir / f"timing__{_slug(name)}__trt-{_slug(trt.__version__)}.cache"
        facts = build_engine(trt, onnx, plan, profiles, args.fp16, args.workspace, timing)
        meta = {"gpu": name, "tensorrt": trt.__version__, "onnx": str(onnx), "onnx_sha256": sha, **settings,
                **facts, "trtexec": shlex.join(trtexec_command(onnx, plan, profiles, args.fp16, args.workspace)),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (key_dir / "build.json").write_text(json.dumps(meta, indent=1))
        log(f"engine written: {plan} ({facts['plan_bytes'] / 2**20:.1f} MiB in {facts['build_seconds']} s)")
        return plan


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_trt.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", type=Path, help="the ranker's ONNX file (REPO/ranker/<version>/model.onnx)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", type=Path, help="write the plan here")
    out.add_argument("--cache-dir", type=Path,
                     help="build into CACHE/<gpu>__trt-<version>__onnx-<sha>__cfg-<hash>/model.plan unless it is "
                          "there already; the plan path is printed as the last line of stdout")
    p.add_argument("--repository", type=Path, help="rendered model repository: seq_len, buckets, dims, max batch")
    p.add_argument("--config", type=Path, help="ranker config to read max batch/dims from (default "
                                               "REPO/ranker/config.pbtxt)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--buckets", help="comma-separated candidate buckets (default: the repository's)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--user-dim", type=int)
    p.add_argument("--n-context", type=int)
    p.add_argument("--opt-candidates", type=int, default=OPT_CANDIDATES_PER_BATCH,
                   help="opt batch per profile = this // bucket (default %(default)s)")
    p.add_argument("--fp16", action="store_true", help="allow fp16 kernels (BuilderFlag.FP16)")
    p.add_argument("--workspace", type=int, default=DEFAULT_WORKSPACE_MIB, metavar="MIB",
                   help="builder workspace memory pool limit in MiB (default %(default)s)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (with --output)")
    p.add_argument("--print-trtexec", action="store_true", help="print the trtexec command line and exit")
    p.add_argument("--plan-config", type=Path, metavar="CONFIG",
                   help="print the tensorrt_plan config derived from this ranker config and exit")
    p.add_argument("--no-cuda-graphs", action="store_true", help="with --plan-config: no CUDA graphs")
    return p


def _settings(args, parser) -> dict:
    base = {}
    if args.repository:
        try:
            base = read_repository_settings(args.repository, args.config)
        except (OSError, ValueError) as err:
            parser.error(f"cannot read settings from {args.repository}: {err}")
    elif args.config:
        try:
            base = ranker_settings(triton_config.load(args.config), args.config)
        except (OSError, ValueError) as err:
            parser.error(f"cannot read settings from {args.config}: {err}")
    overrides = {"seq_len": args.seq_len, "max_batch": args.max_batch, "user_dim": args.user_dim,
                 "n_context": args.n_context,
                 "buckets": [int(b) for b in args.buckets.split(",")] if args.buckets else None}
    settings = {"buckets": list(CANDIDATE_BUCKETS), "max_batch": DEFAULT_MAX_BATCH, **base,
                **{k: v for k, v in overrides.items() if v is not None}}
    missing = [k for k in ("seq_len", "user_dim", "n_context") if k not in settings]
    if missing:
        parser.error(f"give --repository or --{' --'.join(m.replace('_', '-') for m in missing)}")
    return settings


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    s = _settings(args, parser)

    if args.plan_config:
        text = args.plan_config.read_text()
        try:
            print(plan_config(text, s["buckets"], s["seq_len"], s["user_dim"], s["n_context"],
                              cuda_graphs=not args.no_cuda_graphs, source=str(args.plan_config)), end="")
        except ValueError as err:
            log(f"cannot derive a plan config from {args.plan_config}: {err}")
            return 2
        return 0

    if args.onnx is None or (args.output is None and args.cache_dir is None):
        parser.error("--onnx and one of --output / --cache-dir are required")
    if not args.onnx.is_file():
        parser.error(f"{args.onnx} does not exist")
    profiles = profile_shapes(s["buckets"], s["max_batch"], s["seq_len"], s["user_dim"], s["n_context"],
                              args.opt_candidates)
    shown_plan = args.output or Path(args.cache_dir) / "<key>" / "model.plan"
    command = shlex.join(trtexec_command(args.onnx, shown_plan, profiles, args.fp16, args.workspace,
                                         args.timing_cache))
    if args.print_trtexec:
        print(command)
        return 0
    log(f"equivalent trtexec command: {command}")

    trt, err = _import_tensorrt()
    if trt is None:
        log(f"the TensorRT Python module is not available ({err}). It ships in the official containers "
            "(nvcr.io/nvidia/tritonserver:<release>-py3, nvcr.io/nvidia/tensorrt); it is deliberately not part "
            "of the CPU install. No engine built.")
        return EXIT_NO_TENSORRT
    try:
        if args.cache_dir is not None:
            plan = _build_cached(trt, args, profiles, args.onnx)
        else:
            facts = build_engine(trt, args.onnx, args.output, profiles, args.fp16, args.workspace, args.timing_cache)
            plan = args.output
            log(f"engine written: {plan} ({facts['plan_bytes'] / 2**20:.1f} MiB in {facts['build_seconds']} s)")
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as exc:  # noqa: BLE001 - any TensorRT failure means: keep the ONNX Runtime config
        log(f"engine build failed: {type(exc).__name__}: {exc}")
        return EXIT_BUILD_FAILED
    print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
