"""`layerprobe demo`: train tiny pre/post/mix/lns models, analyse, prune-sweep and compare them, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import defaults
from . import app
from .common import console, err_console, user_errors


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path(defaults.DEMO_OUT), help="Report folder: the comparison's index.html and one "
                                                           "folder per model."),
    runs: Path = typer.Option(Path(defaults.DEMO_RUNS), help="Where the trained checkpoints go (one folder per scheme)."),
    norm: str = typer.Option(defaults.DEMO_SCHEMES, help="Norm schemes to train and compare."),
    preset: str = typer.Option(defaults.DEMO_PRESET, help="Model size preset: tiny (the demo) or micro (a smoke run "
                                                          "in seconds)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per model (default: the preset's)."),
    fresh: bool = typer.Option(False, "--fresh", help="Train again even where runs/ already holds finished runs."),
    threshold: float = typer.Option(defaults.REMOVABLE_THRESHOLD, help="'Removable' layers: removing one alone costs "
                                                                       "less than this many nats."),
    block_sweep: bool = typer.Option(True, "--block-sweep/--no-block-sweep", help="Also remove every contiguous block."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice; 1 is steadier "
                                                     "on a busy machine)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """The whole story offline: train tiny Pre-LN, Post-LN, Mix-LN and LNS models, analyse and prune-sweep each, compare."""
    defaults.check_demo_counts(steps, threads)  # before the library loads
    from ..demo_pipeline import demo
    from ..report.compare import headline_table

    comp = demo(out=out, runs=runs, norm=norm, preset=preset, steps=steps, fresh=fresh, threshold=threshold,
                block_sweep=block_sweep, threads=threads, progress=not quiet)
    console.print(headline_table(comp))
    err_console.print(f"wrote {comp.html} in {comp.seconds / 60:.1f} min (checkpoints in {runs}/, one folder "
                      f"per model in {out}/)", highlight=False)
