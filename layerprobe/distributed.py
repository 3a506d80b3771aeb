"""torch.distributed plumbing every data-parallel command shares: the process environment torchrun
describes, the process group, and the collectives (training's DDP/FSDP, analyze and prune-sweep).

A single process is world size 1 and none of this touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import LayerprobeError, first_line

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


def init_distributed(device: str = "auto", device_map=None) -> DistEnv:
    """Read torchrun's environment; start the process group when there is more than one process. With a
    string device map a process computes (and communicates) on the first GPU of its own group."""
    base = resolve_train_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=torch.device("cuda", torch.cuda.current_device()) if base.type == "cuda" else base)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        index = gpu_group(local_rank, local_processes(world), visible_gpus(), device_map)[0] \
            if isinstance(device_map, str) else local_rank
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
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


# -- data parallel over samples (analyze, prune-sweep) -------------------------------------------------

def current() -> DistEnv:
    """The process group this process is in (started by `init_distributed`, or by the caller's own code);
    world size 1 when there is none. The device is the one the group's collectives run on."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return DistEnv()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def requested_world_size() -> int:
    """The processes torchrun started (its environment), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_processes(samples: int | None, world_size: int, device_map=None, gpus: int | None = None,
                    local_world_size: int | None = None) -> None:
    """Data-parallel runs refused before any weight loads: fewer samples than processes (a process with
    none), and a device map whose GPUs cannot be split into one group per process (`gpu_group`)."""
    if world_size <= 1:
        return
    if samples is not None and samples < world_size:
        raise LayerprobeError(f"{world_size} processes share {samples} samples: each needs at least one; "
                              f"use --samples {world_size} or more, or fewer processes (--nproc-per-node)")
    gpus = visible_gpus() if gpus is None else gpus
    local = local_processes(world_size) if local_world_size is None else local_world_size
    if isinstance(device_map, str) and gpus > 0 and local > 1:
        gpu_group(0, local, gpus, device_map)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_processes(world_size: int | None = None) -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE; without it, all of them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size if world_size is not None else requested_world_size()))


def gpu_group(local_rank: int, local_world_size: int, gpus: int, device_map: str = "auto") -> list[int]:
    """The GPUs a process plans its replica over under a string device map: the node's GPUs cut into
    local_world_size contiguous groups, process `local_rank` taking its own (all of them for one process)."""
    if gpus % local_world_size:
        divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
        raise LayerprobeError(
            f"--device-map {device_map} with {local_world_size} processes per node and {gpus} GPUs: each process "
            f"needs a group of GPUs of its own and {gpus} do not split into {local_world_size} equal groups; use "
            f"--nproc-per-node {' or '.join(map(str, divisors))}")
    if device_map == "balanced_low_0" and local_world_size > 1:
        # transformers' planner keeps GPU 0 light by its index (0, then 1..n-1): other groups hold no GPU 0
        raise LayerprobeError(f"--device-map balanced_low_0 with {local_world_size} processes per node: the planner "
                              "keeps GPU 0 light, which only the first process's group holds; use balanced or "
                              "sequential")
    per = gpus // local_world_size
    return list(range(local_rank * per, (local_rank + 1) * per))


def group_max_memory(local_rank: int, local_world_size: int, gpus: int, max_memory: dict | None,
                     free: dict | None = None, device_map: str = "auto") -> dict:
    """The max_memory a process's device map is planned with: its group's GPUs only (accelerate's planner
    places on no device a max_memory dict leaves out), each at the user's budget or else `free[gpu]` (the
    bytes free on it now), plus cpu/mps/disk as the user gave them. With no --max-memory, transformers'
    own defaults (90% of the host's free memory; 90% of a lone GPU under the balanced maps), the host's
    share split equally: every process on the node offloads into the same RAM."""
    group = gpu_group(local_rank, local_world_size, gpus, device_map)
    given = dict(max_memory or {})
    outside = sorted(k for k in given if isinstance(k, int) and k not in group)
    if outside:
        span = f"GPUs {group[0]}-{group[-1]}" if len(group) > 1 else f"GPU {group[0]}"
        raise LayerprobeError(
            f"--max-memory names GPU {outside[0]}, but with {local_world_size} processes per node process "
            f"{local_rank} plans its replica over {span} only; give budgets for cpu/disk only (each process's "
            "GPUs then get what is free on them), or run one process")
    free = free or {}
    scale = 0.9 if max_memory is None and len(group) == 1 and device_map != "sequential" else 1.0
    out: dict = {g: given[g] if g in given else int(free.get(g, 0) * scale) for g in group}
    out.update({k: v for k, v in given.items() if not isinstance(k, int)})
    if max_memory is None and "cpu" in free:
        out["cpu"] = int(free["cpu"] * 0.9 / local_world_size)
    return out


def process_max_memory(device_map, max_memory: dict | None) -> dict | None:
    """`max_memory` for this process's device map: under torchrun with several processes on a node and a
    string map, the one of `group_max_memory`; otherwise as given."""
    local = local_processes()
    gpus = visible_gpus()
    if not isinstance(device_map, str) or local <= 1 or gpus == 0:
        return max_memory
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    group = gpu_group(local_rank, local, gpus, device_map)
    free: dict = {g: torch.cuda.mem_get_info(g)[0] for g in group if not max_memory or g not in max_memory}
    if max_memory is None:
        import psutil  # accelerate's own dependency, as its planner measures the host

        free["cpu"] = psutil.virtual_memory().available
    return group_max_memory(local_rank, local, gpus, max_memory, free, device_map)


def sample_shares(n: int, world_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each process's samples: contiguous, in data order, the first n % world one larger.
    Contiguous shares make the gathered per-sample sums fall in the one-process order by concatenation."""
    base, extra = divmod(n, world_size)
    out, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def split_manifest(env: DistEnv, n: int) -> dict:
    """What manifest.json says about the processes and how the samples were split between them."""
    return {"world_size": env.world_size,
            "split": "samples" if env.distributed else None,
            "sample_shares": [list(s) for s in sample_shares(n, env.world_size)] if env.distributed else None}


def _flat(value) -> torch.Tensor:
    """A number, a tensor or a (nested) list of them as one flat float64 CPU tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).reshape(-1)
    if isinstance(value, (list, tuple)):
        parts = [_flat(v) for v in value]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return torch.tensor([float(value)], dtype=torch.float64)


def all_reduce_packed(env: DistEnv, *, summed=(), maxed=(), rows=(), start: int = 0, total: int = 0):
    """Every process's running state combined with ONE all-reduce of one float64 vector.

    `summed`: values (numbers, tensors, nested lists) added over processes. `maxed`: the same, but the
    largest over processes (each process writes its own slot of a [world, ...] block; the others are 0).
    `rows`: [own samples, ...] arrays placed at [start, start + own) of a zero [total, ...] block, so the
    sum is every process's rows in global sample order. Returns (summed, maxed, rows): flat float64
    tensors for the first two, numpy arrays [total, ...] for the rows. In one process: the values as given.
    """
    import numpy as np

    flat_sum = [_flat(v) for v in summed]
    flat_max = [_flat(v) for v in maxed]
    rows = [np.asarray(r, dtype=np.float64) for r in rows]
    if not env.distributed:
        return flat_sum, flat_max, rows
    W = env.world_size
    parts = list(flat_sum)
    for v in flat_max:
        slots = torch.zeros(W, v.numel(), dtype=torch.float64)
        slots[env.rank] = v
        parts.append(slots.reshape(-1))
    for r in rows:
        block = torch.zeros((total,) + r.shape[1:], dtype=torch.float64)
        block[start:start + r.shape[0]] = torch.from_numpy(r)
        parts.append(block.reshape(-1))
    sizes = [p.numel() for p in parts]
    vector = all_reduce_sum(env, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    pieces = list(torch.split(vector, sizes))
    out_sum = pieces[:len(flat_sum)]
    out_max = [p.reshape(W, -1).amax(0) for p in pieces[len(flat_sum):len(flat_sum) + len(flat_max)]]
    out_rows = [p.reshape((total,) + r.shape[1:]).numpy()
                for p, r in zip(pieces[len(flat_sum) + len(flat_max):], rows)]
    return out_sum, out_max, out_rows


GRADIENT_BUCKET_BYTES = 256 << 20


def all_reduce_gradients(env: DistEnv, params) -> None:
    """Sum the gradients of `params` over processes, in place, in their own dtype: packed into flat buckets
    of at most GRADIENT_BUCKET_BYTES (one collective for a small model). Not in the float64 statistics'
    vector: at 8B parameters that would be a 64 GB copy."""
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group in by_dtype.values():
        bucket, size = [], 0
        for g in group + [None]:
            if g is not None and (not bucket or size + g.numel() * g.element_size() <= GRADIENT_BUCKET_BYTES):
                bucket.append(g)
                size += g.numel() * g.element_size()
                continue
            flat = torch.cat([b.reshape(-1) for b in bucket])
            moved = flat.to(env.device) if env.device.type == "cuda" else flat.cpu()
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            for b, piece in zip(bucket, torch.split(moved, [b.numel() for b in bucket])):
                b.copy_(piece.reshape(b.shape))
            bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)
