"""Data-parallel plumbing for `torchrun`: DDP (gloo on CPU, NCCL on GPU) and FSDP2 for the large presets.

A single process is world size 1 and none of this touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LayerprobeError, first_line

# How long a process may wait in a collective for the others. The phases where one process works while the
# others wait are writing a checkpoint on the main process (a gathered 1b model + Adam: ~16 GB, ~10-20 s) and
# evaluation; data preparation (which may take an hour) waits on a file lock, outside any collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_train_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise LayerprobeError(f"unknown --device {device!r}; training runs on auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise LayerprobeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment; start the process group when there is more than one process."""
    base = resolve_train_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=torch.device("cuda", torch.cuda.current_device()) if base.type == "cuda" else base)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def main_first(env: DistEnv, work):
    """`work()` on the main process only, then a collective every process reaches. It stands where a barrier
    would: when `work` fails on the main process, every other process raises an error naming it instead of
    waiting at the barrier until the process group times out. Returns `work()`'s result on the main process
    and None on the others."""
    if not env.distributed:
        return work()
    result, failure = None, None
    if env.is_main:
        try:
            result = work()
        except BaseException as e:  # Ctrl-C and SystemExit too: the others must not wait for this process
            failure = e
    message = [None if failure is None else first_line(failure)]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise LayerprobeError(f"stopped because the main process (rank 0) failed: {message[0]}")
    return result


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over processes (on the CPU for gloo, on the GPU for NCCL)."""
    if not env.distributed:
        return values
    t = values.to(env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def any_process(env: DistEnv, flag: bool) -> bool:
    """True when `flag` is true on any process: every process then takes the same branch."""
    if not env.distributed:
        return flag
    return bool(all_reduce_sum(env, torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def wrap_fsdp(model: nn.Module, env: DistEnv, mixed_bf16: bool) -> nn.Module:
    """FSDP2: shard every decoder layer, then the rest (embeddings, final norm, head), across the processes."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps it under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
