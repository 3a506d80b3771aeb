"""analyze's cost over a bare pass on the same tokens (issue 2's targets: ≤ 1.10 in time).

    python bench/bench_analyze.py [--model smollm2] [--samples 16] [--seq-len 256] [--batch-size 4]
                                  [--repeats 3] [--dtype float32] [--device auto]

Time: one process loads the model once, then alternates bare and analyze runs `--repeats` times
and reports the median of each (alternating spreads any background load over both sides).
  bare (grad):     forward + mean LM loss + backward, per batch — the least any gradient pass costs
  analyze (grad):  layerprobe.analyze(..., grad=True) — includes data preparation and writing nothing
  bare (no grad):  forward + loss under inference_mode
  analyze (no grad): layerprobe.analyze(..., grad=False)
With --pruneme, two more runs join the rotation (time only):
  pruneme:         PruneMe's angular-distance pass (arcee-ai/PruneMe, compute_block_similarity), re-implemented
                   here: the model's forward with output_hidden_states under no_grad (full logits included, as
                   there), each layer's last token, the mean angular distance of every block of n = 1 layers
  analyze (angular): layerprobe.analyze(..., grad=False, metrics="angular"): the whole ℓ×n map, loss and
                   norm placement on the same tokens
Memory: each of the four runs again in its own subprocess, after one warm-up batch of the same run (so
modules analyze imports on first use, ~350 MiB of pandas and friends, are not counted as the pass's
memory); the peak resident set over the warmed-up process (VmHWM, reset just before the run) and, on
CUDA, torch.cuda.max_memory_allocated are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from layerprobe.analysis import analyze
from layerprobe.metrics import next_token_loss_sum
from layerprobe.data import load_token_blocks
from layerprobe.loading import load_model

MODES = ("bare_grad", "analyze_grad", "bare_nograd", "analyze_nograd")
PRUNEME_MODES = ("pruneme", "analyze_angular")


def pruneme_pass(loaded, blocks, batch_size, skip: int = 1):
    """PruneMe's pass, as its compute_block_similarity does it (no padding here: the last token is T-1)."""
    model = loaded.model
    device = next(model.parameters()).device
    per_block = None
    for batch in torch.split(blocks, batch_size):
        ids = batch.to(device)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        last = [h[:, -1, :] for h in out.hidden_states][1:]  # as PruneMe: the embedding output left out
        dists = []
        for l in range(len(last) - skip):
            a = last[l] / torch.norm(last[l], dim=-1, keepdim=True)
            b = last[l + skip] / torch.norm(last[l + skip], dim=-1, keepdim=True)
            dists.append(float((torch.acos((a * b).sum(-1).clamp(-1, 1)) / torch.pi).mean()))
        per_block = [dists] if per_block is None else per_block + [dists]
    return [sum(col) / len(col) for col in zip(*per_block)]


def bare_pass(loaded, blocks, batch_size, grad):
    model = loaded.model
    device = next(model.parameters()).device
    n_pred = blocks.shape[0] * (blocks.shape[1] - 1)
    model.zero_grad(set_to_none=True)
    for batch in torch.split(blocks, batch_size):
        ids = batch.to(device)
        if grad:
            logits = model(input_ids=ids, use_cache=False).logits
            (next_token_loss_sum(logits, ids) / n_pred).backward()
        else:
            with torch.inference_mode():
                logits = model(input_ids=ids, use_cache=False).logits
                next_token_loss_sum(logits, ids)
        del logits
    model.zero_grad(set_to_none=True)


def run_mode(mode, loaded, blocks, args):
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sync()
    start = clock()
    if mode.startswith("bare"):
        bare_pass(loaded, blocks, args.batch_size, grad=mode == "bare_grad")
    elif mode == "pruneme":
        pruneme_pass(loaded, blocks, args.batch_size)
    elif mode == "analyze_angular":
        analyze(loaded, data=args.npy, samples=len(blocks), batch_size=args.batch_size, grad=False,
                metrics="angular", progress=False)
    else:
        analyze(loaded, data=args.npy, samples=len(blocks), batch_size=args.batch_size, grad=mode == "analyze_grad",
                progress=False)
    sync()
    return clock() - start


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")


def _proc_status_mib(key: str) -> float:
    """A memory line of /proc/self/status (e.g. VmHWM, VmRSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib():
    return _proc_status_mib("VmHWM")


def current_rss_mib():
    return _proc_status_mib("VmRSS")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, steadier than wall time on a shared machine (use with --threads 1)")
    p.add_argument("--pruneme", action="store_true",
                   help="also time PruneMe's angular-distance pass against analyze --no-grad --metrics angular")
    p.add_argument("--no-memory", action="store_true", help="time only (skip the memory subprocesses)")
    p.add_argument("--skip-grad", action="store_true", help="leave out the two runs with gradients (time only)")
    p.add_argument("--memory-only-mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--npy", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.npy is None:
        import numpy as np
        import tempfile

        blocks = load_token_blocks("builtin", loaded.tokenizer, seq_len=args.seq_len, samples=args.samples, seed=0)
        args.npy = os.path.join(tempfile.mkdtemp(), "tokens.npy")
        np.save(args.npy, blocks.numpy())
    blocks = torch.from_numpy(__import__("numpy").load(args.npy))

    if args.memory_only_mode:
        run_mode(args.memory_only_mode, loaded, blocks[: args.batch_size], args)  # imports and caches: not the pass's
        base = current_rss_mib()
        reset_peak_rss()
        if loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run_mode(args.memory_only_mode, loaded, blocks, args)
        out = {"rss_peak_over_loaded_mib": peak_rss_mib() - base}
        if loaded.device.type == "cuda":
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(out))
        return

    run_mode("bare_nograd", loaded, blocks[: args.batch_size], args)  # warm-up
    run_mode("analyze_nograd", loaded, blocks[: args.batch_size], args)
    modes = tuple(m for m in MODES if not (args.skip_grad and m.endswith("_grad"))) + (PRUNEME_MODES if args.pruneme else ())
    args.no_memory = args.no_memory or args.skip_grad
    if args.pruneme:
        run_mode("pruneme", loaded, blocks[: args.batch_size], args)
        run_mode("analyze_angular", loaded, blocks[: args.batch_size], args)
    times = {m: [] for m in MODES + PRUNEME_MODES}
    for r in range(args.repeats):
        for m in modes:
            times[m].append(run_mode(m, loaded, blocks, args))
            print(f"repeat {r + 1}/{args.repeats} {m:15s} {times[m][-1]:8.2f} s", file=sys.stderr, flush=True)
    med = {m: statistics.median(v) if v else float("nan") for m, v in times.items()}
    # Paired per-round ratios: each analyze run against the bare run just before it.
    paired = {g: statistics.median(a / b for a, b in zip(times[f"analyze_{g}"], times[f"bare_{g}"])) if times[f"bare_{g}"]
              else float("nan") for g in ("grad", "nograd")}

    mem = {m: {"rss_peak_over_loaded_mib": float("nan")} for m in MODES}
    for m in () if args.no_memory else MODES:
        cmd = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--device", args.device,
               "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--npy", args.npy, "--memory-only-mode", m]
        mem[m] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])

    print(f"\nmodel {args.model} · {args.samples} samples × {args.seq_len} tokens · batch {args.batch_size} · "
          f"{args.dtype} on {loaded.device} · torch {torch.__version__} · {os.cpu_count()} CPUs · {platform.processor() or platform.machine()}")
    print(f"{'run':16s} {'median s':>9s} {'peak RSS over loaded (MiB)':>27s}" +
          (f" {'CUDA peak MiB':>14s}" if loaded.device.type == "cuda" else ""))
    for m in MODES:
        line = f"{m:16s} {med[m]:9.2f} {mem[m]['rss_peak_over_loaded_mib']:27.0f}"
        if "cuda_peak_mib" in mem[m]:
            line += f" {mem[m]['cuda_peak_mib']:14.0f}"
        print(line)
    for m in PRUNEME_MODES if args.pruneme else ():
        print(f"{m:16s} {statistics.median(times[m]):9.2f}")
    print(f"\nclock: {args.clock} · threads: {torch.get_num_threads()}")
    print(f"analyze / bare, with gradients: {med['analyze_grad'] / med['bare_grad']:.3f} of medians, "
          f"{paired['grad']:.3f} median of paired rounds  (target ≤ 1.10)")
    print(f"analyze / bare, no gradients:   {med['analyze_nograd'] / med['bare_nograd']:.3f} of medians, "
          f"{paired['nograd']:.3f} median of paired rounds  (target ≤ 1.10)")
    if args.pruneme:
        rounds = [a / b for a, b in zip(times["analyze_angular"], times["pruneme"])]
        print(f"analyze --no-grad --metrics angular / PruneMe's pass: {statistics.median(rounds):.3f} median of "
              f"paired rounds ({', '.join(f'{r:.3f}' for r in rounds)}; target ≤ 1.00)")
        rounds = [a / b for a, b in zip(times["analyze_nograd"], times["pruneme"])]
        print(f"analyze --no-grad (every metric) / PruneMe's pass: {statistics.median(rounds):.3f} median of paired rounds")
    print("per round, analyze / bare without gradients: "
          + ", ".join(f"{a / b:.3f}" for a, b in zip(times["analyze_nograd"], times["bare_nograd"])))


if __name__ == "__main__":
    main()
