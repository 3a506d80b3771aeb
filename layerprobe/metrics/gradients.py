"""L2 norms of accumulated gradients, per group of parameters."""

from __future__ import annotations

from typing import Iterable

import torch


def grad_norms_by_group(groups: dict[str, Iterable[torch.nn.Parameter]]) -> dict[str, float]:
    """sqrt(sum of squared gradient entries) over each group's parameters; NaN if none has a gradient."""
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
