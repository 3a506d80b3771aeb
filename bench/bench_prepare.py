"""Preparation (prepare-data) throughput and peak memory.

1. Throughput: MB of text per second of `prepare_data` (read .jsonl shards, encode on all cores, write
   the memmap) against the tokenizer's own `encode_batch_fast` over the same documents already in memory
   (the practical limit), timed in alternation round after round; the ratio reported is the median over
   rounds of (encode_batch time / prepare time). Wall and process CPU time (all threads) are both given.
2. Peak RSS: `prepare_data` in a fresh process for corpora of different sizes (shards of the same
   generated text), read with os.wait4: flat in corpus size is the target.

    python bench/bench_prepare.py                                   # 20 MB throughput, RSS at 10 and 300 MB
    python bench/bench_prepare.py --rss-sizes 10,300,1000 --rounds 5 --json bench/prepare.json

The generated corpus lives under --tmp and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not first one their its new after who they have two been other all year time city team during school "
         "river music game film state world history national series north south people season however between "
         "government company university population album village station member league club county").split()


def make_shard(path: Path, mb: float, seed: int) -> None:
    rng = random.Random(seed)
    size, target = 0, int(mb * 1e6)
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            n = rng.randrange(50, 800)
            text = " ".join(rng.choice(WORDS) if rng.random() > 0.05 else str(rng.randrange(10000)) for _ in range(n))
            line = json.dumps({"text": text.capitalize() + "."}) + "\n"
            f.write(line)
            size += len(line)


def corpus(root: Path, mb: int, shard: Path) -> Path:
    """A folder of `mb` MB: copies of one 10 MB shard (enough to exercise the folder reader and the writer)."""
    d = root / f"c{mb}"
    d.mkdir(parents=True, exist_ok=True)
    shard_mb = shard.stat().st_size / 1e6
    for i in range(max(1, round(mb / shard_mb))):
        dst = d / f"shard-{i:05d}.jsonl"
        if not dst.exists():
            os.link(shard, dst) if i else shutil.copy(shard, dst)
    return d


def throughput(root: Path, tok_dir: str, mb: int, rounds: int) -> dict:
    from layerprobe.corpus import iter_documents, load_hf_tokenizer, prepare_data

    data = corpus(root, mb, root / "shard.jsonl")
    docs = list(iter_documents(str(data)))
    text_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    tok = load_hf_tokenizer(tok_dir)
    backend = tok.backend_tokenizer
    rows, n_tok = [], None
    for r in range(rounds):
        order = ("encode", "prepare") if r % 2 == 0 else ("prepare", "encode")
        t = {}
        for which in order:
            w0, c0 = time.perf_counter(), time.process_time()
            if which == "encode":
                enc = backend.encode_batch_fast(docs, add_special_tokens=False)
                n_tok = sum(len(e.ids) for e in enc) + len(docs)
                del enc
            else:
                out = root / f"prep-{r}"
                res = prepare_data(str(data), tok_dir, out, progress=False)
                prep_tokens = res.index["tokens"]
                shutil.rmtree(out)
            t[which] = (time.perf_counter() - w0, time.process_time() - c0)
        assert prep_tokens == n_tok, (prep_tokens, n_tok)  # the same work: every token plus one EOS a document
        rows.append(t)
        print(f"round {r}: encode_batch {t['encode'][0]:.2f} s wall / {t['encode'][1]:.2f} s cpu, "
              f"prepare {t['prepare'][0]:.2f} s wall / {t['prepare'][1]:.2f} s cpu", flush=True)
    ratio = statistics.median(t["encode"][0] / t["prepare"][0] for t in rows)
    return {
        "text_mb": round(text_mb, 1), "tokens": n_tok, "rounds": rounds,
        "encode_batch_mb_s": round(text_mb / statistics.median(t["encode"][0] for t in rows), 2),
        "prepare_mb_s": round(text_mb / statistics.median(t["prepare"][0] for t in rows), 2),
        "ratio_wall_median": round(ratio, 3),
        "encode_cpu_s_median": round(statistics.median(t["encode"][1] for t in rows), 2),
        "prepare_cpu_s_median": round(statistics.median(t["prepare"][1] for t in rows), 2),
    }


def peak_rss(root: Path, tok_dir: str, mb: int) -> dict:
    data = corpus(root, mb, root / "shard.jsonl")
    out = root / f"rss-{mb}"
    code = ("import sys; from layerprobe.corpus import prepare_data; "
            "r = prepare_data(sys.argv[1], sys.argv[2], sys.argv[3], progress=False); print(r.index['tokens'])")
    w0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, str(data), tok_dir, str(out)], stdout=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    tokens = int(p.stdout.read().decode().strip() or 0)
    wall = time.perf_counter() - w0
    size = sum(f.stat().st_size for f in data.iterdir()) / 1e6
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    assert status == 0, status
    return {"corpus_mb": round(size), "tokens": tokens, "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "mb_s": round(size / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--throughput-mb", type=int, default=20, help="corpus size of the throughput rounds (0: skip them)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rss-sizes", default="10,300", help="corpus sizes in MB for the peak-RSS runs")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tmp", default="/tmp/layerprobe-bench-prepare")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    root = Path(args.tmp)
    root.mkdir(parents=True, exist_ok=True)
    try:
        from layerprobe.corpus import iter_pieces, train_bpe_on_sample

        if not (root / "shard.jsonl").exists():
            make_shard(root / "shard.jsonl", 10, seed=0)
        tok_dir = root / "tok"
        if not tok_dir.exists():
            train_bpe_on_sample(iter_pieces(str(root / "shard.jsonl")), args.vocab, max_bytes=8 << 20).save_pretrained(tok_dir)
        result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "python": sys.version.split()[0]}
        if args.throughput_mb > 0:  # 0: peak RSS only
            result["throughput"] = throughput(root, str(tok_dir), args.throughput_mb, args.rounds)
            print(json.dumps(result["throughput"]), flush=True)
        result["rss"] = []
        for mb in [int(x) for x in args.rss_sizes.split(",") if x]:
            result["rss"].append(peak_rss(root, str(tok_dir), mb))
            print(json.dumps(result["rss"][-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
