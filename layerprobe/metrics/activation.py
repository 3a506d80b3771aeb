"""Massive activations (Sun et al., "Massive Activations in Large Language Models", arXiv 2402.17762).

    max_activation_ℓ      = max over tokens and hidden units of |y_ℓ|
    mean_abs_activation_ℓ = mean over tokens and hidden units of |y_ℓ|

with y_ℓ the output of layer ℓ (the residual stream, before the final norm). Sun et al. find a few
units whose magnitude is ~10⁴× the median appear abruptly in early layers and stay; the ratio of
the two columns shows such an outlier.
"""

from __future__ import annotations

import torch


def activation_extremes(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |y|, Σ |y|) over every element, on y's device; Σ in float64.

    max |y| from the extremes of y (one pass, no |y| temporary; on the CPU ~13x faster than an ∞-norm).
    Compiled (metrics/token_terms.py's fused kernel) it is taken per row instead, where it joins the row's
    other reductions rather than reading y again: the same maximum (a maximum does not round).
    Σ |y| is taken per token with float32 accumulation (bf16 read as is) and summed in float64: |y|
    then a sum is ~2x faster on the CPU than the 1-norm kernel.
    """
    if torch.compiler.is_compiling():
        peak = y.abs().amax(-1).amax()
    else:
        lo, hi = torch.aminmax(y)
        peak = torch.maximum(hi, -lo)
    return peak.double(), y.abs().sum(-1, dtype=torch.float32).sum(dtype=torch.float64)


MASSIVE_RATIO = 100.0


def massive_onset(max_activation, mean_abs_activation, ratio: float = MASSIVE_RATIO) -> int | None:
    """First layer whose largest |activation| is at least `ratio` × its mean |activation| (None if none).

    Sun et al. call an activation massive when it is ~10³-10⁴× the median; against the mean (which
    the outliers themselves raise) 100× is a conservative threshold.
    """
    for layer, (peak, mean) in enumerate(zip(max_activation, mean_abs_activation)):
        if mean and mean > 0 and peak / mean >= ratio:
            return layer
    return None
