"""Data-parallel `analyze` / `prune-sweep` on the CPU: 2 gloo processes (torchrun) against 1 process, same samples.

    python bench/bench_parallel.py [--commands analyze,prune-sweep] [--samples 16] [--seq-len 256]
                                   [--batch-size 4] [--repeats 3] [--nproc 2] [--threads 1]
                                   [--hidden 384] [--layers 6] [--vocab 4096]

A random Llama (`--hidden`, `--layers`, `--vocab`; saved with save_pretrained) and random token ids (.npy) are
made once. Each command then runs as the real CLI in child processes, alternately 1 process and `--nproc`
processes under torchrun, `--repeats` times; every process has `--threads` threads (OMP_NUM_THREADS).
Reported, as medians: the command's wall time, the CPU time of all its processes (user + sys of the children,
torchrun's launcher included), and the manifest's `wall_time_s` (rank 0: from opening the model to the
results, i.e. without interpreter start-up and imports). The outputs of the two are compared column by column
(the largest relative difference is printed) so the timing is of runs that agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TABLES = {"analyze": ("layers.csv", "angular.csv"), "prune-sweep": ("sweep.csv",)}
SECTIONS = {"analyze": "analyze", "prune-sweep": "prune-sweep"}


def make_model(folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def run(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def largest_difference(one: Path, two: Path, command: str) -> float:
    import pandas as pd

    worst = 0.0
    for name in TABLES[command]:
        a, b = pd.read_csv(one / name), pd.read_csv(two / name)
        for col in a.columns:
            if a[col].dtype.kind == "f":
                x, y = a[col].to_numpy(float), b[col].to_numpy(float)
                ok = ~np.isnan(x)
                if ok.any():
                    worst = max(worst, float(np.max(np.abs(x[ok] - y[ok]) / np.maximum(np.abs(x[ok]), 1e-12))))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", default="analyze,prune-sweep")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", args.hidden, args.layers, args.vocab)
        data = tmp / "ids.npy"
        np.save(data, np.random.default_rng(0).integers(0, args.vocab, (args.samples, args.seq_len)))
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}; model: Llama {args.layers} layers x {args.hidden}, vocab {args.vocab}; "
              f"{args.samples} samples x {args.seq_len} tokens, batch {args.batch_size}; "
              f"{args.threads} thread(s) per process")
        for command in args.commands.split(","):
            base = ["-m", "layerprobe", command, str(model), "--data", str(data), "--samples", str(args.samples),
                    "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype", "float32",
                    "--device", "cpu", "-q"]
            launch = {1: [sys.executable],
                      args.nproc: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", str(args.nproc)]}
            times = {n: {"wall": [], "cpu": [], "manifest": []} for n in launch}
            for r in range(args.repeats):
                for n, prefix in launch.items():
                    out = tmp / f"{command}-{n}-{r}"
                    wall, cpu = run([*prefix, *base, "--out", str(out)], env)
                    manifest = json.loads((out / "manifest.json").read_text())[SECTIONS[command]]
                    times[n]["wall"].append(wall)
                    times[n]["cpu"].append(cpu)
                    times[n]["manifest"].append(manifest["wall_time_s"])
            diff = largest_difference(tmp / f"{command}-1-0", tmp / f"{command}-{args.nproc}-0", command)
            med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
            one, many = med[1], med[args.nproc]
            print(f"{command}: largest relative difference between the outputs {diff:.1e}")
            for n in launch:
                m = med[n]
                print(f"  {n} process(es): wall {m['wall']:.1f} s, CPU {m['cpu']:.1f} s, measured part (manifest) "
                      f"{m['manifest']:.1f} s")
            print(f"  {args.nproc} vs 1: wall x{many['wall'] / one['wall']:.2f}, CPU x{many['cpu'] / one['cpu']:.2f}, "
                  f"measured part x{many['manifest'] / one['manifest']:.2f}")


if __name__ == "__main__":
    main()
