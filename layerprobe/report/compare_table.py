"""The headline table of a comparison: which columns say something, how values print, the terminal table.

With several seeds of a scheme (train-reference --seeds) the table has one row per seed group, each number
the mean ± standard deviation over its runs. The terminal table never cuts a number or a name: when the models do not fit side by side in the
terminal's width (80 columns when piped), it turns so that each model is a column and each quantity a row.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console, Group
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..comparison import interval_findings, interval_gaps, interval_warnings

HEADLINE_COLUMNS = [
    # column, header in the report, header in the terminal, format, detail (in the report's table, not the terminal's)
    ("model", "model", "model", None, False),
    ("norm_scheme", "norm scheme", "norm", None, False),
    ("layers", "layers", "L", "d", False),
    ("seeds", "seeds", "seeds", "d", False),  # only in the per-scheme table, when a scheme has several seeds
    ("perplexity", "perplexity", "ppl", ".2f", False),
    ("final_eval_perplexity", "held-out ppl at the end of training", "train ppl", ".2f", False),
    ("deep_half_share", "deep-half share of removal cost", "deep½ cost", ".0%", False),
    ("removable_relative", "removable layers (< 10% of max Δloss)", "removable", "d", False),
    ("removable_layers", "removable layers (absolute threshold)", "removable abs", "d", True),
    ("variance_growth", "variance growth (slope)", "var slope", ".2f", True),
    ("variance_growth_factor", "variance growth factor", "var ×", "sig3", False),
    ("grad_ratio", "gradient ratio last/first quarter", "∇ last/first", "sig3", False),
]

NOTES = {  # the terminal table's caption, for the columns it shows
    "seeds": "seeds: training runs per scheme, differing only in their seed; a ± b: their mean ± standard deviation",
    "perplexity": "ppl: on the analysed data",
    "final_eval_perplexity": "train ppl: held-out, at the end of training",
    "deep_half_share": "deep½ cost: share of the single-layer removal cost on the deeper half",
    "removable_relative": "removable: layers whose removal costs < 10% of the model's largest Δloss",
    "variance_growth_factor": "var ×: fitted growth of the output variance from the first layer to the last",
    "grad_ratio": "∇ last/first: mean gradient norm of the last ⌈L/4⌉ layers over the first ⌈L/4⌉",
}


def fmt(v, spec) -> str:
    """A headline value as text; "—" for a missing or non-finite one (the one place that decides)."""
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and not math.isfinite(v)):
        return "—"
    if spec == "d":
        return str(int(v))
    if spec == "sig3":  # three significant figures, trailing zeros kept so a column reads evenly: 6.00, 4.67, 0.246
        v = float(v) + 0.0  # + 0.0: no "-0.00"
        return f"{v:,.0f}" if abs(v) >= 999.5 else format(v, "#.3g").rstrip(".")
    if spec:
        return format(float(v), spec)
    return str(v)


def table_frame(comp) -> pd.DataFrame:
    """What the headline tables show: one row per model, or, when a scheme was trained on several seeds, one
    row per seed group with each number its mean (`Comparison.seeds`)."""
    return comp.seeds if comp.seeded else comp.headline


def _number(v) -> float | None:
    return None if v is None or v is pd.NA or not math.isfinite(float(v)) else float(v)


def cell(row, col: str, spec) -> str:
    """A value of `table_frame` as text: a seed group's mean ± its standard deviation when it has several runs
    (counts then with one decimal), "(n=2)" after it when fewer of its runs than all have the number; else the
    value as `fmt` prints it."""
    sd = _number(row.get(f"{col}_sd")) if hasattr(row, "get") else None
    n, runs = (_number(row.get(f"{col}_n")), _number(row.get("seeds"))) if hasattr(row, "get") else (None, None)
    if sd is None:
        text = fmt(row[col], spec)
    else:
        spec = ".1f" if spec == "d" else spec
        text = f"{fmt(row[col], spec)} ± {fmt(sd, spec)}"
    if n is not None and runs is not None and 0 < n < runs:
        text += f" (n={int(n)})"
    return text


def _repeats(df: pd.DataFrame, col: str, other: str) -> bool:
    if col not in df or other not in df:
        return False
    if not (pd.api.types.is_numeric_dtype(df[col]) and pd.api.types.is_numeric_dtype(df[other])):
        return bool((df[col].astype(str) == df[other].astype(str)).all())
    a, b = df[col].astype(float), df[other].astype(float)
    return bool(np.allclose(a, b, rtol=1e-6, equal_nan=True))


def visible_columns(df: pd.DataFrame, terminal: bool = False):
    """The headline columns that say something, as (column, header, format): no all-empty column, no column
    that repeats another (when the analysis ran on the trainer's held-out split, its perplexity is the final
    held-out perplexity; when every model is named after its scheme). The terminal leaves out the details."""
    return [(c, t if terminal else h, f) for c, h, t, f, detail in HEADLINE_COLUMNS
            if c in df.columns and not (terminal and detail) and
            (f is None or df[c].notna().any()) and
            not (c == "final_eval_perplexity" and _repeats(df, c, "perplexity")) and
            not (terminal and c == "norm_scheme" and _repeats(df, c, "model"))]


def _wide(df, cols, title: str) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for c, header, _ in cols:
        numeric = c not in ("model", "norm_scheme")
        t.add_column(header, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold")
    for _, row in df.iterrows():
        t.add_row(*[cell(row, c, f) for c, _, f in cols])
    return t


def _tall(df, cols, title: str) -> Table:
    """One column per model, one row per quantity."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("", justify="left", overflow="fold")
    for label in df["model"]:
        t.add_column(str(label), justify="right", overflow="fold")
    for c, header, f in cols:
        if c != "model":
            t.add_row(header, *[cell(row, c, f) for _, row in df.iterrows()])
    return t


def _fits(table: Table, width: int) -> bool:
    console = Console(width=10_000)
    return Measurement.get(console, console.options, table).maximum <= width


def headline_table(comp, width: int | None = None):
    """The headline numbers for the terminal, side by side when they fit in `width` (default: the terminal's),
    else one column per model; a caption says what each column is."""
    width = width or Console().width
    df = table_frame(comp)
    cols = visible_columns(df, terminal=True)
    title = f"comparison of {len(comp.models)} model(s)"
    if comp.seeded:
        title += f" in {len(df)} seed groups"
    table = _wide(df, cols, title)
    if not _fits(table, width):
        table = _tall(df, cols, title)
    shown = {c for c, _, _ in cols}
    caption = [text for c, text in NOTES.items() if c in shown]
    if "removable_layers" in df and df["removable_layers"].notna().any():
        counts = ", ".join(f"{row['model']} {cell(row, 'removable_layers', 'd')}" for _, row in df.iterrows())
        caption.append(f"removable at an absolute < {comp.threshold:g} nats: {counts}")
    lines = Table.grid()  # a grid wraps its lines at the width even on a soft-wrapping console (the CLI's)
    lines.add_column()
    for line in interval_lines(comp):
        lines.add_row(Text(line))
    return Group(table, Text("\n".join(caption), style="dim"), lines)


def interval_lines(comp) -> list[str]:
    """The headline numbers' intervals in words (one line per number), then which models lack one and
    whose interval is wider than its value (`comparison.interval_findings`, ...; one row per run)."""
    df = comp.headline
    return (interval_findings(df) + [f"note: {g}" for g in interval_gaps(df)]
            + [f"warning: {w}" for w in interval_warnings(df)])
