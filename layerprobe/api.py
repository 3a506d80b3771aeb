"""The Python API's convenience calls: compute, save, render, as the CLI does.

The computation lives below (`comparison`, `analysis`, `pruning`, ...) and never draws; these calls
sit above the report layer, like the CLI, so one line in a notebook gives the same folder as the
command.
"""

from __future__ import annotations

from pathlib import Path

from .comparison import DEFAULT_THRESHOLD, Comparison, compare_results
from .defaults import COMPARE_OUT, check_compare_options
from .io import check_output_dir
from .progress import status
from .report.compare import render_comparison
from .results import check_manifest


def compare(
    folders,
    out: str | Path | None = COMPARE_OUT,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    title: str | None = None,
    depth: str = "auto",
    progress: bool = True,
    command: str | None = None,
    notes: list[str] | None = None,
) -> Comparison:
    """Compare the results in `folders` (of analyze, prune-sweep, train-reference) and, unless `out` is None,
    write the report there: index.html (self-contained), the figures as PNGs, headline.csv, per_layer.csv
    (and training.csv when runs are given).

    threshold: nats of loss under which removing one layer counts as harmless. depth: the x axis of the
    per-layer curves, "auto" (normalised depth ℓ/(L−1) when the models' depths differ), "layer" or
    "normalised". command: how the page says it was made (default: the equivalent CLI command). notes:
    sentences the page adds to its findings."""
    check_compare_options(folders, threshold, depth)
    if out is not None:
        out = check_output_dir(out)  # fail before reading anything, and create nothing yet
        check_manifest(out)
    comp = compare_results(folders, threshold=threshold, depth=depth, progress=progress, command=command,
                           notes=notes)
    if out is not None:
        with status("drawing figures and writing the report", progress):
            comp.save(out)
            render_comparison(comp, out, title=title)
    return comp


__all__ = ["compare"]
