"""Data-parallel training across processes started by torchrun: the process group, this process's rank and device,
its share of each global batch (or, with partitioned data, the factor of its own batch), and the few collectives the
training loops need (seqrank/training.py).

Without torchrun (no WORLD_SIZE in the environment) nothing here starts a process group: world size 1, rank 0, the
CPU, and every helper is the identity, so single-process training runs exactly the code it ran before.
docs/training-at-scale.md: the design (sharding, gradients, checkpoints) and its measurements.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("seqrank.distributed")


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ


@contextmanager
def process_group():
    """The process group for the duration of a command: gloo on CPU, NCCL with one CUDA device per process when the
    machine has them. Nothing at all when not launched by torchrun."""
    if not launched() or dist.is_initialized():
        yield
        return
    hazard = restart_hazard(os.environ)
    if hazard and os.environ.get("RANK") == "0":  # before the group exists: a restarted group may hang in its init
        log.warning(hazard)
    if torch.cuda.is_available():
        # cuBLAS is deterministic only with a fixed workspace (training sets torch.use_deterministic_algorithms);
        # it must be set before the first cuBLAS call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    if is_main():
        log.info("data-parallel training: world size %d (%s backend, device %s)", world_size(),
                 dist.get_backend(), device())
    try:
        yield
    finally:
        dist.destroy_process_group()


def restart_hazard(env) -> str | None:
    """Why torchrun's restarts of this group may hang, if they can: with --max-restarts, torchrun's default shared
    rendezvous store keeps the previous attempt's process-group keys, and a restarted group can read a dead worker's
    address (pytorch/pytorch#135712). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment gives every
    attempt a fresh store."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return ("torchrun may restart this group, and a restarted group can hang on the shared rendezvous store "
                "(pytorch/pytorch#135712): launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    return None


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes the run directory and logs progress."""
    return rank() == 0


def device() -> torch.device:
    """This process's CUDA device in an NCCL group; the CPU otherwise (single-process training stays on the CPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard(n: int) -> tuple[np.ndarray, float]:
    """This rank's rows of a global batch of n rows, and the factor its loss is scaled by.

    Rank r takes rows r, r + W, r + 2W, ... (W = world size). Each rank's loss is its rows' share of the global
    batch's loss (their sum over the global batch's normaliser) times W, so that DistributedDataParallel's average
    of the W gradients is exactly the gradient of the global batch's loss, whatever the shards' sizes. A rank left
    without rows (a last batch smaller than W) still has to join the gradient all-reduce: it runs row 0 with factor 0.
    """
    return shard_of(n, rank(), world_size())


def shard_of(n: int, r: int, world: int) -> tuple[np.ndarray, float]:
    """shard() for rank r of `world` (a pure function, for tests)."""
    rows = np.arange(r, n, world)
    if len(rows) == 0:
        return np.zeros(1, dtype=np.int64), 0.0
    return rows, float(world)


def all_sum(x) -> np.ndarray:
    """x summed over the ranks (float64), for data that each rank holds a different part of (its own users, in a
    partitioned run); x itself, as an array, in one process."""
    x = np.asarray(x, dtype=np.float64)
    if not dist.is_initialized():
        return x
    t = torch.as_tensor(x).to(device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def over_log(x, partitioned: bool) -> np.ndarray:
    """x (a count, or counts) over the whole log: summed over the ranks when each holds its own users (a partitioned
    run), x itself when every rank holds the whole log."""
    return all_sum(x) if partitioned else np.asarray(x, dtype=np.float64)


def all_max(x):
    """The largest x of any rank: an int, or an int64 array element by element."""
    if not dist.is_initialized():
        return x
    t = torch.as_tensor(np.asarray(x, dtype=np.int64), device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().numpy() if t.dim() else int(t.item())


def local_factor(n: float, total: float) -> float:
    """A partitioned run's loss factor for a rank whose batch holds n of the step's `total` units over the ranks
    (queries, label weight; all_sum). Each rank's loss, the mean over its own units, times W n / total, makes
    DistributedDataParallel's average of the W gradients the gradient of the mean over every rank's units: ranks
    with uneven batches (or none: n = 0, a stand-in) weigh in by what they hold, as shard() does for a global batch."""
    return world_size() * n / total if total > 0 else 0.0


def padded_steps(batches: list) -> list:
    """A partitioned rank's batches, then None up to the most batches any rank has: every rank joins every step's
    gradient all-reduce, a rank out of data with a zero-weighted stand-in."""
    return list(batches) + [None] * (all_max(len(batches)) - len(batches))


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's (picklable) value, in rank order, on rank 0; None elsewhere."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(value, values, dst=0)
    return values


def seed_epoch(seed: int, epoch: int) -> None:
    """In a group of several processes, seed each rank's torch generator (dropout draws) from (seed, epoch, rank):
    the ranks draw different masks for their different rows, and a run resumed after a failure, with any world
    size, draws exactly what the uninterrupted run drew. One process keeps its single stream (checkpointed)."""
    if world_size() > 1:
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank()]).generate_state(1)[0]))


class _Step(nn.Module):
    """`step(model, *inputs)` as a module's forward: DistributedDataParallel synchronises the gradients of what one
    forward call computed, and a training step may need several of the model's methods."""

    def __init__(self, model: nn.Module, step: Callable[..., Any]):
        super().__init__()
        self.model, self.step = model, step

    def forward(self, *inputs, **kwargs):
        return self.step(self.model, *inputs, **kwargs)


def data_parallel(model: nn.Module, step: Callable[..., Any]) -> nn.Module:
    """A module whose forward(*inputs) is step(model, *inputs); in a process group, wrapped in
    DistributedDataParallel, so backward() all-reduces (averages) the gradients over the ranks.

    Embedding tables keep dense gradients (nn.Embedding's default): AdamW needs them, and the all-reduce of the
    item table is small next to a step's compute (docs/training-at-scale.md). static_graph: the baselines leave
    some parameters unused in every step (no_sequence never reads the action embedding), always the same ones.
    forward_sync_buffers=False: the only buffer (the ranker's frozen item table) never changes in training."""
    wrapped = _Step(model, step)
    if not dist.is_initialized():
        return wrapped
    dev = device()
    return nn.parallel.DistributedDataParallel(wrapped, device_ids=[dev.index] if dev.type == "cuda" else None,
                                               forward_sync_buffers=False, static_graph=True)


def from_main(compute: Callable[[], Any]) -> Any:
    """compute() on rank 0, its (picklable) result on every rank: one decision for all of them."""
    if not dist.is_initialized():
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value: Any, what: str) -> Any:
    """`value` if every rank holds the same one; otherwise a RuntimeError naming `what` (e.g. ranks that see
    different run directories, when nodes do not share the volume that holds it)."""
    if not dist.is_initialized():
        return value
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"{what} differs between ranks ({values}): every rank must see the same run directory "
                           "(on several nodes, a shared volume)")
    return value
