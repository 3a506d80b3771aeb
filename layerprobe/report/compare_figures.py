"""The figures of a comparison (`layerprobe compare`): per-layer curves, angular-distance maps, training curves.

Each `plot_*` draws one PNG from a `Comparison` and returns False when the comparison has no data for it;
`write_figures` draws every one it can. Models keep one colour per norm scheme everywhere (`style`).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..comparison import training_dynamics
from .style import DEPTH_AXIS, LAYER_AXIS, model_styles, new_figure, save_figure

# metric column -> (file, y label, log scale, title, caption)
PER_LAYER = [
    ("angular_distance", "compare_angular_distance.png",
     "angular distance, layer input → output (fraction of π)", False,
     "angular distance between each layer's input and output (n = 1)",
     "How far each layer turns the residual stream (Gromov et al.): near 0, the layer is close to the identity."),
    ("block_influence", "compare_block_influence.png",
     "Block Influence = 1 − mean cos(input, output)", False,
     "Block Influence (ShortGPT)",
     "1 − mean cosine similarity between a layer's input and output over all tokens; low values are the "
     "layers ShortGPT removes first."),
    ("output_variance", "compare_output_variance.png",
     "variance of the layer's output (log scale)", True,
     "output variance of the residual stream against depth",
     "Variance of the residual stream after each layer. The Curse of Depth paper reports that under Pre-LN it "
     "grows with depth, so deep layers change it less and less, and that LNS keeps it in check."),
    ("grad_norm", "compare_grad_norm.png",
     "‖∂ mean LM loss / ∂θ_layer‖₂ (log scale)", True,
     "gradient norm of each layer's parameters",
     "L2 norm of the gradient of the mean LM loss with respect to each layer's parameters. The Mix-LN paper "
     "reports small gradients in deep layers under Pre-LN and in early layers under Post-LN."),
    ("delta_loss", "compare_delta_loss.png",
     "Δ loss when the layer is removed (nats)", "symlog",
     "cost of removing one layer",
     "Increase of the mean next-token loss when this one layer is skipped (prune-sweep, mode layer). Below "
     "the dashed line: removable at the chosen threshold."),
]
TRAINING_LAYER_METRICS = [
    ("grad_norm", "gradient norm per layer (log scale)"),
    ("output_variance", "output variance per layer (log scale)"),
]


def styles(comp) -> dict[str, dict]:
    """Colour, line style and marker of each model, by label."""
    return model_styles([(m.label, m.norm_scheme) for m in comp.models])


def legend_label(m) -> str:
    return m.label if m.norm_scheme.lower() in m.label.lower() else f"{m.label} ({m.norm_scheme})"


def panel_grid(n: int, panel_width: float, panel_height: float, extra_width: float, **subplots):
    """One panel per model, at most four to a row, unused panels hidden; returns (fig, axes[rows, cols])."""
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_width * cols + extra_width, panel_height * rows + 0.6),
                             dpi=120, squeeze=False, constrained_layout=True, **subplots)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def _x(comp, df):
    return df["depth"] if comp.depth == "normalised" else df["layer"]


def _x_axis(comp, ax):
    if comp.depth == "normalised":
        ax.set_xlabel(DEPTH_AXIS)
        ax.set_xlim(-0.03, 1.03)
    else:
        ax.set_xlabel(LAYER_AXIS)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))


def plot_per_layer(comp, metric: str, path: Path, ylabel: str, scale, title: str) -> bool:
    df = comp.per_layer
    if df.empty or metric not in df.columns or not df[metric].notna().any():
        return False
    by_model = styles(comp)
    fig, ax = new_figure(7.5, 4.4)
    for m in comp.models:
        d = df[(df["model"] == m.label)].dropna(subset=[metric])
        if scale is True:
            d = d[d[metric] > 0]
        if d.empty:
            continue
        st = by_model[m.label]
        ax.plot(_x(comp, d), d[metric], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markersize=4, linewidth=1.8, label=legend_label(m))
    if scale is True:
        ax.set_yscale("log")
    elif scale == "symlog":
        # Log above 1e-3 nats (removals cost from ~1e-3 to several nats); linear around 0, where a removal
        # can even lower the loss a little.
        ax.set_yscale("symlog", linthresh=1e-3, linscale=0.5)
        ax.axhline(comp.threshold, color="#555555", linestyle="--", linewidth=1)
        ax.axhline(0, color="#999999", linewidth=0.6)
        ax.annotate(f"threshold {comp.threshold:g} nats", xy=(1, comp.threshold), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom", fontsize=8, color="#555555")
    else:
        ax.set_ylim(bottom=0)
    _x_axis(comp, ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=2 if len(comp.models) > 4 else 1)
    save_figure(fig, path)
    return True


def plot_angular_heatmaps(comp, path: Path) -> bool:
    models = [m for m in comp.models if m.analysis is not None and len(m.analysis.angular)]  # --metrics: maybe none
    if not models:
        return False
    grids = []
    for m in models:
        mat = m.analysis.angular_matrix()
        L = m.num_layers
        grid = np.full((L, L), np.nan)  # rows: n - 1, columns: l
        for n in mat.columns:
            for l, v in mat[n].dropna().items():
                if int(n) <= L and int(l) < L:
                    grid[int(n) - 1, int(l)] = v
        grids.append(grid)
    vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 1.0 for g in grids) or 1.0
    fig, axes = panel_grid(len(models), 3.3, 3.1, 1.2)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    by_model = styles(comp)
    im = None
    for ax, m, grid in zip(axes.flat, models, grids):
        L = grid.shape[0]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                       extent=(-0.5, L - 0.5, 0.5, L + 0.5), interpolation="nearest")
        ax.set_title(legend_label(m), color=by_model[m.label]["color"], fontsize=10, fontweight="bold")
        ax.set_xlabel("first layer ℓ of the block (0-based)", fontsize=8)
        ax.set_ylabel("block size n (layers)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.tick_params(labelsize=8)
    cb = fig.colorbar(im, ax=axes, shrink=0.9)
    cb.set_label("angular distance (fraction of π; 0 = same direction)", fontsize=8)
    fig.suptitle("angular distance between the inputs of layer ℓ and layer ℓ+n (same colour scale)", fontsize=11)
    save_figure(fig, path, tight=False)
    return True


def _smooth(values: pd.Series, points: int) -> pd.Series:
    window = max(1, points // 40)
    return values.rolling(window, min_periods=1, center=True).mean()


def plot_training_loss(comp, path: Path) -> bool:
    models = [m for m in comp.models if m.training is not None]
    if not models:
        return False
    by_model = styles(comp)
    fig, ax = new_figure(10.5, 4.2)
    any_eval = False
    for m in models:
        t = m.training
        st = by_model[m.label]
        if "loss" in t.columns and t["loss"].notna().any():
            tr = t.dropna(subset=["loss"])
            ax.plot(tr["step"], tr["loss"], color=st["color"], alpha=0.25, linewidth=0.8)
            ax.plot(tr["step"], _smooth(tr["loss"], len(tr)), color=st["color"], linestyle=st["linestyle"],
                    linewidth=1.4, label=legend_label(m))
        col = next((c for c in ("eval_loss", "val_loss") if c in t.columns), None)
        if col and t[col].notna().any():
            ev = t.dropna(subset=[col])
            any_eval = True
            ax.plot(ev["step"], ev[col], color=st["color"], linestyle="none", marker=st["marker"], markersize=5,
                    markeredgecolor="white", markeredgewidth=0.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title("training curves")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="#555555", linewidth=1.4))
    labels.append("train loss (smoothed; raw faint)")
    if any_eval:
        handles.append(Line2D([], [], color="#555555", linestyle="none", marker="o", markersize=5))
        labels.append("held-out loss")
    ax.legend(handles, labels, fontsize=8)
    save_figure(fig, path)
    return True


def _layer_metric_over_training(m, metric: str) -> pd.DataFrame | None:
    tl = m.training_layers
    if tl is None or tl.empty or metric not in tl.columns:
        return None
    d = tl.dropna(subset=[metric])
    return d if len(d) else None


def plot_training_layers(comp, metric: str, ylabel: str, path: Path) -> bool:
    models = [m for m in comp.models if _layer_metric_over_training(m, metric) is not None]
    if not models:
        return False
    fig, axes = panel_grid(len(models), 3.3, 3.0, 0.6, sharey=True)
    by_model = styles(comp)
    for i_ax, (ax, m) in enumerate(zip(axes.flat, models)):
        d = _layer_metric_over_training(m, metric)
        d = d[d[metric] > 0]
        steps = sorted(d["step"].unique())
        color = by_model[m.label]["color"]
        cmap = LinearSegmentedColormap.from_list("s", ["#dddddd", color])
        for i, step in enumerate(steps):
            s = d[d["step"] == step]
            frac = i / max(1, len(steps) - 1)
            ax.plot(s["layer"], s[metric], color=cmap(frac), linewidth=1.0 + 0.8 * frac,
                    label=f"step {step}" if i in (0, len(steps) - 1) else None)
        ax.set_yscale("log")
        ax.set_title(legend_label(m), color=color, fontsize=10, fontweight="bold")
        ax.set_xlabel(LAYER_AXIS, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        if i_ax == 0:
            ax.legend(fontsize=7, title="light → dark: early → late", title_fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(f"{ylabel.split(' (')[0]} over training, one line per evaluation", fontsize=11)
    save_figure(fig, path, tight=False)
    return True


def plot_training_dynamics(comp, path: Path) -> bool:
    dyn = {m.label: training_dynamics(m) for m in comp.models}
    dyn = {k: v for k, v in dyn.items() if v is not None}
    if not dyn:
        return False
    panels = [("variance_growth", "variance growth: slope of ln(output var)\nagainst normalised depth", False),
              ("grad_ratio", "gradient ratio: last-quarter / first-quarter\nmean layer gradient norm (log)", True)]
    panels = [p for p in panels if any(p[0] in v.columns for v in dyn.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), dpi=120, squeeze=False,
                             constrained_layout=True)
    by_model = styles(comp)
    by_label = {m.label: m for m in comp.models}
    for ax, (col, ylabel, log) in zip(axes[0], panels):
        for label, d in dyn.items():
            if col not in d.columns:
                continue
            st = by_model[label]
            ax.plot(d["step"], d[col], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                    markersize=3.5, linewidth=1.6, label=legend_label(by_label[label]))
        if log:
            ax.set_yscale("log")
            ax.axhline(1, color="#999999", linewidth=0.8, linestyle="--")
        else:
            ax.axhline(0, color="#999999", linewidth=0.8, linestyle="--")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("how the depth profile develops during training (headline numbers at each evaluation)", fontsize=11)
    save_figure(fig, path, tight=False)
    return True


def _literal_legend(ax, **kwargs) -> None:
    """A legend whose labels (model names) are shown as typed, never as matplotlib maths."""
    legend = ax.legend(**kwargs)
    for text in legend.get_texts():
        text.set_parse_math(False)


def _overlay_models(comp, metrics: list[str]):
    """(model, its rows with every metric present, style) for the models that have `metrics`."""
    df, by_model = comp.per_layer, styles(comp)
    if df.empty or any(c not in df.columns for c in metrics):
        return []
    out = []
    for m in comp.models:
        d = df[df["model"] == m.label].dropna(subset=metrics)
        if not d.empty:
            out.append((m, d.sort_values("layer"), by_model[m.label]))
    return out


def _line(st: dict) -> dict:
    """A model's line in the depth-curve figures: its colour, dash and marker."""
    return dict(color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=3.5, linewidth=1.6)


def _stacked_panels():
    """Two panels stacked on one depth axis (the lens and the residual-update figures)."""
    fig, first = new_figure(7.5, 6.0)
    first.remove()
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, ax1, ax2


def _finish(comp, fig, top, bottom, title: str, n_models: int, path: Path) -> None:
    _x_axis(comp, bottom)
    top.set_title(title)
    _literal_legend(top, fontsize=8, ncols=2 if n_models > 4 else 1)
    save_figure(fig, path)


def plot_logit_lens(comp, path: Path) -> bool:
    """Logit lens across models: KL to each model's final distribution (log) and top-1 agreement, with
    each model's lock-in layer marked on the top-1 curve."""
    from ..metrics import LOCK_IN_TOP1, lock_in_layer

    rows = _overlay_models(comp, ["lens_kl", "lens_top1"])
    if not rows:
        return False
    fig, ax1, ax2 = _stacked_panels()
    for m, d, st in rows:
        kw = _line(st)
        kl = d["lens_kl"].where(d["lens_kl"] > 1e-6)  # the last layer is the model's own output: KL 0
        ax1.plot(_x(comp, d), kl, label=legend_label(m), **kw)
        ax2.plot(_x(comp, d), d["lens_top1"], **kw)
        lock = lock_in_layer(list(d["lens_top1"]))
        if lock is not None:
            at = d[d["layer"] == lock]
            ax2.plot(_x(comp, at), at["lens_top1"], marker="o", markersize=10, markerfacecolor="none",
                     markeredgecolor=st["color"], markeredgewidth=1.6, linestyle="none")
    ax1.set_yscale("log")
    ax1.set_ylabel("KL(p_final ‖ p_ℓ), nats (log)")
    ax2.axhline(LOCK_IN_TOP1, color="#999999", linestyle=":", linewidth=1)
    ax2.set_ylim(-0.03, 1.03)
    ax2.set_ylabel("top-1 = final top-1 (fraction)")
    _finish(comp, fig, ax1, ax2, "logit lens: distance to the final prediction; circles: lock-in layer", len(rows), path)
    return True


def plot_residual_updates(comp, path: Path) -> bool:
    """Relative update ‖y−x‖/‖x‖ (log) and update cosine cos(y−x, x) across models."""
    rows = _overlay_models(comp, ["relative_update", "update_cosine"])
    if not rows:
        return False
    fig, ax1, ax2 = _stacked_panels()
    for m, d, st in rows:
        kw = _line(st)
        ax1.plot(_x(comp, d), d["relative_update"].where(d["relative_update"] > 0), label=legend_label(m), **kw)
        ax2.plot(_x(comp, d), d["update_cosine"], **kw)
    ax1.set_yscale("log")
    ax1.set_ylabel("‖y−x‖ / ‖x‖ (log)")
    ax2.axhline(0, color="#999999", linewidth=0.8)
    ax2.set_ylabel("cos(y−x, x)")
    _finish(comp, fig, ax1, ax2, "how much each layer rewrites the residual stream", len(rows), path)
    return True


def plot_massive_activations(comp, path: Path) -> bool:
    """max |y_ℓ| over mean |y_ℓ| across models (log): where massive activations appear and stay."""
    rows = _overlay_models(comp, ["max_activation", "mean_abs_activation"])
    if not rows:
        return False
    fig, ax = new_figure(7.5, 4.4)
    for m, d, st in rows:
        ratio = d["max_activation"] / d["mean_abs_activation"].where(d["mean_abs_activation"] > 0)
        ax.plot(_x(comp, d), ratio, label=legend_label(m), **_line(st))
    ax.set_yscale("log")
    ax.set_ylabel("max |activation| / mean |activation| (log)")
    _x_axis(comp, ax)
    ax.set_title("massive activations: largest unit against the typical one")
    _literal_legend(ax, fontsize=8, ncols=2 if len(rows) > 4 else 1)
    save_figure(fig, path)
    return True


# file, plot, caption: the depth-use curves of issue 12, drawn after PER_LAYER.
DEPTH_USE = [
    ("compare_logit_lens.png", plot_logit_lens,
     "Logit lens (nostalgebraist 2020; Csordás et al., arXiv 2505.13898): each model's own final norm and head "
     "applied to each layer's output. Top: KL to the model's final next-token distribution (nats, log); bottom: "
     "fraction of tokens whose top-1 already matches the final one. Circles: the lock-in layer, the first from "
     "which that fraction stays ≥ 0.5."),
    ("compare_residual_updates.png", plot_residual_updates,
     "How much each layer rewrites the residual stream: ‖y−x‖/‖x‖ (top, log) and cos(y−x, x) (bottom; < 0 erases, "
     "≈ 0 writes new directions, > 0 amplifies), averaged over all tokens. Csordás et al. report that second-half "
     "layers contribute much less than first-half ones."),
    ("compare_massive_activations.png", plot_massive_activations,
     "Largest |activation| in each layer's output over the mean |activation| (log). Sun et al. (arXiv 2402.17762) "
     "find massive activations, 10³–10⁴× the typical one, appearing abruptly in an early layer and staying."),
]


def write_figures(comp, out: Path) -> list[dict]:
    """Every figure the comparison has data for; returns [{file, caption, section}]."""
    figures = []
    what = "normalised depth" if comp.depth == "normalised" else "layer"
    for metric, file, ylabel, scale, title, caption in PER_LAYER:
        if plot_per_layer(comp, metric, out / file, ylabel, scale, f"{title}, by {what}"):
            figures.append({"file": file, "caption": caption, "section": "per-layer"})
    for file, plot, caption in DEPTH_USE:
        if plot(comp, out / file):
            figures.append({"file": file, "caption": caption, "section": "per-layer"})
    if plot_angular_heatmaps(comp, out / "compare_angular_heatmaps.png"):
        figures.append({"file": "compare_angular_heatmaps.png", "section": "angular", "wide": True,
                        "caption": "Angular distance between the input of layer ℓ and of layer ℓ+n for every "
                                   "start ℓ and block size n, one panel per model on one colour scale. Dark cells: "
                                   "blocks of n layers that barely change the residual stream."})
    if plot_training_loss(comp, out / "compare_training_loss.png"):
        figures.append({"file": "compare_training_loss.png", "section": "training", "wide": True,
                        "caption": "Training loss per optimizer step (faint: raw; solid: moving average) and "
                                   "loss on held-out data at each evaluation (markers)."})
    if plot_training_dynamics(comp, out / "compare_training_dynamics.png"):
        figures.append({"file": "compare_training_dynamics.png", "section": "training", "wide": True,
                        "caption": "The headline numbers computed from the per-layer statistics logged at each "
                                   "evaluation during training: variance growth with depth, and the ratio of "
                                   "deep to early layers' gradient norms (1 = balanced)."})
    for metric, ylabel in TRAINING_LAYER_METRICS:
        file = f"compare_training_{metric}.png"
        if plot_training_layers(comp, metric, ylabel, out / file):
            figures.append({"file": file, "section": "training", "wide": True,
                            "caption": f"Per-layer {ylabel.split(' (')[0].replace(' per layer', '')} logged during "
                                       "training, one line per evaluation, from light (early) to dark (late)."})
    return figures


