"""The depth headline numbers: how a model's per-layer profile changes from its first layer to its last.

Each number summarises one per-layer curve in a way that can be compared across models of different
depth L (layers ℓ = 0 … L−1):

- normalised depth  d(ℓ) = ℓ / (L−1), 0 for the first layer and 1 for the last (0 when L = 1).
- quarter           q(L) = ⌈L/4⌉ layers (at least 1).
- variance growth   the least-squares slope b of  ln Var(h_ℓ) ≈ a + b·d(ℓ)  over the layers with a finite,
                    positive output variance; exp(b) is the fitted factor by which the residual stream's
                    variance grows from the first layer's output to the last's. The Curse of Depth
                    (Sun et al., 2025, arXiv:2502.05795) shows that under Pre-LN this variance grows with
                    depth, so deep blocks approach the identity; LayerNorm Scaling keeps it in check.
- gradient ratio    mean_{ℓ ≥ L−q} ‖∇θ_ℓ‖ / mean_{ℓ < q} ‖∇θ_ℓ‖: below 1 when deep layers get smaller
                    gradients (Pre-LN), above 1 when early ones do (Post-LN), as Mix-LN
                    (Li et al., 2024, arXiv:2412.13795) reports.
- removable layers  the layers whose removal alone raises the mean next-token loss by less than a
                    threshold (in nats), read off a single-layer pruning sweep (Gromov et al., 2024,
                    arXiv:2403.17887; Men et al., 2024, ShortGPT, arXiv:2403.03853). An absolute threshold
                    depends on the model's scale (a toy's Δloss is a few hundredths of a nat); the relative
                    one, a fraction of the model's own largest single-layer Δloss, does not.
- deep-half share   Σ_{ℓ ≥ ⌈L/2⌉} c_ℓ / Σ_ℓ c_ℓ with c_ℓ = max(Δloss_ℓ, 0), the removal cost of layer ℓ:
                    the share of the total single-layer removal cost that falls on the deeper half (the
                    last ⌊L/2⌋ layers). Scale-free; well under 1/2 when deep layers do little (Pre-LN's
                    Curse of Depth), around or above 1/2 when they carry their share.

Plain numpy on per-layer arrays: the caller decides where the curves come from (analyze, or the
per-layer statistics the trainer logs at each evaluation).
"""

from __future__ import annotations

import math

import numpy as np


def normalised_depth(layers, num_layers: int) -> np.ndarray:
    """ℓ / (L−1) for each 0-based layer index ℓ; zeros when L = 1."""
    layers = np.asarray(layers, dtype=float)
    return layers / (num_layers - 1) if num_layers > 1 else np.zeros_like(layers)


def quarter(num_layers: int) -> int:
    """How many layers make a quarter: ⌈L/4⌉, at least 1."""
    return max(1, math.ceil(num_layers / 4))


def variance_growth(output_variance, num_layers: int | None = None) -> float:
    """Least-squares slope of ln(output variance) against normalised depth ℓ/(L−1).

    `output_variance[ℓ]` is layer ℓ's output variance; L is `num_layers` (default: the array's length).
    Layers with a missing, zero or negative variance are left out of the fit; NaN when fewer than two remain.
    """
    v = np.asarray(output_variance, dtype=float)
    L = num_layers or len(v)
    d = normalised_depth(np.arange(len(v)), L)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(d[ok], np.log(v[ok]), 1)[0])


def variance_growth_factor(slope: float) -> float:
    """exp(variance growth): the fitted growth of the variance from the first layer to the last."""
    return math.exp(slope) if math.isfinite(slope) else float("nan")


def grad_ratio(grad_norm) -> float:
    """Mean gradient norm of the last ⌈L/4⌉ layers over that of the first ⌈L/4⌉.

    NaN for fewer than two layers, for any missing norm, or when the first quarter's mean is zero.
    """
    g = np.asarray(grad_norm, dtype=float)
    if len(g) < 2 or not np.isfinite(g).all():
        return float("nan")
    return float(grad_ratios(g))


def grad_ratios(grad_norm: np.ndarray) -> np.ndarray:
    """`grad_ratio` along the last axis of [..., L] (the replicates of an interval); NaN where the first
    quarter's mean is not positive."""
    g = np.asarray(grad_norm, dtype=float)
    q = quarter(g.shape[-1])
    first, last = g[..., :q].mean(-1), g[..., -q:].mean(-1)
    with np.errstate(all="ignore"):
        return np.where(first > 0, last / np.where(first > 0, first, 1.0), np.nan)


def removable_layers(layers, delta_loss, threshold: float) -> list[int]:
    """The layers ℓ whose removal alone raises the loss by less than `threshold` nats (Δloss_ℓ < threshold)."""
    return [int(layer) for layer, delta in zip(layers, delta_loss) if float(delta) < threshold]


def removal_verdicts(layers, delta_loss, lo, hi, threshold: float, samples: int) -> dict:
    """Removability with its confidence, from each layer's Δloss interval [lo, hi] over samples:

    - sure:      hi < threshold (the whole interval under it)
    - undecided: lo < threshold ≤ hi
    - kept:      lo ≥ threshold
    - samples_to_decide: for the undecided layers, the samples at which the interval's half-width on the
      threshold's side, w = hi − Δ (or Δ − lo), shrinks to |Δ − threshold| under the 1/√n scaling of a
      mean: n · (w / |Δ − threshold|)²; the largest over them (what decides all), NaN if none is undecided.
    Layers with a missing bound count as undecided (no interval: nothing is sure)."""
    sure, undecided, kept, need = [], [], [], []
    for layer, d, a, b in zip(layers, delta_loss, lo, hi):
        d, a, b = float(d), float(a), float(b)
        if not math.isfinite(d):
            continue
        if math.isfinite(b) and b < threshold:
            sure.append(int(layer))
        elif math.isfinite(a) and a >= threshold:
            kept.append(int(layer))
        else:
            undecided.append(int(layer))
            half = (b - d) if d < threshold else (d - a)
            margin = abs(d - threshold)
            if math.isfinite(half) and margin > 0:
                need.append(math.ceil(samples * (half / margin) ** 2 - 1e-9))  # 16.000000000000004 is 16
    return {"sure": sure, "undecided": undecided, "kept": kept,
            "samples_to_decide": max(need) if len(need) == len(undecided) and need else float("nan")}


def relative_threshold(delta_loss, fraction: float) -> float:
    """`fraction` of the largest single-layer Δloss (NaN when no removal costs anything)."""
    d = np.asarray(delta_loss, dtype=float)
    top = np.nanmax(d) if np.isfinite(d).any() else float("nan")
    return float(fraction * top) if top > 0 else float("nan")


def removable_layers_relative(layers, delta_loss, fraction: float) -> list[int]:
    """The layers whose removal alone costs less than `fraction` of the model's own largest Δloss; every
    layer when no removal raises the loss at all."""
    threshold = relative_threshold(delta_loss, fraction)
    if math.isfinite(threshold):
        return removable_layers(layers, delta_loss, threshold)
    return [int(layer) for layer, delta in zip(layers, delta_loss) if math.isfinite(float(delta))]


def deep_half_share(delta_loss) -> float:
    """Share of the total single-layer removal cost max(Δloss_ℓ, 0) that falls on the last ⌊L/2⌋ layers.

    `delta_loss[ℓ]` is layer ℓ's Δloss, ℓ = 0 … L−1. NaN for fewer than two layers, a missing Δloss, or
    when no removal costs anything."""
    d = np.asarray(delta_loss, dtype=float)
    if len(d) < 2 or not np.isfinite(d).all():
        return float("nan")
    return float(deep_half_shares(d))


def deep_half_shares(delta_loss: np.ndarray) -> np.ndarray:
    """`deep_half_share` along the last axis of [..., L] (the replicates of an interval)."""
    cost = np.clip(np.asarray(delta_loss, dtype=float), 0, None)
    L = cost.shape[-1]
    total = cost.sum(-1)
    with np.errstate(all="ignore"):
        return np.where(total > 0, cost[..., L - L // 2:].sum(-1) / np.where(total > 0, total, 1.0), np.nan)


__all__ = ["removal_verdicts", "deep_half_share", "deep_half_shares", "grad_ratio", "grad_ratios", "normalised_depth", "quarter", "relative_threshold",
           "removable_layers", "removable_layers_relative", "variance_growth", "variance_growth_factor"]
