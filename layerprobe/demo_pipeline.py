"""`layerprobe.demo()`: the whole story offline, in one command.

Train tiny Pre-LN, Post-LN, Mix-LN and LNS models on the builtin corpus (identical data, order
and initial seed), analyse each and sweep its layer removals on the *held-out* blocks the trainer
kept aside, and compare them in one report:

    layerprobe demo                       # reports/demo/index.html; checkpoints in runs/demo/
    layerprobe.demo(out="reports/demo")   # the same from Python

Re-running it reuses finished training runs (the trainer's --resume) unless `fresh=True`.

One training run per scheme by default, so its verdicts rest on one seed each (the report says so);
`seeds=3` (`layerprobe demo --seeds 3`) trains each scheme on 3 seeds of its initial weights, in
runs/demo/<scheme>-seed<k>/, and the report shows means ± spread and decides only beyond the spread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .analysis import analyze
from .api import compare
from .comparison import DEFAULT_THRESHOLD, Comparison
from .defaults import DEMO_OUT, DEMO_PRESET, DEMO_RUNS, DEMO_SCHEMES, check_demo_counts
from .errors import LayerprobeError
from .io import atomic_path, ensure_writable_dir, write_json
from .loading import load_model
from .progress import RelayDisplay, make_progress, relay_to, status
from .pruning import prune_sweep
from .report import render_analysis, render_sweep
from .reference import NORM_SCHEMES, canonical_scheme, get_preset
from .training import checkpoint as ckpt
from .training import train_reference
from .training.data import prepare_token_data
from .training.summary import RunResult, TrainingSummary

HELDOUT_FILE = "heldout.npy"
# The trainer's options that the demo exposes under its own names (the advice in its errors uses them).
DEMO_FLAGS = {"overwrite": "--fresh", "out": "--runs"}

_stage_console = Console(stderr=True)  # stage headings go where the progress bars go


def _say(message: str, enabled: bool) -> None:
    if enabled:
        _stage_console.rule(f"[bold]{message}", align="left")


def check_options(*, norm: str, preset: str, steps: int | None, threads: int | None,
                  workers: int | None = None, seeds: int = 1) -> list[str]:
    """The demo's schemes in canonical names; a LayerprobeError for a bad option, before any folder is made
    or anything is printed (the trainer checks the rest of its settings again)."""
    check_demo_counts(steps, threads, workers, seeds)
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
    record = ckpt.read_run(run_dir) or {}
    train = (record.get("identity") or {}).get("train") or {}
    needed = ("data", "seq_len", "batch_size", "data_seed", "eval_samples")
    if any(train.get(k) is None for k in needed):
        raise LayerprobeError(f"{run_dir}/run.json does not record how the run split its data ({', '.join(needed)})")
    with status("rebuilding the held-out split", progress):
        tokenizer = load_model(str(run_dir), device="cpu").tokenizer
        data = prepare_token_data(train["data"], tokenizer, seq_len=int(train["seq_len"]),
                                  batch_size=int(train["batch_size"]), eval_samples=int(train["eval_samples"]),
                                  seed=int(train["data_seed"]), text_column=train.get("text_column"),
                                  vocab_size=len(tokenizer) if tokenizer is not None else None,
                                  # how far a streamed (hf:) split was read depends on the run's length
                                  train_blocks=int(record["total_steps"]) * int(train["batch_size"])
                                  if record.get("total_steps") else None)
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


def _command_line(*, out, runs, norm, preset, steps, block_sweep, threshold, threads, workers, seeds=1) -> str:
    """The `layerprobe demo` command that makes the same report, for the page to quote."""
    command = f"layerprobe demo --out {out} --runs {runs} --norm {norm} --preset {preset}"
    command += f" --seeds {seeds}" if seeds > 1 else ""
    command += (f" --steps {steps}" if steps else "") + ("" if block_sweep else " --no-block-sweep")
    command += f" --threshold {threshold}" if threshold is not None else ""
    command += f" --threads {threads}" if threads else ""
    command += f" --workers {workers}" if workers else ""
    return command


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_workers(n_models: int, workers: int | None, threads: int | None, cores: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads in each) for `n_models` models.

    By default one single-threaded process per model even when models outnumber cores: the scheduler
    shares the CPU per runnable thread, so on a machine busy with other work more workers keep a fair
    share of it, and on a quiet one the total work is the same. With more cores than models, each worker
    gets its share of them (a 16-core workstation trains 4 models on 4 threads each)."""
    cores = cores or available_cores()
    workers = max(1, min(workers or n_models, n_models))
    return workers, threads or max(1, cores // workers)


@dataclass
class _Job:
    """One model's whole share of the demo: train, then analyze and prune-sweep on the held-out blocks."""

    scheme: str
    runs: Path
    out: Path
    preset: str
    steps: int | None
    fresh: bool
    block_sweep: bool
    threads: int | None
    progress: bool
    train_options: dict
    seed: int | None = None  # demo --seeds: the seed of this run's initial weights (None: one run per scheme)

    @property
    def label(self) -> str:
        return self.scheme if self.seed is None else f"{self.scheme}-seed{self.seed}"


_worker_queue = None  # in a worker process: where its progress events go


def _start_worker(queue, threads: int) -> None:
    global _worker_queue
    _worker_queue = queue
    torch.set_num_threads(threads)


def _run_job(job: _Job) -> tuple[RunResult, dict, Path | None]:
    """Train, analyze and sweep one model; returns its RunResult, the training settings and its report folder
    (None when Ctrl-C stopped the training)."""
    if _worker_queue is not None and job.progress:
        relay_to(_worker_queue, job.label)  # this job's bars show in the parent, labelled with the scheme
    seeds = {} if job.seed is None else {"seeds": [job.seed]}  # one seed per job: runs/<scheme>-seed<k>/
    try:
        summary = train_reference(norm=job.scheme, preset=job.preset, steps=job.steps, data="builtin",
                                  out=str(job.runs), resume=not job.fresh, overwrite=job.fresh,
                                  progress=job.progress, threads=job.threads, **seeds, **job.train_options)
    except LayerprobeError as e:
        # The advice is rendered in the demo's flags here: only the text survives the trip to the parent.
        raise LayerprobeError(e.renamed(**DEMO_FLAGS).text()) from None
    run = summary.runs[0]
    if summary.interrupted:
        return run, summary.settings, None
    run_dir = Path(run.path)
    heldout = heldout_blocks(run_dir, job.runs / HELDOUT_FILE, progress=job.progress)
    folder = analyse_and_sweep(run_dir, heldout, job.out / run_dir.name, block_sweep=job.block_sweep,
                               progress=job.progress)
    return run, summary.settings, folder


def _stop_workers(pool, grace: float = 10.0) -> None:
    """End every worker of a pool whose job failed. SIGTERM first: a worker in training saves its run (the
    trainer's stop flag) and then idles in the pool, which never ends it once a job has failed, so whatever
    is still alive after `grace` seconds is killed. Runs stay resumable: checkpoints are written atomically."""
    processes = list(getattr(pool, "_processes", {}).values())
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    pool.shutdown(wait=False, cancel_futures=True)  # waiting would join workers that will never take a job


def _run_jobs(jobs: list[_Job], workers: int, threads: int, progress: bool) -> list[tuple]:
    """Every job, in `workers` spawned processes of `threads` threads each (in this process when workers is 1);
    results in the jobs' order. A worker's progress shows in this process's one display."""
    if workers == 1:
        torch.set_num_threads(threads)
        return [_run_job(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
    queue = ctx.Queue()
    with make_progress(progress) as display, RelayDisplay(queue, display):
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker, initargs=(queue, threads))
        futures = [pool.submit(_run_job, job) for job in jobs]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                # A bad folder or option fails every model the same way; stop the rest rather than finish
                # their training first (their runs stay resumable: checkpoints are written atomically).
                _stop_workers(pool)
                raise failed[0].exception()
        except KeyboardInterrupt:
            # Ctrl-C reaches the workers too: each saves its run (the trainer's stop flag) before it ends.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return [f.result() for f in futures]


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
    workers: int | None = None,
    seeds: int = 1,
    progress: bool = True,
    **train_options,
) -> Comparison:
    """Train one tiny model per norm scheme, analyse and prune-sweep each, and write the comparison to `out`.

    `seeds`: training runs per scheme, differing only in the seed of their initial weights (`seed`, seed+1,
    …; `seed` from train_options, default 0), on the same data in the same order. With one (the default) the
    runs go to runs/<scheme>/ and the report says its verdicts rest on one seed; with more, to
    runs/<scheme>-seed<k>/, and the report gives each number as the mean ± spread over the seeds.

    The models are independent, so each is trained, analysed and swept in its own process (`workers`,
    default one per scheme), with `threads` torch threads each (default: the available cores shared out);
    `workers=1` runs everything one after another in this process. Same results either way.
    `train_options` go to `layerprobe.training.train_reference` (e.g. layers=, seq_len=).
    Returns the `Comparison`; its `.html` is the report.
    """
    started = time.perf_counter()
    schemes = check_options(norm=norm, preset=preset, steps=steps, threads=threads, workers=workers, seeds=seeds)
    out, runs = Path(out), Path(runs)
    ensure_writable_dir(out)
    ensure_writable_dir(runs)
    base = int(train_options.get("seed", 0))
    run_seeds = [None] if seeds == 1 else [base + k for k in range(seeds)]
    n_workers, n_threads = plan_workers(len(schemes) * len(run_seeds), workers, threads)
    where = (f"in {n_workers} processes of {n_threads} thread{'s' * (n_threads > 1)}" if n_workers > 1
             else f"one after another, {n_threads} thread{'s' * (n_threads > 1)}")
    on_seeds = "" if seeds == 1 else f" on {seeds} seeds each"
    _say(f"training, analysing and prune-sweeping {len(schemes) * seeds} {preset} models ({', '.join(schemes)}"
         f"{on_seeds}) on the builtin corpus, {where}", progress)
    jobs = [_Job(scheme, runs, out, preset, steps, fresh, block_sweep, threads, progress, train_options, seed)
            for seed in run_seeds for scheme in schemes]
    if n_workers == 1:
        for job in jobs:
            job.threads = n_threads
    results = _run_jobs(jobs, n_workers, n_threads, progress)
    summary = TrainingSummary(out=str(runs), settings=results[0][1], runs=[r for r, _, _ in results],
                              interrupted=any(folder is None for _, _, folder in results))
    write_json(runs / "summary.json", summary.as_dict())  # every scheme's, not the last worker's
    if summary.interrupted:
        raise KeyboardInterrupt
    run_dirs = [Path(r.path) for r in summary.runs]
    result_dirs = [folder for _, _, folder in results]

    _say("comparing", progress)
    title = f"layerprobe demo — {', '.join(schemes)} ({preset} preset, trained on the builtin corpus)"
    command = _command_line(out=out, runs=runs, norm=norm, preset=preset, steps=steps, block_sweep=block_sweep,
                            threshold=threshold, threads=threads, workers=workers, seeds=seeds)
    if seeds == 1:
        note = (f"Each scheme was trained once (1 seed): the verdicts below rest on one training run per scheme, "
                f"and a second seed may order them differently; `layerprobe demo --seeds 3` trains 3 per scheme "
                "and decides only beyond their spread.")
    else:
        note = (f"Each scheme was trained on {seeds} seeds of its initial weights ({', '.join(map(str, run_seeds))}; "
                f"same data, same order): every number is the mean ± standard deviation over its seeds.")
    comp = compare([*run_dirs, *result_dirs], out=out, title=title,
                   threshold=DEFAULT_THRESHOLD if threshold is None else threshold, progress=progress,
                   command=command, notes=[note])
    comp.seconds = time.perf_counter() - started
    return comp


__all__ = ["demo", "analyse_and_sweep", "available_cores", "check_options", "heldout_blocks", "plan_workers",
           "DEMO_FLAGS", "DEMO_SCHEMES"]
