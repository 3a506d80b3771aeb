"""The sweep's table: one row per candidate (the full model's first) and the summary read from it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..defaults import REMOVABLE_THRESHOLD
from ..metrics import perplexity
from ..metrics.depth import removal_verdicts
from ..metrics.intervals import LEVEL, bootstrap_interval
from .candidates import Candidate
from .measures import Sums
from .surgery import format_removed

COLUMNS = ["mode", "removed", "n_removed", "first_layer", "block_size", "by", "step", "added_layer",
           "loss", "loss_lo", "loss_hi", "delta_loss", "delta_loss_lo", "delta_loss_hi", "perplexity",
           "kl", "kl_lo", "kl_hi", "top1_agreement", "top1_agreement_lo", "top1_agreement_hi", "tokens"]
INTERVAL_OF = ("loss", "delta_loss", "kl", "top1_agreement")  # the columns with _lo/_hi beside them
INT_COLUMNS = ("first_layer", "block_size", "step", "added_layer")


def _sweep_statistic(t) -> np.ndarray:
    """[R, 4]: loss, Δloss (paired: the candidate and the full model on the same resampled samples), KL, top-1."""
    with np.errstate(all="ignore"):
        loss = t["ce"] / t["tokens"]
        return np.stack([loss, loss - t["full_ce"] / t["tokens"], t["kl"] / t["tokens"], t["top1"] / t["tokens"]], -1)


def intervals(sums: Sums, full: Sums, counts: np.ndarray | None, level: float = LEVEL) -> dict:
    """{column_lo, column_hi} for loss, Δloss, KL and top-1 over samples (NaN without per-sample sums)."""
    ps, fs = sums.per_sample(), full.per_sample()
    if not ps or not fs or len(ps["ce"]) != len(fs["ce"]):
        return {f"{c}_{e}": float("nan") for c in INTERVAL_OF for e in ("lo", "hi")}
    lo, hi = bootstrap_interval(dict(ps, full_ce=fs["ce"]), _sweep_statistic, level=level, counts=counts)
    out = {}
    for i, col in enumerate(INTERVAL_OF):
        out[f"{col}_lo"], out[f"{col}_hi"] = float(lo[i]), float(hi[i])
    return out


def full_row(full: Sums, counts: np.ndarray | None = None) -> dict:
    row = {"mode": "full", "removed": "none", "n_removed": 0, "first_layer": None, "block_size": None,
           "by": None, "step": None, "added_layer": None, "loss": full.loss, "delta_loss": 0.0,
           "perplexity": perplexity(full.loss), "kl": 0.0, "top1_agreement": 1.0, "tokens": full.tokens}
    return dict(row, **intervals(full, full, counts))


def candidate_row(c: Candidate, sums: Sums, full_loss: float, full: Sums | None = None,
                  counts: np.ndarray | None = None) -> dict:
    loss = sums.loss
    row = {
        "mode": c.mode, "removed": format_removed(c.removed), "n_removed": len(c.removed),
        "first_layer": c.first_layer, "block_size": c.block_size, "by": c.by, "step": c.step,
        "added_layer": c.added_layer, "loss": loss, "delta_loss": loss - full_loss,
        "perplexity": perplexity(loss), "kl": sums.mean_kl,
        "top1_agreement": sums.top1_agreement, "tokens": sums.tokens,
    }
    return dict(row, **intervals(sums, full if full is not None else Sums(), counts))


def row_sample_sums(rows: list[dict], sums: list[Sums]) -> dict[str, np.ndarray]:
    """What sweep_samples.npz holds: ce, kl, top1, tokens [rows, samples] for each row of the table (the
    full model's first; NaN for a row without per-sample sums), and its mode and removed labels, so a
    reader can check that the file belongs to the sweep.csv beside it. {} when no row has them."""
    per = [s.per_sample() for s in sums]
    n = {len(p["ce"]) for p in per if p}
    if len(n) != 1:
        return {}
    samples = n.pop()
    out = {name: np.array([p[name] if p else np.full(samples, np.nan) for p in per])
           for name in ("ce", "kl", "top1", "tokens")}
    out["mode"] = np.array([str(r["mode"]) for r in rows])
    out["removed"] = np.array([str(r["removed"]) for r in rows])
    return out


def sweep_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in INT_COLUMNS:
        table[col] = table[col].astype("Int64")
    return table


def _layer_summary(layer: pd.DataFrame, samples: int | None) -> dict:
    best, worst = layer.loc[layer["delta_loss"].idxmin()], layer.loc[layer["delta_loss"].idxmax()]
    out = {"least_harmful_layer": int(best["first_layer"]), "least_harmful_delta_loss": float(best["delta_loss"]),
           "most_harmful_layer": int(worst["first_layer"]), "most_harmful_delta_loss": float(worst["delta_loss"]),
           "layers_with_delta_loss_below_0.01": int((layer["delta_loss"] < 0.01).sum())}
    if samples and "delta_loss_hi" in layer:
        v = removal_verdicts(layer["first_layer"], layer["delta_loss"], layer["delta_loss_lo"], layer["delta_loss_hi"],
                             REMOVABLE_THRESHOLD, samples)
        out.update({"removable_threshold": REMOVABLE_THRESHOLD, "removable_sure": len(v["sure"]),
                    "removable_undecided": len(v["undecided"]), "removable_sure_layers": v["sure"],
                    "removable_undecided_layers": v["undecided"], "samples_to_decide": v["samples_to_decide"]})
        out["warnings"] = wide_interval_warnings(
            {"least harmful Δloss": best, "most harmful Δloss": worst}, "delta_loss")
    return out


def wide_interval_warnings(rows: dict, column: str) -> list[str]:
    """A line for each headline value whose interval over samples is wider than the value itself."""
    out = []
    for name, row in rows.items():
        v, lo, hi = (float(row[c]) for c in (column, f"{column}_lo", f"{column}_hi"))
        if np.isfinite([v, lo, hi]).all() and hi - lo > abs(v):
            out.append(f"{name} {v:.4g}: its interval [{lo:.4g}, {hi:.4g}] is wider than the value; "
                       "more samples (--samples) would pin it down")
    return out


def summarize(table: pd.DataFrame, model_name: str, model_type: str, num_layers: int, n_tokens: int,
              samples: int | None = None) -> dict:
    """Headline numbers of each mode present in `table`."""
    full = table.iloc[0]
    s: dict[str, Any] = {
        "model": model_name, "model_type": model_type, "num_layers": num_layers,
        "tokens_scored": n_tokens, "full_loss": float(full["loss"]), "full_perplexity": float(full["perplexity"]),
    }
    by_mode = {m: table[table["mode"] == m] for m in ("layer", "block", "greedy", "ranked", "remove")}
    if len(by_mode["layer"]):
        s.update(_layer_summary(by_mode["layer"], samples))
    block = by_mode["block"]
    if len(block):
        n = int(block["block_size"].max())
        b = block[block["block_size"] == n]
        best = b.loc[b["delta_loss"].idxmin()]
        s.update({f"best_block_of_{n}": best["removed"], f"best_block_of_{n}_delta_loss": float(best["delta_loss"])})
    if len(by_mode["greedy"]):
        last = by_mode["greedy"].iloc[-1]
        s.update({"greedy_removed": last["removed"], "greedy_perplexity": float(last["perplexity"])})
    for by, g in by_mode["ranked"].groupby("by", sort=False):
        last = g.iloc[-1]
        s[f"ranked_{by}_perplexity_at_{int(last['n_removed'])}"] = float(last["perplexity"])
    if len(by_mode["remove"]):
        r = by_mode["remove"].iloc[0]
        s.update({"removed": r["removed"], "removed_delta_loss": float(r["delta_loss"]), "removed_kl": float(r["kl"])})
    return s
