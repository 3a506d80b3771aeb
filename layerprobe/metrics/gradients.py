"""Gradient norms per group of parameters: the one function `analyze` and the trainer use.

‖g‖_G = sqrt(Σ_{p ∈ G} Σ_i (∂L/∂p_i)²), the L2 norm of the gradient restricted to the group G
(a layer, or one sublayer of it). Read from the accumulated `.grad` before any clipping: the
per-layer and total norms a run reports come from the same, unclipped, gradients.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def grad_norms_by_group(groups: dict[str, Iterable[torch.nn.Parameter]]) -> dict[str, float]:
    """sqrt(sum of squared gradient entries) over each group's parameters; NaN if none has a gradient.

    Each distinct gradient's norm is taken once (groups may overlap: a layer and the total), computed in
    float64 by one `torch._foreach_norm` per device and copied to the host in one piece per device, so a
    training step makes one host copy, not one per parameter; groups spread over several devices
    (device_map) work. The group's norm is then sqrt(Σ ‖g‖²) on the host, in float64.
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
    squares = [0.0] * len(grads)
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    for positions in by_device.values():
        norms = torch._foreach_norm([grads[i] for i in positions], 2, dtype=torch.float64)
        for i, value in zip(positions, torch.stack(norms).cpu().tolist()):  # the device's one host copy
            squares[i] = value * value
    return {name: math.sqrt(math.fsum(squares[i] for i in ids)) if ids else float("nan")
            for name, ids in members.items()}
