"""How a layer (or sublayer) changes the residual stream it writes into.

With x the stream a layer reads and d = y − x the update it adds (y its output):

    relative_update = mean over tokens of ‖d‖ / ‖x‖        (how much of the stream it rewrites)
    update_cosine   = mean over tokens of cos(d, x)          (< 0 erases, ≈ 0 writes new directions,
                                                               > 0 amplifies what is there)

averaged over every token of every sample whose stream is not exactly zero (the ratio is undefined
there; a zero embedding row, e.g. a padding id, gives one). The same formulas, with d a sublayer's
output and x the stream it is added to, give the attention and MLP rows of sublayers.csv. This is the residual
contribution view of e.g. Csordás et al. (arXiv 2505.13898, §3), who compare ‖d‖ with ‖x‖ per layer.
d is formed explicitly: expanding ‖y − x‖² = ‖y‖² − 2x·y + ‖x‖² cancels catastrophically when the
update is small next to the stream, which it is in deep layers.
"""

from __future__ import annotations

import torch

_EPS = 1e-30  # guards 0/0 for an all-zero stream only


def update_terms(x: torch.Tensor, d: torch.Tensor, x_norm: torch.Tensor | None = None,
                 d_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token [...]: (‖d‖/‖x‖, cos(d, x), x not all zero), 0 where x is all zero; capture.py sums them per
    sample and layer."""
    if x_norm is None:
        x_norm = torch.linalg.vector_norm(x, dim=-1)
    if d_norm is None:
        d_norm = torch.linalg.vector_norm(d, dim=-1)
    seen = x_norm > 0
    ratio = torch.where(seen, d_norm / x_norm.clamp_min(_EPS), 0.0)
    cos = torch.where(seen, torch.linalg.vecdot(d, x) / (d_norm * x_norm).clamp_min(_EPS), 0.0)
    return ratio, cos, seen


def second_half_ratio(values) -> float:
    """Median of a per-layer series over the second half of the layers divided by its median over
    the first half (the odd middle layer counts in neither); NaN with fewer than two layers.

    Medians, because the first layer often rewrites the embedding many times over and would
    dominate a mean.
    """
    import statistics

    v = [float(x) for x in values]
    half = len(v) // 2
    if half == 0:
        return float("nan")
    a, b = statistics.median(v[:half]), statistics.median(v[len(v) - half:])
    return b / a if a else float("nan")
