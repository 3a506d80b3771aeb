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
# accelerate's placement strategies (transformers' from_pretrained(device_map=...)); "auto" = "balanced".
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# transformers' attention back-ends; whether the model (and this machine) supports one is checked at load.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# --max-memory sizes, as accelerate reads them (case-insensitive here, always bytes).
MEMORY_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
                "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}

# analyze --metrics: each name -> the layers.csv columns it gives (angular also angular.csv; updates also the
# sublayer rows' relative_update/update_cosine; gradients also the sublayer rows' grad_norm; loss the summary's
# loss and perplexity: without it, and without gradients, the head and the cross-entropy do not run). The norm
# placement comes with every run.
METRIC_COLUMNS = {
    "angular": ("angular_distance",),
    "influence": ("block_influence",),
    "variance": ("output_variance", "update_variance"),
    "lens": ("lens_kl", "lens_top1"),
    "updates": ("relative_update", "update_cosine"),
    "activations": ("max_activation", "mean_abs_activation"),
    "gradients": ("grad_norm", "grad_norm_attention", "grad_norm_mlp", "grad_norm_norm"),
    "loss": (),
}
METRICS = tuple(METRIC_COLUMNS)
FORWARD_METRICS = METRICS[:-2]  # what the layers' hooks measure; gradients need the backward, loss the head

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


def parse_max_memory(spec) -> dict | None:
    """--max-memory "0=70GiB,cpu=200GiB" -> {0: 75161927680, "cpu": 214748364800}: accelerate's max_memory
    (keys: GPU indices, "cpu", "mps", "disk"; values: bytes). A dict is checked the same way. Whether the
    GPUs named exist is checked where torch is loaded (`loading.check_max_memory_devices`)."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        items = [(str(k), str(v)) for k, v in spec.items()]
    else:
        items = []
        for part in str(spec).split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise LayerprobeError(f"--max-memory {spec!r}: give DEVICE=SIZE pairs separated by commas, "
                                      "e.g. 0=70GiB,cpu=200GiB")
            items.append((key.strip(), value.strip()))
    out: dict = {}
    for key, value in items:
        if key.isdigit():
            device = int(key)
        elif key.lower() in ("cpu", "mps", "disk"):
            device = key.lower()
        else:
            raise LayerprobeError(f"--max-memory names device {key!r}; use GPU indices (0, 1, ...), cpu, mps or disk")
        out[device] = _memory_bytes(value, key)
    return out


def _memory_bytes(value: str, key: str) -> int:
    text = value.strip().replace(" ", "")
    if text.isdigit():
        return int(text)
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = text[len(number):].lower()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in MEMORY_UNITS or not math.isfinite(amount) or amount < 0:
        raise LayerprobeError(f"--max-memory {key}={value}: not a size; use bytes or a number with GiB, MiB, GB, "
                              "MB ...")
    return int(amount * MEMORY_UNITS[unit])


def check_placement_options(device_map=None, max_memory=None, attn_implementation: str | None = None) -> dict | None:
    """--device-map, --max-memory and --attn-implementation, checked without torch; the parsed max_memory."""
    if device_map is not None and not isinstance(device_map, dict) and device_map not in DEVICE_MAPS:
        raise LayerprobeError(f"unknown --device-map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    memory = parse_max_memory(max_memory)
    if memory is not None and not isinstance(device_map, str):
        raise LayerprobeError("--max-memory needs --device-map auto, balanced or sequential")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise LayerprobeError("--device-map needs accelerate: pip install accelerate")
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise LayerprobeError(f"unknown --attn-implementation {attn_implementation!r}; use one of "
                              f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    return memory


def check_measure_options(*, data: str = "builtin", seq_len: int = 256, samples: int | None = 32,
                          batch_size: int = 4, tokens: str = "last", dtype: str = "auto", device: str = "auto",
                          device_map: str | None = None, max_memory=None,
                          attn_implementation: str | None = None) -> None:
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
    check_placement_options(device_map, max_memory, attn_implementation)
    check_data_spec(data)


def check_metrics(metrics, grad: bool = True) -> frozenset | None:
    """--metrics "angular,influence" (or a list) -> the names, checked; None (every metric) stays None.
    Gradients need the backward: asked for with --no-grad, refused."""
    if metrics is None:
        return None
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    bad = [m for m in names if m not in METRICS]
    if bad or not names or not all(names):
        raise LayerprobeError(f"unknown --metrics {', '.join(repr(m) for m in bad) if bad else repr(metrics)}; "
                              f"use a comma-separated list of {', '.join(METRICS)}")
    if "gradients" in names and not grad:
        raise LayerprobeError("--metrics gradients needs the backward pass: drop --no-grad")
    return frozenset(names)


def takes_gradients(selected: frozenset | None, grad: bool) -> bool:
    """Whether a run with these checked metrics (`check_metrics`) does the backward pass."""
    return grad and (selected is None or "gradients" in selected)


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
