"""Figures and the terminal table for one `analyze` result."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator
from rich import box
from rich.table import Table

from .confidence import interval_note, plus_minus
from .style import LAYER_AXIS, METRIC_COLORS, integer_ticks, new_figure, save_figure


def _band(ax, df, col: str, color: str) -> None:
    """The column's interval over samples (_lo/_hi) as a shaded band, when the table has one."""
    lo, hi = f"{col}_lo", f"{col}_hi"
    if lo in df and df[lo].astype(float).notna().any():
        ax.fill_between(df["layer"].astype(float), df[lo].astype(float), df[hi].astype(float), color=color,
                        alpha=0.18, linewidth=0)


def _title(result, what: str) -> str:
    return f"{result.summary.get('model', '')}: {what}"


def plot_angular_heatmap(result, path: Path) -> None:
    """The l x n map of Gromov et al.: where a block of n layers changes its input least."""
    mat = result.angular_matrix()
    L = int(result.summary["num_layers"])
    grid = np.full((L, L), np.nan)  # rows: n - 1, columns: l
    for n in mat.columns:
        for l, v in mat[n].dropna().items():
            grid[int(n) - 1, int(l)] = v
    fig, ax = new_figure(7.5, 5.2)
    ax.grid(False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=0,
                   extent=(-0.5, L - 0.5, 0.5, L + 0.5), interpolation="nearest")
    # For each block size, the start layer whose block is closest to the identity.
    best_l = [int(np.nanargmin(grid[n - 1])) for n in range(1, L + 1) if np.isfinite(grid[n - 1]).any()]
    ax.plot(best_l, range(1, len(best_l) + 1), "o", color="#D55E00", markersize=4, label="min over ℓ for each n")
    ax.set_xlabel(f"first layer of the block, {LAYER_AXIS}")
    ax.set_ylabel("block size n (layers)")
    ax.set_title(_title(result, "angular distance d(xˡ, xˡ⁺ⁿ) between layer inputs"))
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("angular distance (fraction of π; 0 = same direction)")
    ax.legend(loc="upper right", fontsize=8, frameon=True)
    integer_ticks(ax, L)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(L, 12)))
    save_figure(fig, path)


def plot_layer_importance(result, path: Path) -> None:
    df = result.layers
    fig, ax = new_figure()
    for col, style, label in (("angular_distance", "o-", "angular distance, input → output (n = 1)"),
                              ("block_influence", "s-", "Block Influence = 1 − mean cos(input, output)")):
        if col in df:  # --metrics may have left one out
            ax.plot(df["layer"], df[col], style, color=METRIC_COLORS[col], markersize=3.5, label=label)
            _band(ax, df, col, METRIC_COLORS[col])
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("how much the layer changes its input (0 = identity)")
    ax.set_ylim(bottom=0)
    ax.set_title(_title(result, "per-layer change of the residual stream"))
    ax.legend(fontsize=8)
    integer_ticks(ax, len(df))
    save_figure(fig, path)


def plot_output_variance(result, path: Path) -> None:
    df = result.layers
    fig, ax = new_figure()
    for col, style, label in (("output_variance", "o-", "variance of the layer's output (residual stream)"),
                              ("update_variance", "s--", "variance of the update the layer adds (output − input)")):
        if col in df:  # results saved before update_variance existed lack it
            ax.semilogy(df["layer"], df[col], style, color=METRIC_COLORS[col], markersize=3.5, label=label)
            _band(ax, df, col, METRIC_COLORS[col])
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("variance over tokens and units (log scale)")
    ax.set_title(_title(result, "output variance against depth"))
    ax.legend(fontsize=8)
    integer_ticks(ax, len(df))
    save_figure(fig, path)


def plot_grad_norms(result, path: Path) -> None:
    df = result.layers
    fig, ax = new_figure()
    styles = [("grad_norm", "o-", "whole layer"), ("grad_norm_attention", "^--", "attention"),
              ("grad_norm_mlp", "s--", "MLP"), ("grad_norm_norm", "d:", "norms")]
    for col, style, label in styles:
        if col not in df:
            continue
        vals = df[col].astype(float)
        if vals.notna().any() and (vals > 0).any():
            ax.semilogy(df["layer"], vals.where(vals > 0), style, color=METRIC_COLORS[col], markersize=3.5,
                        label=label, linewidth=1.8 if col == "grad_norm" else 1.1)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("‖∂ mean LM loss / ∂θ‖₂ (log scale)")
    ax.set_title(_title(result, "gradient norm against depth"))
    ax.legend(fontsize=8, ncols=2)
    integer_ticks(ax, len(df))
    save_figure(fig, path)


def _has(df, col: str) -> bool:
    return col in df and df[col].astype(float).notna().any()


def plot_logit_lens(result, path: Path) -> None:
    """Logit lens by depth: KL to the final distribution (log axis) and top-1 agreement, lock-in marked."""
    from ..metrics import LOCK_IN_TOP1, lock_in_layer

    df = result.layers
    fig, ax = new_figure()
    kl = df["lens_kl"].astype(float)
    # The last layer's KL is 0 up to rounding (its lens is the model's own output): off the log axis.
    ax.semilogy(df["layer"], kl.where(kl > 1e-6), "o-", color="#0072B2", markersize=3.5,
                label="KL(p_final ‖ p_ℓ), nats (left; 0 at the last layer)")
    if "lens_kl_lo" in df:
        ax.fill_between(df["layer"].astype(float), df["lens_kl_lo"].astype(float).where(kl > 1e-6),
                        df["lens_kl_hi"].astype(float).where(kl > 1e-6), color="#0072B2", alpha=0.18, linewidth=0)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("KL to the final next-token distribution (nats, log scale)")
    ax2 = ax.twinx()
    ax2.plot(df["layer"], df["lens_top1"], "s--", color="#D55E00", markersize=3.5,
             label="top-1 agrees with the final prediction (right)")
    _band(ax2, df, "lens_top1", "#D55E00")
    ax2.set_ylim(-0.03, 1.03)
    ax2.spines["right"].set_visible(True)
    ax2.set_ylabel("fraction of tokens, top-1 = final top-1")
    ax2.grid(False)
    lock = lock_in_layer([float(v) for v in df["lens_top1"]])
    if lock is not None:
        ax.axvline(lock, color="#555555", linestyle=":", linewidth=1.2,
                   label=f"lock-in: top-1 ≥ {LOCK_IN_TOP1:g} from layer {lock} on")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8, loc="center left")
    ax.set_title(_title(result, "logit lens: when the final prediction forms"), parse_math=False)
    integer_ticks(ax, len(df))
    save_figure(fig, path)


def plot_residual_updates(result, path: Path) -> None:
    """Relative update ‖y−x‖/‖x‖ and update cosine cos(y−x, x) by depth, per layer and per sublayer."""
    df, sub = result.layers, result.sublayers
    fig, first = new_figure(7.5, 5.6)
    first.remove()
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3, linewidth=0.6)
    ax1.plot(df["layer"], df["relative_update"], "o-", color="#000000", markersize=3.5, label="whole layer")
    ax2.plot(df["layer"], df["update_cosine"], "o-", color="#000000", markersize=3.5, label="whole layer")
    _band(ax1, df, "relative_update", "#000000")
    _band(ax2, df, "update_cosine", "#000000")
    if _has(sub, "relative_update"):
        for kind, style, color, label in (("attention", "^--", "#0072B2", "attention"), ("mlp", "s--", "#D55E00", "MLP")):
            rows = sub[sub["kind"] == kind].dropna(subset=["relative_update"]).sort_values("layer")
            if len(rows):
                ax1.plot(rows["layer"], rows["relative_update"], style, color=color, markersize=3, label=label)
                ax2.plot(rows["layer"], rows["update_cosine"], style, color=color, markersize=3, label=label)
    ax1.set_yscale("log")  # the first layer often rewrites the embedding many times over
    ax1.set_ylabel("‖update‖ / ‖stream‖ (log)")
    ax2.axhline(0, color="#999999", linewidth=0.8)
    ax2.set_ylabel("cos(update, stream)")
    ax2.set_xlabel(LAYER_AXIS)
    ax1.legend(fontsize=8, ncols=3)
    ax1.set_title(_title(result, "how much each layer rewrites the residual stream"), parse_math=False)
    for ax in (ax1, ax2):
        integer_ticks(ax, len(df))
    save_figure(fig, path)


def plot_activations(result, path: Path) -> None:
    """Massive activations: max |y_ℓ| against mean |y_ℓ| by depth (log axis)."""
    df = result.layers
    fig, ax = new_figure()
    ax.semilogy(df["layer"], df["max_activation"], "o-", color="#D55E00", markersize=3.5,
                label="max |activation| over tokens and units")
    ax.semilogy(df["layer"], df["mean_abs_activation"], "s--", color="#0072B2", markersize=3.5,
                label="mean |activation|")
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("|layer output| (residual stream, log scale)")
    ax.set_title(_title(result, "massive activations against depth"), parse_math=False)
    ax.legend(fontsize=8)
    integer_ticks(ax, len(df))
    save_figure(fig, path)


def write_analysis_figures(result, folder: Path) -> list[dict]:
    """Write the analyze PNGs; returns [{file, caption}] for the manifest and the HTML page."""
    # Each figure only where its columns were measured (analyze --metrics may leave any out).
    figures = []
    if len(result.angular):
        figures.append(("angular_heatmap.png", plot_angular_heatmap,
                        "Angular distance between the input of layer ℓ and of layer ℓ+n, averaged over samples. Dark "
                        "cells: blocks that barely change the residual stream, the candidates for removal (Gromov et al.)."))
    if "angular_distance" in result.layers or "block_influence" in result.layers:
        figures.append(("layer_importance.png", plot_layer_importance,
                        "Per-layer angular distance (n = 1) and Block Influence (ShortGPT), bands: 95% intervals over "
                        "samples. Low values: the layer is close to the identity."))
    if "output_variance" in result.layers:
        figures.append(("output_variance.png", plot_output_variance,
                        "Variance of the residual stream after each layer (bands: 95% intervals over samples). Under "
                        "Pre-LN it grows with depth (Curse of Depth)."))
    if _has(result.layers, "lens_kl"):
        figures.append(("logit_lens.png", plot_logit_lens,
                        "Logit lens (nostalgebraist 2020; Csordás et al. 2025): the model's final norm and head applied "
                        "to each layer's output. KL to the final next-token distribution in nats (log axis) and the "
                        "fraction of tokens whose top-1 already matches the final one; dotted: the lock-in layer, the "
                        "first from which top-1 agreement stays ≥ 0.5."))
    if _has(result.layers, "relative_update"):
        figures.append(("residual_updates.png", plot_residual_updates,
                        "Relative update ‖y−x‖/‖x‖ and update cosine cos(y−x, x) per layer (mean over tokens), and per "
                        "attention/MLP sublayer where the layer's output is input + attention + MLP (Pre-LN). Cosine < 0: "
                        "the layer erases part of the stream; ≈ 0: writes new directions; > 0: amplifies it."))
    if _has(result.layers, "max_activation"):
        figures.append(("activations.png", plot_activations,
                        "Largest |activation| in each layer's output against the mean (Sun et al. 2024, massive "
                        "activations): a gap of orders of magnitude marks a few outlier units."))
    if _has(result.layers, "grad_norm"):
        figures.append(("grad_norms.png", plot_grad_norms,
                        "L2 norm of the gradient of the mean LM loss per layer and sublayer. Pre-LN shrinks deep "
                        "layers' gradients, Post-LN early layers' (Mix-LN paper)."))
    out = []
    for name, plot, caption in figures:
        plot(result, Path(folder) / name)
        out.append({"file": name, "caption": caption})
    return out


def _fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


HEADLINE_COLUMNS = ("angular_distance", "block_influence")  # what the table marks layers by


def wide_interval_lines(df) -> list[str]:
    """For the headline columns: how many layers' intervals are wider than their value."""
    out = []
    for col in HEADLINE_COLUMNS:
        if f"{col}_lo" not in df:
            continue
        v, lo, hi = (df[c].astype(float).to_numpy() for c in (col, f"{col}_lo", f"{col}_hi"))
        wide = np.isfinite(lo) & np.isfinite(hi) & (hi - lo > np.abs(v))
        if wide.any():
            out.append(f"{col}: the interval over samples is wider than the value on {int(wide.sum())} of {len(v)} "
                       f"layers (layers {', '.join(str(int(l)) for l in df['layer'][wide])}); more samples would "
                       "pin them down")
    return out


def summary_table(result) -> Table:
    s = result.summary
    source = str(s.get("norm_scheme_source") or "").replace(" (", ": ").rstrip(")")  # no nested parentheses
    t = Table(title=f"{s.get('model')} — {s.get('num_layers')} layers, norm scheme {s.get('norm_scheme')} "
                    f"({source})", title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
              pad_edge=False, caption_justify="left")
    cols = [("layer", "layer", "d"), ("angular_distance", "angular", ".3f"), ("block_influence", "BI", ".3f"),
            ("output_variance", "out var", ".2e"), ("update_variance", "upd var", ".2e"),
            ("grad_norm", "grad", ".2e"), ("grad_norm_attention", "∇attn", ".2e"), ("grad_norm_mlp", "∇mlp", ".2e"),
            ("norm_placement", "norm", "")]
    for _, header, _ in cols:
        t.add_column(header, justify="right", no_wrap=True)
    df = result.layers
    lowest = (set(df.nsmallest(max(1, len(df) // 4), "angular_distance")["layer"])
              if len(df) and "angular_distance" in df else set())
    for _, row in df.iterrows():
        cells = [_fmt(row[c].item() if hasattr(row[c], "item") else row[c], spec) if c in row else "—"
                 for c, _, spec in cols]
        for i, (c, _, spec) in enumerate(cols):  # ± where the column has an interval and the value is there
            if f"{c}_lo" in row and cells[i] != "—" and spec in (".3f",):
                cells[i] = plus_minus(float(row[c]), row[f"{c}_lo"], row[f"{c}_hi"], spec)
        marked = int(row["layer"]) in lowest
        if marked:  # a symbol, so the mark shows without colour too
            cells[0] = f"• {cells[0]}"
        t.add_row(*cells, style="bold cyan" if marked else None)
    measured = s.get("loss") is not None and not math.isnan(float(s["loss"]))
    t.caption = ((f"loss {s['loss']:.4f}, perplexity {s['perplexity']:.2f} on {s['tokens_scored']} tokens" if measured
                  else "loss not measured (--metrics without loss)")
                 + ("; •: the quarter of layers with the lowest angular distance" if lowest else ""))
    note = interval_note(result.manifest)
    if note:
        t.caption += f"\n{note}; none on the gradient norms (see docs/design.md)"
    for line in wide_interval_lines(df):
        t.caption += f"\nwarning: {line}"
    return t
