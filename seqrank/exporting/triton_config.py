"""Triton model configs (config.pbtxt) as Triton's own ModelConfig protobuf: parse, edit the message, print.

Every program that changes a config goes through here -- `seqrank export` filling a run's numbers into the
templates in model_repository/, export/build_trt.py deriving the tensorrt_plan config, the bench's and research's
config variants -- so a config is never edited as text. A printed config is valid protobuf text format, which is
what Triton reads; it loses the template's comments (the templates in git keep theirs).

Command line (docker/entrypoint.sh renders the container's runtime configs with it):
``python -m seqrank.exporting.triton_config --trt-cache-path DIR SRC DST [SRC DST ...]``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ModelConfig = model_config_pb2.ModelConfig
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU


class ConfigError(ValueError):
    """A config that does not parse as a ModelConfig, or lacks what an edit needs; the message names the file."""


def parse(text: str, source: str | Path = "<config>") -> ModelConfig:
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as err:
        raise ConfigError(f"{source}: not a Triton model config: {err}") from err


def load(path: str | Path) -> ModelConfig:
    return parse(Path(path).read_text(), path)


def dump(config: ModelConfig) -> str:
    return text_format.MessageToString(config)


def save(config: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(dump(config))


def edit(path: str | Path, change: Callable[[ModelConfig], None]) -> bool:
    """Apply ``change`` to the config at ``path`` and write it back, printed, only if the message changed (an
    unchanged file keeps its text and comments). Returns whether it changed."""
    before = load(path)
    after = ModelConfig()
    after.CopyFrom(before)
    change(after)
    if after == before:
        return False
    save(after, path)
    return True


def parameter(config: ModelConfig, key: str) -> str | None:
    """The string value of parameter ``key``, or None where the config has none."""
    return config.parameters[key].string_value if key in config.parameters else None


def set_parameter(config: ModelConfig, key: str, value, source: str | Path = "<config>") -> None:
    """Set an existing parameter (a missing key is an error: an edit never adds a setting the model does not read)."""
    if key not in config.parameters:
        raise ConfigError(f"{source}: no parameter {key!r}")
    config.parameters[key].string_value = str(value)


def set_instance_count(config: ModelConfig, count: int, source: str | Path = "<config>") -> None:
    """Set the (first) instance group's count."""
    if not config.instance_group:
        raise ConfigError(f"{source}: no instance_group")
    config.instance_group[0].count = int(count)


def set_queue_policy(config: ModelConfig, timeout_us: int, max_queue_size: int = 0,
                     source: str | Path = "<config>") -> None:
    """Bound the dynamic batcher's queue: a request that has waited ``timeout_us`` without being scheduled is
    rejected with an explicit error (``timeout_action: REJECT``; clients cannot ask for longer), and with
    ``max_queue_size`` > 0 a request arriving at a full queue is rejected at once. Under overload the server then
    answers late requests with an error instead of letting every request's latency grow with the queue. Only a
    model with ``dynamic_batching`` has that queue."""
    if timeout_us <= 0 or max_queue_size < 0:
        raise ConfigError(f"{source}: queue policy needs timeout_us > 0 and max_queue_size >= 0, got "
                          f"{timeout_us} and {max_queue_size}")
    if not config.HasField("dynamic_batching"):
        raise ConfigError(f"{source}: no dynamic_batching (a queue policy applies to the dynamic batcher's queue)")
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = model_config_pb2.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = int(timeout_us)
    policy.allow_timeout_override = False
    policy.max_queue_size = int(max_queue_size)


def set_rate_limit_resource(config: ModelConfig, resource: str, count: int = 1,
                            source: str | Path = "<config>") -> None:
    """Every instance group needs ``count`` of ``resource`` to execute (Triton's rate limiter, active when the
    server runs with ``--rate-limit=execution_count``): instances of all the models that name the same resource
    then take turns instead of running at once, e.g. one execution at a time on a one-core CPU share."""
    if not config.instance_group:
        raise ConfigError(f"{source}: no instance_group (the rate limiter schedules instances)")
    if count < 1:
        raise ConfigError(f"{source}: rate limiter resource count must be >= 1, got {count}")
    for group in config.instance_group:
        group.rate_limiter.ClearField("resources")
        group.rate_limiter.resources.add(name=resource, count=int(count))


def fill(config: ModelConfig, dims: Mapping[str, Sequence[int]], parameters: Mapping[str, object],
         source: str | Path = "<config>") -> ModelConfig:
    """Fill numbers by name wherever the config declares them: the dims of every input, output and model_warmup
    input named in ``dims`` (a dim the config declares -1 stays -1: variable there) and the parameters named in
    ``parameters`` (as strings). Names the config does not declare are left out; a rank that differs is an error."""
    def shaped(name: str, declared) -> None:
        want = dims.get(name)
        if want is None:
            return
        if len(declared) != len(want):
            raise ConfigError(f"{source}: tensor {name!r} has dims {list(declared)}, expected rank {len(want)}")
        declared[:] = [d if d == -1 else int(w) for d, w in zip(declared, want)]

    for tensor in [*config.input, *config.output]:
        shaped(tensor.name, tensor.dims)
    for sample in config.model_warmup:
        for name, value in sample.inputs.items():
            shaped(name, value.dims)
    for key, value in parameters.items():
        if key in config.parameters:
            config.parameters[key].string_value = str(value)
    return config


def set_accelerator_parameter(config: ModelConfig, key: str, value) -> int:
    """Set parameter ``key`` on every execution accelerator (GPU and CPU) that declares it; returns how many."""
    accelerators = config.optimization.execution_accelerators
    found = 0
    for accel in [*accelerators.gpu_execution_accelerator, *accelerators.cpu_execution_accelerator]:
        if key in accel.parameters:
            accel.parameters[key] = str(value)
            found += 1
    return found


def render_with_trt_cache(src: str | Path, dst: str | Path, cache_path: str | Path) -> None:
    """The config at ``src`` with ONNX Runtime's TensorRT engine cache at ``cache_path`` (where the template says
    trt_engine_cache_path), printed to ``dst`` through a temporary file and a rename: a reader sees the old file or
    the new one, never half of it."""
    config = load(src)
    set_accelerator_parameter(config, "trt_engine_cache_path", cache_path)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    save(config, tmp)
    os.replace(tmp, dst)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqrank.exporting.triton_config",
                                     description="render configs for a container: SRC DST pairs")
    parser.add_argument("--trt-cache-path", required=True, help="ONNX Runtime's TensorRT engine cache directory")
    parser.add_argument("pairs", nargs="+", metavar="SRC DST")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("expected SRC DST pairs")
    try:
        for src, dst in zip(args.pairs[::2], args.pairs[1::2]):
            render_with_trt_cache(src, dst, args.trt_cache_path)
    except (ConfigError, OSError) as err:
        print(f"seqrank.exporting.triton_config: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
