"""The sweep's table: one row per candidate (the full model's first) and the summary read from it."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..metrics import perplexity
from .candidates import Candidate
from .measures import Sums
from .surgery import format_removed

COLUMNS = ["mode", "removed", "n_removed", "first_layer", "block_size", "by", "step", "added_layer",
           "loss", "delta_loss", "perplexity", "kl", "top1_agreement", "tokens"]
INT_COLUMNS = ("first_layer", "block_size", "step", "added_layer")


def full_row(full: Sums) -> dict:
    return {"mode": "full", "removed": "none", "n_removed": 0, "first_layer": None, "block_size": None,
            "by": None, "step": None, "added_layer": None, "loss": full.loss, "delta_loss": 0.0,
            "perplexity": perplexity(full.loss), "kl": 0.0, "top1_agreement": 1.0, "tokens": full.tokens}


def candidate_row(c: Candidate, sums: Sums, full_loss: float) -> dict:
    loss = sums.loss
    return {
        "mode": c.mode, "removed": format_removed(c.removed), "n_removed": len(c.removed),
        "first_layer": c.first_layer, "block_size": c.block_size, "by": c.by, "step": c.step,
        "added_layer": c.added_layer, "loss": loss, "delta_loss": loss - full_loss,
        "perplexity": perplexity(loss), "kl": sums.mean_kl,
        "top1_agreement": sums.top1_agreement, "tokens": sums.tokens,
    }


def sweep_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in INT_COLUMNS:
        table[col] = table[col].astype("Int64")
    return table


def _layer_summary(layer: pd.DataFrame) -> dict:
    best, worst = layer.loc[layer["delta_loss"].idxmin()], layer.loc[layer["delta_loss"].idxmax()]
    return {"least_harmful_layer": int(best["first_layer"]), "least_harmful_delta_loss": float(best["delta_loss"]),
            "most_harmful_layer": int(worst["first_layer"]), "most_harmful_delta_loss": float(worst["delta_loss"]),
            "layers_with_delta_loss_below_0.01": int((layer["delta_loss"] < 0.01).sum())}


def summarize(table: pd.DataFrame, model_name: str, model_type: str, num_layers: int, n_tokens: int) -> dict:
    """Headline numbers of each mode present in `table`."""
    full = table.iloc[0]
    s: dict[str, Any] = {
        "model": model_name, "model_type": model_type, "num_layers": num_layers,
        "tokens_scored": n_tokens, "full_loss": float(full["loss"]), "full_perplexity": float(full["perplexity"]),
    }
    by_mode = {m: table[table["mode"] == m] for m in ("layer", "block", "greedy", "ranked", "remove")}
    if len(by_mode["layer"]):
        s.update(_layer_summary(by_mode["layer"]))
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
