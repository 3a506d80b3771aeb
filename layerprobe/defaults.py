"""Defaults and option checks shared by the library and the CLI.

This module imports nothing heavy, so `layerprobe <command> --help` shows the library's own defaults
and a bad option is refused before torch, transformers or pandas load.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from .errors import LayerprobeError

# analyze / prune-sweep: what a model may be loaded as, and the data it reads
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
TOKEN_MODES = ("last", "all")  # angular distance on the last token of each sample, or on all of them
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".csv", ".parquet", ".npy")

# compare
REMOVABLE_THRESHOLD = 0.05  # nats of loss: removing the layer costs < ~5% perplexity
REMOVABLE_FRACTION = 0.1  # of the model's own largest single-layer Δloss: a threshold that ignores scale
DEPTH_MODES = ("auto", "layer", "normalised")
COMPARE_OUT = "reports/compare"

# demo
DEMO_SCHEMES = "pre,post,mix,lns"
DEMO_PRESET = "tiny"
DEMO_OUT = "reports/demo"
DEMO_RUNS = "runs/demo"


def check_data_spec(data: str) -> None:
    """A --data spec that cannot be read, refused before a model is loaded (its content is read later)."""
    spec = str(data)
    if spec == "builtin":
        return
    if spec.startswith("hf:"):
        if not spec[3:].split(":")[0]:
            raise LayerprobeError(f"--data {spec!r} names no dataset; use hf:NAME[:CONFIG[:SPLIT]]")
        if importlib.util.find_spec("datasets") is None:
            raise LayerprobeError("hf: data needs the datasets package: pip install datasets")
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise LayerprobeError(f"no such data file or folder: {spec} (use 'builtin', a file, a folder or hf:NAME)")
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise LayerprobeError(f"unsupported data file {path.name}: use .txt, .jsonl, .csv, .parquet, .npy, a folder, "
                              "'builtin' or hf:NAME")
    if path.suffix.lower() == ".parquet":
        check_parquet_reader()


def check_parquet_reader() -> None:
    if importlib.util.find_spec("pyarrow") is None:
        raise LayerprobeError("reading .parquet needs pyarrow, which is missing: pip install pyarrow")


def check_measure_options(*, data: str = "builtin", seq_len: int = 256, samples: int | None = 32,
                          batch_size: int = 4, tokens: str = "last", dtype: str = "auto", device: str = "auto",
                          device_map: str | None = None) -> None:
    """Every option of analyze and prune-sweep that needs no model, checked before one is loaded."""
    if seq_len < 2:
        raise LayerprobeError(f"--seq-len must be at least 2 (got {seq_len})")
    if samples is not None and samples < 1:
        raise LayerprobeError(f"--samples must be at least 1 (got {samples})")
    if batch_size < 1:
        raise LayerprobeError(f"--batch-size must be at least 1 (got {batch_size})")
    if tokens not in TOKEN_MODES:
        raise LayerprobeError(f"--tokens must be 'last' or 'all' (got {tokens!r})")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise LayerprobeError(f"unknown --dtype {dtype!r}; use auto, {', '.join(DTYPE_NAMES)}")
    if device not in DEVICES:
        raise LayerprobeError(f"unknown --device {device!r}; use one of {', '.join(DEVICES)}")
    if device_map not in (None, "auto"):
        raise LayerprobeError(f"unknown --device-map {device_map!r}; the only value is 'auto'")
    check_data_spec(data)


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


def check_demo_counts(steps: int | None, threads: int | None, workers: int | None = None, seeds: int = 1) -> None:
    """The demo's numeric options (its schemes and preset are checked by `layerprobe.demo_pipeline.check_options`)."""
    if seeds is None or seeds < 1:
        raise LayerprobeError(f"--seeds must be at least 1 (got {seeds})")
    if threads is not None and threads < 1:
        raise LayerprobeError(f"--threads must be at least 1 (got {threads})")
    if workers is not None and workers < 1:
        raise LayerprobeError(f"--workers must be at least 1 (got {workers})")
    if steps is not None and steps < 1:
        raise LayerprobeError(f"--steps must be positive (got {steps})")
