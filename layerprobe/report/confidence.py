"""How sure the numbers are, in words: the interval note, the removal verdict, the rankings' stability.

Shared by the terminal tables and index.html; the numbers come from the manifests and summaries
(metrics/intervals.py and metrics/depth.py `removal_verdicts` compute them).
"""

from __future__ import annotations

import math

RANKING_NAMES = {"angular": "angular distance (block)", "influence": "Block Influence",
                 "angular-layer": "single-layer angular distance"}


def interval_note(section: dict) -> str | None:
    """'95% intervals: percentile bootstrap over 32 samples (1000 resamples, seed 0)', or None."""
    iv = section.get("intervals")
    if not isinstance(iv, dict):
        return None
    return (f"{iv.get('level', 0.95):.0%} intervals (_lo/_hi, ±: half their width): {iv.get('method')} "
            f"over {iv.get('samples')} samples ({iv.get('resamples')} resamples, seed {iv.get('seed')})")


def plus_minus(value, lo, hi, spec: str) -> str:
    """'value ±half-width', or the value alone when there is no interval."""
    v = format(value, spec)
    try:
        half = (float(hi) - float(lo)) / 2
    except (TypeError, ValueError):
        return v
    if not math.isfinite(half):
        return v
    return f"{v} ±{format(half, spec.lstrip('+'))}"


def verdict_lines(summary: dict) -> list[str]:
    """The removal verdict with its confidence, then the wide-interval warnings."""
    out = []
    if "removable_sure" in summary:
        thr = summary.get("removable_threshold")
        line = (f"removable (Δloss < {thr:g} nats over its whole interval): {summary['removable_sure']} for sure, "
                f"{summary['removable_undecided']} undecided")
        need = summary.get("samples_to_decide")
        if summary["removable_undecided"] and isinstance(need, (int, float)) and math.isfinite(need):
            line += f"; ~{int(need)} samples would decide them (interval width ∝ 1/√samples)"
        out.append(line)
    out += [f"warning: {w}" for w in summary.get("warnings", []) or []]
    return out


def stability_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(ranking, split-half Kendall τ, share of resamples picking the same k layers, mean Jaccard)."""
    rows = []
    for by, s in (summary.get("ranking_stability") or {}).items():
        rows.append((f"{RANKING_NAMES.get(by, by)}, k = {s.get('k')}", _num(s.get("split_half_tau"), "+.2f"),
                     _num(s.get("chosen_identical"), ".0%"), _num(s.get("chosen_jaccard"), ".2f")))
    return rows


STABILITY_HEADERS = ("ranking", "Kendall τ, two halves", "same k layers on resamples", "mean Jaccard")
STABILITY_CAPTION = ("τ: rank agreement of the ranking's scores on two disjoint halves of the samples (1 = same "
                     "order); then how often a bootstrap resample of the samples picks exactly the k layers picked "
                     "on all of them, and their mean overlap")


def _num(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "—"
