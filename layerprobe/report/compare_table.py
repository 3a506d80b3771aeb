"""The headline table of a comparison: which columns say something, how values print, the terminal table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from rich import box
from rich.table import Table

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


def fmt(v, spec) -> str:
    """A headline value as text; "—" for a missing or non-finite one (the one place that decides)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if spec == "d":
        return str(int(v))
    if spec:
        return format(float(v), spec)
    return str(v)


def _repeats(df: pd.DataFrame, col: str, other: str) -> bool:
    a, b = df[col].astype(float), df[other].astype(float)
    return bool(np.allclose(a, b, rtol=1e-6, equal_nan=True))


def visible_columns(df: pd.DataFrame, terminal: bool = False):
    """The headline columns that say something: no all-empty column, no column that repeats another (when
    the analysis ran on the trainer's held-out split, its perplexity is the final held-out perplexity)."""
    return [(c, t if terminal else h, f) for c, h, t, f in HEADLINE_COLUMNS if c in df.columns and
            (f is None or df[c].notna().any()) and
            not (c == "final_eval_perplexity" and _repeats(df, c, "perplexity"))]


def headline_table(comp) -> Table:
    """The headline numbers for the terminal."""
    t = Table(title=f"comparison of {len(comp.models)} model(s)", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    cols = visible_columns(comp.headline, terminal=True)
    for c, header, _ in cols:
        t.add_column(header, justify="left" if c in ("model", "norm_scheme") else "right")
    for _, row in comp.headline.iterrows():
        t.add_row(*[fmt(row[c], f) for c, _, f in cols])
    notes = {"perplexity": "ppl: on the analysed data", "final_eval_perplexity": "train ppl: held-out, at the end of training",
             "removable_layers": f"removable: layers whose removal alone costs < {comp.threshold:g} nats",
             "variance_growth": "var slope: slope of ln(output variance) against depth ℓ/(L−1), var × = exp(slope)",
             "grad_ratio": "∇ last/first: mean gradient norm of the last ⌈L/4⌉ layers over the first ⌈L/4⌉"}
    t.caption = "; ".join(text for c, text in notes.items() if c in {c for c, _, _ in cols})
    t.caption_justify = "left"
    return t


