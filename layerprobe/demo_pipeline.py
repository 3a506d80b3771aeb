"""`layerprobe.demo()`: the whole story offline, in one command.

Train tiny Pre-LN, Post-LN, Mix-LN and LNS models on the builtin corpus (identical data, order
and initial seed), analyse each and sweep its layer removals on the *held-out* blocks the trainer
kept aside, and compare them in one report:

    layerprobe demo                       # reports/demo/index.html; checkpoints in runs/demo/
    layerprobe.demo(out="reports/demo")   # the same from Python

Re-running it reuses finished training runs (the trainer's --resume) unless `fresh=True`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .analysis import analyze
from .api import compare
from .comparison import DEFAULT_THRESHOLD, Comparison
from .defaults import DEMO_OUT, DEMO_PRESET, DEMO_RUNS, DEMO_SCHEMES, check_demo_counts
from .errors import LayerprobeError
from .io import atomic_path, ensure_writable_dir
from .loading import load_model
from .progress import status
from .pruning import prune_sweep
from .report import render_analysis, render_sweep
from .reference import NORM_SCHEMES, canonical_scheme, get_preset
from .training import checkpoint as ckpt
from .training import train_reference
from .training.data import prepare_token_data

HELDOUT_FILE = "heldout.npy"
# The trainer's options that the demo exposes under its own names (the advice in its errors uses them).
DEMO_FLAGS = {"overwrite": "--fresh", "out": "--runs"}

_stage_console = Console(stderr=True)  # stage headings go where the progress bars go


def _say(message: str, enabled: bool) -> None:
    if enabled:
        _stage_console.rule(f"[bold]{message}", align="left")


def check_options(*, norm: str, preset: str, steps: int | None, threads: int | None) -> list[str]:
    """The demo's schemes in canonical names; a LayerprobeError for a bad option, before any folder is made
    or anything is printed (the trainer checks the rest of its settings again)."""
    check_demo_counts(steps, threads)
    try:
        get_preset(preset)
        schemes = list(dict.fromkeys(canonical_scheme(s) for s in norm.split(",") if s.strip()))
    except ValueError as e:
        raise LayerprobeError(str(e)) from None
    if not schemes:
        raise LayerprobeError(f"--norm names no scheme; give a comma list of {', '.join(NORM_SCHEMES)}")
    return schemes


def heldout_blocks(run_dir: Path, path: Path, *, progress: bool = True) -> Path:
    """The trainer's held-out blocks for the run in `run_dir`, rebuilt exactly as it split them
    (same data, tokenizer, sequence length, batch size and data seed), saved as token ids in `path`."""
    train = ((ckpt.read_run(run_dir) or {}).get("identity") or {}).get("train") or {}
    needed = ("data", "seq_len", "batch_size", "data_seed", "eval_samples")
    if any(train.get(k) is None for k in needed):
        raise LayerprobeError(f"{run_dir}/run.json does not record how the run split its data ({', '.join(needed)})")
    with status("rebuilding the held-out split", progress):
        tokenizer = load_model(str(run_dir), device="cpu").tokenizer
        data = prepare_token_data(train["data"], tokenizer, seq_len=int(train["seq_len"]),
                                  batch_size=int(train["batch_size"]), eval_samples=int(train["eval_samples"]),
                                  seed=int(train["data_seed"]), text_column=train.get("text_column"),
                                  vocab_size=len(tokenizer) if tokenizer is not None else None)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, data.eval.numpy())
    return path


def analyse_and_sweep(run_dir: Path, heldout: Path, folder: Path, *, block_sweep: bool, progress: bool) -> Path:
    """Analyse the run's model and sweep its layer (and block) removals on the held-out blocks; both results
    go to `folder` with their pages."""
    n, seq_len = np.load(heldout, mmap_mode="r").shape
    loaded = load_model(str(run_dir), device="cpu", dtype="float32")
    result = analyze(loaded, data=str(heldout), seq_len=seq_len, samples=n, batch_size=8, progress=progress)
    folder = render_analysis(result, folder)
    modes = "layer,block" if block_sweep else "layer"
    sweep = prune_sweep(loaded, mode=modes, data=str(heldout), seq_len=seq_len, samples=n, batch_size=8,
                        analysis=result, progress=progress)
    render_sweep(sweep, folder)
    return folder


def _command_line(*, out, runs, norm, preset, steps, block_sweep, threshold, threads) -> str:
    """The `layerprobe demo` command that makes the same report, for the page to quote."""
    command = f"layerprobe demo --out {out} --runs {runs} --norm {norm} --preset {preset}"
    command += (f" --steps {steps}" if steps else "") + ("" if block_sweep else " --no-block-sweep")
    command += f" --threshold {threshold}" if threshold is not None else ""
    command += f" --threads {threads}" if threads else ""
    return command


def demo(
    out: str | Path = DEMO_OUT,
    runs: str | Path = DEMO_RUNS,
    *,
    norm: str = DEMO_SCHEMES,
    preset: str = DEMO_PRESET,
    steps: int | None = None,
    fresh: bool = False,
    threshold: float | None = None,
    block_sweep: bool = True,
    threads: int | None = None,
    progress: bool = True,
    **train_options,
) -> Comparison:
    """Train one tiny model per norm scheme, analyse and prune-sweep each, and write the comparison to `out`.

    `threads`: CPU threads for torch in every step (default: torch's choice; 1 is steadier on a machine shared
    with other jobs). `train_options` go to `layerprobe.training.train_reference` (e.g. layers=, seq_len=).
    Returns the `Comparison`; its `.html` is the report.
    """
    started = time.perf_counter()
    schemes = check_options(norm=norm, preset=preset, steps=steps, threads=threads)
    if threads is not None:
        torch.set_num_threads(threads)
    out, runs = Path(out), Path(runs)
    ensure_writable_dir(out)
    ensure_writable_dir(runs)
    _say(f"1/3 training {len(schemes)} {preset} models ({', '.join(schemes)}) on the builtin corpus", progress)
    try:
        summary = train_reference(norm=norm, preset=preset, steps=steps, data="builtin", out=str(runs),
                                  resume=not fresh, overwrite=fresh, progress=progress, threads=threads,
                                  **train_options)
    except LayerprobeError as e:
        raise e.renamed(**DEMO_FLAGS) from None  # the trainer's advice, in the demo's flags
    if summary.interrupted:
        raise KeyboardInterrupt
    run_dirs = [Path(r.path) for r in summary.runs]
    heldout = heldout_blocks(run_dirs[0], runs / HELDOUT_FILE, progress=progress)
    result_dirs = []
    for i, (run, run_dir) in enumerate(zip(summary.runs, run_dirs), 1):
        _say(f"2/3 [{i}/{len(run_dirs)}] {run.scheme}: analyze and prune-sweep on the held-out blocks", progress)
        result_dirs.append(analyse_and_sweep(run_dir, heldout, out / run.scheme, block_sweep=block_sweep,
                                             progress=progress))

    _say("3/3 comparing", progress)
    title = f"layerprobe demo — {', '.join(schemes)} ({preset} preset, trained on the builtin corpus)"
    command = _command_line(out=out, runs=runs, norm=norm, preset=preset, steps=steps, block_sweep=block_sweep,
                            threshold=threshold, threads=threads)
    comp = compare([*run_dirs, *result_dirs], out=out, title=title,
                   threshold=DEFAULT_THRESHOLD if threshold is None else threshold, progress=progress,
                   command=command)
    comp.seconds = time.perf_counter() - started
    return comp


__all__ = ["demo", "analyse_and_sweep", "check_options", "heldout_blocks", "DEMO_FLAGS", "DEMO_SCHEMES"]
