"""What the intervals over samples cost (issue 23's target: ≤ 1.03× analyze and prune-sweep without them).

    python bench/bench_intervals.py --base REV [--model smollm2] [--samples 8] [--seq-len 128]
                                    [--batch-size 4] [--repeats 3] [--threads 1] [--clock cpu]

"Without" is the code at git revision REV (the commit before the intervals), exported with `git archive`
to a temporary folder; "with" is this checkout. Each round runs both, in alternating order, in their own
subprocess: load the model, one warm-up call of each command on one sample, then time
analyze(grad=False), analyze(grad=True) and prune_sweep(mode="layer") once each on the same tokens.
The report is the median over rounds of each time and of the with/without ratio of each round
(pairing the two sides of a round spreads background load over both).

    python bench/bench_intervals.py --profile [--model smollm2] [--samples 8] [--seq-len 128]
    python bench/bench_intervals.py --toggle [--model smollm2] [--samples 8] [--seq-len 128] [--repeats 5]

On a shared machine the paired ratios scatter by ±10%, far more than the intervals cost; `--profile`
measures that cost directly instead: this checkout's prune_sweep(mode="layer") and analyze (without and
with gradients) under cProfile, and the cumulative seconds inside the functions that exist only for the intervals
(per-sample sums, the bootstrap) against the call's total.

`--toggle` pairs closer than `--base`: one process, this checkout, each call timed with the intervals on
and off back to back (alternating which goes first), so the two sides of a pair share the machine's
load within seconds and differ only in the intervals (not in the other changes since REV). Off: no
bootstrap, no gradient Gram, the sweep's scorer without per-sample sums (`intervals_off`); the capture's
per-sample sums cannot be switched off (its totals come from them), and the profile covers those.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("analyze_nograd", "analyze_grad", "prune_layer")

CHILD = r"""
import json, sys, time, torch
from layerprobe.analysis import analyze
from layerprobe.loading import load_model
from layerprobe.pruning import prune_sweep
a = json.loads(sys.argv[1])
if a["threads"]:
    torch.set_num_threads(a["threads"])
clock = time.process_time if a["clock"] == "cpu" else time.perf_counter
loaded = load_model(a["model"], dtype=a["dtype"], device="cpu")
kw = dict(data=a["data"], seq_len=a["seq_len"], batch_size=a["batch_size"], progress=False)
analyze(loaded, samples=1, grad=False, **kw); prune_sweep(loaded, mode="layer", samples=1, **kw)  # warm-up
out = {}
for name, call in (("analyze_nograd", lambda: analyze(loaded, samples=a["samples"], grad=False, **kw)),
                   ("analyze_grad", lambda: analyze(loaded, samples=a["samples"], grad=True, **kw)),
                   ("prune_layer", lambda: prune_sweep(loaded, mode="layer", samples=a["samples"], **kw))):
    t = clock(); call(); out[name] = clock() - t
print(json.dumps(out))
"""


# The functions that exist only for the intervals (their cumulative time is the intervals' cost).
INTERVAL_FUNCTIONS = ("_per_sample_add", "intervals", "ranking_stability", "layer_intervals",  # not nested in each other
                      "per_sample_sums", "_keep_sample_sums", "_sample_sums", "row_sample_sums")
# ... and the gradient Gram's (metrics/gradients.py: the hook's host copy, the dot products), by file and name
GRAM_FUNCTIONS = ("keep", "end_batch")


def _interval_function(key) -> str | None:
    filename, _, name = key
    if name in INTERVAL_FUNCTIONS:
        return name
    if name in GRAM_FUNCTIONS and filename.endswith(os.path.join("metrics", "gradients.py")):
        return f"gram.{name}"
    return None


def profile(args) -> None:
    import cProfile
    import pstats

    import torch

    from layerprobe.analysis import analyze
    from layerprobe.loading import load_model
    from layerprobe.pruning import prune_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    kw = dict(data=args.data, seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
    analyze(loaded, samples=1, grad=False, **kw)  # warm-up: imports and first-call costs
    out = {}
    for name, call in (("prune_layer", lambda: prune_sweep(loaded, mode="layer", samples=args.samples, **kw)),
                       ("analyze_nograd", lambda: analyze(loaded, samples=args.samples, grad=False, **kw)),
                       ("analyze_grad", lambda: analyze(loaded, samples=args.samples, grad=True, **kw))):
        pr = cProfile.Profile()
        pr.enable()
        call()
        pr.disable()
        stats = pstats.Stats(pr)
        spent: dict[str, float] = {}
        for k, v in stats.stats.items():
            if (f := _interval_function(k)):
                spent[f] = spent.get(f, 0.0) + v[3]
        out[name] = {"total_s": round(stats.total_tt, 3), "intervals_s": round(sum(spent.values()), 4),
                     "share": round(sum(spent.values()) / stats.total_tt, 5),
                     "by_function_s": {k: round(v, 4) for k, v in spent.items()}}
    print(json.dumps({"args": vars(args), "profile": out}, indent=1))


def intervals_off():
    """A context in which this checkout computes no intervals where they can be switched off: no bootstrap
    (analyze's layer_intervals, the sweep's per-candidate intervals), no per-batch gradient Gram, and the
    sweep's scorer without per-sample sums. The capture's per-sample sums stay (its totals are formed
    from them), so this measures the rest of the intervals' cost, not all of it."""
    from contextlib import ExitStack
    from unittest import mock

    import numpy as np

    from layerprobe.pruning import sweep, table

    class PlainScorer(sweep.Scorer):
        def __init__(self, *a, **k):
            k["rows_per_sample"] = None
            super().__init__(*a, **k)

    nan = {f"{c}_{e}": float("nan") for c in table.INTERVAL_OF for e in ("lo", "hi")}
    stack = ExitStack()
    stack.enter_context(mock.patch("layerprobe.analysis.layer_intervals", lambda *a, **k: {}))
    stack.enter_context(mock.patch("layerprobe.analysis._gradient_gram", lambda *a, **k: None))
    stack.enter_context(mock.patch("layerprobe.pruning.sweep.Scorer", PlainScorer))
    stack.enter_context(mock.patch("layerprobe.pruning.table.intervals", lambda *a, **k: dict(nan)))
    stack.enter_context(mock.patch("layerprobe.pruning.sweep.resample_counts", lambda *a, **k: np.zeros((1, 1))))
    return stack


def toggle(args) -> None:
    """One process, this checkout: each round times every call with the intervals on and off (`intervals_off`),
    back to back in alternating order, on the CPU clock; the report is the median of the rounds' ratios."""
    import time

    import torch

    from layerprobe.analysis import analyze
    from layerprobe.loading import load_model
    from layerprobe.pruning import prune_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    kw = dict(data=args.data, seq_len=args.seq_len, batch_size=args.batch_size, progress=False)
    calls = {"analyze_nograd": lambda: analyze(loaded, samples=args.samples, grad=False, **kw),
             "analyze_grad": lambda: analyze(loaded, samples=args.samples, grad=True, **kw),
             "prune_layer": lambda: prune_sweep(loaded, mode="layer", samples=args.samples, **kw)}
    analyze(loaded, samples=1, grad=False, **kw)  # warm-up
    prune_sweep(loaded, mode="layer", samples=1, **kw)
    ratios, loads = {r: [] for r in RUNS}, []
    for i in range(args.repeats):
        before = os.getloadavg()[0]
        for j, r in enumerate(RUNS):
            got = {}
            for side in (("off", "on") if (i + j) % 2 == 0 else ("on", "off")):
                with (intervals_off() if side == "off" else _nothing()):
                    t = time.process_time()
                    calls[r]()
                    got[side] = time.process_time() - t
            ratios[r].append(got["on"] / got["off"])
        loads.append((round(before, 2), round(os.getloadavg()[0], 2)))
        print(f"round {i + 1} (load {loads[-1][0]} -> {loads[-1][1]}): "
              + ", ".join(f"{r} {ratios[r][-1]:.3f}x" for r in RUNS), flush=True)
    print(json.dumps({"args": vars(args), "ratios": {r: [round(x, 4) for x in v] for r, v in ratios.items()},
                      "load_before_after": loads, "cpus": os.cpu_count(),
                      "median_ratio": {r: round(statistics.median(v), 4) for r, v in ratios.items()}}, indent=1))


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def export(rev: str, into: Path) -> Path:
    """The package at `rev`, unpacked under `into` (git archive: no checkout, no worktree)."""
    tar = into / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), rev, "layerprobe"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(into / "base", filter="data")
    return into / "base"


def run_side(path: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(path), OMP_NUM_THREADS=str(args.threads or os.cpu_count()))
    payload = json.dumps({k: getattr(args, k) for k in ("model", "data", "samples", "seq_len", "batch_size",
                                                        "threads", "clock", "dtype")})
    done = subprocess.run([sys.executable, "-c", CHILD, payload], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", help="git revision without the intervals (paired timing)")
    p.add_argument("--profile", action="store_true", help="profile this checkout instead of paired timing")
    p.add_argument("--toggle", action="store_true", help="this checkout with its switchable intervals on and off, "
                                                         "call by call in one process")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="builtin")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = p.parse_args()
    if args.profile:
        return profile(args)
    if args.toggle:
        return toggle(args)
    if not args.base:
        p.error("give --base REV (paired timing) or --profile")
    with tempfile.TemporaryDirectory() as tmp:
        base = export(args.base, Path(tmp))
        sides = {"without": base, "with": ROOT}
        times = {s: {r: [] for r in RUNS} for s in sides}
        ratios = {r: [] for r in RUNS}
        loads = []
        for i in range(args.repeats):
            order = ("without", "with") if i % 2 == 0 else ("with", "without")
            before = os.getloadavg()[0]
            got = {s: run_side(sides[s], args) for s in order}
            loads.append((round(before, 2), round(os.getloadavg()[0], 2)))  # the 1-min load: other jobs
            for r in RUNS:
                for s in sides:
                    times[s][r].append(got[s][r])
                ratios[r].append(got["with"][r] / got["without"][r])
            print(f"round {i + 1} ({'/'.join(order)} first; load {loads[-1][0]} -> {loads[-1][1]}): "
                  + ", ".join(f"{r} {ratios[r][-1]:.3f}x" for r in RUNS), flush=True)
    print(json.dumps({"args": vars(args), "median_s": {s: {r: round(statistics.median(v), 3) for r, v in t.items()}
                                                      for s, t in times.items()},
                      "ratios": {r: [round(x, 4) for x in v] for r, v in ratios.items()},
                      "load_before_after": loads, "cpus": os.cpu_count(),
                      "median_ratio": {r: round(statistics.median(v), 4) for r, v in ratios.items()}}, indent=1))


if __name__ == "__main__":
    main()
