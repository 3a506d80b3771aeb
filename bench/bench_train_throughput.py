"""Training throughput of the layerprobe reference model (Pre-LN) against transformers' LlamaForCausalLM.

Same sizes, same batch, same optimizer step (forward + backward + AdamW), fp32 on the CPU. The two
models are timed in alternation, round after round (who goes first alternates too); the ratio reported
is the median over rounds of llama's time / ours in that round, so that load from other processes on a
shared machine, which drifts over minutes, hits both alike.

    python bench/bench_train_throughput.py                      # tiny and 71m on the CPU
    python bench/bench_train_throughput.py --presets tiny --rounds 7 --json bench/results.json

On a CUDA GPU it also reports model FLOPs utilisation (MFU) of the reference model in bf16 autocast
with torch.compile for the 71m and 130m presets: 6·N·tokens/s plus attention FLOPs, over the GPU's
peak dense bf16 FLOP/s (--peak-tflops, default 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from layerprobe.reference import LayerprobeForCausalLM, get_preset, reference_config

# CPU batches: the presets' global batches of 512 sequences do not fit a CPU timing budget.
CPU_SHAPES = {"micro": (8, 32), "tiny": (16, 128), "71m": (4, 256), "130m": (2, 256), "250m": (2, 256)}


def llama_twin(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                     rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False, use_cache=False,
                     rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    lc._attn_implementation = "sdpa"
    return LlamaForCausalLM(lc)


def make_step(model, ids, autocast_dtype=None, compiled=False):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if compiled else model
    ctx = (lambda: torch.autocast(ids.device.type, dtype=autocast_dtype)) if autocast_dtype else None

    def step():
        if ctx is None:
            loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            with ctx():
                loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ids.is_cuda:
            torch.cuda.synchronize()

    return step


def time_steps(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def bench_cpu(preset: str, rounds: int, steps_per_round: int, warmup: int, batch: int | None, seq: int | None) -> dict:
    b, s = CPU_SHAPES.get(preset, (2, 256))
    b, s = batch or b, seq or s
    cfg = reference_config(preset, "pre", max_position_embeddings=s)
    torch.manual_seed(0)
    ours = LayerprobeForCausalLM(cfg)
    llama = llama_twin(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in llama.parameters())
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    steps = {"layerprobe": make_step(ours, ids), "llama": make_step(llama, ids)}
    for step in steps.values():
        time_steps(step, warmup)
    per_round = {k: [] for k in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # alternate who goes first
        for name in order:
            per_round[name].append(time_steps(steps[name], steps_per_round))
    tokens = b * s
    tps = {k: tokens / statistics.median(v) for k, v in per_round.items()}
    paired = [ll / lp for lp, ll in zip(per_round["layerprobe"], per_round["llama"])]
    return {"preset": preset, "batch": b, "seq_len": s, "params": sum(p.numel() for p in ours.parameters()),
            "layerprobe_tok_s": tps["layerprobe"], "llama_tok_s": tps["llama"],
            "ratio": statistics.median(paired), "ratio_min": min(paired), "ratio_max": max(paired),
            "rounds_s_per_step": {k: [round(x, 4) for x in v] for k, v in per_round.items()}}


def bench_gpu_mfu(preset: str, peak_tflops: float, steps: int, batch: int, compiled: bool) -> dict:
    p = get_preset(preset)
    cfg = reference_config(preset, "pre")
    model = LayerprobeForCausalLM(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (batch, p.seq_len), device="cuda")
    step = make_step(model, ids, autocast_dtype=torch.bfloat16, compiled=compiled)
    time_steps(step, 5)  # compile and warm up
    dt = time_steps(step, steps)
    n_params = sum(q.numel() for q in model.parameters()) - model.model.embed_tokens.weight.numel()
    tokens = batch * p.seq_len
    # Training FLOPs per token: 6N for the matmuls (+ head) and 12·L·d·T for attention scores and values.
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * p.seq_len
    achieved = flops_per_token * tokens / dt
    return {"preset": preset, "batch": batch, "seq_len": p.seq_len, "tok_s": tokens / dt,
            "tflops": achieved / 1e12, "mfu": achieved / (peak_tflops * 1e12), "compiled": compiled,
            "gpu": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,71m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="override the CPU batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gpu-presets", default="71m,130m")
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print(f"# CPU fp32, forward+backward+AdamW, {info}")
    print(f"{'preset':>6} {'params':>10} {'batch x seq':>12} {'layerprobe tok/s':>17} {'llama tok/s':>12} "
          f"{'ratio':>6} {'(min-max over rounds)':>22}")
    results = {"info": info, "cpu": [], "gpu": []}
    for preset in args.presets.split(","):
        r = bench_cpu(preset.strip(), args.rounds, args.steps_per_round, args.warmup, args.batch, args.seq_len)
        results["cpu"].append(r)
        print(f"{r['preset']:>6} {r['params']:>10,} {r['batch']:>5} x {r['seq_len']:<5} "
              f"{r['layerprobe_tok_s']:>17,.0f} {r['llama_tok_s']:>12,.0f} {r['ratio']:>6.2f} "
              f"{r['ratio_min']:>14.2f}-{r['ratio_max']:.2f}", flush=True)
    if torch.cuda.is_available():
        print(f"# GPU bf16 autocast, compile={not args.no_compile}, peak {args.peak_tflops} TFLOP/s")
        for preset in args.gpu_presets.split(","):
            r = bench_gpu_mfu(preset.strip(), args.peak_tflops, 20, args.gpu_batch, not args.no_compile)
            results["gpu"].append(r)
            print(f"{r['preset']:>6} {r['tok_s']:>12,.0f} tok/s {r['tflops']:>7.1f} TFLOP/s MFU {r['mfu']:.1%}")
    else:
        print("# no CUDA GPU: MFU not measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
