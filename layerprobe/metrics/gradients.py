"""Gradient norms per group of parameters: the one function `analyze` and the trainer use.

‖g‖_G = sqrt(Σ_{p ∈ G} Σ_i (∂L/∂p_i)²), the L2 norm of the gradient restricted to the group G
(a layer, or one sublayer of it). Read from the accumulated `.grad` before any clipping: the
per-layer and total norms a run reports come from the same, unclipped, gradients.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
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


# Host memory the per-batch gradients of BatchGradientGram may hold; above it no Gram is kept.
GRAM_HOST_BYTES = 2 * 1024 ** 3


class BatchGradientGram:
    """M[k, b, c] = ⟨g_b, g_c⟩ over group k's parameters, where g_b is the gradient batch b's backward adds
    to `.grad` (read by a hook before it is accumulated: exact whatever the gradients' dtype).

    Why: the gradient of any reweighting of the batches, Σ_b w_b g_b, then has the norm sqrt(wᵀ M_k w),
    so a bootstrap over batches (metrics/intervals.py `grad_ratio_interval`) needs no extra backward.
    Cost: a float32 host copy of each tracked parameter's gradient per batch, kept to the end
    (`host_bytes`), and b dot products at batch b. Use: `with gram:` around the passes, `end_batch()`
    after each batch's backward, then `result()`.
    """

    def __init__(self, groups: dict[str, Iterable[torch.nn.Parameter]], batches: int):
        self.names = list(groups)
        self.params = [[p for p in ps if not p.is_meta] for ps in groups.values()]
        self.gram = np.zeros((len(self.names), batches, batches))
        self.batches = 0
        self._current: dict[int, torch.Tensor] = {}  # id(param) -> this batch's gradient (host, float32)
        self._past: dict[int, list[torch.Tensor]] = {}  # id(param) -> g_0 … g_{b−1}
        self._handles: list = []

    @staticmethod
    def host_bytes(groups: dict[str, Iterable[torch.nn.Parameter]], batches: int) -> int:
        """What the copies take: `batches` float32 copies of every tracked parameter."""
        return 4 * batches * sum(p.numel() for ps in groups.values() for p in ps)

    def _hook(self, p: torch.nn.Parameter):
        def keep(grad: torch.Tensor) -> None:
            g = grad.detach().to("cpu", torch.float32, copy=True).reshape(-1)
            if id(p) in self._current:  # a second gradient for the same parameter in one backward
                self._current[id(p)] += g
            else:
                self._current[id(p)] = g
        return keep

    def __enter__(self) -> "BatchGradientGram":
        self._handles = [p.register_hook(self._hook(p)) for ps in self.params for p in ps if p.requires_grad]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def end_batch(self) -> None:
        b = self.batches
        for k, params in enumerate(self.params):
            for p in params:
                g = self._current.pop(id(p), None)
                if g is None:
                    continue
                past = self._past.setdefault(id(p), [])
                past.append(g)
                # float32 dots (BLAS, blocked partial sums: ~1e-5 relative at 10⁷ entries, well inside an
                # interval); float64 copies of every past gradient would cost more than the rest of this.
                dots = np.array([float(torch.dot(x, g)) for x in past])
                self.gram[k, b, :b + 1] += dots
                self.gram[k, :b, b] += dots[:b]
        self.batches += 1

    def result(self) -> dict[str, np.ndarray]:
        """{"grad_gram": [groups, batches, batches] for the batches seen, "grad_gram_groups": their names}."""
        b = self.batches
        return {"grad_gram": self.gram[:, :b, :b].copy(), "grad_gram_groups": np.array(self.names)}
