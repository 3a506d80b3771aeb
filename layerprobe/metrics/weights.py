"""How far an optimizer step moves a layer's weights.

    weight_update_ℓ = ‖θ_ℓ(after) − θ_ℓ(before)‖₂ / ‖θ_ℓ(before)‖₂

over every parameter of layer ℓ taken as one vector. The update-to-weight ratio people watch for a
learning rate that is too high (ratios near 1) or a layer that has stopped learning (near 0); taken per
layer it shows which depths the optimizer still moves. Sums of squares in float64, so shards of one
parameter (FSDP) can be summed across processes before the square root.
"""

from __future__ import annotations

import math

import torch


def weight_change_sums(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ ‖after − before‖², Σ ‖before‖²) over matching tensors, float64 scalars on the first tensor's device."""
    if not before:
        return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    diff = torch._foreach_sub([a.detach().float() for a in after], [b.float() for b in before])
    # Per-tensor norms in one fused call each (float32), squared and summed in float64.
    change = torch.stack(torch._foreach_norm(diff)).double().square().sum()
    size = torch.stack(torch._foreach_norm([b.float() for b in before])).double().square().sum()
    return change, size


def weight_update_ratio(change_sq: float, size_sq: float) -> float:
    """sqrt(Σ‖Δθ‖²) / sqrt(Σ‖θ‖²); NaN for a layer whose weights were all zero."""
    return math.sqrt(change_sq) / math.sqrt(size_sq) if size_sq > 0 else float("nan")
