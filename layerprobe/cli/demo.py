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
    workers: Optional[int] = typer.Option(None, help="Processes that train, analyse and sweep the models side by "
                                                     "side (default: one per scheme; 1: one after another)."),
    threads: Optional[int] = typer.Option(None, help="torch threads in each process (default: the available cores "
                                                     "shared out among the processes, at least 1)."),
    seeds: int = typer.Option(1, help="Training runs per scheme, differing only in the seed of their initial weights "
                                      "(0, 1, …; same data and order). 1: one run each, in runs/<scheme>/; more: "
                                      "runs/<scheme>-seed<k>/, and the report gives means ± spread."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """The whole story offline: train tiny Pre-LN, Post-LN, Mix-LN and LNS models, analyse and prune-sweep each, compare."""
    defaults.check_demo_counts(steps, threads, workers, seeds)  # before the library loads
    from ..demo_pipeline import demo
    from ..report.compare import headline_table

    comp = demo(out=out, runs=runs, norm=norm, preset=preset, steps=steps, fresh=fresh, threshold=threshold,
                block_sweep=block_sweep, threads=threads, workers=workers, seeds=seeds, progress=not quiet)
    console.print(headline_table(comp))
    on = "1 seed per scheme; --seeds 3 shows the spread over seeds" if seeds == 1 else f"{seeds} seeds per scheme"
    err_console.print(f"wrote {comp.html} in {comp.seconds / 60:.1f} min ({on}; checkpoints in {runs}/, one folder "
                      f"per model in {out}/)", highlight=False)
