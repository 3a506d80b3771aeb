"""Figures and terminal tables for one `prune_sweep` result."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, SymLogNorm
from rich import box
from rich.table import Table
from rich.text import Text

from .confidence import STABILITY_CAPTION, STABILITY_HEADERS, plus_minus, stability_rows, verdict_lines
from .style import LAYER_AXIS, OKABE_ITO, integer_ticks, new_figure, save_figure

RANKING_LABELS = {
    "angular": "angular distance (Gromov et al.: most similar block)",
    "influence": "Block Influence (ShortGPT: lowest k layers)",
    "last": "last k layers",
    "angular-layer": "single-layer angular distance (lowest k)",
}
RANKING_COLORS = {"angular": OKABE_ITO[0], "influence": OKABE_ITO[1], "last": OKABE_ITO[4], "angular-layer": OKABE_ITO[5]}


def _title(result, what: str) -> str:
    return f"{result.summary.get('model', '')}: {what}"


def _y_scale(ax, values) -> str:
    """log when every value is positive, symlog when some are ≤ 0 (a removal can lower the loss)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) and (v > 0).all():
        ax.set_yscale("log")
        return "log scale"
    nonzero = np.abs(v[v != 0]) if len(v) else np.array([])
    if len(nonzero) == 0:
        return "linear"
    lin = 10 ** math.floor(math.log10(max(nonzero.min(), nonzero.max() * 1e-4)))
    ax.set_yscale("symlog", linthresh=lin)
    ax.axhline(0, color="#444444", linewidth=0.8)
    return f"symmetric log scale, linear below {lin:g}"


def plot_layer_damage(result, path: Path) -> None:
    df = result.rows("layer")
    fig, ax = new_figure()
    scale = _y_scale(ax, list(df["delta_loss"]) + list(df["kl"]))
    x = df["first_layer"].astype(int)
    ax.bar(x, df["delta_loss"], color=OKABE_ITO[0], alpha=0.85, width=0.75,
           label="Δloss = loss without the layer − full model's loss")
    if _has_interval(df, "delta_loss"):
        ax.errorbar(x, df["delta_loss"], yerr=_yerr(df, "delta_loss"), fmt="none", ecolor="#222222", elinewidth=1,
                    capsize=2, label="95% interval over samples")
    ax.plot(x, df["kl"], "o", color=OKABE_ITO[1], markersize=4,
            label="KL(full ‖ pruned) of the next-token distributions")
    if "removable_threshold" in result.summary:
        ax.axhline(result.summary["removable_threshold"], color="#777777", linestyle="--", linewidth=1,
                   label=f"removable below {result.summary['removable_threshold']:g} nats (whole interval)")
    ax.set_xlabel(f"removed {LAYER_AXIS}")
    ax.set_ylabel(f"nats per token ({scale})")
    full = result.summary
    ax.set_title(_title(result, "damage from removing one layer") +
                 f"\n(full model: loss {full['full_loss']:.3f} nats, perplexity {full['full_perplexity']:.1f})")
    ax.legend(fontsize=8)
    integer_ticks(ax, len(df))
    save_figure(fig, path)


def _has_interval(df: pd.DataFrame, col: str) -> bool:
    return f"{col}_lo" in df and df[f"{col}_lo"].astype(float).notna().any()


def _yerr(df: pd.DataFrame, col: str) -> np.ndarray:
    """[2, n] distances from the value down to _lo and up to _hi (matplotlib's asymmetric yerr)."""
    v = df[col].astype(float).to_numpy()
    return np.abs(np.stack([v - df[f"{col}_lo"].astype(float).to_numpy(), df[f"{col}_hi"].astype(float).to_numpy() - v]))


def plot_block_heatmap(result, path: Path) -> None:
    df = result.rows("block")
    L = int(result.summary["num_layers"])
    sizes = sorted(int(n) for n in df["block_size"].unique())
    grid = np.full((L - 1, L), np.nan)  # rows: n - 1, columns: ℓ
    for r in df.itertuples(index=False):
        grid[int(r.block_size) - 1, int(r.first_layer)] = r.delta_loss
    grid = grid[min(sizes) - 1:max(sizes)]
    finite = grid[np.isfinite(grid)]
    if (finite > 0).all():
        norm, scale = LogNorm(vmin=finite.min(), vmax=finite.max()), "log colour scale"
    else:
        nz = np.abs(finite[finite != 0])
        lin = 10 ** math.floor(math.log10(max(nz.min(), nz.max() * 1e-4))) if len(nz) else 1e-3
        bound = float(np.abs(finite).max()) or 1.0
        norm, scale = SymLogNorm(linthresh=lin, vmin=-bound, vmax=bound), f"symmetric log colour scale, linear below {lin:g}"
    fig, ax = new_figure(7.5, 5.2)
    ax.grid(False)
    cmap = matplotlib.colormaps["magma_r" if (finite > 0).all() else "RdBu_r"].with_extremes(bad="#f2f2f2")
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
                   extent=(-0.5, L - 0.5, min(sizes) - 0.5, max(sizes) + 0.5))
    best = [(int(np.nanargmin(grid[i])), sizes_i) for i, sizes_i in enumerate(range(min(sizes), max(sizes) + 1))
            if np.isfinite(grid[i]).any()]
    if best:
        ax.plot([b[0] for b in best], [b[1] for b in best], "o", color=OKABE_ITO[2], markersize=4,
                markeredgecolor="white", markeredgewidth=0.5, label="least harmful block for each n")
        ax.legend(loc="upper right", fontsize=8, frameon=True)
    ax.set_xlabel(f"first removed layer of the block, {LAYER_AXIS}")
    ax.set_ylabel("block size n (layers removed)")
    ax.set_title(_title(result, "Δloss when removing layers ℓ … ℓ+n−1"))
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"Δloss, nats per token ({scale})")
    integer_ticks(ax, L)
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    save_figure(fig, path)


def curves(result) -> list[tuple[str, str, pd.DataFrame]]:
    """(label, colour, rows with n_removed and perplexity) for greedy, each ranking and the best block."""
    t = result.table
    keep = ["n_removed", "perplexity"] + [c for c in ("loss_lo", "loss_hi") if c in t]
    full = t[t["mode"] == "full"][keep]
    out = []
    greedy = t[t["mode"] == "greedy"]
    if len(greedy):
        out.append(("greedy, re-measured after each removal (SLEB-style)", OKABE_ITO[7],
                    pd.concat([full, greedy[keep]])))
    ranked = t[t["mode"] == "ranked"]
    for by, g in ranked.groupby("by", sort=False):
        out.append((f"ranked: {RANKING_LABELS.get(by, by)}", RANKING_COLORS.get(by, OKABE_ITO[3]),
                    pd.concat([full, g[keep]])))
    block = t[t["mode"] == "block"]
    if out:  # beside greedy and the rankings, only as far as they go: the scale stays readable
        block = block[block["block_size"] <= max(int(df["n_removed"].max()) for _, _, df in out)]
    if len(block) and block["block_size"].nunique() > 1:
        best = block.loc[block.groupby("block_size")["delta_loss"].idxmin()][keep]
        out.append(("best contiguous block, exhaustive (block mode)", OKABE_ITO[2], pd.concat([full, best])))
    return out


def plot_curves(result, path: Path) -> None:
    fig, ax = new_figure()
    styles = ["o-", "s-", "^-", "d-", "v-", "P-"]
    for i, (label, color, df) in enumerate(curves(result)):
        df = df.sort_values("n_removed")
        ax.plot(df["n_removed"], df["perplexity"], styles[i % len(styles)], color=color, markersize=3.5,
                linewidth=1.6, label=label)
        if _has_interval(df, "loss"):  # perplexity = exp(loss): the band is exp of the loss interval
            ax.fill_between(df["n_removed"].astype(float), np.exp(df["loss_lo"].astype(float)),
                            np.exp(df["loss_hi"].astype(float)), color=color, alpha=0.15, linewidth=0)
    full = result.summary["full_perplexity"]
    ax.axhline(full, color="#888888", linestyle=":", linewidth=1, label=f"full model ({full:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("layers removed")
    ax.set_ylabel("perplexity on the sweep's tokens (log scale)")
    ax.set_title(_title(result, f"perplexity against layers removed (of {result.summary['num_layers']})"))
    ax.legend(fontsize=8)
    integer_ticks(ax, int(result.table["n_removed"].max()) + 1)
    save_figure(fig, path)


def write_sweep_figures(result, folder: Path) -> list[dict]:
    """Write the sweep's PNGs; returns [{file, caption}] for the manifest and index.html."""
    folder = Path(folder)
    modes = set(result.table["mode"])
    out = []
    if "layer" in modes:
        plot_layer_damage(result, folder / "prune_layers.png")
        out.append({"file": "prune_layers.png", "caption":
                    "Δloss and KL(full ‖ pruned) when one layer is removed, measured against the full model on "
                    "the same tokens, with 95% intervals over samples. Low bars: layers the model barely needs; "
                    "removable for sure when the whole interval is under the dashed threshold."})
    if "block" in modes:
        plot_block_heatmap(result, folder / "prune_blocks.png")
        out.append({"file": "prune_blocks.png", "caption":
                    "Δloss when the contiguous block of n layers starting at ℓ is removed; dots: the least harmful "
                    "block for each n. Compare with the angular-distance map of analyze."})
    drawn = [label for label, _, _ in curves(result)]
    if drawn:
        plot_curves(result, folder / "prune_curves.png")
        out.append({"file": "prune_curves.png", "caption":  # says what is drawn, nothing more
                    "Perplexity as more layers are removed (bands: 95% intervals of each perplexity over samples, which "
                    "include the spread of the samples' own difficulty; the paired Δloss intervals of the table are "
                    "narrower), "
                    + ("curves: " if len(drawn) > 1 else "curve: ") + "; ".join(drawn) + "."})
    return out


# -- terminal ---------------------------------------------------------------------------------
def _f(v, spec=".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "—"
    return format(v, spec)


def _table(title: str, first: tuple[str, str]) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    t.add_column(first[0], justify="right", no_wrap=True)
    t.add_column(first[1], justify="right", no_wrap=True)
    for h in ("Δloss", "perplexity", "KL", "top-1"):
        t.add_column(h, justify="right", no_wrap=True)
    return t


def _cells(r) -> list[str]:
    r = r if isinstance(r, pd.Series) else pd.Series(r._asdict())
    dl = _f(r["delta_loss"], "+.4f")
    if dl != "—" and "delta_loss_lo" in r:
        dl = plus_minus(r["delta_loss"], r["delta_loss_lo"], r["delta_loss_hi"], "+.4f")
    return [dl, _f(r["perplexity"], ".2f"), _f(r["kl"], ".4f"), _f(r["top1_agreement"], ".3f")]


def _layer_table(layer: pd.DataFrame) -> Table:
    t = _table("removing one layer", ("layer", "removed"))
    low = set(layer.nsmallest(max(1, len(layer) // 4), "delta_loss")["first_layer"])
    for r in layer.itertuples(index=False):
        marked = r.first_layer in low
        t.add_row(f"{'• ' if marked else ''}{r.first_layer}", r.removed, *_cells(r), style="bold cyan" if marked else None)
    t.caption = "•: the quarter of layers whose removal hurts least" + (
        "; ±: half the 95% interval over samples" if "delta_loss_lo" in layer else "")
    t.caption_justify = "left"
    return t


def _block_table(block: pd.DataFrame) -> Table:
    t = _table("removing a contiguous block: the least harmful block of each size", ("n", "removed"))
    for n, g in block.groupby("block_size"):
        r = g.loc[g["delta_loss"].idxmin()]
        t.add_row(str(n), r["removed"], *_cells(r))
    return t


def _lm_eval_table(table: pd.DataFrame, lm_cols: list[str]) -> Table:
    t = Table(title="lm-evaluation-harness", title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
              pad_edge=False)
    t.add_column("mode", no_wrap=True)
    t.add_column("removed", justify="right", no_wrap=True)
    for c in lm_cols:
        t.add_column(c.split(":", 1)[1], justify="right", no_wrap=True)
    for _, r in table.iterrows():
        t.add_row(str(r["mode"]), str(r["removed"]), *[_f(r[c], ".3f") for c in lm_cols])
    return t


def sweep_tables(result) -> list:
    """A headline, then one rich Table per mode in the result."""
    s = result.summary
    head = Text.assemble((f"{s.get('model')}", "bold"), f" — {s.get('num_layers')} layers; full model: loss ",
                         (f"{s['full_loss']:.4f}", "bold"), ", perplexity ", (f"{s['full_perplexity']:.2f}", "bold"),
                         f" on {s['tokens_scored']} tokens; Δloss and KL in nats per token")
    tables: list = [head]
    if len(result.rows("layer")):
        tables.append(_layer_table(result.rows("layer")))
    if len(result.rows("block")):
        tables.append(_block_table(result.rows("block")))
    for mode, title, first in (("greedy", "greedy removal, re-measured after each step", "step"),
                               ("remove", "the removal asked for", "layers")):
        rows = result.rows(mode)
        if len(rows):
            t = _table(title, (first, "removed"))
            for r in rows.itertuples(index=False):
                t.add_row(str(r.step) if mode == "greedy" else str(r.n_removed), r.removed, *_cells(r))
            tables.append(t)
    for by, g in result.rows("ranked").groupby("by", sort=False):
        t = _table(f"ranked by {RANKING_LABELS.get(by, by)}", ("k", "removed"))
        for r in g.itertuples(index=False):
            t.add_row(str(r.n_removed), r.removed, *_cells(r))
        tables.append(t)
    lm_cols = [c for c in result.table.columns if str(c).startswith("lm_eval:")]
    if lm_cols:
        tables.append(_lm_eval_table(result.table, lm_cols))
    rows = stability_rows(s)
    if rows:
        t = Table(title="how stable the rankings are over the samples", title_justify="left", box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False, caption=STABILITY_CAPTION, caption_justify="left")
        for h in STABILITY_HEADERS:
            t.add_column(h, justify="right")
        for row in rows:
            t.add_row(*row)
        tables.append(t)
    tables += [Text(line) for line in verdict_lines(s)]
    return tables
