"""Gradient norms per group of parameters: the one function `analyze` and the trainer use.

‖g‖_G = sqrt(Σ_{p ∈ G} Σ_i (∂L/∂p_i)²), the L2 norm of the gradient restricted to the group G
(a layer, or one sublayer of it). Read from the accumulated `.grad` before any clipping: the
per-layer and total norms a run reports come from the same, unclipped, gradients.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .squares import squared_sums


# Added to the total norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
CLIP_EPS = 1e-6


def clip_factor(total_norm: float, max_norm: float) -> float:
    """min(1, max_norm / (total_norm + 1e-6)): the factor clip_grad_norm_ scales every gradient by."""
    return min(1.0, max_norm / (total_norm + CLIP_EPS))


def gradient_squares(grads: list[torch.Tensor]) -> list[float]:
    """Σ g² of each tensor, in float64 (`squares.squared_sums`), copied to the host in one piece per device."""
    out = [0.0] * len(grads)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    for positions in by_device.values():
        sums = squared_sums([grads[i].detach() for i in positions]).cpu().tolist()  # the device's one host copy
        for i, value in zip(positions, sums):
            out[i] = value
    return out


def grad_norms_by_group(groups: dict[str, Iterable[torch.nn.Parameter]]) -> dict[str, float]:
    """sqrt(sum of squared gradient entries) over each group's parameters; NaN if none has a gradient.

    Each distinct gradient's squared norm is taken once (groups may overlap: a layer and the total), in
    float64 (`gradient_squares`), so a training step makes one host copy per device, not one per parameter;
    groups spread over several devices (device_map) work. The group's norm is then sqrt(Σ ‖g‖²) on the host
    (math.fsum: exactly rounded, so it does not depend on the order of the parameters).
    """
    index: dict[int, int] = {}
    grads: list[torch.Tensor] = []
    members: dict[str, list[int]] = {}
    for name, params in groups.items():
        ids = []
        for p in params:
            g = p.grad
            if g is None:
                continue
            if id(g) not in index:
                index[id(g)] = len(grads)
                grads.append(g.detach())
            ids.append(index[id(g)])
        members[name] = ids
    squares = gradient_squares(grads)
    return {name: math.sqrt(math.fsum(squares[i] for i in ids)) if ids else float("nan")
            for name, ids in members.items()}
