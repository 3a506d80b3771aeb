"""Every GPU promise of layerprobe, proven and timed in one command that fits a time budget (issues 13, 22).

    PYTHONPATH=$PWD python3 bench/bench_gpu.py --budget-s 420 --out $OUT/bench_gpu.md   # on a GPU machine
    PYTHONPATH=$PWD python3 bench/bench_gpu.py --dry-run --out /tmp/gpu.md               # tiny sizes on the CPU

The first line of output names the versions found and whether they meet layerprobe's requirements (read from
pyproject.toml); where one the checks use is missing or too old, or layerprobe does not import, that line is an
`error:` and nothing else runs. Then the checks run in this order, most valuable first (`--only` picks checks or
sections by name):

 1. analyze-correctness  analyze fp32 (TF32 off) and bf16 on the device against the CPU in fp32.
 2. memory               peak memory of analyze with gradients and of prune-sweep layer mode on a 4-layer slice of
                         a Llama-3-8B shape (full 128,256 vocabulary), T = 2048, batch 1 and 4, against a
                         predictor of peak bytes (imported lazily: see `find_predictor`; without one the
                         measured figures are recorded and the comparison is skipped).
 3. analyze-fused        analyze --no-grad in bf16 on that slice with the per-layer statistics as one compiled
                         kernel (metrics/token_terms.py) against the float32 copies it replaces: the same numbers,
                         and each one's time over a bare forward (on a CPU: the tiny slice, Inductor's C++ backend).
    analyze-speed        analyze / bare forward+backward (and --no-grad / bare forward) in bf16 on that slice.
 4. train-eager, train-compiled   train-reference 71m tokens/s and MFU, eager and with --compile.
 5. prune                prune-sweep layer mode cached vs naive (fp32 correctness, bf16 speed) and the share of
                         the sweep spent scoring, on a SmolLM2-135M shape.
 6. torchrun             torchrun --nproc-per-node 1 DDP and FSDP2 (NCCL on a GPU) against a plain run.
 7. offload              device maps through layerprobe's loading: analyze --no-grad --tokens all and prune-sweep
                         with the last quarter of the layers, the final norm and the head offloaded (to the CPU on
                         a GPU, to disk on a CPU), analyze with gradients with the head offloaded, each against one
                         device; analyze with gradients on offloaded layers refused; --device-map auto on a GPU.
 8. resume, train-twin, analyze-speed-small   a training run SIGKILLed and resumed; transformers'
                         LlamaForCausalLM of the 71m shape; analyze / bare on the small model.

`--budget-s S`: before each check its time is estimated (the ESTIMATES table, scaled by how the checks done so far
compared with theirs); a check that would not finish within S seconds of the start is skipped with that reason,
and a cheaper one after it may still run. A check still running at S seconds is stopped (SIGALRM; its
subprocesses are killed) and the rest are skipped. Every row is written to --out (Markdown) and to its JSON
sidecar (same name, .json) as soon as it is measured, each time as a whole new file renamed into place, so a
kill at any moment leaves everything measured before it; the JSON says `"finished": false` until the end.

The models are built here from configs with seeded random weights (a GPU box has no hub; speed and memory do
not depend on the weights). layerprobe is driven through its entry points: analyze / prune_sweep / load_model
(a transformers model or a LoadedModel is passed as is) and `python -m layerprobe train-reference`
(subprocesses, so a kill is a real SIGKILL).

Tolerances (error = max |x - ref| / max |ref| over the layers of each quantity, so that a near-zero entry does
not turn rounding into a large relative error):
- bf16 vs CPU fp32: 3e-2. bf16 keeps 8 bits of mantissa (2^-8 = 3.9e-3 per rounding), grown through the layers
  and the backward pass.
- fp32 on the GPU vs CPU fp32: 1e-4, with TF32 off for this check (TF32 keeps 10 bits of mantissa and would make
  it a bf16-like check). What remains is the order of floating-point reductions, grown through the layers.
- cached vs naive prune sweep, torchrun world size 1 vs plain, offloaded vs one device: 1e-5 (fp32, same device's
  kernels; only batch shapes and reduction order may differ).
- the fused statistics kernel vs float32 copies (bf16, same device): 1e-4. Both are float32 arithmetic on the
  same values; only the order of each token's H additions differs (a per-token sum moves by at most (H - 1)·2^-24
  of its terms' magnitudes, ~1e-3 at H = 4096 in the worst case, ~1e-7 measured on the CPU: docs/design.md).
- predicted peak memory: within 15% of torch.cuda.max_memory_allocated.
- training resumed after a kill: bit-identical losses and gradient norms.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here, before torch and transformers are imported

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from functools import cached_property  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benches: their timing helpers are reused, not copied

# Imported by load_stack() after the version check, so that a layerprobe that needs newer packages than this
# machine has is reported in the first line instead of as a traceback.
layerprobe = bench_analyze = bench_prune = bench_train = None

TOL_BF16 = 3e-2
TOL_FP32_DEVICE = 1e-4
TOL_SAME_DEVICE = 1e-5
TOL_FUSED = 1e-4
TOL_MEMORY = 0.15
ANALYZE_TARGET = 1.10
MFU_TARGET = 0.40
MFU_PRESET = "71m"
GiB = 2**30

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
# Llama-3-8B's shape with 4 of its 32 layers: the whole 128k vocabulary (embedding, head, logits) and 4 layers'
# activations, ~1.9e9 parameters (3.6 GiB in bf16). The per-layer terms scale with L.
LLAMA3_8B_SLICE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY_SLICE = dict(TINY_MODEL, vocab_size=512, tie_word_embeddings=False)


@dataclass
class Sizes:
    model: dict
    model_name: str
    samples: int        # token blocks of the small model's speed and prune checks
    check_samples: int  # token blocks of the correctness checks (the CPU fp32 reference runs on them)
    seq_len: int
    batch_size: int
    repeats: int        # alternating rounds of each timing
    big_model: dict     # the memory and analyze-speed model, built on the device
    big_name: str
    big_seq_len: int
    memory_batches: tuple
    big_samples: int    # analyze-speed: token blocks of big_seq_len, in batches of the largest memory batch
    train_preset: str   # timed for tokens/s and MFU (the MFU target is for 71m)
    train_batch: int
    train_steps: int
    resume_preset: str
    resume_steps: int   # enough that the kill (polled every 5 ms) lands mid-run at GPU speed
    torchrun_steps: int


FULL = Sizes(FULL_MODEL, "SmolLM2-135M shape", samples=32, check_samples=8, seq_len=512, batch_size=8,
             repeats=3, big_model=LLAMA3_8B_SLICE, big_name="Llama-3-8B shape, 4 layers", big_seq_len=2048,
             memory_batches=(1, 4), big_samples=8, train_preset="71m", train_batch=64, train_steps=30,
             resume_preset="micro", resume_steps=200, torchrun_steps=50)
DRY = Sizes(TINY_MODEL, "tiny", samples=4, check_samples=4, seq_len=32, batch_size=2, repeats=2,
            big_model=TINY_SLICE, big_name="tiny slice", big_seq_len=32, memory_batches=(1, 4), big_samples=8,
            train_preset="micro", train_batch=8, train_steps=6, resume_preset="micro", resume_steps=30,
            torchrun_steps=30)


# ---- the table, written whole after every row ------------------------------------------------------------

@dataclass
class Row:
    section: str
    check: str
    result: str
    target: str
    status: str  # pass | FAIL | measured | skipped: why


@dataclass
class Table:
    out: Path | None
    header: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    checks: list = field(default_factory=list)  # {name, estimate_s, seconds, outcome} per check in order
    budget_s: float | None = None
    started: float = T0
    finished: bool = False
    ended: float | None = None

    def finish(self):
        self.finished, self.ended = True, time.monotonic()
        self.write()

    def record(self, section, check, result, target="", status="measured"):
        row = Row(section, check, result, target, status)
        self.rows.append(row)
        print(f"[{section}] {check}: {result} ({target}) -> {status}", file=sys.stderr, flush=True)
        self.write()
        return row

    def markdown(self) -> str:
        lines = [*self.header, "", "| section | check | result | target / tolerance | status |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_cell(v) for v in (r.section, r.check, r.result, r.target, r.status)) + " |"
                  for r in self.rows]
        elapsed = (self.ended or time.monotonic()) - self.started
        budget = f" of a {self.budget_s:g} s budget" if self.budget_s else ""
        if self.finished:
            counts = {k: sum(r.status.startswith(k) for r in self.rows) for k in ("pass", "FAIL", "measured", "skipped")}
            lines += ["", f"Finished in {elapsed:.0f} s{budget}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + "."]
        else:
            lines += ["", f"Still running at {elapsed:.0f} s{budget} (a kill leaves this file as it is: the rows "
                          f"above were measured)."]
        return "\n".join(lines) + "\n"

    def sidecar(self) -> dict:
        return {"header": self.header, "budget_s": self.budget_s,
                "elapsed_s": round((self.ended or time.monotonic()) - self.started, 1),
                "finished": self.finished, "checks": self.checks, "rows": [asdict(r) for r in self.rows]}

    def write(self):
        if self.out is None:
            return
        _write_text(self.out, self.markdown())
        _write_text(self.out.with_suffix(".json"), json.dumps(self.sidecar(), indent=2, default=str) + "\n")


def _write_text(path: Path, text: str):
    """layerprobe.io's atomic write; where layerprobe does not import (its own dependency check refuses this
    machine: the first line says why, and it must still reach --out), the same temporary-then-rename by hand."""
    try:
        from layerprobe.io import write_text
    except Exception:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return
    write_text(path, text)


def _cell(text) -> str:
    """A Markdown table cell: an error message's pipe or newline must not break the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


TABLE = Table(out=None)


def record(section, check, result, target="", status="measured"):
    return TABLE.record(section, check, result, target, status)


# ---- the budget -------------------------------------------------------------------------------------------

class Stop(BaseException):
    """Raised into the running check at the budget's end or on SIGTERM (BaseException: no `except Exception`
    in the code under test swallows it)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


DEADLINE: float | None = None  # monotonic time at which the budget ends


def time_left(default: float = 3600.0) -> float:
    """Seconds until the budget ends (a subprocess's timeout)."""
    return default if DEADLINE is None else max(1.0, DEADLINE - time.monotonic())


@dataclass
class Check:
    name: str
    section: str
    label: str  # what its row says when it is skipped
    estimate_s: float
    run: Callable[[], None]


ARMED = [False]  # the alarm raises only inside a check, never in the bookkeeping around it


def _on_alarm(signum, frame):
    if ARMED[0]:
        ARMED[0] = False
        raise Stop("stopped at the budget")


def _on_term(signum, frame):
    raise Stop("stopped by SIGTERM")


def run_checks(checks: list[Check], table: Table, budget_s: float | None, clock=time.monotonic, start: float = T0):
    """Run `checks` in order within `budget_s` seconds of `start`. A check whose estimate (scaled by how the
    checks before it compared with their estimates) exceeds the time left is skipped; one that raises gets a
    FAIL row and the next one runs; one still running at the budget's end is stopped and the rest skipped."""
    global DEADLINE
    DEADLINE = None if budget_s is None else start + budget_s
    ratios, stopped = [], None
    use_alarm = budget_s is not None and hasattr(signal, "setitimer")
    old_alarm = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    for c in checks:
        scale = min(4.0, max(0.5, statistics.median(ratios))) if ratios else 1.0
        est = c.estimate_s * scale
        entry = {"name": c.name, "estimate_s": round(est, 1), "seconds": None, "outcome": None}
        table.checks.append(entry)
        if stopped:
            entry["outcome"] = f"skipped: {stopped} earlier"
            table.record(c.section, c.label, "", "", entry["outcome"])
            continue
        left = None if budget_s is None else start + budget_s - clock()
        if left is not None and est > left:
            entry["outcome"] = f"skipped: needs ~{est:.0f} s, {max(left, 0):.0f} s of the budget left"
            table.record(c.section, c.label, "", "", entry["outcome"])
            continue
        t = clock()
        try:
            if use_alarm:
                ARMED[0] = True
                signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
            c.run()
            ARMED[0] = False
            entry["outcome"] = "done"
        except Stop as s:
            ARMED[0] = False
            stopped = s.why
            entry["outcome"] = f"skipped: {s.why}"
            table.record(c.section, c.label, f"stopped after {clock() - t:.0f} s (estimated {est:.0f} s)", "",
                         entry["outcome"])
        except Exception as e:  # one broken check must not cost the rows of the others
            ARMED[0] = False
            entry["outcome"] = "error"
            table.record(c.section, c.label, f"raised {type(e).__name__}: {_first_line(str(e))}", "", "FAIL")
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            entry["seconds"] = round(clock() - t, 1)
            if entry["outcome"] == "done" and c.estimate_s > 0:
                ratios.append(entry["seconds"] / c.estimate_s)
            free_memory()
            table.write()
    if use_alarm:
        signal.signal(signal.SIGALRM, old_alarm)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return lines[0][:200] if lines else "(no message)"


def _last_line(text):
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1][:200] if lines else "(no output)"


# ---- versions: the first line ------------------------------------------------------------------------------

# The declared requirements the checks use. The others (pyarrow: .parquet data; matplotlib: figures; tokenizers:
# text data) are only named in the first line when missing: the device machine may lack pyarrow, and no check
# needs it.
CHECKS_NEED = {"python", "torch", "transformers", "typer", "rich", "pandas", "numpy", "safetensors"}


def requirement_problems(pyproject: Path = REPO / "pyproject.toml", version_of=importlib.metadata.version,
                         python_version: str = platform.python_version()) -> list[tuple[str, str]]:
    """(name, what is wrong) for each of layerprobe's declared requirements (pyproject.toml [project]) that this
    machine lacks: a missing package, or one older than its specifier allows. Python < 3.11 has no tomllib:
    the import check alone decides there."""
    try:
        import tomllib
    except ImportError:
        return []
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads(pyproject.read_text())["project"]
    problems = []
    if not SpecifierSet(project.get("requires-python", "")).contains(python_version, prereleases=True):
        problems.append(("python", f"python{project['requires-python']} (this machine has {python_version})"))
    for spec in project.get("dependencies", []):
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = version_of(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append((req.name, f"{req.name} (not installed)"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append((req.name, f"{req.name}{req.specifier} (this machine has {have})"))
    return problems


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def versions_text() -> str:
    return (f"python {platform.python_version()} · torch {_version('torch')} · transformers {_version('transformers')}"
            f" · accelerate {_version('accelerate')} · layerprobe {_layerprobe_version()} at {REPO}")


def _layerprobe_version() -> str:
    """Read from the file: importing any part of the package runs its dependency check."""
    import re

    m = re.search(r'__version__ = "([^"]+)"', (REPO / "layerprobe" / "_version.py").read_text())
    return m.group(1) if m else "unknown"


def load_stack():
    """Import layerprobe (every part the checks drive) and the sibling benches."""
    global layerprobe, bench_analyze, bench_prune, bench_train
    import layerprobe as lp

    for sub in ("analysis", "pruning", "pruning.measurement", "training", "reference", "loading", "cli"):
        importlib.import_module(f"layerprobe.{sub}")
    import bench_analyze as ba
    import bench_prune as bp
    import bench_train_throughput as bt

    layerprobe, bench_analyze, bench_prune, bench_train = lp, ba, bp, bt


def first_line() -> tuple[bool, str]:
    """(ok, the first line of output): the versions, and what layerprobe needs that they do not give."""
    try:
        problems = requirement_problems()
    except Exception as e:  # a pyproject.toml or a `packaging` this script cannot read
        return False, f"error: cannot read layerprobe's requirements ({type(e).__name__}: {_first_line(str(e))})"
    blocking = [text for name, text in problems if name.lower() in CHECKS_NEED]
    if blocking:
        return False, (f"error: layerprobe needs {', '.join(blocking)}; nothing was run ({versions_text()})")
    try:
        load_stack()
    except Exception as e:  # ImportError or an API error at import: layerprobe needs something newer
        return False, (f"error: layerprobe does not import here ({type(e).__name__}: {_first_line(str(e))}); "
                       f"nothing was run ({versions_text()})")
    others = [text for name, text in problems if name.lower() not in CHECKS_NEED]
    met = "met" if not others else f"met for these checks; also declared: {', '.join(others)} (no check uses it)"
    return True, f"versions: {versions_text()}: layerprobe's requirements (pyproject.toml) are {met}"


def machine_lines(device, args):
    import transformers

    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    cuda = torch.version.cuda or "none"
    cmd = "python bench/bench_gpu.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    return [f"`{cmd.strip()}` · {'dry run (tiny sizes)' if args.dry else 'full sizes'} · device {device}",
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


def compare_sweeps(got, ref, tol) -> tuple[bool, dict]:
    """(all within tol, {column: scaled error}) for two layer-mode SweepResults of the same model and tokens."""
    errors = {c: scaled_error(got.table[c].to_numpy(), ref.table[c].to_numpy())
              for c in ("loss", "kl", "top1_agreement")}
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


# ---- the models and the tokens ----------------------------------------------------------------------------

def build_model(folder: Path, shape: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)  # fp32, seeded
    return folder


def build_on_device(shape: dict, device, dtype: torch.dtype):
    """A seeded random Llama made on `device` (no host copy, no file: 1.9e9 parameters init in a second on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def write_tokens(path: Path, rows: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    g = np.random.default_rng(seed)
    np.save(path, g.integers(3, vocab, size=(rows, seq_len), dtype=np.int64))
    return path


def set_tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Ctx:
    """What the checks share, made on first use so that a skipped check costs nothing."""

    def __init__(self, work: Path, device: torch.device, sz: Sizes, dry: bool, peak, peak_src):
        self.work, self.device, self.sz, self.dry, self.peak, self.peak_src = work, device, sz, dry, peak, peak_src
        self.speed_dtype = "bfloat16" if device.type == "cuda" else "float32"  # bf16 is ~20x slower on a CPU
        self.train_runs = {}  # (preset, compiled) -> (config dict, tokens/s)

    @cached_property
    def small_folder(self) -> Path:
        return build_model(self.work / "model", self.sz.model)

    @cached_property
    def untied_folder(self) -> Path:  # the offload check moves the head away from the embedding
        return build_model(self.work / "model-untied", dict(self.sz.model, tie_word_embeddings=False))

    @cached_property
    def tokens_npy(self) -> Path:
        return write_tokens(self.work / "tokens.npy", self.sz.samples, self.sz.seq_len, self.sz.model["vocab_size"])

    @cached_property
    def check_npy(self) -> Path:
        return write_tokens(self.work / "check.npy", self.sz.check_samples, self.sz.seq_len, self.sz.model["vocab_size"])

    @cached_property
    def train_npy(self) -> Path:  # the micro preset: seq 32, vocab 384
        return write_tokens(self.work / "train.npy", 1024, 32, 384, seed=2)

    @cached_property
    def big(self):
        return build_on_device(self.sz.big_model, self.device, getattr(torch, self.speed_dtype))

    def drop_big(self):
        self.__dict__.pop("big", None)
        free_memory()


# ---- 1. analyze on the device against the CPU --------------------------------------------------------------

def check_analyze(ctx: Ctx):
    device, kw = ctx.device, dict(data=str(ctx.check_npy), batch_size=ctx.sz.batch_size, progress=False)
    ref = layerprobe.analyze(str(ctx.small_folder), dtype="float32", device="cpu", **kw)
    set_tf32(False)
    fp32 = layerprobe.analyze(str(ctx.small_folder), dtype="float32", device=device.type, **kw)
    ok, err = compare_analyses(fp32, ref, TOL_FP32_DEVICE)
    record("correctness", f"analyze fp32 on {device.type} (TF32 off) vs CPU fp32", _errors_text(err),
           f"≤ {TOL_FP32_DEVICE:g} of scale", _status(ok))
    bf16 = layerprobe.analyze(str(ctx.small_folder), dtype="bfloat16", device=device.type, **kw)
    ok, err = compare_analyses(bf16, ref, TOL_BF16)
    record("correctness", f"analyze bf16 on {device.type} vs CPU fp32", _errors_text(err),
           f"≤ {TOL_BF16:g} of scale", _status(ok))


# ---- 2. peak memory against the predictor ------------------------------------------------------------------

# Where the predictor of peak bytes may live (the first found is used). The call made is
#   predict_peak_bytes(config, batch=B, seq_len=T, mode=MODE, dtype="bfloat16") -> int
# with config a transformers PretrainedConfig, MODE one of MEMORY_MODES, and the result the peak bytes that
# torch's CUDA caching allocator holds allocated during the call on one device, the weights included
# (torch.cuda.max_memory_allocated after reset_peak_memory_stats, the model already loaded).
PREDICTORS = (("layerprobe.memory", "predict_peak_bytes"), ("bench_memory", "predict_peak_bytes"))
MEMORY_MODES = {"analyze": "analyze with gradients", "prune-layer": "prune-sweep layer mode"}


def find_predictor():
    """(the predictor function or None, where it came from or why there is none)."""
    for module, name in PREDICTORS:
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:  # a parent package is missing
            continue
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except Exception as e:
            return None, f"predictor {module} does not import ({type(e).__name__}: {_first_line(str(e))})"
        if callable(fn):
            return fn, f"{module}.{name}"
    return None, "predictor not available"


def measure_peak(fn, device) -> dict:
    """Run fn() once; the allocator's peak over it (the loaded model included), what was resident before, seconds."""
    free_memory()
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    sync(device)
    return {"peak": torch.cuda.max_memory_allocated(), "before": before, "reserved": torch.cuda.max_memory_reserved(),
            "seconds": time.perf_counter() - t, "out": out}


# The function that scores candidates over the vocabulary (CE, KL, top-1), by the name the sweep calls it.
SCORE_FN = ("layerprobe.pruning.measurement", "score")


def scoring_share(model, npy: Path, samples: int, batch_size: int, device) -> dict:
    """Seconds inside pruning.measurement's `score` (the CE/KL/top-1 over the vocabulary) over the sweep's own
    timer, for one layer-mode prune_sweep (score_s None, and the sweep still run, where `score` has moved)."""
    meas = importlib.import_module(SCORE_FN[0])
    orig = getattr(meas, SCORE_FN[1], None)
    spent = [0.0 if orig is not None else None]

    def timed(*a, **k):
        sync(device)
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            sync(device)
            spent[0] += time.perf_counter() - t

    if orig is not None:
        setattr(meas, SCORE_FN[1], timed)
    try:
        res = layerprobe.prune_sweep(model, mode="layer", data=str(npy), samples=samples, batch_size=batch_size,
                                     progress=False)
    finally:
        if orig is not None:
            setattr(meas, SCORE_FN[1], orig)
    s = res.summary
    return {"score_s": spent[0], "sweep_s": float(s["sweep_time_s"]), "layer_calls": s.get("layer_calls"),
            "result": res}


def _record_share(label, r):
    if r["score_s"] is None:
        record("speed", label, "", "", f"skipped: {'.'.join(SCORE_FN)} not found (the scoring loop moved): "
               "point bench_gpu.SCORE_FN at it")
        return
    record("speed", label, f"{r['score_s'] / r['sweep_s']:.0%} of the sweep's time in scoring ({r['score_s']:.2f} of "
           f"{r['sweep_s']:.2f} s, {r['layer_calls']} layer calls)", "issue 20: scoring share before/after",
           "measured")


def check_memory(ctx: Ctx, measure=None):
    """Each mode and batch: the predictor's figure against `measure` (measure_peak on a GPU; without a GPU the
    prediction alone is recorded)."""
    predictor, source = find_predictor()
    sz, device, dtype = ctx.sz, ctx.device, ctx.speed_dtype
    measure = measure or (measure_peak if device.type == "cuda" else None)
    model = ctx.big if measure is not None else None
    cfg = model.config if model is not None else _config(sz.big_model)
    T, L, V = sz.big_seq_len, cfg.num_hidden_layers, cfg.vocab_size
    target = f"predicted within {TOL_MEMORY:.0%} of torch.cuda.max_memory_allocated"
    for mode, mode_label in MEMORY_MODES.items():
        for B in sz.memory_batches:
            label = f"peak memory, {mode_label} ({sz.big_name}, V={V}, B={B}, T={T}, {dtype}, {device.type})"
            predicted, why = None, source
            if predictor is not None:
                try:
                    predicted = int(predictor(cfg, batch=B, seq_len=T, mode=mode, dtype=dtype))
                except Exception as e:
                    why = f"predictor failed ({type(e).__name__}: {_first_line(str(e))})"
            pred_text = f"predicted {predicted / GiB:.2f} GiB ({source})" if predicted is not None else ""
            if measure is None:
                record("memory", label, pred_text, target, "skipped: no GPU" if predicted is not None else
                       f"skipped: no GPU; {why}")
                continue
            npy = write_tokens(ctx.work / f"mem-{B}.npy", B, T, V, seed=3)
            try:
                if mode == "analyze":
                    m = measure(lambda: layerprobe.analyze(model, data=str(npy), samples=B, batch_size=B, grad=True,
                                                           progress=False), device)
                else:
                    m = measure(lambda: scoring_share(model, npy, B, B, device), device)
            except torch.cuda.OutOfMemoryError as e:
                model.zero_grad(set_to_none=True)
                free_memory()
                total = torch.cuda.get_device_properties(0).total_memory / GiB
                record("memory", label, f"out of memory on a {total:.0f} GiB device: {_first_line(str(e))[:120]}"
                       + (f"; {pred_text}" if pred_text else ""), target, "FAIL")
                continue
            model.zero_grad(set_to_none=True)
            result = (f"measured {m['peak'] / GiB:.2f} GiB ({m['before'] / GiB:.2f} resident before, "
                      f"{(m['peak'] - m['before']) / GiB:.2f} over it; reserved {m['reserved'] / GiB:.2f}; "
                      f"{m['seconds']:.1f} s)")
            if predicted is None:
                record("memory", label, result, target, f"skipped: {why}")
            else:
                off = predicted / m["peak"] - 1
                record("memory", label, f"{result}; {pred_text}: {off:+.1%}", target, _status(abs(off) <= TOL_MEMORY))
            if mode == "prune-layer" and B == max(sz.memory_batches):
                _record_share(f"prune-sweep scoring share ({sz.big_name}, L={L}, V={V}, B={B}, T={T}, {dtype})",
                              m["out"])


def _config(shape):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ---- 3. analyze's speed ------------------------------------------------------------------------------------

def _loaded(model, device, dtype):
    from layerprobe.loading import LoadedModel

    return LoadedModel(model=model, tokenizer=None, spec="bench", name="bench", source="model", revision=None,
                       dtype=dtype, device=device)


def speed_analyze(loaded, npy: Path, batch_size: int, repeats: int, label: str, dry: bool):
    """Paired alternating rounds of bench_analyze's bare and analyze runs; peak GPU memory of each."""
    device = loaded.device
    blocks = torch.from_numpy(np.load(npy))
    args = argparse.Namespace(npy=str(npy), batch_size=batch_size, clock="wall")
    modes = ("bare_grad", "analyze_grad", "bare_nograd", "analyze_nograd")
    for m in modes:  # warm-up on one batch (analyze reads the first `samples` blocks): kernels, allocator, imports
        bench_analyze.run_mode(m, loaded, blocks[:batch_size], args)
    times, peak = {m: [] for m in modes}, {}
    for _ in range(repeats):
        for m in modes:
            if device.type == "cuda":
                free_memory()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times[m].append(bench_analyze.run_mode(m, loaded, blocks, args))
            if device.type == "cuda":
                peak[m] = max(peak.get(m, 0.0), (torch.cuda.max_memory_allocated() - base) / 2**20)
    for g, what in (("grad", "analyze / bare forward+backward"), ("nograd", "analyze --no-grad / bare forward")):
        ratio = statistics.median(a / b for a, b in zip(times[f"analyze_{g}"], times[f"bare_{g}"]))
        mem = (f"; peak GPU memory over the loaded model {peak[f'analyze_{g}']:.0f} vs {peak[f'bare_{g}']:.0f} MiB"
               if peak else "")
        status = "measured (dry run: no target)" if dry else _status(ratio <= ANALYZE_TARGET)
        record("speed", f"{what} ({label})",
               f"{ratio:.3f} (median of {repeats} paired rounds; bare {statistics.median(times[f'bare_{g}']):.3f} s)"
               f"{mem}", f"≤ {ANALYZE_TARGET}", status)


# The columns the per-layer statistics kernel forms (capture's post-hook); angular, lens and loss do not use it.
HOOK_COLUMNS = {"layers": ("block_influence", "output_variance", "update_variance", "relative_update", "update_cosine",
                           "max_activation", "mean_abs_activation"),
                "sublayers": ("relative_update", "update_cosine")}


def hook_errors(got, ref) -> dict:
    """{table column: scaled error} over the columns HOOK_COLUMNS names (the sublayer rows sorted alike)."""
    out = {}
    for table, cols in HOOK_COLUMNS.items():
        a, b = getattr(got, table), getattr(ref, table)
        if table == "sublayers":
            a, b = (t.sort_values(["layer", "module"]) for t in (a, b))
        for c in cols:
            out[c if table == "layers" else f"sublayer {c}"] = scaled_error(a[c].to_numpy(), b[c].to_numpy())
    return out


def check_analyze_fused(ctx: Ctx):
    """analyze --no-grad in bf16 with the per-layer statistics read by one compiled kernel against the float32 copies
    (token_terms.FUSED_DEVICES emptied): the numbers agree, and the time each adds over a bare forward, in paired
    alternating rounds. On a CPU (dry run) the tiny slice in bf16 through Inductor's C++ backend: the code path."""
    from layerprobe.metrics import token_terms

    sz, device = ctx.sz, ctx.device
    B = max(sz.memory_batches)
    model = ctx.big if device.type == "cuda" else build_on_device(sz.big_model, device, torch.bfloat16)
    label = f"bfloat16, {device.type}, {sz.big_name}, {sz.big_samples}×{sz.big_seq_len} tokens, batch {B}"
    npy = write_tokens(ctx.work / "speed-big.npy", sz.big_samples, sz.big_seq_len, sz.big_model["vocab_size"], seed=4)
    loaded = _loaded(model, device, torch.bfloat16)
    blocks = torch.from_numpy(np.load(npy))
    args = argparse.Namespace(npy=str(npy), batch_size=B, clock="wall")
    before, fused_on, off = token_terms.FUSED_DEVICES, frozenset({device.type}), frozenset()
    times = {"bare": [], "copies": [], "fused": []}
    try:
        token_terms.FUSED_DEVICES = off
        copies = layerprobe.analyze(loaded, data=str(npy), samples=len(blocks), batch_size=B, grad=False, progress=False)
        token_terms.FUSED_DEVICES = fused_on
        t = time.perf_counter()
        fused = layerprobe.analyze(loaded, data=str(npy), samples=len(blocks), batch_size=B, grad=False, progress=False)
        first = time.perf_counter() - t
        if token_terms._broken:
            record("correctness", f"analyze --no-grad, fused statistics kernel vs float32 copies ({label})",
                   f"the kernel did not compile: {token_terms._broken}", f"≤ {TOL_FUSED:g} of scale", "FAIL")
            return
        err = hook_errors(fused, copies)
        record("correctness", f"analyze --no-grad, fused statistics kernel vs float32 copies ({label})",
               _errors_text(err), f"≤ {TOL_FUSED:g} of scale", _status(all(e <= TOL_FUSED for e in err.values())))
        bench_analyze.run_mode("bare_nograd", loaded, blocks[:B], args)  # warm-up
        for _ in range(sz.repeats):
            times["bare"].append(bench_analyze.run_mode("bare_nograd", loaded, blocks, args))
            for name, devices in (("copies", off), ("fused", fused_on)):
                token_terms.FUSED_DEVICES = devices
                times[name].append(bench_analyze.run_mode("analyze_nograd", loaded, blocks, args))
    finally:
        token_terms.FUSED_DEVICES = before
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["bare"])) for k in ("copies", "fused")}
    gain = statistics.median(a / b for a, b in zip(times["copies"], times["fused"]))
    record("speed", f"fused statistics kernel: analyze --no-grad over a bare forward, with it and with float32 copies "
                    f"({label})",
           f"{ratio['fused']:.3f} fused vs {ratio['copies']:.3f} with copies (analyze {gain:.2f}× as fast; median of "
           f"{sz.repeats} paired rounds; bare {statistics.median(times['bare']):.3f} s; first fused run, compiling "
           f"included, {first:.1f} s)", f"≤ {ANALYZE_TARGET}",
           "measured (dry run: no target)" if ctx.dry else _status(ratio["fused"] <= ANALYZE_TARGET))


def check_analyze_speed(ctx: Ctx):
    sz = ctx.sz
    B = max(sz.memory_batches)
    vocab = sz.big_model["vocab_size"]
    npy = write_tokens(ctx.work / "speed-big.npy", sz.big_samples, sz.big_seq_len, vocab, seed=4)
    loaded = _loaded(ctx.big, ctx.device, getattr(torch, ctx.speed_dtype))
    speed_analyze(loaded, npy, B, sz.repeats, f"{ctx.speed_dtype}, {ctx.device.type}, {sz.big_name}, "
                  f"{sz.big_samples}×{sz.big_seq_len} tokens, batch {B}", ctx.dry)
    ctx.drop_big()  # nothing after this needs it: give its memory to the training runs


def check_analyze_speed_small(ctx: Ctx):
    dtype = ctx.speed_dtype
    loaded = layerprobe.load_model(str(ctx.small_folder), dtype=dtype, device=ctx.device.type, load_tokenizer=False)
    set_tf32(True)  # the speed runs use the defaults a user gets
    try:
        speed_analyze(loaded, ctx.tokens_npy, ctx.sz.batch_size, ctx.sz.repeats,
                      f"{dtype}, {ctx.device.type}, {ctx.sz.model_name}, {ctx.sz.samples}×{ctx.sz.seq_len} tokens, "
                      f"batch {ctx.sz.batch_size}", ctx.dry)
    finally:
        set_tf32(False)


# ---- 4. training throughput and MFU ------------------------------------------------------------------------

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


def _env(extra=None):
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(extra or {})}


def run_sub(cmd, env_extra=None) -> subprocess.CompletedProcess:
    """Run cmd in its own process group with the budget's time left as its timeout; on a timeout or a Stop the
    whole group (torchrun's workers, compile workers) is SIGKILLed, so nothing keeps holding the GPU."""
    proc = subprocess.Popen(cmd, env=_env(env_extra), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=time_left())
    except subprocess.TimeoutExpired:  # its timeout is the budget's end
        _kill_group(proc)
        raise Stop("stopped at the budget") from None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_cli(args, env_extra=None):
    return run_sub([sys.executable, "-c", CLI_DRIVER, *args], env_extra)


def run_cli_and_kill(args, metrics: Path, after_lines: int, env_extra=None):
    """Start the CLI and SIGKILL it (no cleanup: a crash) once `metrics` has `after_lines` lines."""
    proc = subprocess.Popen([sys.executable, "-c", CLI_DRIVER, *args], env=_env(env_extra), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + time_left()
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= after_lines:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        _kill_group(proc)
        raise
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


def check_train(ctx: Ctx, preset: str, compiled: bool):
    """train-reference tokens/s and MFU (bf16 autocast on a GPU), eager or --compile."""
    from layerprobe.reference import get_preset

    device, sz = ctx.device, ctx.sz
    bf16 = device.type == "cuda"
    p = get_preset(preset)
    label = f"train-reference {preset} ({'--compile' if compiled else 'eager'}, {'bf16' if bf16 else 'fp32'}, " \
            f"batch {sz.train_batch}×{p.seq_len})"
    if compiled and device.type != "cuda":
        record("speed", label, "", "", "skipped: no GPU (--compile is timed on CUDA only)")
        return
    # Token ids straight from a .npy: no tokenizer to train; enough rows for every step plus held-out.
    npy = ctx.work / f"train-{preset}.npy"
    if not npy.exists():
        write_tokens(npy, rows=sz.train_batch * (sz.train_steps + 2) + 64, seq_len=p.seq_len, vocab=p.vocab_size, seed=1)
    out = ctx.work / f"speed-{preset}-{int(compiled)}"
    extra = ["--dtype", "bfloat16" if bf16 else "float32", "--vocab-size", str(p.vocab_size)]
    if compiled:
        extra.append("--compile")
    proc = run_cli(_train_cmd(preset, sz.train_steps, out, npy, device, extra, batch=sz.train_batch))
    if proc.returncode != 0:
        record("speed", label, f"failed: {_last_line(proc.stderr)}", "", "FAIL")
        return
    recs = read_metrics(out / "pre")
    steady = [r["tokens_per_s"] for r in recs[len(recs) // 3:] if r.get("tokens_per_s")]  # past compile/warm-up
    tps = statistics.median(steady)
    n, cfg = _matmul_params(out / "pre")
    ctx.train_runs[(preset, compiled)] = (cfg, tps)
    fpt = train_flops_per_token(n, cfg["num_hidden_layers"], cfg["hidden_size"], p.seq_len)
    target, status = "", "measured (dry run: no target)" if ctx.dry else "measured"
    if ctx.peak:
        mfu = fpt * tps / (ctx.peak * 1e12)
        result = f"{tps:,.0f} tok/s, MFU {mfu:.1%} ({fpt * tps / 1e12:.1f} TFLOP/s of {ctx.peak:g}, {ctx.peak_src})"
        if compiled and preset == MFU_PRESET:
            target, status = f"MFU ≥ {MFU_TARGET:.0%} (H100)", _status(mfu >= MFU_TARGET)
    else:
        result = f"{tps:,.0f} tok/s (MFU: {ctx.peak_src})"
    record("speed", label, f"{result}; N = {n:.3g}, {fpt:.3g} FLOP/token of which attention 12·L·d·T = "
           f"{12 * cfg['num_hidden_layers'] * cfg['hidden_size'] * p.seq_len:.3g}", target, status)


def llama_tps(cfg: dict, batch, seq_len, device, compiled, steps) -> float:
    """tokens/s of transformers' LlamaForCausalLM of the same size: bf16 autocast + AdamW (bench_train_throughput)."""
    from types import SimpleNamespace

    c = SimpleNamespace(**{**cfg, "max_position_embeddings": max(seq_len, cfg.get("max_position_embeddings", 0))})
    torch.manual_seed(0)
    model = bench_train.llama_twin(c).to(device)
    ids = torch.randint(0, c.vocab_size, (batch, seq_len), device=device)
    step = bench_train.make_step(model, ids, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                                 compiled=compiled)
    bench_train.time_steps(step, max(2, steps // 3))  # compile and warm up
    dt = bench_train.time_steps(step, max(2, steps - steps // 3))
    del model, step
    free_memory()
    return batch * seq_len / dt


def check_twin(ctx: Ctx):
    from layerprobe.reference import get_preset

    if not ctx.train_runs:
        record("speed", "LlamaForCausalLM twin of the train-reference rows", "", "",
               "skipped: no train-reference row ran")
        return
    for (preset, compiled), (cfg, tps) in ctx.train_runs.items():
        seq = get_preset(preset).seq_len
        twin = llama_tps(cfg, ctx.sz.train_batch, seq, ctx.device, compiled, ctx.sz.train_steps)
        record("speed", f"transformers LlamaForCausalLM twin of {preset} ({'--compile' if compiled else 'eager'})",
               f"{twin:,.0f} tok/s; train-reference/twin {tps / twin:.2f}", "", "measured")


# ---- 5. the prune sweep ------------------------------------------------------------------------------------

def prune_pair(ctx: Ctx, dtype: str) -> dict:
    """Cached vs naive (correctness) and their times against the caching bound (speed), via bench_prune."""
    loaded = layerprobe.load_model(str(ctx.small_folder), dtype=dtype, device=ctx.device.type, load_tokenizer=False)
    blocks = torch.from_numpy(np.load(ctx.tokens_npy))
    r = bench_prune.bench(dtype, loaded, blocks, argparse.Namespace(repeats=ctx.sz.repeats,
                                                                     batch_size=ctx.sz.batch_size, clock="wall"))
    tol = TOL_SAME_DEVICE if dtype == "float32" else TOL_BF16
    ok = max(r["max_rel_loss_diff"], r["max_rel_kl_diff"]) <= tol
    record("correctness", f"prune-sweep layer mode, cached vs naive ({dtype}, {ctx.device.type})",
           f"loss {r['max_rel_loss_diff']:.1e}, KL {r['max_rel_kl_diff']:.1e}, top-1 {r['max_top1_diff']:.1e}",
           f"≤ {tol:g} relative", _status(ok))
    r["loaded"] = loaded
    return r


def speed_prune(r, device, dtype):
    record("speed", f"prune-sweep cached / naive ({dtype}, {device.type}, L={r['L']}, {r['tokens']} tokens)",
           f"{r['ratio']:.3f} (naive {r['naive_s']:.2f} s, cached {r['cached_s']:.2f} s); bound (L/2+r)/(L+r) = "
           f"{r['bound']:.3f} with r = c_h/c_l = {r['r']:.2f}; cached / its minimum {r['cached_over_min']:.2f}",
           "ratio/bound → 1 (BENCHMARKS.md)", f"measured (ratio/bound {r['ratio_over_bound']:.2f})")


def check_prune(ctx: Ctx):
    set_tf32(False)
    r = prune_pair(ctx, "float32")
    if ctx.speed_dtype != "float32":
        del r
        free_memory()
        r = prune_pair(ctx, ctx.speed_dtype)
    speed_prune(r, ctx.device, ctx.speed_dtype)
    share = scoring_share(r["loaded"].model, ctx.tokens_npy, ctx.sz.samples, ctx.sz.batch_size, ctx.device)
    _record_share(f"prune-sweep scoring share ({ctx.sz.model_name}, L={r['L']}, V={r['vocab']}, {r['tokens']} tokens, "
                  f"{ctx.speed_dtype})", share)


# ---- 6. torchrun, 7. offload, 8. resume ----------------------------------------------------------------

def check_torchrun(ctx: Ctx):
    device, steps, preset = ctx.device, ctx.sz.torchrun_steps, ctx.sz.resume_preset
    backend = "NCCL" if device.type == "cuda" else "gloo"
    extra = ["--save-every", str(steps // 4)]
    proc = run_cli(_train_cmd(preset, steps, ctx.work / "plain", ctx.train_npy, device, extra))
    if proc.returncode != 0:
        record("scale", f"torchrun --nproc-per-node 1 ({backend})", f"the plain run failed: {_last_line(proc.stderr)}",
               "", "FAIL")
        return
    ref = _loss_series(read_metrics(ctx.work / "plain" / "pre"))
    for name, flag in (("DDP", []), ("FSDP2 (--fsdp)", ["--fsdp"])):
        out = ctx.work / f"torchrun-{name[:4]}"
        args = _train_cmd(preset, steps, out, ctx.train_npy, device, [*extra, *flag])
        proc = run_sub([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "-m", "layerprobe", *args])
        label = f"torchrun --nproc-per-node 1 {name}, {backend} ({preset}, {steps} steps)"
        if proc.returncode != 0:
            record("scale", label, f"failed: {_last_line(proc.stderr)}", "equals the plain run", "FAIL")
            continue
        got = _loss_series(read_metrics(out / "pre"))
        ok, err = compare_series([x[1:] for x in got], [x[1:] for x in ref], TOL_SAME_DEVICE)
        exact = got == ref
        record("scale", label, f"losses and grad norms vs plain run: {'bit-identical' if exact else f'max error {err:.1e}'}",
               f"≤ {TOL_SAME_DEVICE:g} relative", _status(ok))


def offload_map(num_layers: int, device, offload_to: str) -> dict:
    """A device map that keeps the embedding and the first three quarters of the layers on `device` and sends
    the last quarter, the final norm and the head to `offload_to`: what transformers' "auto" does to a model
    larger than 90% of one GPU."""
    keep = num_layers - max(1, num_layers // 4)
    out = {"model.embed_tokens": device, "model.rotary_emb": device}
    out.update({f"model.layers.{i}": device if i < keep else offload_to for i in range(num_layers)})
    out.update({"model.norm": offload_to, "lm_head": offload_to})
    return out


def check_offload(ctx: Ctx):
    """Device maps through layerprobe's own loading (an explicit map, `offload_folder`), fp32, against the same
    model on one device: analyze --no-grad --tokens all and prune-sweep layer mode with the last quarter of the
    layers, the final norm and the head offloaded; analyze with gradients with only the norm and head offloaded
    (every layer's gradient still lands); with layers offloaded, analyze with gradients must be refused before
    loading; on a GPU, --device-map auto (nothing offloaded). Columns within 1e-5, NaN against a number is a FAIL."""
    device = ctx.device
    cuda = device.type == "cuda"
    offload_to = "cpu" if cuda else "disk"  # on a CPU only a disk offload takes weights off the compute device
    compute = 0 if cuda else "cpu"
    L = ctx.sz.model["num_hidden_layers"]
    tail = offload_map(L, compute, offload_to)
    head_only = {"model.embed_tokens": compute, "model.rotary_emb": compute, "model.layers": compute,
                 "model.norm": offload_to, "lm_head": offload_to}
    kept = sum(1 for k, v in tail.items() if k.startswith("model.layers.") and v != offload_to)
    layers = f"layers {kept}–{L - 1}" if L - 1 > kept else f"layer {kept}"
    where = f"{layers}, final norm and head offloaded to {offload_to}"
    folder = str(ctx.untied_folder)
    kw = dict(data=str(ctx.check_npy), batch_size=ctx.sz.batch_size, dtype="float32", progress=False)
    placed = dict(offload_folder=str(ctx.work / "offload"))
    tol = f"≤ {TOL_SAME_DEVICE:g} of scale"
    set_tf32(False)
    runs = [(f"analyze --no-grad --tokens all, {where}", tail, compare_analyses,
             lambda **p: layerprobe.analyze(folder, grad=False, tokens="all", **kw, **p)),
            (f"prune-sweep layer mode, {where}", tail, compare_sweeps,
             lambda **p: layerprobe.prune_sweep(folder, mode="layer", **kw, **p)),
            (f"analyze with gradients, final norm and head offloaded to {offload_to}", head_only, compare_analyses,
             lambda **p: layerprobe.analyze(folder, grad=True, **kw, **p))]
    if cuda:
        runs.append(("analyze, --device-map auto (one GPU, nothing offloaded)", "auto", compare_analyses,
                     lambda **p: layerprobe.analyze(folder, grad=True, **kw, **p)))
    for name, dmap, compare, run in runs:
        label = f"{name} vs on one {device.type} (fp32)"
        ref = run(device=device.type)
        if cuda:
            free_memory()
            torch.cuda.reset_peak_memory_stats()
        try:
            got = run(device_map=dmap, **placed)
        except Exception as e:
            record("scale", label, f"raised {type(e).__name__}: {_first_line(str(e))}", tol, "FAIL")
            continue
        ok, err = compare(got, ref, TOL_SAME_DEVICE)
        offloaded = (getattr(got, "manifest", None) or {}).get("offloaded") or []
        really = dmap == "auto" or bool(offloaded)  # a map that offloaded nothing would prove nothing
        mem = f"; peak GPU memory {torch.cuda.max_memory_allocated() / GiB:.2f} GiB" if cuda else ""
        record("scale", label, f"{_errors_text(err)}; {len(offloaded)} modules offloaded{mem}", tol,
               _status(ok and really))
    label = f"analyze with gradients, {where}"
    try:
        layerprobe.analyze(folder, grad=True, device_map=tail, **placed, **kw)
        record("scale", label, "ran: the offloaded layers' gradients never land", "refused before loading", "FAIL")
    except layerprobe.LayerprobeError as e:
        record("scale", label, f"refused: {_first_line(str(e))[:120]}", "refused before loading, naming --no-grad",
               _status("--no-grad" in str(e)))


def check_resume(ctx: Ctx):
    """One run SIGKILLed after ~40% of its steps and resumed, against one run straight through: the losses
    and gradient norms must be bit-identical. On CUDA, if they are not, repeat with deterministic algorithms
    and say what that cost."""
    work, npy, device, sz = ctx.work, ctx.train_npy, ctx.device, ctx.sz
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
            return
        rc = run_cli_and_kill(_train_cmd(sz.resume_preset, steps, cut, npy, device, extra), cut / "pre" / "metrics.jsonl",
                              after_lines=int(steps * 0.4) + 1, env_extra=env)
        killed_at = len(read_metrics(cut / "pre"))
        if rc != -signal.SIGKILL or killed_at >= steps:
            record("correctness", "training resumed after SIGKILL", f"the run was not killed mid-way (exit {rc})",
                   "bit-identical losses", "FAIL")
            return
        proc = run_cli(_train_cmd(sz.resume_preset, steps, cut, npy, device, [*extra, "--resume"]), env)
        a, b = _loss_series(read_metrics(cut / "pre")), _loss_series(read_metrics(whole / "pre"))
        if proc.returncode == 0 and a == b:
            cost = ""
            if name != "default":
                cost = f"; needed them: {seconds[name]:.1f} s vs {seconds['default']:.1f} s with default settings"
            record("correctness", f"training killed at step {killed_at} of {steps} ({sz.resume_preset}) and resumed",
                   f"{len(a)} losses and grad norms bit-identical with {name} settings{cost}", "bit-identical", "pass")
            return
        diff = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        print(f"resume with {name} settings: {diff} of {len(b)} steps differ", file=sys.stderr)
    record("correctness", f"training killed and resumed ({sz.resume_preset})",
           f"losses differ under every setting tried ({', '.join(seconds)})", "bit-identical", "FAIL")


# ---- the plan -----------------------------------------------------------------------------------------------

# Seconds each check is expected to take: (on a GPU at full sizes, on a CPU at dry-run sizes). The GPU column is
# an estimate that has not met a GPU yet (subprocess start-up, CUDA and NCCL init, model builds, a cold Inductor
# compile included; a bf16 analyze on CUDA compiles the statistics kernel once per model width (guessed ~10 s) in
# analyze-correctness and analyze-fused): the first eight add up to 390 s, which with ~10 s of imports fits 420 s on
# an H100 (offload, ninth, needs ~460). The CPU column is what the dry run took on the 2-core build machine
# (torchrun and resume: subprocess start-ups; analyze-fused: a cold Inductor C++ compile).
ESTIMATES = {
    "analyze-correctness": (50, 3),
    "memory": (60, 1),
    "analyze-fused": (30, 30),
    "analyze-speed": (35, 2),
    "train-eager": (30, 6),
    "train-compiled": (100, 1),
    "prune": (35, 2),
    "torchrun": (50, 40),
    "offload": (40, 4),
    "resume": (60, 45),
    "train-twin": (120, 2),
    "analyze-speed-small": (40, 2),
}
SECTIONS = ("correctness", "memory", "speed", "scale")


def plan(ctx: Ctx) -> list[Check]:
    """The checks in the order of their value: what a GPU session most needs to know first."""
    col = 1 if ctx.dry else 0
    rows = [
        ("analyze-correctness", "correctness", "analyze fp32/bf16 on the device vs CPU fp32", lambda: check_analyze(ctx)),
        ("memory", "memory", f"peak memory vs prediction ({ctx.sz.big_name})", lambda: check_memory(ctx)),
        ("analyze-fused", "speed", f"analyze --no-grad, fused statistics kernel vs float32 copies ({ctx.sz.big_name})",
         lambda: check_analyze_fused(ctx)),
        ("analyze-speed", "speed", f"analyze / bare forward+backward ({ctx.sz.big_name})", lambda: check_analyze_speed(ctx)),
        ("train-eager", "speed", f"train-reference {ctx.sz.train_preset} eager tokens/s and MFU",
         lambda: check_train(ctx, ctx.sz.train_preset, False)),
        ("train-compiled", "speed", f"train-reference {ctx.sz.train_preset} --compile tokens/s and MFU",
         lambda: check_train(ctx, ctx.sz.train_preset, True)),
        ("prune", "speed", "prune-sweep cached vs naive and scoring share", lambda: check_prune(ctx)),
        ("torchrun", "scale", "torchrun --nproc-per-node 1 DDP and FSDP2 vs plain", lambda: check_torchrun(ctx)),
        ("offload", "scale", "analyze and prune-sweep with an offloading device map", lambda: check_offload(ctx)),
        ("resume", "correctness", "training killed and resumed", lambda: check_resume(ctx)),
        ("train-twin", "speed", "transformers LlamaForCausalLM twin tokens/s", lambda: check_twin(ctx)),
        ("analyze-speed-small", "speed", f"analyze / bare forward+backward ({ctx.sz.model_name})",
         lambda: check_analyze_speed_small(ctx)),  # the launch-bound small model
    ]
    return [Check(name, section, label, ESTIMATES[name][col], fn) for name, section, label, fn in rows]


def selected(checks: list[Check], only: str | None) -> list[Check]:
    if not only:
        return checks
    want = set(only.split(","))
    return [c for c in checks if c.name in want or c.section in want]


# ---- main -------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (4-layer models, the micro preset), for the CPU and the tests")
    p.add_argument("--out", type=Path, help="write the Markdown table here (and its JSON sidecar, .json), row by row")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds from the start within which to finish: checks that would not fit are skipped")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cuda | cpu")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's peak dense bf16 TFLOP/s for MFU (default: from the table in this script)")
    p.add_argument("--only", default=None,
                   help=f"comma list of checks ({', '.join(ESTIMATES)}) or sections ({', '.join(SECTIONS)})")
    args = p.parse_args(argv)
    args.argv = argv
    if args.device not in ("auto", "cuda", "cpu"):
        p.exit(2, f"error: --device must be auto, cuda or cpu (got {args.device!r})\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda but torch sees no CUDA GPU; use --device auto or cpu\n")
    if args.only:
        bad = set(args.only.split(",")) - set(ESTIMATES) - set(SECTIONS)
        if bad:
            p.exit(2, f"error: --only takes checks {', '.join(ESTIMATES)} or sections {', '.join(SECTIONS)} "
                      f"(got {', '.join(sorted(bad))})\n")
    if args.budget_s is not None and not args.budget_s > 0:
        p.exit(2, f"error: --budget-s must be a positive number of seconds (got {args.budget_s:g})\n")
    if args.out and not args.out.parent.is_dir():
        p.exit(2, f"error: the folder of --out {args.out} does not exist; create it first\n")
    return args


def main(argv=None) -> int:
    global TABLE
    args = parse_args(argv)
    ok, line = first_line()
    print(line, flush=True)
    TABLE = Table(out=args.out, header=[line], budget_s=args.budget_s)
    if not ok:
        TABLE.finish()
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars between the rows say nothing
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.dry = args.dry_run or device.type == "cpu"
    TABLE.header = [*machine_lines(device, args), line]
    peak, peak_src = peak_tflops(device, args.peak_tflops)
    old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
            ctx = Ctx(Path(tmp), device, DRY if args.dry else FULL, args.dry, peak, peak_src)
            checks = selected(plan(ctx), args.only)
            print("plan: " + ", ".join(f"{c.name} ~{c.estimate_s:g} s" for c in checks)
                  + (f" (budget {args.budget_s:g} s from the start)" if args.budget_s else ""), flush=True)
            run_checks(checks, TABLE, args.budget_s)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    TABLE.finish()
    print(TABLE.markdown())
    return 1 if any(r.status == "FAIL" for r in TABLE.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
