"""Predicted GPU memory of layerprobe's own code paths at full model size, on a CPU, allocating nothing.

    python bench/bench_memory.py [--models llama3-8b,gemma2-9b] [--batch-size 4] [--seq-len 2048]
                                 [--modes analyze,analyze-all,no-grad,no-grad-all,prune-layer,train]
                                 [--dtype bfloat16] [--json out.json]
    python bench/bench_memory.py --validate      # the tracker against real allocations (CPU, fp32)
    python bench/bench_memory.py --models llama3-70b --device-map balanced --gpus 8 --gpu-gib 80 \
                                 [--max-memory 0=60GiB,...] [--modes analyze,no-grad] [--target-gib 60]

Each model is built from its config (written below: no hub) under FakeTensorMode, and layerprobe's
own calls run on it inside `layerprobe.memory.StorageTracker`, which follows every storage an aten op
makes until it dies:
  analyze / analyze-all    `analysis._measure` with gradients, --tokens last / all, two batches
  no-grad / no-grad-all    the same without gradients
  prune-layer              `pruning.sweep._measure` in layer mode, one batch
  train                    one train-reference step of the reference model (71m / 130m presets at their
                           default batch 512 x 256 and default micro-batch), bf16 autocast, AdamW
Printed per run: the weights, the tracked peak over them, and the predicted CUDA peak
(weights + 1.1 x tracked + 0.7 GiB: allocator, kernel workspaces, context; see docs/design.md).
The model's device ("cpu") stands for the GPU; what layerprobe keeps in host memory on a GPU run (`--tokens
all`'s streams without gradients, capture.STREAM_HOST) is sent to the fake device HOST instead, tracked
apart and printed as "host" (see HOST below for why not the other way round).
Under inference_mode composite ops hide their internals from dispatch modes, so the no-grad runs are
tracked under no_grad (the same memory).

--device-map: the analyze modes per GPU of the map `analyze --device-map ...` would plan on a machine with
--gpus GPUs of --gpu-gib GiB free (layerprobe's own planner on the meta model), run on the fake model that
accelerate's dispatch_model splits along it; GPU k is the fake device cpu:k+1 (layerprobe/memory.py says
why). Maps that offload to cpu or disk are not predicted.

--validate runs analyze with gradients and without on a real fp32 Llama of ~150 MB in a subprocess with
malloc's mmap threshold fixed (so freed tensors leave the resident set) and compares the tracked peak
with the peak resident set over the loaded model (VmHWM, reset after loading).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import time

import torch

from layerprobe.memory import GIB, StorageTracker, cuda_estimate, fake_mode, weight_bytes

MODELS = {
    # name: (config class, kwargs) as in each model's config.json on the hub
    "llama3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                                      max_position_embeddings=8192, tie_word_embeddings=False)),
    "qwen2.5-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                                       max_position_embeddings=32768, tie_word_embeddings=False)),
    "mistral-7b": ("MistralConfig", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, rope_theta=1000000.0,
                                         sliding_window=None, max_position_embeddings=32768, tie_word_embeddings=False)),
    "gemma2-9b": ("Gemma2Config", dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                       query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                                       attn_logit_softcapping=50.0, max_position_embeddings=8192)),
    "llama2-13b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                                       tie_word_embeddings=False)),
    "llama3-70b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
                                       max_position_embeddings=8192, tie_word_embeddings=False)),
}
MODES = ("analyze", "analyze-all", "no-grad", "no-grad-all", "prune-layer")
# Where the faked runs put what a GPU run keeps on the host. The model stays on "cpu", standing for the GPU:
# FakeTensorMode on a CPU-only torch cannot run a model on fake "cuda" tensors (indexing and copy_ need the
# CUDA device guard), and a model on "meta" would take attention's math path (the [B, heads, T, T] scores),
# not the fused kernels of the CPU and the GPU. So the host copies go to "meta": the same code path as a
# GPU run's (capture._to_host: a device copy, then a copy to the host), on a device the tracker tells apart.
HOST = "meta"
TRAIN_PRESETS = ("71m", "130m")


def build(name: str, dtype: torch.dtype):
    """The CausalLM for `name` at full size, under the current fake mode, in `dtype`."""
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return model_cls(config).eval()
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def no_inference_mode():
    """inference_mode -> no_grad while tracking: composite ops then show their internals."""
    saved = torch.inference_mode
    torch.inference_mode = lambda *a, **k: torch.no_grad()
    try:
        yield
    finally:
        torch.inference_mode = saved


@contextlib.contextmanager
def streams_to_host():
    """`--tokens all`'s streams without a backward sent to HOST (a device the tracker counts apart from the
    GPU's) while the block runs, as a GPU run sends them to host memory; a no-op on code from before the
    host copies (it has no such setting)."""
    from layerprobe import capture

    if not hasattr(capture, "STREAM_HOST"):
        yield
        return
    saved, capture.STREAM_HOST = capture.STREAM_HOST, HOST
    try:
        yield
    finally:
        capture.STREAM_HOST = saved


def tracked(run, model, inputs=(), scalar: float = 0) -> dict:
    tracker = StorageTracker(fake_scalars=True, scalar=scalar)
    tracker.register_module(model)
    tracker.register(inputs)
    started = time.perf_counter()
    with streams_to_host(), no_inference_mode(), tracker:
        run()
    weights = sum(weight_bytes(model).values())
    peak = max((v for d, v in tracker.peak.items() if d != HOST), default=0)  # the GPU's: the host's apart
    return {"weights_gib": weights / GIB, "tracked_gib": peak / GIB, "cuda_gib": cuda_estimate(weights, peak) / GIB,
            "host_gib": tracker.peak.get(HOST, 0) / GIB, "seconds": round(time.perf_counter() - started, 1)}


def opening_for(model, blocks):
    from layerprobe.anatomy import find_anatomy

    anatomy = find_anatomy(model)
    loaded = type("Loaded", (), {"dtype": next(model.parameters()).dtype})()
    vocab = model.get_output_embeddings().weight.shape[0]
    return type("Opening", (), {"model": model, "anatomy": anatomy, "blocks": blocks, "loaded": loaded,
                                "vocab_size": vocab, "seed": 0})()


def run_mode(model, mode: str, batch: int, seq_len: int) -> dict:
    from layerprobe import analysis

    if mode == "prune-layer":
        from layerprobe.pruning.candidates import build_candidates
        from layerprobe.pruning.measures import chunk_rows_for
        from layerprobe.pruning.options import SweepOptions
        from layerprobe.pruning.sweep import _measure as sweep_measure

        blocks = torch.zeros(batch, seq_len, dtype=torch.long)
        opening = opening_for(model, blocks)
        opts = SweepOptions.parse(mode="layer", block_size=None, steps=None, by=None, remove=None, batch_size=batch,
                                  lm_eval_tasks=None)
        opts.for_depth(opening.anatomy.num_layers)
        from layerprobe.pruning.plan import Plan

        L = opening.anatomy.num_layers
        candidates = build_candidates(opts, L, {})
        plan = Plan.for_options(opts, L, batch, batch, candidates=candidates)
        return tracked(lambda: sweep_measure(opening, opts, candidates, batch_size=batch,
                                             chunk_rows=chunk_rows_for(opening.vocab_size), plan=plan,
                                             say=lambda line: None, progress=False),
                       model, [blocks])
    grad = mode.startswith("analyze")
    tokens = "all" if mode.endswith("-all") else "last"
    blocks = torch.zeros(2 * batch, seq_len, dtype=torch.long)  # two batches: what one holds for the next counts
    opening = opening_for(model, blocks)
    # On a GPU analyze checkpoints every layer (checkpoint_layers defaults to "not on the CPU"); the
    # fake model sits on the CPU device, so ask for it. Code from before the option has no checkpointing.
    extra = {"checkpoint_layers": True} if "checkpoint_layers" in inspect.signature(analysis._measure).parameters else {}
    return tracked(lambda: analysis._measure(opening, batch_size=batch, tokens=tokens, grad=grad, progress=False,
                                             **extra), model, [blocks])


def predict_peak_bytes(config, *, batch: int, seq_len: int, mode: str, dtype: str) -> int:
    """What bench_gpu.py compares with torch.cuda.max_memory_allocated: the allocator's peak during `mode`
    ("analyze" with gradients, or "prune-layer") on a model of `config` already loaded in `dtype`, weights
    included, no CUDA context: the weights plus CUDA_FACTOR x what the tracked run added."""
    import transformers

    from layerprobe.memory import CUDA_FACTOR

    with fake_mode():
        before = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
        finally:
            torch.set_default_dtype(before)
        result = run_mode(model, mode, batch, seq_len)
    weights = result["weights_gib"] * GIB
    return int(weights + CUDA_FACTOR * result["tracked_gib"] * GIB)


# --- A device map over N GPUs of M GiB ------------------------------------------------------------------

def emulated_free_memory(gpus: int, gpu_gib: float, host_gib: float):
    """What accelerate's get_max_memory() reads on a machine with `gpus` GPUs of `gpu_gib` GiB free and
    `host_gib` GiB of host memory available: the planner's budget when --max-memory is not given."""
    def read(max_memory=None):
        from accelerate.utils import get_max_memory

        if max_memory is not None:
            return get_max_memory(max_memory)
        return {**{i: int(gpu_gib * GIB) for i in range(gpus)}, "cpu": int(host_gib * GIB)}
    return read


def plan_map(name: str, dtype: torch.dtype, device_map: str, gpus: int, gpu_gib: float, host_gib: float,
             max_memory: str | None = None) -> dict:
    """Module -> device as `layerprobe analyze --device-map DEVICE_MAP [--max-memory ...]` plans it on a
    machine with `gpus` GPUs of `gpu_gib` GiB: layerprobe's own planner (loading.plan_device_map,
    transformers' _get_device_map: get_balanced_memory, infer_auto_device_map, no_split modules) on the
    model built from its config on the meta device."""
    import transformers
    import transformers.integrations.accelerate as hf_accelerate

    from layerprobe.defaults import check_placement_options
    from layerprobe.loading import plan_device_map

    memory = check_placement_options(device_map, max_memory)
    cls_name, kwargs = MODELS[name]
    with torch.device("meta"), contextlib.redirect_stderr(open(os.devnull, "w")):
        meta = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs), dtype=dtype)
    saved = hf_accelerate.accelerate_max_memory
    hf_accelerate.accelerate_max_memory = emulated_free_memory(gpus, gpu_gib, host_gib)
    try:
        return plan_device_map(meta, device_map, memory)
    finally:
        hf_accelerate.accelerate_max_memory = saved


def run_map_mode(name: str, dtype: torch.dtype, plan: dict, mode: str, batch: int, seq_len: int) -> dict:
    """analyze (`mode`: analyze, analyze-all, no-grad, no-grad-all) on the full-size fake model dispatched
    along `plan` (memory.dispatch_fake: GPU k is the fake device cpu:k+1), tracked per device."""
    from layerprobe import analysis
    from layerprobe.memory import dispatch_fake, track_devices

    grad = mode.startswith("analyze")
    tokens = "all" if mode.endswith("-all") else "last"
    with fake_mode():
        model = dispatch_fake(build(name, dtype), plan)
        blocks = torch.zeros(2 * batch, seq_len, dtype=torch.long)  # on the host, as analyze's data is
        opening = opening_for(model, blocks)
        started = time.perf_counter()
        # On a GPU, analyze checkpoints every layer by default (its input device is not the CPU); the fake
        # GPUs are CPU devices, so ask for it.
        # `--tokens all`'s streams go to the host as on a GPU (the fake GPUs are CPU devices, which keep them).
        with streams_to_host(), no_inference_mode():
            pred = track_devices(lambda: analysis._measure(opening, batch_size=batch, tokens=tokens, grad=grad,
                                                           progress=False, checkpoint_layers=True),
                                 model, [blocks])
    devices = sorted(set(pred.weights) | set(pred.tracked), key=_device_order)
    return {"mode": mode, "seconds": round(time.perf_counter() - started, 1),
            "devices": {d: {"weights_gib": pred.weights.get(d, 0) / GIB, "tracked_gib": pred.tracked.get(d, 0) / GIB,
                            "cuda_gib": pred.cuda(d) / GIB} for d in devices}}


def _device_order(label: str):
    return (0, int(label.split()[1])) if label.startswith("GPU ") else (1, label)


def device_map_table(name: str, dtype: torch.dtype, args) -> list[dict]:
    plan = plan_map(name, dtype, args.device_map, args.gpus, args.gpu_gib, args.host_gib, args.max_memory)
    placed = {}
    for module, where in plan.items():
        placed.setdefault(where, []).append(module)
    print(f"{name}: --device-map {args.device_map}"
          + (f" --max-memory {args.max_memory}" if args.max_memory else "")
          + f" over {args.gpus} GPUs of {args.gpu_gib:g} GiB:")
    for where, modules in placed.items():
        print(f"  {where if not isinstance(where, int) else 'GPU %d' % where}: {_span(modules)}")
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES[:4]:
            print(f"  {mode}: not predicted on a device map (analyze modes only)")
            continue
        r = run_map_mode(name, dtype, plan, mode, args.batch_size, args.seq_len)
        r.update(model=name, device_map=args.device_map, gpus=args.gpus, gpu_gib=args.gpu_gib)
        results.append(r)
        print(f"  {mode} ({r['seconds']} s): device, weights, tracked peak over them, predicted CUDA peak (GiB)")
        for device, d in r["devices"].items():
            if not device.startswith("GPU "):  # the host holds the token ids only
                continue
            over = "  > target" if args.target_gib and d["cuda_gib"] > args.target_gib else ""
            print(f"    {device:6s} {d['weights_gib']:6.1f} {d['tracked_gib']:6.1f} {d['cuda_gib']:6.1f}{over}",
                  flush=True)
    return results


def _span(modules: list[str]) -> str:
    """'model.layers.0', ..., 'model.layers.9' -> 'model.layers.0-9' (the rest as they are)."""
    out, run = [], []
    for m in modules + [None]:
        head, _, tail = (m or "").rpartition(".")
        if m is not None and tail.isdigit() and run and run[-1][0] == head and int(tail) == run[-1][1] + 1:
            run.append((head, int(tail)))
            continue
        if run:
            out.append(f"{run[0][0]}.{run[0][1]}" + (f"-{run[-1][1]}" if len(run) > 1 else ""))
            run = []
        if m is not None:
            (run.append((head, int(tail))) if tail.isdigit() else out.append(m))
    return ", ".join(out)


def run_train(preset: str) -> dict:
    """One optimizer step of train-reference at the preset's defaults on one GPU: the trainer's own
    micro-batch loop (model(ids, labels=ids).loss under bf16 autocast, backward), then AdamW."""
    from layerprobe.reference.presets import get_preset, reference_config
    from layerprobe.training import settings as training_settings
    from layerprobe.training.model import autocast

    p = get_preset(preset)
    per_rank = p.batch_size
    choose = getattr(training_settings, "default_micro_batch", None)
    micro = choose(per_rank, p.seq_len) if choose else per_rank  # before: the whole per-rank batch
    from layerprobe.reference import LayerprobeForCausalLM

    model = LayerprobeForCausalLM(reference_config(p))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = torch.zeros(per_rank, p.seq_len, dtype=torch.long)

    def step():
        for m in range(per_rank // micro):
            ids = rows[m * micro:(m + 1) * micro]
            with autocast(torch.bfloat16, torch.device("cpu")):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / (per_rank // micro)).backward()
        opt.step()

    out = tracked(step, model, [rows], scalar=1)  # Adam divides by 1 - beta^step
    out["micro_batch"] = micro
    return out


def validate() -> int:
    """The tracker against real allocations: one subprocess per run (see the module docstring)."""
    print("tracker vs real allocations: fp32 Llama, 4 layers, hidden 512, vocab 32000, 2 batches of 2 x 1024 "
          "tokens, CPU")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for grad in (True, False):
        out = subprocess.run([sys.executable, __file__, "--validate-one", "grad" if grad else "nograd"],
                             env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {'with gradients' if grad else 'no gradients  '}: tracked {r['tracked_mib']:.0f} MiB, "
              f"measured {r['measured_mib']:.0f} MiB (peak RSS over the loaded model), "
              f"tracked/measured {r['tracked_mib'] / r['measured_mib']:.3f}")
    return 0


# (vocabulary, hidden, layers, batch, tokens): --validate's model, and the test's smaller one
VALIDATION_SIZES = {"full": (32000, 512, 4, 2, 1024), "small": (16000, 256, 2, 2, 512)}


def validation_model(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def validate_one(which: str, size: str = "full") -> None:
    from layerprobe import analysis

    torch.set_num_threads(1)
    grad = which == "grad"
    vocab, hidden, layers, batch, seq = VALIDATION_SIZES[size]
    blocks = torch.randint(0, vocab, (2 * batch, seq))
    model = validation_model(vocab, hidden, layers)
    opening = opening_for(model, blocks)
    # Warm-up on a few tokens: first-use imports and allocator set-up are not the pass's memory.
    analysis._measure(opening_for(model, blocks[:2, :16]), batch_size=1, tokens="last", grad=grad, progress=False)
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _rss_kib("VmRSS")
    tracker = StorageTracker()
    tracker.register_module(model)
    tracker.register([blocks])
    with no_inference_mode(), tracker:
        analysis._measure(opening, batch_size=batch, tokens="last", grad=grad, progress=False, checkpoint_layers=True)
    measured = (_rss_kib("VmHWM") - base) / 1024
    print(json.dumps({"tracked_mib": max(tracker.peak.values()) / (1 << 20), "measured_mib": measured}))


def _rss_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=",".join(MODES + ("train",)))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device-map", default=None, help="auto, balanced, balanced_low_0 or sequential: predict "
                    "per GPU for this device map over --gpus GPUs of --gpu-gib GiB (analyze modes only)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--host-gib", type=float, default=1024.0)
    ap.add_argument("--max-memory", default=None, help="as layerprobe's --max-memory, e.g. 0=60GiB,1=60GiB,cpu=500GiB")
    ap.add_argument("--target-gib", type=float, default=None, help="mark GPUs whose predicted peak exceeds it")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--validate-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--validate-size", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.validate_one:
        validate_one(args.validate_one, args.validate_size)
        return 0
    if args.validate:
        return validate()
    modes = args.modes.split(",")
    dtype = getattr(torch, args.dtype)
    if args.device_map:
        print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}")
        results = [r for name in args.models.split(",") for r in device_map_table(name, dtype, args)]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    results = []
    print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}; GiB: weights, tracked peak over them, "
          f"predicted CUDA peak")
    for name in args.models.split(","):
        with fake_mode():
            model = build(name, dtype)
            attn = model.config._attn_implementation
            for mode in (m for m in modes if m in MODES):
                r = run_mode(model, mode, args.batch_size, args.seq_len)
                r.update(model=name, mode=mode, attention=attn)
                results.append(r)
                print(f"{name:12s} {mode:12s} weights {r['weights_gib']:6.1f}  tracked {r['tracked_gib']:6.1f}  "
                      f"CUDA {r['cuda_gib']:6.1f}  host {r['host_gib']:5.1f}   ({attn} attention, {r['seconds']} s)",
                      flush=True)
    if "train" in modes:
        for preset in TRAIN_PRESETS:
            with fake_mode():
                r = run_train(preset)
            r.update(model=f"reference-{preset}", mode="train")
            results.append(r)
            print(f"{'ref ' + preset:12s} {'train':12s} weights {r['weights_gib']:6.1f}  tracked {r['tracked_gib']:6.1f}  "
                  f"CUDA {r['cuda_gib']:6.1f}   (micro-batch {r['micro_batch']} x 256, {r['seconds']} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
