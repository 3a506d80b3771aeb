"""`layerprobe compare DIR... --out reports/<name>/`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .. import defaults
from . import app
from .common import console, err_console, user_errors


@app.command("compare")
@user_errors
def compare_command(
    folders: Optional[List[Path]] = typer.Argument(
        None, metavar="DIR", show_default=False,
        help="Result folders written by analyze, prune-sweep and/or train-reference (one or more)."),
    out: Path = typer.Option(Path(defaults.COMPARE_OUT), help="Report folder: index.html, PNGs, headline.csv, "
                                                              "per_layer.csv."),
    threshold: float = typer.Option(defaults.REMOVABLE_THRESHOLD, help="A layer is 'removable' when removing it "
                                    "alone raises the loss by less than this many nats."),
    depth: str = typer.Option("auto", help="x axis of per-layer curves: auto (normalised when depths differ) | "
                                           "layer | normalised."),
    title: Optional[str] = typer.Option(None, help="Page title (default: the models' names)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress spinner."),
) -> None:
    """Lay several models side by side: per-layer curves, heat maps, training curves, headline numbers, one HTML page."""
    folders = defaults.check_compare_options(folders, threshold, depth)  # before the library loads
    from ..api import compare
    from ..report.compare import headline_table

    comp = compare(folders, out=out, threshold=threshold, title=title, depth=depth, progress=not quiet)
    console.print(headline_table(comp))
    err_console.print(f"wrote {comp.html} ({len(comp.figures)} figures embedded; headline.csv, per_layer.csv, PNGs "
                      f"in {out}/)", highlight=False)
