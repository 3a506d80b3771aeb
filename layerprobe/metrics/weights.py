"""How far an optimizer step moves a layer's weights.

    weight_update_ℓ = ‖θ_ℓ(after) − θ_ℓ(before)‖₂ / ‖θ_ℓ(before)‖₂

over every parameter of layer ℓ taken as one vector. The update-to-weight ratio people watch for a
learning rate that is too high (ratios near 1) or a layer that has stopped learning (near 0); taken per
layer it shows which depths the optimizer still moves. Squared norms accumulated in float64
(`squares.squared_sums`), so shards of one parameter (FSDP) can be summed across processes before the root.
"""

from __future__ import annotations

import math

import torch

from .squares import squared_sums


def _squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ ‖t‖² over `tensors` as a float64 scalar on their device (float64 accumulation: `squares.squared_sums`)."""
    return squared_sums(tensors).sum()


def weight_change_sums(before: list[torch.Tensor], after: list[torch.Tensor], *,
                       in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ ‖after − before‖², Σ ‖before‖²) over matching tensors, float64 scalars.

    `in_place`: overwrite `before` with before − after instead of allocating the difference (the monitor
    keeps one buffer of the weights and refills it each logged step: no copy of the model allocated per step).
    """
    if not before:
        return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    after = [a.detach() for a in after]
    size = _squared_norms(before)
    diff = before if in_place else [b.clone() for b in before]
    torch._foreach_sub_(diff, after)  # ‖before − after‖ = ‖after − before‖
    return _squared_norms(diff), size


def weight_update_ratio(change_sq: float, size_sq: float) -> float:
    """sqrt(Σ‖Δθ‖²) / sqrt(Σ‖θ‖²); NaN for a layer whose weights were all zero."""
    return math.sqrt(change_sq) / math.sqrt(size_sq) if size_sq > 0 else float("nan")
