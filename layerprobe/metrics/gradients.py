"""Gradient norms per group of parameters: the one function `analyze` and the trainer use.

‖g‖_G = sqrt(Σ_{p ∈ G} Σ_i (∂L/∂p_i)²), the L2 norm of the gradient restricted to the group G
(a layer, or one sublayer of it). Read from the accumulated `.grad` before any clipping: the
per-layer and total norms a run reports come from the same, unclipped, gradients.
"""

from __future__ import annotations

from typing import Iterable

import torch


def grad_norms_by_group(groups: dict[str, Iterable[torch.nn.Parameter]]) -> dict[str, float]:
    """sqrt(sum of squared gradient entries) over each group's parameters; NaN if none has a gradient.

    Squares are summed in float64 on each parameter's device and moved to the host once per
    parameter, so groups spread over several devices (device_map) work.
    """
    out = {}
    for name, params in groups.items():
        total = None
        for p in params:
            if p.grad is None:
                continue
            sq = p.grad.detach().float().pow(2).sum(dtype=torch.float64)
            total = sq.cpu() if total is None else total + sq.cpu()
        out[name] = float(total.sqrt()) if total is not None else float("nan")
    return out
