"""How far an optimizer step moves a layer's weights.

    weight_update_ℓ = ‖θ_ℓ(after) − θ_ℓ(before)‖₂ / ‖θ_ℓ(before)‖₂

over every parameter of layer ℓ taken as one vector. The update-to-weight ratio people watch for a
learning rate that is too high (ratios near 1) or a layer that has stopped learning (near 0); taken per
layer it shows which depths the optimizer still moves. Sums of squares in float32 per piece of at most
65,536 entries, the pieces' sums added in float64 (`squares.change_and_size_sums`: ~2e-8 relative on the
CPU, no float64 copy of the weights, one pass over both weights), kept as sums so that shards of one
parameter (FSDP) can be summed across processes before the root.
"""

from __future__ import annotations

import math

import torch

from .squares import change_and_size_sums


def weight_change_sums(before: list[list[torch.Tensor]], after: list[list[torch.Tensor]], *,
                       in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (a layer's tensors): (Σ ‖after − before‖², Σ ‖before‖²) over its matching tensors, as two
    float64 [groups] tensors on the tensors' device (one device). Every group's tensors go through one
    `change_and_size_sums` call, not one per group.

    `in_place`: `before` may be overwritten (off the CPU the difference then goes there instead of into a
    new model-sized allocation; on the CPU it is never written).
    """
    sizes = [len(b) for b in before]
    flat_before = [t for b in before for t in b]
    flat_after = [a.detach() for group in after for a in group]
    change, size = change_and_size_sums(flat_before, flat_after, in_place=in_place)

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([part.sum() for part in values.split(sizes)]) if sizes else values

    return per_group(change), per_group(size)


def weight_update_ratio(change_sq: float, size_sq: float) -> float:
    """sqrt(Σ‖Δθ‖²) / sqrt(Σ‖θ‖²); NaN for a layer whose weights were all zero."""
    return math.sqrt(change_sq) / math.sqrt(size_sq) if size_sq > 0 else float("nan")
