"""Findings sentences for the depth metrics of issue 12 (logit lens, residual updates, massive
activations): each states the paper's claim, attributed, then what this run measured beside it.

Input: (label, layers table) pairs, the layers table being `AnalysisResult.layers`. The numbers
come from `layerprobe.metrics`; this module only words them.
"""

from __future__ import annotations

import math

import pandas as pd

from ..metrics import LOCK_IN_TOP1, MASSIVE_RATIO, lock_in_layer, massive_onset, second_half_ratio


def _usable(layers: pd.DataFrame | None, *cols: str) -> bool:
    return layers is not None and len(layers) > 0 and all(c in layers and layers[c].notna().all() for c in cols)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "; ".join(parts)


def lens_finding(models: list[tuple[str, pd.DataFrame | None]]) -> str | None:
    parts = []
    for label, layers in models:
        if not _usable(layers, "lens_top1"):
            continue
        L = len(layers)
        k = lock_in_layer([float(v) for v in layers["lens_top1"]])
        if k is None:
            parts.append(f"{label}: never")
        else:
            parts.append(f"{label}: layer {k} of 0–{L - 1} (depth {k / max(L - 1, 1):.2f})")
    if not parts:
        return None
    return ("Csordás et al. (arXiv 2505.13898) find that the second half of the layers of large LMs mostly "
            "refines an output distribution the first half has already formed; with the logit lens, the "
            f"top-1 prediction here locks in (agrees with the final one on ≥ {LOCK_IN_TOP1:g} of the tokens "
            f"from that layer on) at {_join(parts)}.")


def update_finding(models: list[tuple[str, pd.DataFrame | None]]) -> str | None:
    parts = []
    for label, layers in models:
        if not _usable(layers, "relative_update") or len(layers) < 2:
            continue
        r = second_half_ratio(layers["relative_update"])
        if not math.isnan(r):
            parts.append(f"{label}: {r:.2f}×")
    if not parts:
        return None
    return ("Csordás et al. (arXiv 2505.13898) also report that second-half layers write much less into the "
            "residual stream, relative to its size, than first-half layers; here the median relative update "
            f"‖y−x‖/‖x‖ of the second-half layers is, against the first half's, {_join(parts)} (below 1× agrees with them).")


def activation_finding(models: list[tuple[str, pd.DataFrame | None]]) -> str | None:
    parts = []
    for label, layers in models:
        if not _usable(layers, "max_activation", "mean_abs_activation"):
            continue
        peak, mean = list(layers["max_activation"]), list(layers["mean_abs_activation"])
        k = massive_onset(peak, mean)
        top = max(p / m for p, m in zip(peak, mean) if m > 0)
        if k is None:
            parts.append(f"{label}: no layer (largest max/mean {top:.0f}×)")
        else:
            parts.append(f"{label}: from layer {k} of 0–{len(layers) - 1} (largest max/mean {top:.0f}×)")
    if not parts:
        return None
    return ("Sun et al. (arXiv 2402.17762) find a few massive activations, 10³–10⁴× the typical magnitude, "
            "that appear abruptly in an early layer and stay nearly constant through the middle layers; here "
            f"the largest |activation| first reaches {MASSIVE_RATIO:g}× the mean |activation| at {_join(parts)}.")


def depth_findings(models: list[tuple[str, pd.DataFrame | None]]) -> list[str]:
    """The three sentences (those the data allows), in the order lens, updates, activations."""
    out = [f(models) for f in (lens_finding, update_finding, activation_finding)]
    return [s for s in out if s]
