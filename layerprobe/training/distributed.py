"""Data-parallel plumbing for `torchrun` training: DDP (gloo on CPU, NCCL on GPU) and FSDP2 for the large
presets. The process group and the collectives are shared with analyze and prune-sweep (`..distributed`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import (PROCESS_GROUP_TIMEOUT, DistEnv, all_reduce_sum, any_process, barrier,  # noqa: F401
                           init_distributed, main_first, resolve_train_device, shutdown)


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
