"""The single-layer prune sweep against the naive sweep (issue 4's targets).

    python bench/bench_prune.py [--model tiny24,smollm2] [--samples N] [--seq-len T] [--batch-size B]
                                [--repeats 2] [--threads N] [--device auto]

naive:  L + 1 full forward passes per batch: the full model, then for each ℓ the model with layer
        ℓ taken out of its layer list; each pass's whole logits give CE, KL(full ‖ pruned) and top-1.
cached: layerprobe.prune_sweep(mode="layer"): one hooked pass stores each layer's input; removing
        ℓ restarts from the input of layer ℓ and runs layers ℓ+1..L−1, the final norm and the head,
        with CE / KL / top-1 over row chunks. Its own timer (summary["sweep_time_s"]) covers the
        passes and the measures, not loading the model or tokenizing.
Both alternate `--repeats` times in one process; the minimum of each is reported (background load
only ever adds time), by wall clock and by the process's CPU time (`--clock` picks the one the
table and the bound use). The losses of the two must agree to a relative 1e-5.

The bound prefix caching allows, per batch, with c_l one layer's cost and c_h the head's cost
(final norm + output head + the loss/KL/top-1 over the vocabulary), both measured here:
    naive  = (L + 1) · (L·c_l + c_h)
    cached ≥ L·c_l (the full pass)  +  Σ_ℓ (L − 1 − ℓ)·c_l  (each removal's tail)  +  (L + 1)·c_h
           = L(L + 1)/2 · c_l + (L + 1) · c_h
    bound  = cached / naive = (L/2 + r) / (L + r),  r = c_h / c_l
(the full pass needs no head of its own when the model computes only the last position's logits;
the full model's log-probabilities are one of the L + 1 head passes).
With --estimate, the time the sweep estimates after its first batch (planned layer calls x the first
batch's seconds per layer call) against its measured time, per mode, on tiny24.

With --scoring (issue 20) it measures instead the share of a layer sweep's time spent scoring (the
head, CE, KL and top-1 in `measurement.score`) on a random Llama with a large vocabulary (default
128,256, Llama 3's), and the host syncs per batch (reads of a tensor's value by the host: aten's
_local_scalar_dense and .tolist/.cpu/.item/.numpy calls), counted as what two more batches add.
Run it once on this code and once with PYTHONPATH at an older checkout for "before" (both versions
have the functions it wraps).

Two ways to hold the sweep against it are printed: cached/naive against (L/2 + r)/(L + r), which
assumes the naive pays the same c_h per pass, and the cached time over its own minimum
L(L+1)/2·c_l + (L+1)·c_h per batch, which does not depend on how costly the naive's head is.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layerprobe.anatomy import find_anatomy
from layerprobe.data import load_token_blocks
from layerprobe.loading import load_model
from layerprobe.memory import HostReadCounter
from layerprobe.pruning import PrefixRunner, prune_sweep, pruned
from layerprobe.pruning.measures import chunk_rows_for, next_token_targets, predicted_rows, score


def make_tiny24(folder: Path) -> Path:
    """A seeded random 24-layer Llama with a small vocabulary (512) and hidden size 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=24,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def naive_sweep(loaded, blocks, batch_size, layers_path=None):
    """Loss per removed layer from L + 1 whole forward passes per batch."""
    model = loaded.model
    L = find_anatomy(model, layers_path).num_layers
    ce = np.zeros(L + 1)
    kl = np.zeros(L + 1)
    top1 = np.zeros(L + 1)
    n = 0
    with torch.inference_mode():
        for batch in torch.split(blocks, batch_size):
            ids = batch.to(loaded.device)
            tgt = ids[:, 1:].reshape(-1)
            full = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            full = full.reshape(-1, full.shape[-1])
            logp_full = F.log_softmax(full, dim=-1)
            top_full = full.argmax(-1)
            ce[0] += float(F.cross_entropy(full, tgt, reduction="sum"))
            del full
            for l in range(L):
                with pruned(model, [l], layers_path):
                    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                logits = logits.reshape(-1, logits.shape[-1])
                ce[l + 1] += float(F.cross_entropy(logits, tgt, reduction="sum"))
                kl[l + 1] += float(F.kl_div(F.log_softmax(logits, -1), logp_full, log_target=True, reduction="sum"))
                top1[l + 1] += int((logits.argmax(-1) == top_full).sum())
                del logits
            n += tgt.numel()
    return ce / n, kl / n, top1 / n


def unit_costs(loaded, blocks, batch_size, clock, reps=3):
    """c_l (one layer on one batch) and c_h (final norm + head + measures for one candidate), seconds."""
    model = loaded.model
    runner = PrefixRunner(model, find_anatomy(model))
    L = runner.num_layers
    ids = blocks[:batch_size].to(loaded.device)
    vocab = runner.head.weight.shape[0]
    rows = chunk_rows_for(vocab)
    t_layers, t_head = [], []
    with torch.inference_mode():
        cap = runner.capture(ids)
        targets = next_token_targets(ids)
        y = predicted_rows(cap.output)
        for _ in range(reps):
            start = clock()
            runner.run(cap.inputs[0], 0, set(), cap.calls)
            t_layers.append((clock() - start) / L)
            full_rows = runner.final_hidden(y)
            start = clock()
            score(runner.logits, full_rows, [], targets, rows)
            t0 = clock() - start
            cands = [runner.final_hidden(y) for _ in range(4)]
            start = clock()
            score(runner.logits, full_rows, cands, targets, rows)
            t4 = clock() - start
            t_head.append(max((t4 - t0) / 4, t0))
    return min(t_layers), min(t_head)


def bench(name, loaded, blocks, args):
    L = find_anatomy(loaded.model).num_layers
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "ids.npy"
        np.save(npy, blocks.numpy())
        naive_t, cached_t = {"wall": [], "cpu": []}, {"wall": [], "cpu": []}
        for _ in range(args.repeats):
            w, c = time.perf_counter(), time.process_time()
            n_ce, n_kl, n_top1 = naive_sweep(loaded, blocks, args.batch_size)
            naive_t["wall"].append(time.perf_counter() - w)
            naive_t["cpu"].append(time.process_time() - c)
            w, c = time.perf_counter(), time.process_time()
            result = prune_sweep(loaded, mode="layer", data=str(npy), batch_size=args.batch_size, progress=False)
            cached_t["wall"].append(time.perf_counter() - w)
            cached_t["cpu"].append(time.process_time() - c)
    t = result.table
    losses = t["loss"].to_numpy()
    rel_loss = float(np.max(np.abs(losses - n_ce) / np.abs(n_ce)))
    rel_kl = float(np.max(np.abs(t["kl"].to_numpy()[1:] - n_kl[1:]) / np.abs(n_kl[1:])))
    top1_diff = float(np.max(np.abs(t["top1_agreement"].to_numpy()[1:] - n_top1[1:])))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    c_l, c_h = unit_costs(loaded, blocks, args.batch_size, clock)
    r = c_h / c_l
    bound = (L / 2 + r) / (L + r)
    naive_s, cached_s = min(naive_t[args.clock]), min(cached_t[args.clock])
    ratio = cached_s / naive_s
    batches = math.ceil(blocks.shape[0] / args.batch_size)
    # The least time the prefix-cached sweep can take with these unit costs.
    cached_min = batches * (L * (L + 1) / 2 * c_l + (L + 1) * c_h)
    naive_pass = naive_s / batches / (L + 1)  # one whole forward + measures, as the naive pays it
    return {
        "model": name, "L": L, "vocab": int(loaded.config.vocab_size), "tokens": int(blocks.numel()),
        "batches": batches, "clock": args.clock, "naive_s": naive_s, "cached_s": cached_s,
        "wall_ratio": min(cached_t["wall"]) / min(naive_t["wall"]), "cpu_ratio": min(cached_t["cpu"]) / min(naive_t["cpu"]),
        "ratio": ratio, "c_l_ms": c_l * 1e3, "c_h_ms": c_h * 1e3, "r": r, "bound": bound,
        "ratio_over_bound": ratio / bound, "cached_min_s": cached_min,
        "cached_over_min": cached_s / cached_min, "naive_c_h_ms": (naive_pass - L * c_l) * 1e3, "max_rel_loss_diff": rel_loss, "max_rel_kl_diff": rel_kl,
        "max_top1_diff": top1_diff, "naive_all": naive_t, "cached_all": cached_t,
    }


def scoring_share(args) -> dict:
    """A layer sweep on a random Llama of `--vocab`: seconds in `measurement.score` over the sweep's seconds,
    and host syncs per batch."""
    import layerprobe.pruning.measurement as measurement
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(512, args.seq_len), bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp / "model")
    loaded = load_model(str(tmp / "model"), dtype="float32", device=args.device)
    g = torch.Generator().manual_seed(0)
    samples = args.samples or 4 * (args.batch_size or 2)
    batch = args.batch_size or 2
    np.save(tmp / "ids.npy", torch.randint(3, args.vocab, (samples, args.seq_len), generator=g).numpy())
    real, spent = measurement.score, [0.0]
    cuda = loaded.device.type == "cuda"

    clock = time.perf_counter if cuda or args.clock == "wall" else time.process_time

    def timed(*a, **k):
        start = clock()
        out = real(*a, **k)
        if cuda:  # the share needs the kernels finished; this adds one sync per call (timing only)
            torch.cuda.synchronize()
        spent[0] += clock() - start
        return out

    def sweep(n):
        return prune_sweep(loaded, mode="layer", data=str(tmp / "ids.npy"), samples=n, batch_size=batch,
                           progress=False)

    sweep(batch)  # warm-up
    shares = []
    measurement.score = timed
    try:
        for _ in range(args.repeats):
            spent[0] = 0.0
            start = clock()
            sweep(samples)
            shares.append((spent[0], clock() - start))
    finally:
        measurement.score = real
    counts = []
    for n in (2 * batch, 4 * batch):
        with HostReadCounter() as counter:
            sweep(n)
        counts.append(counter.count)
    score_s, sweep_s = min(shares, key=lambda x: x[1])
    return {"vocab": args.vocab, "L": args.layers, "hidden": args.hidden, "tokens": samples * args.seq_len,
            "batches": math.ceil(samples / batch), "clock": "wall" if clock is time.perf_counter else "cpu",
            "sweep_s": sweep_s, "score_s": score_s,
            "share": score_s / sweep_s, "syncs_per_batch": (counts[1] - counts[0]) / 2}


def estimate_check(args) -> list[dict]:
    """The time printed after the first batch (`summary["estimated_time_s"]`) against the sweep's measured
    time, on the tiny24 model, per mode."""
    tmp = Path(tempfile.mkdtemp())
    loaded = load_model(str(make_tiny24(tmp / "tiny24")), dtype="float32", device=args.device)
    samples, batch = args.samples or 16, args.batch_size or 2
    g = torch.Generator().manual_seed(0)
    np.save(tmp / "ids.npy", torch.randint(3, 512, (samples, args.seq_len), generator=g).numpy())
    rows = []
    for mode, extra in (("layer", {}), ("block", {"block_size": "all"}), ("greedy", {"steps": 4})):
        result = prune_sweep(loaded, mode=mode, data=str(tmp / "ids.npy"), samples=samples, batch_size=batch,
                             progress=False, yes=True, **extra)
        s = result.summary
        rows.append({"mode": mode, "layer_calls": s["layer_calls"], "planned": s["planned_layer_calls"],
                     "estimated_s": s["estimated_time_s"], "measured_s": s["sweep_time_s"],
                     "ratio": s["estimated_time_s"] / s["sweep_time_s"]})
    return rows


def _runs(t):
    return ", ".join(f"{w:.1f}/{c:.1f}" for w, c in zip(t["wall"], t["cpu"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny24,smollm2")
    p.add_argument("--samples", type=int, default=None, help="default: 8 (tiny24), 2 (smollm2)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 (tiny24), 2 (smollm2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="which time the table and the bound use; 'cpu' (process time) with --threads 1 is "
                        "robust to other jobs on a shared machine (both are always printed)")
    p.add_argument("--scoring", action="store_true", help="the scoring share and host syncs per batch instead")
    p.add_argument("--estimate", action="store_true", help="the time estimated after the first batch against the "
                                                            "measured sweep time, per mode (tiny24)")
    p.add_argument("--vocab", type=int, default=128_256, help="--scoring: the vocabulary")
    p.add_argument("--layers", type=int, default=8, help="--scoring: decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="--scoring: hidden size")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.estimate:
        print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
              f"{torch.__version__}, tiny24, {args.samples or 16} samples x {args.seq_len}, batch {args.batch_size or 2}")
        print("| mode | layer calls (counted) | planned | estimated after batch 1 (s) | measured (s) | estimated / measured |")
        print("|---|---|---|---|---|---|")
        for r in estimate_check(args):
            print(f"| {r['mode']} | {r['layer_calls']:,} | {r['planned']:,} | {r['estimated_s']:.2f} | "
                  f"{r['measured_s']:.2f} | {r['ratio']:.2f} |")
        return
    if args.scoring:
        row = scoring_share(args)
        print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
              f"{torch.__version__}, cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
        print("| vocab | L | hidden | tokens | batches | clock | sweep (s) | scoring (s) | scoring share | host syncs per batch |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {row['vocab']:,} | {row['L']} | {row['hidden']} | {row['tokens']} | {row['batches']} | {row['clock']} | "
              f"{row['sweep_s']:.2f} | {row['score_s']:.2f} | {row['share']:.2f} | {row['syncs_per_batch']:g} |")
        return
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
    rows = []
    for name in args.model.split(","):
        samples = args.samples or (8 if name == "tiny24" else 2)
        a = argparse.Namespace(**vars(args))
        a.batch_size = args.batch_size or (4 if name == "tiny24" else 2)
        if name == "tiny24":
            tmp = Path(tempfile.mkdtemp())
            loaded = load_model(str(make_tiny24(tmp / "tiny24")), dtype="float32", device=args.device)
            g = torch.Generator().manual_seed(0)
            blocks = torch.randint(3, 512, (samples, args.seq_len), generator=g)
        else:
            loaded = load_model(name, dtype="float32", device=args.device)
            blocks = load_token_blocks("builtin", loaded.tokenizer, seq_len=args.seq_len, samples=samples, seed=0)
        row = bench(name, loaded, blocks, a)
        rows.append(row)
        print(f"{name} ({args.clock} time): L={row['L']} vocab={row['vocab']} tokens={row['tokens']} ({row['batches']} batches) "
              f"naive {row['naive_s']:.2f}s cached {row['cached_s']:.2f}s ratio {row['ratio']:.3f} | "
              f"c_l {row['c_l_ms']:.2f} ms c_h {row['c_h_ms']:.2f} ms r={row['r']:.2f} bound {row['bound']:.3f} "
              f"ratio/bound {row['ratio_over_bound']:.3f} | cached min {row['cached_min_s']:.2f}s "
              f"cached/min {row['cached_over_min']:.3f} naive c_h {row['naive_c_h_ms']:.1f} ms | max rel diff loss {row['max_rel_loss_diff']:.1e} "
              f"KL {row['max_rel_kl_diff']:.1e} top-1 {row['max_top1_diff']:.1e} | ratio by wall clock "
              f"{row['wall_ratio']:.3f}, by CPU time {row['cpu_ratio']:.3f} | runs (wall/cpu s) naive "
              f"{_runs(row['naive_all'])} cached {_runs(row['cached_all'])}", flush=True)
    print()
    print(f"({args.clock} time)")
    print("| model | L | vocab | tokens | naive (s) | cached (s) | cached/naive | r = c_h/c_l | bound (L/2+r)/(L+r) "
          "| ratio/bound | cached / its minimum | max rel. loss diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['L']} | {row['vocab']} | {row['tokens']} | {row['naive_s']:.2f} | "
              f"{row['cached_s']:.2f} | {row['ratio']:.3f} | {row['r']:.2f} | {row['bound']:.3f} | "
              f"{row['ratio_over_bound']:.3f} | {row['cached_over_min']:.3f} | {row['max_rel_loss_diff']:.1e} |")


if __name__ == "__main__":
    main()
