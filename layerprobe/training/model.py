"""The model a run trains: fresh seeded weights, the module inside the DDP/FSDP/compile wrappers, autocast."""

from __future__ import annotations

import contextlib

import torch

from ..reference import LayerprobeConfig, LayerprobeForCausalLM


def init_model(config: LayerprobeConfig, seed: int) -> LayerprobeForCausalLM:
    """Fresh fp32 weights from `seed`. Schemes with the same parameters (pre, post, mix, lns) start identical:
    each module draws its initial values in the same order whatever the scheme."""
    torch.manual_seed(seed)
    return LayerprobeForCausalLM(config)


def unwrap(model) -> LayerprobeForCausalLM:
    """The LayerprobeForCausalLM inside DDP / torch.compile wrappers (FSDP2 shards it in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and not isinstance(model, LayerprobeForCausalLM):
            model = model.module
        else:
            return model


def autocast(dtype: torch.dtype | None, device: torch.device):
    """bf16 autocast when the plan asks for it; fp32 otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
