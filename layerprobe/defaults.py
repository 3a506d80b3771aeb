"""Defaults and option checks shared by the library and the CLI.

This module imports nothing heavy, so `layerprobe <command> --help` shows the library's own defaults
and a bad option is refused before torch, transformers or pandas load.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import LayerprobeError

# compare
REMOVABLE_THRESHOLD = 0.05  # nats of loss: removing the layer costs < ~5% perplexity
DEPTH_MODES = ("auto", "layer", "normalised")
COMPARE_OUT = "reports/compare"

# demo
DEMO_SCHEMES = "pre,post,mix,lns"
DEMO_PRESET = "tiny"
DEMO_OUT = "reports/demo"
DEMO_RUNS = "runs/demo"


def check_compare_options(folders, threshold: float, depth: str) -> list:
    """The folders as a list; a LayerprobeError for a bad option, before anything is read."""
    if depth not in DEPTH_MODES:
        raise LayerprobeError(f"--depth must be one of {', '.join(DEPTH_MODES)} (got {depth!r})")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise LayerprobeError(f"--threshold must be a number of nats (got {threshold!r})")
    if isinstance(folders, (str, Path)):
        folders = [folders]
    folders = list(folders or [])
    if not folders:
        raise LayerprobeError("give at least one result folder (written by analyze, prune-sweep or train-reference)")
    return folders


def check_demo_counts(steps: int | None, threads: int | None) -> None:
    """The demo's numeric options (its schemes and preset are checked by `layerprobe.demo_pipeline.check_options`)."""
    if threads is not None and threads < 1:
        raise LayerprobeError(f"--threads must be at least 1 (got {threads})")
    if steps is not None and steps < 1:
        raise LayerprobeError(f"--steps must be positive (got {steps})")
