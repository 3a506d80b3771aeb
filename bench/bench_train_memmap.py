"""Training from a prepared (memory-mapped) token file: speed against blocks held in memory, and peak memory
against corpus size.

1. Throughput: the same model trained for --steps optimizer steps with its batches read by `BlockBatches`
   from the memmap (a prepared folder's `BlockView`) and from the very same blocks held in one tensor,
   in alternating pairs; the time of each run is process CPU time (time.process_time, all threads), so a
   busy machine slows both sides alike. Reported: tokens per CPU-second of each, and the median over
   pairs of (memmap tok/s / in-memory tok/s); the target is >= 0.98.
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
    import torch

    from layerprobe.reference import reference_config
    from layerprobe.training.data import BlockBatches, load_token_data
    from layerprobe.training.model import init_model

    data = load_token_data(str(prep), None, seq_len=seq_len, batch_size=batch, eval_samples=64)
    in_memory = data.train[slice(0, len(data.train))].clone()  # the same blocks, one tensor
    sources = {"memmap": BlockBatches(data.train, batch, seed=0), "memory": BlockBatches(in_memory, batch, seed=0)}
    config = reference_config(preset, "pre", vocab_size=data.embedding_rows, max_position_embeddings=seq_len)

    def run(source) -> tuple[float, float]:
        model = init_model(config, 0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        fetch = 0.0
        t0 = time.process_time()
        for step in range(steps):
            f0 = time.process_time()
            ids = source.batch(step)
            fetch += time.process_time() - f0
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.process_time() - t0, fetch

    run(sources["memory"])  # warm-up: allocator, page cache, kernels
    rows = []
    for i in range(pairs):
        order = ("memmap", "memory") if i % 2 == 0 else ("memory", "memmap")
        got = {name: run(sources[name]) for name in order}
        rows.append(got)
    tokens = steps * batch * seq_len
    tps = {k: [tokens / r[k][0] for r in rows] for k in ("memmap", "memory")}
    return {"preset": preset, "seq_len": seq_len, "batch": batch, "steps": steps, "pairs": pairs,
            "tok_per_cpu_s": {k: statistics.median(v) for k, v in tps.items()},
            "fetch_ms_per_step": {k: statistics.median(r[k][1] for r in rows) / steps * 1e3 for k in ("memmap", "memory")},
            "ratio_median": statistics.median(a / b for a, b in zip(tps["memmap"], tps["memory"])),
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
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rss-sizes", default="10,300", help="token-file sizes in MB; the first is the real preparation")
    ap.add_argument("--rss-steps", type=int, default=20)
    ap.add_argument("--skip-throughput", action="store_true")
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
        for mb in sizes:
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
