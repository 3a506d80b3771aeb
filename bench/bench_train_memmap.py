"""Training from a prepared (memory-mapped) token file: speed against blocks held in memory, and peak memory
against corpus size.

1. Throughput: two copies of the same model trained in lockstep for --steps optimizer steps, one with its
   batches read by `BlockBatches` from the prepared folder's token file (a `BlockView`), one from the very
   same blocks held in one tensor; each step of each is timed in process CPU time (time.process_time), the
   two in alternating order, so a busy machine slows both sides alike. Reported per round: tokens per
   CPU-second of each; the median over rounds of (token file tok/s / in-memory tok/s), target >= 0.98;
   and the batch-fetch time per step of each (the only code that differs).
2. Peak RSS: `layerprobe train-reference --data DIR` in a fresh process on prepared corpora of different
   sizes, read with os.wait4. The 10 MB corpus is prepared for real (generated text, a 4096-id BPE); the
   larger ones repeat its token ids to the size asked (their token files are 10 MB x k; the training path
   reads only the rows of each step, so what the ids are does not matter). Target: flat in corpus size,
   at most 1.5 GB above the 10 MB figure.

    python bench/bench_train_memmap.py                              # throughput + RSS at 10 and 300 MB
    python bench/bench_train_memmap.py --rss-sizes 10,300,1000 --pairs 7 --json bench/train_memmap.json

Everything generated lives under --tmp and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def prepare_small(root: Path, text_mb: float) -> Path:
    from bench_prepare import make_shard

    from layerprobe.corpus import prepare_data

    src = root / "text"
    src.mkdir(parents=True, exist_ok=True)
    make_shard(src / "shard-00000.jsonl", text_mb, seed=0)
    return prepare_data(str(src), "bpe:4096", root / "prep-small", progress=False).path


def scaled(small: Path, root: Path, mb: int) -> Path:
    """A prepared folder whose token file is about `mb` MB: the small one's ids repeated, index to match."""
    out = root / f"prep-{mb}"
    if out.exists():
        return out
    shutil.copytree(small / "tokenizer", out / "tokenizer")
    chunk = (small / "tokens.bin").read_bytes()
    index = json.loads((small / "index.json").read_text())
    reps = max(1, round(mb * 1e6 / len(chunk)))
    with open(out / "tokens.bin", "wb") as f:
        for _ in range(reps):
            f.write(chunk)
    item = 2 if index["dtype"] == "uint16" else 4
    index.update(tokens=reps * len(chunk) // item, bytes=reps * len(chunk), documents=index["documents"] * reps,
                 text_bytes=index["text_bytes"] * reps, key=f"{index['key']}-x{reps}")
    (out / "index.json").write_text(json.dumps(index))
    return out


def throughput(prep: Path, steps: int, pairs: int, preset: str, seq_len: int, batch: int) -> dict:
    """Two copies of the same model trained in lockstep, one from each source; every step is timed on each,
    in alternating order, so the machine's load drifts cancel step by step. `pairs` rounds of `steps` steps."""
    import torch

    from layerprobe.reference import reference_config
    from layerprobe.training.data import BlockBatches, load_token_data
    from layerprobe.training.model import init_model

    data = load_token_data(str(prep), None, seq_len=seq_len, batch_size=batch, eval_samples=64)
    in_memory = data.train[slice(0, len(data.train))].clone()  # the same blocks, one tensor
    sources = {"memmap": BlockBatches(data.train, batch, seed=0), "memory": BlockBatches(in_memory, batch, seed=0)}
    config = reference_config(preset, "pre", vocab_size=data.embedding_rows, max_position_embeddings=seq_len)

    def one_step(model, opt, source, step) -> tuple[float, float]:
        t0 = time.process_time()
        ids = source.batch(step)
        t1 = time.process_time()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.process_time() - t0, t1 - t0

    rounds = []
    for p in range(pairs + 1):  # round 0 warms up (allocator, page cache, kernels) and is not counted
        models = {k: init_model(config, 0) for k in sources}
        opts = {k: torch.optim.AdamW(models[k].parameters(), lr=1e-3, weight_decay=0.0) for k in sources}
        total = {k: [0.0, 0.0] for k in sources}
        for step in range(steps):
            order = ("memmap", "memory") if (step + p) % 2 == 0 else ("memory", "memmap")
            for k in order:
                dt, fetch = one_step(models[k], opts[k], sources[k], step)
                total[k][0] += dt
                total[k][1] += fetch
        if p:
            rounds.append(total)
    tokens = steps * batch * seq_len
    tps = {k: [tokens / r[k][0] for r in rounds] for k in sources}
    return {"preset": preset, "seq_len": seq_len, "batch": batch, "steps": steps, "rounds": pairs,
            "tok_per_cpu_s": {k: round(statistics.median(v), 1) for k, v in tps.items()},
            "fetch_ms_per_step": {k: round(statistics.median(r[k][1] for r in rounds) / steps * 1e3, 3) for k in sources},
            "step_ms": {k: round(statistics.median(r[k][0] for r in rounds) / steps * 1e3, 2) for k in sources},
            "ratio_median": round(statistics.median(a / b for a, b in zip(tps["memmap"], tps["memory"])), 4),
            "ratios": [round(a / b, 4) for a, b in zip(tps["memmap"], tps["memory"])]}


def peak_rss(prep: Path, out: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "layerprobe", "train-reference", "--data", str(prep), "--preset", "micro",
           "--norm", "pre", "--steps", str(steps), "--eval-every", str(steps), "--device", "cpu", "--threads", "1",
           "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"train-reference failed on {prep}: {err[-2000:]}")
    return {"token_file_mb": round((prep / "tokens.bin").stat().st_size / 1e6, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tmp", default="/tmp/layerprobe-bench-train-memmap")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rss-sizes", default="10,300", help="token-file sizes in MB; the first is the real preparation")
    ap.add_argument("--rss-steps", type=int, default=20)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    root = Path(args.tmp)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_version()}, "
                         f"torch {torch.__version__}", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        sizes = [int(x) for x in args.rss_sizes.split(",")]
        small = prepare_small(root, sizes[0] * 2.2)  # ~2.2 bytes of text per uint16 token id in this corpus
        report["small_index"] = {k: json.loads((small / "index.json").read_text())[k] for k in ("tokens", "bytes", "text_bytes")}
        if not args.skip_throughput:
            report["throughput"] = throughput(small, args.steps, args.pairs, args.preset, args.seq_len, args.batch)
            print(json.dumps(report["throughput"]), flush=True)
        report["rss"] = []
        for mb in [] if args.skip_rss else sizes:
            prep = small if mb == sizes[0] else scaled(small, root, mb)
            row = peak_rss(prep, root / f"runs-{mb}", args.rss_steps)
            report["rss"].append(row)
            print(json.dumps(row), flush=True)
            if prep is not small:
                shutil.rmtree(prep)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
