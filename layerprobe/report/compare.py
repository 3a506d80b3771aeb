"""Figures, tables and the self-contained HTML page of a comparison (`layerprobe compare`)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from rich import box
from rich.table import Table

from .. import __version__
from ..comparison import HEADLINE_DEFINITIONS, grad_ratio, variance_growth
from ..io import write_csv, write_text
from ..results import package_versions, update_manifest
from .html import esc, img_tag, page
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


def _styles(comp):
    return model_styles([(m.label, m.norm_scheme) for m in comp.models])


def _legend_label(m) -> str:
    return m.label if m.norm_scheme.lower() in m.label.lower() else f"{m.label} ({m.norm_scheme})"


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
    styles = _styles(comp)
    fig, ax = new_figure(7.5, 4.4)
    for m in comp.models:
        d = df[(df["model"] == m.label)].dropna(subset=[metric])
        if scale is True:
            d = d[d[metric] > 0]
        if d.empty:
            continue
        st = styles[m.label]
        ax.plot(_x(comp, d), d[metric], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                markersize=4, linewidth=1.8, label=_legend_label(m))
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
    models = [m for m in comp.models if m.analysis is not None]
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
    n = len(models)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 1.2, 3.1 * rows + 0.6), dpi=120, squeeze=False,
                             constrained_layout=True)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f2f2f2")
    styles = _styles(comp)
    im = None
    for ax, m, grid in zip(axes.flat, models, grids):
        L = grid.shape[0]
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=0, vmax=vmax,
                       extent=(-0.5, L - 0.5, 0.5, L + 0.5), interpolation="nearest")
        ax.set_title(_legend_label(m), color=styles[m.label]["color"], fontsize=10, fontweight="bold")
        ax.set_xlabel("first layer ℓ of the block (0-based)", fontsize=8)
        ax.set_ylabel("block size n (layers)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    cb = fig.colorbar(im, ax=axes, shrink=0.9)
    cb.set_label("angular distance (fraction of π; 0 = same direction)", fontsize=8)
    fig.suptitle("angular distance between the inputs of layer ℓ and layer ℓ+n (same colour scale)", fontsize=11)
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _smooth(values: pd.Series, points: int) -> pd.Series:
    window = max(1, points // 40)
    return values.rolling(window, min_periods=1, center=True).mean()


def plot_training_loss(comp, path: Path) -> bool:
    models = [m for m in comp.models if m.training is not None]
    if not models:
        return False
    styles = _styles(comp)
    fig, ax = new_figure(10.5, 4.2)
    any_eval = False
    for m in models:
        t = m.training
        st = styles[m.label]
        if "loss" in t.columns and t["loss"].notna().any():
            tr = t.dropna(subset=["loss"])
            ax.plot(tr["step"], tr["loss"], color=st["color"], alpha=0.25, linewidth=0.8)
            ax.plot(tr["step"], _smooth(tr["loss"], len(tr)), color=st["color"], linestyle=st["linestyle"],
                    linewidth=1.4, label=_legend_label(m))
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
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    n = len(models)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 0.6, 3.0 * rows + 0.6), dpi=120, squeeze=False,
                             sharey=True, constrained_layout=True)
    styles = _styles(comp)
    for i_ax, (ax, m) in enumerate(zip(axes.flat, models)):
        d = _layer_metric_over_training(m, metric)
        d = d[d[metric] > 0]
        steps = sorted(d["step"].unique())
        color = styles[m.label]["color"]
        cmap = LinearSegmentedColormap.from_list("s", ["#dddddd", color])
        for i, step in enumerate(steps):
            s = d[d["step"] == step]
            frac = i / max(1, len(steps) - 1)
            ax.plot(s["layer"], s[metric], color=cmap(frac), linewidth=1.0 + 0.8 * frac,
                    label=f"step {step}" if i in (0, len(steps) - 1) else None)
        ax.set_yscale("log")
        ax.set_title(_legend_label(m), color=color, fontsize=10, fontweight="bold")
        ax.set_xlabel(LAYER_AXIS, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        if i_ax == 0:
            ax.legend(fontsize=7, title="light → dark: early → late", title_fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{ylabel.split(' (')[0]} over training, one line per evaluation", fontsize=11)
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def training_dynamics(m) -> pd.DataFrame | None:
    """Variance growth and gradient ratio at every logged step of a training run."""
    tl = m.training_layers
    if tl is None or tl.empty:
        return None
    rows = []
    for step, d in tl.groupby("step"):
        d = d.sort_values("layer")
        row = {"step": int(step)}
        if "output_variance" in d and d["output_variance"].notna().all():
            row["variance_growth"] = variance_growth(d["output_variance"].to_numpy(), len(d))
        if "grad_norm" in d and d["grad_norm"].notna().all():
            row["grad_ratio"] = grad_ratio(d["grad_norm"].to_numpy())
        rows.append(row)
    out = pd.DataFrame(rows)
    return out if len(out.columns) > 1 else None


def plot_training_dynamics(comp, path: Path) -> bool:
    dyn = {m.label: training_dynamics(m) for m in comp.models}
    dyn = {k: v for k, v in dyn.items() if v is not None}
    if not dyn:
        return False
    import matplotlib.pyplot as plt

    panels = [("variance_growth", "variance growth: slope of ln(output var)\nagainst normalised depth", False),
              ("grad_ratio", "gradient ratio: last-quarter / first-quarter\nmean layer gradient norm (log)", True)]
    panels = [p for p in panels if any(p[0] in v.columns for v in dyn.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), dpi=120, squeeze=False,
                             constrained_layout=True)
    styles = _styles(comp)
    by_label = {m.label: m for m in comp.models}
    for ax, (col, ylabel, log) in zip(axes[0], panels):
        for label, d in dyn.items():
            if col not in d.columns:
                continue
            st = styles[label]
            ax.plot(d["step"], d[col], color=st["color"], linestyle=st["linestyle"], marker=st["marker"],
                    markersize=3.5, linewidth=1.6, label=_legend_label(by_label[label]))
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
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def write_figures(comp, out: Path) -> list[dict]:
    """Every figure the comparison has data for; returns [{file, caption, section}]."""
    figures = []
    what = "normalised depth" if comp.depth == "normalised" else "layer"
    for metric, file, ylabel, scale, title, caption in PER_LAYER:
        if plot_per_layer(comp, metric, out / file, ylabel, scale, f"{title}, by {what}"):
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


# ----------------------------------------------------------------------------- tables

HEADLINE_COLUMNS = [
    # column, header in the report, header in the terminal, format
    ("model", "model", "model", None),
    ("norm_scheme", "norm scheme", "norm", None),
    ("layers", "layers", "L", "d"),
    ("perplexity", "perplexity", "ppl", ".2f"),
    ("final_eval_perplexity", "held-out ppl at the end of training", "train ppl", ".2f"),
    ("removable_layers", "removable layers", "removable", "d"),
    ("variance_growth", "variance growth (slope)", "var slope", ".2f"),
    ("variance_growth_factor", "variance growth factor", "var ×", ".3g"),
    ("grad_ratio", "gradient ratio last/first quarter", "∇ last/first", ".3g"),
]


def _fmt(v, spec) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if spec == "d":
        return str(int(v))
    if spec:
        s = format(float(v), spec)
        return s
    return str(v)


def _repeats(df: pd.DataFrame, col: str, other: str) -> bool:
    a, b = df[col].astype(float), df[other].astype(float)
    return bool(np.allclose(a, b, rtol=1e-6, equal_nan=True))


def _visible_columns(df: pd.DataFrame, terminal: bool = False):
    """The headline columns that say something: no all-empty column, no column that repeats another (when
    the analysis ran on the trainer's held-out split, its perplexity is the final held-out perplexity)."""
    return [(c, t if terminal else h, f) for c, h, t, f in HEADLINE_COLUMNS if c in df.columns and
            (f is None or df[c].notna().any()) and
            not (c == "final_eval_perplexity" and _repeats(df, c, "perplexity"))]


def headline_table(comp) -> Table:
    """The headline numbers for the terminal."""
    t = Table(title=f"comparison of {len(comp.models)} model(s)", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    cols = _visible_columns(comp.headline, terminal=True)
    for c, header, _ in cols:
        t.add_column(header, justify="left" if c in ("model", "norm_scheme") else "right")
    for _, row in comp.headline.iterrows():
        t.add_row(*[_fmt(row[c], f) for c, _, f in cols])
    notes = {"perplexity": "ppl: on the analysed data", "final_eval_perplexity": "train ppl: held-out, at the end of training",
             "removable_layers": f"removable: layers whose removal alone costs < {comp.threshold:g} nats",
             "variance_growth": "var slope: slope of ln(output variance) against depth ℓ/(L−1), var × = exp(slope)",
             "grad_ratio": "∇ last/first: mean gradient norm of the last ⌈L/4⌉ layers over the first ⌈L/4⌉"}
    t.caption = "; ".join(text for c, text in notes.items() if c in {c for c, _, _ in cols})
    t.caption_justify = "left"
    return t


def _headline_html(comp, styles) -> str:
    df = comp.headline
    cols = _visible_columns(df)
    head = "".join(f'<th class="t">{esc(h)}</th>' if f is None else f"<th>{esc(h)}</th>" for _, h, f in cols)
    body = []
    for _, row in df.iterrows():
        cells = []
        for c, _, f in cols:
            text = esc(_fmt(row[c], f))
            if c == "model":
                color = styles[row["model"]]["color"]
                text = f'<span class="swatch" style="background:{color}"></span>{text}'
            elif c == "removable_layers" and pd.notna(row["removable_layers"]) and pd.notna(row["layers"]):
                which = [int(x) for x in str(row.get("removable_which") or "").split()]
                rest = [ell for ell in range(int(row["layers"])) if ell not in which]
                if which and rest and len(which) > len(rest):
                    text += f' <span class="muted">all but ℓ = {esc(", ".join(map(str, rest)))}</span>'
                elif which and rest:
                    text += f' <span class="muted">ℓ = {esc(", ".join(map(str, which)))}</span>'
                elif which:
                    text += ' <span class="muted">all</span>'
            cells.append(f'<td class="t">{text}</td>' if f is None else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="headline"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _definitions_html(comp) -> str:
    items = []
    shown = {c for c, _, _ in _visible_columns(comp.headline)}
    names = {c: h for c, h, _, _ in HEADLINE_COLUMNS}
    for key, text in HEADLINE_DEFINITIONS.items():
        if key in shown:
            if key == "removable_layers":
                text = text.replace("the threshold", f"the threshold of {comp.threshold:g} nats")
            items.append(f"<dt>{esc(names[key])}</dt><dd>{esc(text)}</dd>")
    return f'<dl class="defs">{"".join(items)}</dl>'


def findings(comp) -> list[str]:
    """Plain sentences read off the headline numbers: each lists every model, ordered, nothing more."""
    df = comp.headline
    out = []

    def ranked(col, fmt, descending=False, prefix=""):
        d = df.dropna(subset=[col]) if col in df else df.iloc[0:0]
        if len(d) < 2:
            return None
        d = d.sort_values(col, ascending=not descending)
        return ", ".join(f"{r['model']} {prefix}{format(r[col], fmt)}" for _, r in d.iterrows())

    text = ranked("perplexity", ".2f")
    if text:
        out.append(f"Perplexity, lowest first: {text}.")
    text = ranked("variance_growth_factor", ".3g", descending=True, prefix="×")
    if text:
        out.append(f"Fitted growth of the output variance from the first layer to the last: {text} "
                   "(×1 = flat; Pre-LN's Curse of Depth shows as a large factor).")
    text = ranked("grad_ratio", ".3g")
    if text:
        out.append(f"Gradient norm of the last quarter of layers over the first quarter: {text} "
                   "(< 1: deep layers get smaller gradients, as the Mix-LN paper reports for Pre-LN; "
                   "> 1: early layers do, as for Post-LN).")
    if "removable_layers" in df and df["removable_layers"].notna().sum() >= 1:
        d = df.dropna(subset=["removable_layers"])
        parts = [f"{r['model']} {int(r['removable_layers'])}/{int(r['layers'])}" for _, r in d.iterrows()]
        out.append(f"Layers whose removal alone costs less than {comp.threshold:g} nats: " + ", ".join(parts) + ".")
    return out


def _inputs_html(comp, out: Path, styles) -> str:
    rows = []
    for m in comp.models:
        links = []
        for f in m.folders:
            idx = f / "index.html"
            shown = esc(str(f))
            try:
                rel = Path(os.path.relpath(idx.resolve(), out.resolve()))
            except ValueError:
                rel = None
            if idx.is_file() and rel is not None and not str(rel).startswith(".."):
                links.append(f'<a href="{esc(rel.as_posix())}"><code>{shown}</code></a>')
            else:
                links.append(f"<code>{shown}</code>")
        a = m.analysis
        data = (f"{a.manifest.get('data')} · {a.manifest.get('samples')} × {a.manifest.get('seq_len')} tokens"
                if a is not None else "")
        src = (a.summary.get("norm_scheme_source") if a is not None else "") or ""
        color = styles[m.label]["color"]
        training = ""
        if m.training is not None:
            t = m.train_manifest
            done = int(m.training["step"].max())
            training = f"{t.get('status', '')} {done}/{t.get('total_steps', done)} steps ({t.get('preset', '?')} preset)"
            if t.get("diverged_at"):
                training += f", diverged at step {t['diverged_at']}"
        rows.append("<tr>" + "".join([
            f'<td><span class="swatch" style="background:{color}"></span>{esc(m.label)}</td>',
            f"<td>{esc(m.norm_scheme)}" + (f' <span class="muted">· {esc(src)}</span>' if src else "") + "</td>",
            f"<td>{esc(', '.join(m.kinds))}</td>",
            f"<td>{esc(training)}</td>",
            f"<td>{esc(data)}</td>",
            f"<td>{'<br>'.join(links)}</td>",
        ]) + "</tr>")
    head = "".join(f'<th class="t">{h}</th>' for h in ("model", "norm scheme (how known)", "results", "training",
                                                        "analysed on", "folders"))
    return f'<table class="inputs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


EXTRA_CSS = """
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:middle}
.muted{color:#777;font-size:12px}
table.headline td,table.headline th{padding:4px 10px}
dl.defs{font-size:13px;color:#333;display:grid;grid-template-columns:max-content 1fr;gap:2px 12px}
dl.defs dt{font-weight:600} dl.defs dd{margin:0}
ul.findings li{margin:3px 0}
td.t,th.t{text-align:left}
figure.wide{grid-column:1/-1}
table.inputs td{text-align:left}
"""


def _section(title: str, figs: list[dict], out: Path, intro: str = "") -> str:
    if not figs:
        return ""
    wide = ' class="wide"'
    body = "".join(
        f"<figure{wide if f.get('wide') else ''}>{img_tag(out / f['file'], f['caption'])}"
        f"<figcaption>{esc(f['caption'])}</figcaption></figure>"
        for f in figs)
    return f"<h2>{esc(title)}</h2>{intro}<div class=\"grid\">{body}</div>"


def render_html(comp, out: Path, title: str, inputs: list[str], command: str | None = None) -> str:
    styles = _styles(comp)
    figs = comp.figures
    by_section = {s: [f for f in figs if f["section"] == s] for s in ("per-layer", "angular", "training")}
    schemes = ", ".join(dict.fromkeys(m.norm_scheme for m in comp.models))
    versions = package_versions()
    subtitle = (f"{len(comp.models)} model(s) · norm schemes {esc(schemes)} · layer index ℓ is 0-based · "
                f"layerprobe {esc(__version__)} · torch {esc(versions.get('torch', '?'))} · "
                f"transformers {esc(versions.get('transformers', '?'))}")
    parts = ["<h2>At a glance</h2>", _headline_html(comp, styles)]
    facts = findings(comp)
    specs = {(m.analysis.manifest.get("data"), m.analysis.manifest.get("seq_len"), m.analysis.manifest.get("samples"))
             for m in comp.models if m.analysis is not None}
    if len(specs) > 1:
        facts.append("Note: the models were analysed on different data (or numbers of tokens), so their "
                     "perplexities and Δloss are not directly comparable; the per-layer shapes are.")
    if facts:
        parts.append('<ul class="findings">' + "".join(f"<li>{esc(s)}</li>" for s in facts) + "</ul>")
    parts.append("<details open><summary>How each number is defined</summary>" + _definitions_html(comp) + "</details>")
    x_note = ("<p class=\"muted\">The models have different depths, so the x axis is the normalised depth "
              "ℓ/(L−1).</p>" if comp.depth == "normalised" else "")
    parts.append(_section("Per-layer curves", by_section["per-layer"], out, x_note))
    parts.append(_section("Angular distance maps", by_section["angular"], out))
    parts.append(_section("Training", by_section["training"], out))
    parts.append("<h2>Inputs</h2>" + _inputs_html(comp, out, styles))
    cmd = command or "layerprobe compare " + " ".join(inputs)
    parts.append(f"<p class=\"muted\">Made with <code>{esc(cmd)}</code>. Tables: <code>headline.csv</code>, "
                 "<code>per_layer.csv</code>" + (", <code>training.csv</code>" if any(m.training is not None for m in comp.models) else "")
                 + " next to this file.</p>")
    html = page(title, subtitle, "".join(parts))
    return html.replace("</style>", EXTRA_CSS + "</style>", 1)


def write_report(comp, out: Path, *, title: str | None, started: float, inputs: list[str],
                 command: str | None = None) -> Path:
    comp.out = out
    comp.figures = write_figures(comp, out)
    write_csv(out / "headline.csv", comp.headline)
    write_csv(out / "per_layer.csv", comp.per_layer)
    training = []
    for m in comp.models:
        if m.training is not None:
            training.append(m.training.assign(model=m.label, norm_scheme=m.norm_scheme))
    if training:
        write_csv(out / "training.csv", pd.concat(training, ignore_index=True))
    title = title or "layerprobe — " + " vs ".join(m.label for m in comp.models)
    write_text(out / "index.html", render_html(comp, out, title, inputs, command))
    update_manifest(out, "compare", {
        "inputs": inputs,
        "command": command or "layerprobe compare " + " ".join(inputs),
        "models": [{"label": m.label, "norm_scheme": m.norm_scheme, "folders": [str(f) for f in m.folders],
                    "results": m.kinds} for m in comp.models],
        "threshold_nats": comp.threshold,
        "depth_axis": comp.depth,
        "figures": [{"file": f["file"], "caption": f["caption"]} for f in comp.figures],
        "versions": package_versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
    })
    return out / "index.html"
