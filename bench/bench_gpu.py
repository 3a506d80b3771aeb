"""Every GPU path of layerprobe, proven and timed in one command (issue 13).

    python bench/bench_gpu.py --out bench/gpu.md              # on a GPU machine (no network needed)
    python bench/bench_gpu.py --dry-run --out /tmp/gpu.md     # tiny sizes on the CPU (the test runs this)

On the device it finds (cuda if there is one, else the CPU), it runs and records:
1. correctness: analyze on the device in fp32 and bf16 against the CPU in fp32; prune-sweep (layer mode)
   cached against naive on the device; a training run SIGKILLed and resumed against an uninterrupted one.
2. speed: analyze / bare forward+backward and --no-grad / bare forward in bf16, with peak GPU memory;
   the prune sweep against naive and against its caching bound (bench_prune.py); train-reference tokens/s
   and MFU for the 71m and 130m presets in bf16, eager and with --compile, against transformers'
   LlamaForCausalLM of the same size.
3. scale paths: torchrun --nproc-per-node 1 (DDP and --fsdp; NCCL on a GPU, gloo on the CPU) against the
   plain run; --device-map auto against a plain load; a map that offloads the last layers, final norm and
   head to the CPU against a plain load (analyze --no-grad --tokens all, prune-sweep layer mode), and
   analyze with gradients on it refused.
and prints one Markdown table (also written to --out) to paste into BENCHMARKS.md.

layerprobe is driven only through its stable entry points: layerprobe.analyze / prune_sweep / load_model
and the `python -m layerprobe train-reference` CLI (subprocesses, so a kill is a real SIGKILL). The models
are built here from configs with seeded random weights (a SmolLM2-135M-shaped Llama): a GPU box without
network has no hub, and speed does not depend on the weights.

Tolerances (the error is measured as max |x - ref| / max |ref| over the layers of each quantity, so that a
near-zero entry does not turn rounding into a large relative error):
- bf16 vs CPU fp32: 3e-2. bf16 keeps 8 bits of mantissa (~2-3 significant digits, 2^-8 = 3.9e-3 per
  rounding) and the error grows through 30 residual layers and the backward pass.
- fp32 on the GPU vs CPU fp32: 1e-4, with TF32 switched off for this check (TF32 matmuls keep 10 bits of
  mantissa and would make it a bf16-like check). What remains is the order of floating-point reductions
  (cuBLAS split-K, attention kernels), a few ulps per op, grown through the layers.
- cached vs naive prune sweep, torchrun world size 1 vs plain, --device-map auto (and offloaded) vs plain: 1e-5 relative
  (the same kernels on the same device; only batch shapes and reduction order may differ).
- training resumed after a kill: bit-identical losses and gradient norms, nothing less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benches: their timing helpers are reused, not copied

from bench_analyze import run_mode as analyze_run_mode  # noqa: E402
from bench_prune import bench as prune_bench  # noqa: E402
from bench_train_throughput import llama_twin, make_step, time_steps  # noqa: E402

import layerprobe  # noqa: E402

TOL_BF16 = 3e-2
TOL_FP32_DEVICE = 1e-4
TOL_SAME_DEVICE = 1e-5
ANALYZE_TARGET = 1.10
MFU_TARGET = 0.40

# Peak dense bf16 tensor FLOP/s (no sparsity), TFLOP/s, from the vendors' datasheets; matched in this
# order against torch.cuda.get_device_name() (so "H100 PCIe" before "H100"). --peak-tflops overrides.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),   # SXM (and NVL per GPU); the H100 the MFU target is stated for
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)

# A SmolLM2-135M-shaped Llama (its config; random weights) and a tiny one for --dry-run.
FULL_MODEL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                  rms_norm_eps=1e-5)
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=256,
                  rms_norm_eps=1e-5)


@dataclass
class Sizes:
    model: dict
    samples: int        # token blocks timed by the speed section
    check_samples: int  # token blocks of the correctness checks (the CPU fp32 reference runs on them)
    seq_len: int
    batch_size: int
    repeats: int        # alternating rounds of each timing
    train_presets: list  # presets timed for tokens/s and MFU
    train_batch: int
    train_steps: int
    resume_preset: str
    resume_steps: int   # enough that the kill (polled every 5 ms) lands mid-run at GPU speed


FULL = Sizes(FULL_MODEL, samples=32, check_samples=8, seq_len=512, batch_size=8, repeats=5, train_presets=["71m", "130m"],
             train_batch=64, train_steps=30, resume_preset="micro", resume_steps=200)
DRY = Sizes(TINY_MODEL, samples=4, check_samples=4, seq_len=32, batch_size=2, repeats=2, train_presets=["micro"],
            train_batch=8, train_steps=6, resume_preset="micro", resume_steps=30)


# ---- the table --------------------------------------------------------------------------------------------

@dataclass
class Row:
    section: str
    check: str
    result: str
    target: str
    status: str  # pass | FAIL | measured | skipped: why


ROWS: list[Row] = []


def record(section, check, result, target="", status="measured"):
    row = Row(section, check, result, target, status)
    ROWS.append(row)
    print(f"[{section}] {check}: {result} ({target}) -> {status}", file=sys.stderr, flush=True)
    return row


def markdown(rows, header_lines):
    lines = [*header_lines, "", "| section | check | result | target / tolerance | status |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.check} | {r.result} | {r.target} | {r.status} |" for r in rows]
    return "\n".join(lines) + "\n"


def machine_lines(device, args):
    import transformers

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    cuda = torch.version.cuda or "none"
    cmd = "python bench/bench_gpu.py " + " ".join(sys.argv[1:])
    return [f"`{cmd.strip()}` · {'dry run (tiny sizes)' if args.dry_run else 'full sizes'} · device {device}",
            f"machine: {platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
            f"GPU: {gpu} · torch {torch.__version__} · CUDA {cuda} · cuDNN {torch.backends.cudnn.version()} · "
            f"transformers {transformers.__version__} · python {platform.python_version()}"]


# ---- comparisons ------------------------------------------------------------------------------------------

def scaled_error(got, ref) -> float:
    """max |got - ref| / max |ref|: the error relative to the quantity's own scale (NaN-aware: a NaN on
    one side only is an infinite error)."""
    got, ref = np.asarray(got, dtype=np.float64).ravel(), np.asarray(ref, dtype=np.float64).ravel()
    if got.shape != ref.shape:
        return float("inf")
    both_nan = np.isnan(got) & np.isnan(ref)
    if (np.isnan(got) ^ np.isnan(ref)).any():
        return float("inf")
    got, ref = got[~both_nan], ref[~both_nan]
    if ref.size == 0:
        return 0.0
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(got - ref))) / (scale if scale > 0 else 1.0)


def analysis_quantities(result) -> dict:
    """The numbers of an AnalysisResult the GPU must reproduce, by name."""
    layers = result.layers
    out = {"angular distance": result.angular.sort_values(["layer", "n"])["angular_distance"].to_numpy(),
           "Block Influence": layers["block_influence"].to_numpy(),
           "output variance": layers["output_variance"].to_numpy(),
           "loss": np.array([result.summary["loss"]])}
    if "grad_norm" in layers and not layers["grad_norm"].isna().all():
        out["gradient norms"] = np.concatenate([layers["grad_norm"].to_numpy(),
                                                result.sublayers.sort_values(["layer", "module"])["grad_norm"].to_numpy()])
    return out


def compare_analyses(got, ref, tol) -> tuple[bool, dict]:
    """(all within tol, {quantity: scaled error}) for two AnalysisResults of the same model and tokens."""
    a, b = analysis_quantities(got), analysis_quantities(ref)
    errors = {k: scaled_error(a.get(k, np.array([np.nan])), b[k]) for k in b}
    return all(e <= tol for e in errors.values()), errors


def compare_series(got, ref, tol) -> tuple[bool, float]:
    """Two equal-length series within a relative tol (exact when tol == 0)."""
    if len(got) != len(ref):
        return False, float("inf")
    err = scaled_error(got, ref)
    return (err == 0.0 if tol == 0 else err <= tol), err


def _errors_text(errors):
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


def _status(ok):
    return "pass" if ok else "FAIL"


# ---- the model and the tokens -----------------------------------------------------------------------------

def build_model(folder: Path, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)  # fp32, seeded
    return folder


def write_tokens(path: Path, rows: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    g = np.random.default_rng(seed)
    np.save(path, g.integers(3, vocab, size=(rows, seq_len), dtype=np.int64))
    return path


def set_tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


# ---- 1. correctness ---------------------------------------------------------------------------------------

def check_analyze(folder, npy, device, sz):
    kw = dict(data=str(npy), batch_size=sz.batch_size, progress=False)
    ref = layerprobe.analyze(str(folder), dtype="float32", device="cpu", **kw)
    set_tf32(False)
    fp32 = layerprobe.analyze(str(folder), dtype="float32", device=device.type, **kw)
    ok, err = compare_analyses(fp32, ref, TOL_FP32_DEVICE)
    record("correctness", f"analyze fp32 on {device.type} (TF32 off) vs CPU fp32", _errors_text(err),
           f"≤ {TOL_FP32_DEVICE:g} of scale", _status(ok))
    bf16 = layerprobe.analyze(str(folder), dtype="bfloat16", device=device.type, **kw)
    ok, err = compare_analyses(bf16, ref, TOL_BF16)
    record("correctness", f"analyze bf16 on {device.type} vs CPU fp32", _errors_text(err),
           f"≤ {TOL_BF16:g} of scale", _status(ok))
    return ref


def check_prune(folder, npy, device, sz, dtype):
    """Cached vs naive (correctness) and their times against the caching bound (speed), via bench_prune."""
    set_tf32(False)
    loaded = layerprobe.load_model(str(folder), dtype=dtype, device=device.type, load_tokenizer=False)
    blocks = torch.from_numpy(np.load(npy))
    r = prune_bench(f"{dtype}", loaded, blocks, argparse.Namespace(repeats=sz.repeats, batch_size=sz.batch_size,
                                                                   clock="wall"))
    tol = TOL_SAME_DEVICE if dtype == "float32" else TOL_BF16
    ok = max(r["max_rel_loss_diff"], r["max_rel_kl_diff"]) <= tol
    record("correctness", f"prune-sweep layer mode, cached vs naive ({dtype}, {device.type})",
           f"loss {r['max_rel_loss_diff']:.1e}, KL {r['max_rel_kl_diff']:.1e}, top-1 {r['max_top1_diff']:.1e}",
           f"≤ {tol:g} relative", _status(ok))
    return r


def _train_cmd(preset, steps, out, npy, device, extra=(), batch=None):
    cmd = ["train-reference", "--preset", preset, "--norm", "pre", "--steps", str(steps), "--data", str(npy),
           "--out", str(out), "--device", device.type, "--quiet", "--eval-every", str(10 * steps), *extra]
    if batch:
        cmd += ["--batch-size", str(batch), "--micro-batch-size", str(batch)]
    return cmd


# Runs the CLI (python -m layerprobe) after optional deterministic settings, so a GPU run can be repeated
# with torch.use_deterministic_algorithms without a flag in the CLI.
CLI_DRIVER = ("import os, runpy, sys, torch\n"
              "if os.environ.get('BENCH_DETERMINISTIC') == '1':\n"
              "    torch.use_deterministic_algorithms(True)\n"
              "sys.argv = ['layerprobe', *sys.argv[1:]]\n"
              "runpy.run_module('layerprobe', run_name='__main__', alter_sys=True)\n")


def run_cli(args, env_extra=None, timeout=3600):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", CLI_DRIVER, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def run_cli_and_kill(args, metrics: Path, after_lines: int, env_extra=None, timeout=3600):
    """Start the CLI and SIGKILL it (no cleanup: a crash) once `metrics` has `after_lines` lines."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-c", CLI_DRIVER, *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_lines:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    return proc.returncode


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the kill
            pass
    return out


def _loss_series(records):
    return [(r["step"], r["loss"], r.get("grad_norm")) for r in records if "loss" in r]


def check_resume(work, npy, device, sz):
    """One run SIGKILLed after ~40% of its steps and resumed, against one run straight through: the losses
    and gradient norms must be bit-identical. On CUDA, if they are not, repeat with deterministic algorithms
    and say what that cost."""
    steps = sz.resume_steps
    extra = ["--save-every", str(steps // 4)]
    settings = [("default", {})]
    if device.type == "cuda":
        settings.append(("torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG=:4096:8",
                         {"BENCH_DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}))
    seconds = {}
    for name, env in settings:
        whole, cut = work / f"whole-{len(seconds)}", work / f"cut-{len(seconds)}"
        t = time.perf_counter()
        proc = run_cli(_train_cmd(sz.resume_preset, steps, whole, npy, device, extra), env)
        seconds[name] = time.perf_counter() - t
        if proc.returncode != 0:
            record("correctness", "training resumed after SIGKILL", f"uninterrupted run failed: {_last_line(proc.stderr)}",
                   "bit-identical losses", "FAIL")
            return None
        rc = run_cli_and_kill(_train_cmd(sz.resume_preset, steps, cut, npy, device, extra), cut / "pre" / "metrics.jsonl",
                              after_lines=int(steps * 0.4) + 1, env_extra=env)
        killed_at = len(read_metrics(cut / "pre"))
        if rc != -signal.SIGKILL or killed_at >= steps:
            record("correctness", "training resumed after SIGKILL", f"the run was not killed mid-way (exit {rc})",
                   "bit-identical losses", "FAIL")
            return None
        proc = run_cli(_train_cmd(sz.resume_preset, steps, cut, npy, device, [*extra, "--resume"]), env)
        a, b = _loss_series(read_metrics(cut / "pre")), _loss_series(read_metrics(whole / "pre"))
        same = proc.returncode == 0 and a == b
        if same:
            cost = ""
            if name != "default":
                cost = f"; needed them: {seconds[name]:.1f} s vs {seconds['default']:.1f} s with default settings"
            record("correctness", f"training killed at step {killed_at} of {steps} ({sz.resume_preset}) and resumed",
                   f"{len(a)} losses and grad norms bit-identical with {name} settings{cost}", "bit-identical", "pass")
            return whole / "pre"
        diff = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        print(f"resume with {name} settings: {diff} of {len(b)} steps differ", file=sys.stderr)
    record("correctness", f"training killed and resumed ({sz.resume_preset})",
           f"losses differ under every setting tried ({', '.join(seconds)})", "bit-identical", "FAIL")
    return None


def _last_line(text):
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1][:200] if lines else "(no output)"


# ---- 2. speed ---------------------------------------------------------------------------------------------

def speed_analyze(folder, npy, device, sz, dtype, dry):
    """Paired alternating rounds of bench_analyze's bare and analyze runs; peak GPU memory of each."""
    loaded = layerprobe.load_model(str(folder), dtype=dtype, device=device.type, load_tokenizer=False)
    blocks = torch.from_numpy(np.load(npy))
    args = argparse.Namespace(npy=str(npy), batch_size=sz.batch_size, clock="wall")
    modes = ("bare_grad", "analyze_grad", "bare_nograd", "analyze_nograd")
    analyze_run_mode("bare_grad", loaded, blocks[: sz.batch_size], args)  # warm-up (kernels, allocator)
    times, peak = {m: [] for m in modes}, {}
    for _ in range(sz.repeats):
        for m in modes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times[m].append(analyze_run_mode(m, loaded, blocks, args))
            if device.type == "cuda":
                peak[m] = max(peak.get(m, 0.0), (torch.cuda.max_memory_allocated() - base) / 2**20)
    for g, label in (("grad", "analyze / bare forward+backward"), ("nograd", "analyze --no-grad / bare forward")):
        ratio = statistics.median(a / b for a, b in zip(times[f"analyze_{g}"], times[f"bare_{g}"]))
        mem = (f"; peak GPU memory over the loaded model {peak[f'analyze_{g}']:.0f} vs {peak[f'bare_{g}']:.0f} MiB"
               if peak else "")
        status = "measured (dry run: no target)" if dry else _status(ratio <= ANALYZE_TARGET)
        record("speed", f"{label} ({dtype}, {device.type})",
               f"{ratio:.3f} (median of {sz.repeats} paired rounds; bare {statistics.median(times[f'bare_{g}']):.3f} s)"
               f"{mem}", f"≤ {ANALYZE_TARGET}", status)


def speed_prune(r, device, dtype):
    record("speed", f"prune-sweep cached / naive ({dtype}, {device.type}, L={r['L']}, {r['tokens']} tokens)",
           f"{r['ratio']:.3f} (naive {r['naive_s']:.2f} s, cached {r['cached_s']:.2f} s); bound (L/2+r)/(L+r) = "
           f"{r['bound']:.3f} with r = c_h/c_l = {r['r']:.2f}; cached / its minimum {r['cached_over_min']:.2f}",
           "ratio/bound → 1 (BENCHMARKS.md)", f"measured (ratio/bound {r['ratio_over_bound']:.2f})")


def peak_tflops(device, override):
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, key
    return None, f"unknown GPU {name!r}: pass --peak-tflops"


def train_flops_per_token(matmul_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the weight matmuls (N without the input embedding, which is a lookup;
    with the output head), plus attention scores and values, 2·2·L·T·d forward ×3 for forward + backward
    = 12·L·d·T (causal masking is not subtracted, as in the usual MFU convention)."""
    return 6 * matmul_params + 12 * layers * hidden * seq_len


def _matmul_params(run_dir: Path) -> tuple[int, dict]:
    """Parameters of a trained checkpoint without its input embedding, read from the safetensors header."""
    from safetensors import safe_open

    cfg = json.loads((run_dir / "config.json").read_text())
    n = 0
    with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            if "embed_tokens" not in k or cfg.get("tie_word_embeddings"):
                n += int(np.prod(shape))
    return n, cfg


def speed_train(work, device, sz, peak, peak_src, dry):
    """train-reference tokens/s and MFU (eager and --compile) against a LlamaForCausalLM twin."""
    compiles = [False, True] if device.type == "cuda" else [False]
    for preset in sz.train_presets:
        # Token ids straight from a .npy: no tokenizer to train; enough rows for every step plus held-out.
        from layerprobe.reference import get_preset

        p = get_preset(preset)
        npy = write_tokens(work / f"train-{preset}.npy", rows=sz.train_batch * (sz.train_steps + 2) + 64,
                           seq_len=p.seq_len, vocab=p.vocab_size, seed=1)
        for compiled in compiles:
            out = work / f"speed-{preset}-{int(compiled)}"
            extra = ["--dtype", "bfloat16" if device.type == "cuda" else "float32", "--vocab-size", str(p.vocab_size)]
            if compiled:
                extra.append("--compile")
            proc = run_cli(_train_cmd(preset, sz.train_steps, out, npy, device, extra, batch=sz.train_batch))
            label = f"train-reference {preset} ({'--compile' if compiled else 'eager'}, " \
                    f"{'bf16' if device.type == 'cuda' else 'fp32'}, batch {sz.train_batch}×{p.seq_len})"
            if proc.returncode != 0:
                record("speed", label, f"failed: {_last_line(proc.stderr)}", "", "FAIL")
                continue
            recs = read_metrics(out / "pre")
            steady = [r["tokens_per_s"] for r in recs[len(recs) // 3:] if r.get("tokens_per_s")]  # past compile/warm-up
            tps = statistics.median(steady)
            n, cfg = _matmul_params(out / "pre")
            fpt = train_flops_per_token(n, cfg["num_hidden_layers"], cfg["hidden_size"], p.seq_len)
            twin = llama_tps(cfg, sz.train_batch, p.seq_len, device, compiled, sz.train_steps)
            if peak:
                mfu = fpt * tps / (peak * 1e12)
                result = f"{tps:,.0f} tok/s, MFU {mfu:.1%} ({fpt * tps / 1e12:.1f} TFLOP/s of {peak:g}, {peak_src})"
                target, status = "", "measured"
                if compiled and preset == "130m":
                    target, status = f"MFU ≥ {MFU_TARGET:.0%} (H100)", _status(mfu >= MFU_TARGET)
            else:
                result, target, status = f"{tps:,.0f} tok/s (MFU: {peak_src})", "", "measured (dry run: no target)" if dry else "measured"
            record("speed", label, f"{result}; LlamaForCausalLM twin {twin:,.0f} tok/s (ours/twin {tps / twin:.2f}); "
                   f"N = {n:.3g}, {fpt:.3g} FLOP/token of which attention 12·L·d·T = "
                   f"{12 * cfg['num_hidden_layers'] * cfg['hidden_size'] * p.seq_len:.3g}",
                   target, status)


def llama_tps(cfg: dict, batch, seq_len, device, compiled, steps) -> float:
    """tokens/s of transformers' LlamaForCausalLM of the same size: bf16 autocast + AdamW (bench_train_throughput)."""
    from types import SimpleNamespace

    c = SimpleNamespace(**{**cfg, "max_position_embeddings": max(seq_len, cfg.get("max_position_embeddings", 0))})
    torch.manual_seed(0)
    model = llama_twin(c).to(device)
    ids = torch.randint(0, c.vocab_size, (batch, seq_len), device=device)
    step = make_step(model, ids, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, compiled=compiled)
    time_steps(step, max(2, steps // 3))  # compile and warm up
    dt = time_steps(step, max(2, steps - steps // 3))
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch * seq_len / dt


# ---- 3. scale paths ---------------------------------------------------------------------------------------

def check_torchrun(work, npy, device, sz, plain_run: Path | None):
    backend = "NCCL" if device.type == "cuda" else "gloo"
    if plain_run is None:
        record("scale", f"torchrun --nproc-per-node 1 ({backend})", "no plain run to compare with", "", "FAIL")
        return
    steps = sz.resume_steps
    ref = _loss_series(read_metrics(plain_run))
    for name, extra in (("DDP", []), ("FSDP2 (--fsdp)", ["--fsdp"])):
        out = work / f"torchrun-{name[:4]}"
        args = _train_cmd(sz.resume_preset, steps, out, npy, device, ["--save-every", str(steps // 4), *extra])
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                               "-m", "layerprobe", *args], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=3600)
        label = f"torchrun --nproc-per-node 1 {name}, {backend} ({sz.resume_preset}, {steps} steps)"
        if proc.returncode != 0:
            record("scale", label, f"failed: {_last_line(proc.stderr)}", "equals the plain run", "FAIL")
            continue
        got = _loss_series(read_metrics(out / "pre"))
        ok, err = compare_series([x[1:] for x in got], [x[1:] for x in ref], TOL_SAME_DEVICE)
        exact = got == ref
        record("scale", label, f"losses and grad norms vs plain run: {'bit-identical' if exact else f'max error {err:.1e}'}",
               f"≤ {TOL_SAME_DEVICE:g} relative", _status(ok))


def check_device_map(folder, npy, device, sz):
    if device.type != "cuda":
        record("scale", "--device-map auto on one GPU vs plain load", "", "", "skipped: no GPU")
        record("scale", "--device-map with layers offloaded to cpu vs plain load", "", "", "skipped: no GPU")
        return
    kw = dict(data=str(npy), batch_size=sz.batch_size, dtype="float32", progress=False)
    set_tf32(False)
    plain = layerprobe.analyze(str(folder), device="cuda", **kw)
    mapped = layerprobe.analyze(str(folder), device_map="auto", **kw)
    ok, err = compare_analyses(mapped, plain, TOL_SAME_DEVICE)
    record("scale", "analyze --device-map auto (one GPU) vs --device cuda, fp32", _errors_text(err),
           f"≤ {TOL_SAME_DEVICE:g} of scale", _status(ok))
    # What --device-map auto does to a 70B on one H200: the last layers, the final norm and the head stay on
    # the CPU (meta parameters, copied in on every forward). GPU 0 gets about half the weights.
    size = sum(p.numel() * p.element_size()
               for p in layerprobe.load_model(str(folder), dtype="float32", device="cpu", load_tokenizer=False)
               .model.parameters())
    offload = dict(device_map="sequential", max_memory={0: size // 2, "cpu": 4 * size})
    plain = layerprobe.analyze(str(folder), device="cuda", grad=False, tokens="all", **kw)
    mapped = layerprobe.analyze(str(folder), grad=False, tokens="all", **offload, **kw)
    ok, err = compare_analyses(mapped, plain, TOL_SAME_DEVICE)
    record("scale", f"analyze --no-grad --tokens all, offloaded to cpu ({len(mapped.manifest['offloaded'] or [])} "
           "modules) vs --device cuda, fp32", _errors_text(err), f"≤ {TOL_SAME_DEVICE:g} of scale",
           _status(ok and bool(mapped.manifest["offloaded"])))
    sweep = dict(data=str(npy), batch_size=sz.batch_size, dtype="float32", progress=False, mode="layer")
    a = layerprobe.prune_sweep(str(folder), device="cuda", **sweep).table
    b = layerprobe.prune_sweep(str(folder), **offload, **sweep).table
    cols = ["loss", "kl", "top1_agreement"]
    err = scaled_error(b[cols].to_numpy(dtype=float), a[cols].to_numpy(dtype=float))
    record("scale", "prune-sweep layer mode, offloaded to cpu vs --device cuda, fp32", f"max error {err:.1e}",
           f"≤ {TOL_SAME_DEVICE:g} relative", _status(err <= TOL_SAME_DEVICE))
    try:
        layerprobe.analyze(str(folder), **offload, **kw)
        refused = "ran (gradient norms of offloaded layers would be lost)"
    except layerprobe.LayerprobeError as e:
        refused = f"refused: {str(e)[:60]}..."
    record("scale", "analyze with gradients, layers offloaded to cpu", refused, "refused before loading",
           _status(refused.startswith("refused")))


# ---- main -------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (a 4-layer model, the micro preset), for the CPU and the tests")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cuda | cpu")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's peak dense bf16 TFLOP/s for MFU (default: from the table in this script)")
    p.add_argument("--only", default="correctness,speed,scale", help="comma list of sections to run")
    args = p.parse_args(argv)
    if args.device not in ("auto", "cuda", "cpu"):
        p.exit(2, f"error: --device must be auto, cuda or cpu (got {args.device!r})\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda but torch sees no CUDA GPU; use --device auto or cpu\n")
    bad = set(args.only.split(",")) - {"correctness", "speed", "scale"}
    if bad:
        p.exit(2, f"error: --only takes correctness, speed, scale (got {', '.join(sorted(bad))})\n")
    if args.out and not args.out.parent.is_dir():
        p.exit(2, f"error: the folder of --out {args.out} does not exist; create it first\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars between the rows say nothing
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dry = args.dry_run or device.type == "cpu"
    sz = DRY if dry else FULL
    sections = set(args.only.split(","))
    peak, peak_src = peak_tflops(device, args.peak_tflops)
    speed_dtype = "bfloat16" if device.type == "cuda" else "float32"  # bf16 is ~20x slower than fp32 on a CPU

    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        work = Path(tmp)
        folder = build_model(work / "model", sz.model)
        npy = write_tokens(work / "tokens.npy", sz.samples, sz.seq_len, sz.model["vocab_size"])
        check_npy = write_tokens(work / "check.npy", sz.check_samples, sz.seq_len, sz.model["vocab_size"])
        train_npy = write_tokens(work / "train.npy", 1024, 32, 384, seed=2)  # the micro preset: seq 32, vocab 384
        plain_run = prune_fp32 = None
        if "correctness" in sections:
            check_analyze(folder, check_npy, device, sz)
            prune_fp32 = check_prune(folder, npy, device, sz, "float32")
            plain_run = check_resume(work, train_npy, device, sz)
        if "speed" in sections:
            set_tf32(True)  # the speed runs use the defaults a user gets
            speed_analyze(folder, npy, device, sz, speed_dtype, dry)
            set_tf32(False)
            # On a CPU the speed dtype is fp32, whose sweep the correctness section has just timed.
            reuse = prune_fp32 is not None and speed_dtype == "float32"
            speed_prune(prune_fp32 if reuse else check_prune(folder, npy, device, sz, speed_dtype), device, speed_dtype)
            speed_train(work, device, sz, peak, peak_src, dry)
        if "scale" in sections:
            if plain_run is None:
                proc = run_cli(_train_cmd(sz.resume_preset, sz.resume_steps, work / "plain", train_npy, device,
                                          ["--save-every", str(sz.resume_steps // 4)]))
                plain_run = work / "plain" / "pre" if proc.returncode == 0 else None
            check_torchrun(work, train_npy, device, sz, plain_run)
            check_device_map(folder, check_npy, device, sz)

    table = markdown(ROWS, machine_lines(device, args))
    print(table)
    if args.out:
        tmp_out = args.out.with_name(args.out.name + ".tmp")
        tmp_out.write_text(table)
        tmp_out.replace(args.out)
    return 1 if any(r.status == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
