"""`train_reference`: train one reference model per norm scheme, with the same data order and seed.

Recipe (the Mix-LN / Curse-of-Depth papers'): AdamW (Adam when weight decay is 0), cosine schedule with
linear warmup decaying to 10% of the peak, optional gradient clipping, gradient accumulation, bf16
autocast and optional torch.compile on GPU. Run it under `torchrun` for DDP (or FSDP with --fsdp).

Everything a step does is a function of the step number and the saved state (weights, optimizer, RNG),
so a run killed at any point and resumed from its last checkpoint logs the same losses as one that
never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LayerprobeError
from ..io import ensure_writable_dir, write_json
from ..reference import (
    NORM_SCHEMES,
    LayerprobeConfig,
    LayerprobeForCausalLM,
    canonical_scheme,
    get_preset,
    reference_config,
)
from . import checkpoint as ckpt
from .data import BatchOrder, TokenData, prepare_token_data, read_training_text
from .distributed import (
    DistEnv,
    all_reduce_sum,
    any_process,
    barrier,
    init_distributed,
    shutdown,
    wrap_ddp,
    wrap_fsdp,
)
from .tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

# Model-config keys that define a run (the rest of a config's dict is transformers bookkeeping).
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "norm_type", "norm_eps", "rope_theta",
              "initializer_range", "norm_scheme", "post_ln_ratio", "post_ln_layers", "scaled_init",
              "tie_word_embeddings")


@dataclass
class TrainSettings:
    """What `layerprobe train-reference` accepts; None means "the preset's value"."""

    norm: str | list[str] = "pre,post,mix,lns"
    preset: str = "tiny"
    steps: int | None = None
    data: str = "builtin"
    text_column: str | None = None
    out: str = "runs"
    layers: int | None = None
    hidden_size: int | None = None
    ffn_size: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None  # global: sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # per process and forward pass; the rest is gradient accumulation
    lr: float | None = None
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    post_ln_ratio: float = 0.25
    post_ln_layers: int | None = None
    scaled_init: bool = False
    norm_type: str = "rmsnorm"
    vocab_size: int | None = None
    tokenizer: str | None = None
    eval_every: int | None = None
    eval_samples: int = 64
    save_every: int | None = None
    seed: int = 0
    data_seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # CPU threads for torch (default: torch's choice)
    compile: bool = False
    fsdp: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass
class RunResult:
    scheme: str
    path: str
    status: str  # completed, diverged, interrupted
    steps_done: int
    total_steps: int
    final_loss: float | None = None
    final_eval_loss: float | None = None
    final_eval_ppl: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    diverged_at: int | None = None
    diverged_reason: str | None = None
    resumed_from: int | None = None
    checkpoint_step: int | None = None  # the step of the checkpoint in last/ (and the top-level model)
    seconds: float = 0.0
    tokens_per_s: float | None = None
    layer_output_var: list[float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingSummary:
    out: str
    runs: list[RunResult] = field(default_factory=list)
    interrupted: bool = False
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"out": self.out, "interrupted": self.interrupted, "settings": self.settings,
                "runs": [r.as_dict() for r in self.runs]}


# ---- settings ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Settings resolved against the preset and validated."""

    schemes: list[str]
    preset: str
    steps: int
    seq_len: int
    batch_size: int
    micro_batch_size: int
    accum: int
    lr: float
    warmup_steps: int
    eval_every: int
    save_every: int
    vocab_size: int
    data_seed: int
    autocast_dtype: torch.dtype | None
    settings: TrainSettings


def parse_schemes(norm: str | list[str]) -> list[str]:
    names = norm.split(",") if isinstance(norm, str) else list(norm)
    out: list[str] = []
    for name in names:
        if not str(name).strip():
            continue
        try:
            scheme = canonical_scheme(name)
        except ValueError:
            raise LayerprobeError(f"unknown norm scheme {name.strip()!r} in --norm; choose from "
                                  f"{', '.join(NORM_SCHEMES)}") from None
        if scheme not in out:
            out.append(scheme)
    if not out:
        raise LayerprobeError(f"--norm names no scheme; give a comma list of {', '.join(NORM_SCHEMES)}")
    return out


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise LayerprobeError(f"{name} must be {'at least 0' if allow_zero else 'positive'} (got {value})")


def resolve_plan(s: TrainSettings, env: DistEnv) -> Plan:
    schemes = parse_schemes(s.norm)
    try:
        preset = get_preset(s.preset)
    except ValueError as e:
        raise LayerprobeError(str(e)) from None
    if not 0.0 <= s.post_ln_ratio <= 1.0:
        raise LayerprobeError(f"--post-ln-ratio (Mix-LN's α) must lie in [0, 1] (got {s.post_ln_ratio})")
    if s.resume and s.overwrite:
        raise LayerprobeError("--resume and --overwrite contradict each other; give one")
    if str(s.norm_type).lower() not in ("rmsnorm", "layernorm"):
        raise LayerprobeError(f"unknown --norm-type {s.norm_type!r}; use rmsnorm or layernorm")
    for name, value in (("--steps", s.steps), ("--layers", s.layers), ("--hidden-size", s.hidden_size),
                        ("--ffn-size", s.ffn_size), ("--heads", s.heads), ("--kv-heads", s.kv_heads),
                        ("--batch-size", s.batch_size), ("--micro-batch-size", s.micro_batch_size),
                        ("--lr", s.lr), ("--eval-every", s.eval_every), ("--eval-samples", s.eval_samples),
                        ("--save-every", s.save_every), ("--vocab-size", s.vocab_size), ("--threads", s.threads)):
        _positive(name, value)
    _positive("--grad-clip", s.grad_clip, allow_zero=True)
    _positive("--weight-decay", s.weight_decay, allow_zero=True)
    if not 0.0 <= s.warmup_ratio < 1.0:
        raise LayerprobeError(f"--warmup-ratio must lie in [0, 1) (got {s.warmup_ratio})")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise LayerprobeError(f"--min-lr-ratio must lie in [0, 1] (got {s.min_lr_ratio})")
    seq_len = s.seq_len or preset.seq_len
    if seq_len < 2:
        raise LayerprobeError(f"--seq-len must be at least 2 (got {seq_len})")
    layers = s.layers or preset.num_hidden_layers
    if s.post_ln_layers is not None and not 0 <= s.post_ln_layers <= layers:
        raise LayerprobeError(f"--post-ln-layers must lie in [0, {layers}] for {layers} layers (got {s.post_ln_layers})")

    batch = s.batch_size or preset.batch_size
    if batch % env.world_size:
        raise LayerprobeError(f"--batch-size {batch} is not divisible by the {env.world_size} processes")
    per_rank = batch // env.world_size
    micro = min(s.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise LayerprobeError(f"the per-process batch {per_rank} is not a multiple of --micro-batch-size {micro}")
    if s.eval_samples < env.world_size:
        raise LayerprobeError(f"--eval-samples {s.eval_samples} is smaller than the {env.world_size} processes")
    steps = s.steps or preset.steps
    eval_every = s.eval_every or min(preset.eval_every, steps)

    if s.dtype not in ("auto", "float32", "bfloat16"):
        raise LayerprobeError(f"unknown --dtype {s.dtype!r}; use auto, float32 or bfloat16")
    # bf16 autocast on a GPU; fp32 on the CPU, where bf16 matmuls are many times slower.
    use_bf16 = s.dtype == "bfloat16" or (s.dtype == "auto" and env.device.type == "cuda")
    return Plan(
        schemes=schemes, preset=preset.name, steps=steps, seq_len=seq_len, batch_size=batch,
        micro_batch_size=micro, accum=per_rank // micro, lr=s.lr or preset.lr,
        warmup_steps=int(s.warmup_ratio * steps), eval_every=eval_every, save_every=s.save_every or eval_every,
        vocab_size=s.vocab_size or preset.vocab_size, data_seed=s.seed if s.data_seed is None else s.data_seed,
        autocast_dtype=torch.bfloat16 if use_bf16 else None, settings=s,
    )


def model_config(plan: Plan, scheme: str, vocab_size: int, tokenizer) -> LayerprobeConfig:
    s = plan.settings
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    try:
        return reference_config(
            plan.preset, scheme, vocab_size=vocab_size, num_hidden_layers=s.layers, hidden_size=s.hidden_size,
            intermediate_size=s.ffn_size, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
            max_position_embeddings=plan.seq_len, post_ln_ratio=s.post_ln_ratio,
            post_ln_layers=s.post_ln_layers if scheme == "mix" else None, scaled_init=s.scaled_init,
            norm_type=s.norm_type, bos_token_id=eos, eos_token_id=eos, pad_token_id=None,
        )
    except ValueError as e:
        raise LayerprobeError(f"bad model shape: {e}") from None


def run_identity(plan: Plan, config: LayerprobeConfig, tok_fingerprint: str | None) -> dict:
    """What a run folder must agree on before it can be resumed (or left alone).

    Left out on purpose, because they do not change what a step computes: --steps (a run can be extended; the
    cosine is then stretched from the resume point), --eval-every, --save-every, --micro-batch-size, the device,
    dtype, threads, compile, FSDP and the number of processes.
    """
    s = plan.settings
    return {
        "model": {k: getattr(config, k) for k in MODEL_KEYS},
        "train": {"preset": plan.preset, "data": s.data, "text_column": s.text_column, "seq_len": plan.seq_len,
                  "batch_size": plan.batch_size, "lr": plan.lr, "warmup_ratio": s.warmup_ratio,
                  "min_lr_ratio": s.min_lr_ratio, "weight_decay": s.weight_decay, "grad_clip": s.grad_clip,
                  "seed": s.seed, "data_seed": plan.data_seed, "eval_samples": s.eval_samples,
                  "tokenizer": s.tokenizer or "bpe", "tokenizer_sha": tok_fingerprint},
    }


def identity_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for part in ("model", "train"):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def lr_at(step: int, plan: Plan) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio × peak at the last step (0-based step)."""
    peak, floor = plan.lr, plan.lr * plan.settings.min_lr_ratio
    if step < plan.warmup_steps:
        return peak * (step + 1) / plan.warmup_steps
    span = max(1, plan.steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- interruption -----------------------------------------------------------------------------------------

class StopFlag:
    """Ctrl-C (or SIGTERM from a scheduler) asks the loop to save and stop after the current step;
    a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


# ---- evaluation and per-layer statistics ------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, plan: Plan, env: DistEnv) -> tuple[float, list[float]]:
    """Held-out loss (mean over every predicted token) and each layer's output variance, over all processes.

    Output variance: the variance over the hidden dimension of a layer's output, averaged over tokens —
    the quantity whose growth with depth the Curse-of-Depth paper plots.
    """
    core = _core(model)
    layers = core.model.layers
    var_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens_seen = torch.zeros(1, dtype=torch.float64)

    def hook(index):
        def fn(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            var_sum[index] += h.float().var(dim=-1, unbiased=False).sum().double().cpu()
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(1, dtype=torch.float64)
    mine = blocks[env.rank::env.world_size]
    try:
        for i in range(0, len(mine), plan.micro_batch_size):
            ids = mine[i:i + plan.micro_batch_size].to(env.device)
            with _autocast(plan, env):
                logits = model(input_ids=ids, use_cache=False).logits
            loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                        reduction="sum").double().cpu()
            tokens_seen += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n_pred = len(mine) * (plan.seq_len - 1)
    totals = all_reduce_sum(env, torch.cat([loss_sum, torch.tensor([float(n_pred)], dtype=torch.float64),
                                            var_sum, tokens_seen]))
    loss = (totals[0] / totals[1]).item()
    variances = (totals[2:-1] / totals[-1]).tolist()
    return loss, variances


def layer_grad_norms(core, sharded: bool, env: DistEnv) -> list[float]:
    """L2 norm of the gradient of each decoder layer's parameters."""
    sq = []
    for layer in core.model.layers:
        total = torch.zeros((), dtype=torch.float64)
        for p in layer.parameters():
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                total += g.detach().double().pow(2).sum().cpu()
        sq.append(total)
    sq = torch.stack(sq)
    if sharded:  # FSDP: each process holds a shard of every gradient
        sq = all_reduce_sum(env, sq)
    return sq.sqrt().tolist()


def init_model(config: LayerprobeConfig, seed: int) -> LayerprobeForCausalLM:
    """Fresh fp32 weights from `seed`. Schemes with the same parameters (pre, post, mix, lns) start identical:
    each module draws its initial values in the same order whatever the scheme."""
    torch.manual_seed(seed)
    return LayerprobeForCausalLM(config)


def _core(model):
    """The LayerprobeForCausalLM inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and not isinstance(model, LayerprobeForCausalLM):
            model = model.module
        else:
            return model


def _autocast(plan: Plan, env: DistEnv):
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=plan.autocast_dtype)


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


# ---- one run ----------------------------------------------------------------------------------------------

class Run:
    """One scheme's training run inside OUT/<scheme>."""

    def __init__(self, plan: Plan, scheme: str, config: LayerprobeConfig, identity: dict, tokenizer,
                 data: TokenData, env: DistEnv, out: Path):
        self.plan, self.scheme, self.config, self.identity = plan, scheme, config, identity
        self.tokenizer, self.data, self.env = tokenizer, data, env
        self.dir = out / scheme
        self.state: dict | None = None  # trainer state to resume from
        self.skip = False  # already complete

    # -- folder checks, done for every scheme before any training starts --
    def check_folder(self) -> None:
        s = self.plan.settings
        if self.env.is_main:
            ckpt.recover(self.dir)
        if not self.dir.exists() or not any(self.dir.iterdir()):
            return
        record = ckpt.read_run(self.dir)
        if record is None:
            raise LayerprobeError(f"{self.dir} exists and is not a layerprobe run folder",
                                  advice="remove it or choose another {out}")
        if s.overwrite:
            return
        diffs = identity_differences(record.get("identity", {}), self.identity)
        if diffs:
            shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
            raise LayerprobeError(f"{self.dir} holds a run with a different config ({shown})",
                                  advice="pass {overwrite} to replace it or choose another {out}")
        if not s.resume:
            raise LayerprobeError(f"{self.dir} already holds this run (step {record.get('step', 0)} of "
                                  f"{record.get('total_steps', '?')})",
                                  advice="pass {resume} to continue it or {overwrite} to start again")

    def prepare(self) -> None:
        """After the checks: clear for --overwrite, or load the state to resume from (every process)."""
        s = self.plan.settings
        if s.overwrite and self.env.is_main and self.dir.exists():
            shutil.rmtree(self.dir)
        barrier(self.env)
        if s.resume and self.dir.exists():
            self.state = ckpt.load_state(self.dir)
            done = self.state["step"] if self.state else 0
            record = ckpt.read_run(self.dir) or {}
            if self.state and done >= self.plan.steps:
                self.skip = True
                self.result_from_record(record, done)

    def result_from_record(self, record: dict, done: int) -> None:
        self.result = RunResult(
            scheme=self.scheme, path=str(self.dir), status=record.get("status", "completed"), steps_done=done,
            total_steps=self.plan.steps, final_loss=record.get("final_loss"),
            final_eval_loss=record.get("final_eval_loss"), final_eval_ppl=record.get("final_eval_ppl"),
            best_eval_loss=record.get("best_eval_loss"), best_step=record.get("best_step"),
            diverged_at=record.get("diverged_at"), diverged_reason=record.get("diverged_reason"),
            checkpoint_step=record.get("checkpoint_step"),
            layer_output_var=record.get("layer_output_var"), seconds=record.get("seconds", 0.0),
            tokens_per_s=record.get("tokens_per_s"),
        )

    def _record(self, result: RunResult, step: int) -> dict:
        return {"scheme": self.scheme, "status": result.status, "step": step, "total_steps": self.plan.steps,
                "final_loss": result.final_loss, "final_eval_loss": result.final_eval_loss,
                "final_eval_ppl": result.final_eval_ppl, "best_eval_loss": result.best_eval_loss,
                "best_step": result.best_step, "diverged_at": result.diverged_at,
                "diverged_reason": result.diverged_reason, "checkpoint_step": result.checkpoint_step,
                "layer_output_var": result.layer_output_var,
                "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "identity": self.identity, "preset": self.plan.preset,
                "settings": {k: v for k, v in asdict(self.plan.settings).items() if k not in ("resume", "overwrite")},
                "world_size": self.env.world_size}

    def _build_model(self) -> LayerprobeForCausalLM:
        model = init_model(self.config, self.plan.settings.seed)
        if self.state is not None:
            from safetensors.torch import load_file

            weights = load_file(str(self.dir / "last" / "model.safetensors"))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            missing = [k for k in missing if not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
            if missing or unexpected:
                raise LayerprobeError(f"the checkpoint in {self.dir / 'last'} does not match the model "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use --overwrite")
        return model.to(self.env.device)

    def _full_state_dicts(self, model, opt) -> tuple[dict | None, dict]:
        """Model and optimizer state in a form that any world size can load."""
        if not self.plan.settings.fsdp:
            return None, opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)

    def _save_last(self, core, model, opt, step: int, result: RunResult, extra: dict) -> None:
        model_sd, opt_sd = self._full_state_dicts(model, opt)
        if self.env.is_main:
            state = {"step": step, "optimizer": opt_sd, "torch_rng": torch.get_rng_state(), **extra}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            last = ckpt.save_checkpoint(self.dir, "last", core, self.tokenizer, state=state, state_dict=model_sd)
            ckpt.publish_top_level(self.dir, last)
            ckpt.write_run(self.dir, self._record(result, step))
        barrier(self.env)

    def _save_best(self, core, model) -> None:
        model_sd = None
        if self.plan.settings.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.is_main:
            ckpt.save_checkpoint(self.dir, "best", core, self.tokenizer, state_dict=model_sd)

    def _setup(self):
        """The model (wrapped for DDP/FSDP, compiled if asked) and its optimizer, restored when resuming."""
        plan, env, s = self.plan, self.env, self.plan.settings
        core = self._build_model()
        core.train()
        model = core
        if s.fsdp:
            model = wrap_fsdp(core, env, mixed_bf16=plan.autocast_dtype is not None)
        elif env.distributed:
            model = wrap_ddp(core, env)
        # Weight decay (0 by default, i.e. Adam) applies to matrices only, never to norms.
        decay = [p for p in core.parameters() if p.dim() >= 2]
        no_decay = [p for p in core.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.999), eps=1e-8)
        if self.state is not None:
            if s.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(model, opt, optim_state_dict=self.state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(self.state["optimizer"])
            torch.set_rng_state(self.state["torch_rng"])
            if "cuda_rng" in self.state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self.state["cuda_rng"])
        step_model = torch.compile(model) if s.compile else model
        return core, model, step_model, opt

    def _step(self, step: int, order: BatchOrder, model, step_model, opt, with_layers: bool):
        """Forward and backward over the micro-batches of one global batch; returns (lr, loss, grad norm,
        per-layer grad norms). The optimizer is not stepped: the caller checks the numbers first."""
        plan, env, s = self.plan, self.env, self.plan.settings
        lr = lr_at(step, plan)
        for group in opt.param_groups:
            group["lr"] = lr
        per_rank = plan.batch_size // env.world_size
        rows = order.rows(step)[env.rank * per_rank:(env.rank + 1) * per_rank]
        loss_acc = torch.zeros((), dtype=torch.float64, device=env.device)
        for m in range(plan.accum):
            ids = self.data.train[rows[m * plan.micro_batch_size:(m + 1) * plan.micro_batch_size]].to(env.device)
            with self._sync(model, m == plan.accum - 1), _autocast(plan, env):
                loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss / plan.accum).backward()
            loss_acc += loss.detach().double()
        # Every micro-batch holds the same number of tokens, so the mean of the means is the batch mean.
        loss_val = (all_reduce_sum(env, (loss_acc / plan.accum).reshape(1).cpu()) / env.world_size).item()
        params = [p for p in model.parameters() if p.grad is not None]
        if s.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)  # the norm before clipping
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        per_layer = layer_grad_norms(_core(model), s.fsdp, env) if with_layers else None
        return lr, loss_val, gnorm, per_layer

    def train(self, stop: StopFlag, progress) -> RunResult:
        plan, env, s = self.plan, self.env, self.plan.settings
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        barrier(env)
        state = self.state or {}
        start = state.get("step", 0)
        result = RunResult(scheme=self.scheme, path=str(self.dir), status="running", steps_done=start,
                           total_steps=plan.steps, resumed_from=start if s.resume and self.state else None,
                           checkpoint_step=start if self.state else None)
        best_loss, best_step = state.get("best_eval_loss"), state.get("best_step")
        seconds_before, tokens_before = state.get("train_seconds", 0.0), state.get("tokens", 0)
        if self.state is not None:
            old = ckpt.read_run(self.dir) or {}
            for key in ("final_loss", "final_eval_loss", "final_eval_ppl", "layer_output_var"):
                setattr(result, key, old.get(key))
        if env.is_main:
            ckpt.truncate_metrics(self.dir, start)  # steps after the checkpoint are redone: their metrics go
            ckpt.write_run(self.dir, self._record(result, start))

        core, model, step_model, opt = self._setup()
        order = BatchOrder(len(self.data.train), plan.batch_size, plan.data_seed)
        eval_blocks = self.data.eval[: (len(self.data.eval) // env.world_size) * env.world_size]
        eval_model = model if s.fsdp else core  # FSDP's forward needs its wrapper; DDP's does not
        tokens_per_step = plan.batch_size * plan.seq_len
        task = progress.add_task(self.scheme, total=plan.steps, completed=start, loss=float("nan"),
                                 tps=0.0, ppl="") if progress is not None else None
        metrics = open(self.dir / ckpt.METRICS_FILE, "a", encoding="utf-8") if env.is_main else None
        seconds, tokens, step = seconds_before, tokens_before, start

        def save_last():
            self._save_last(core, model, opt, step, result, {"best_eval_loss": best_loss, "best_step": best_step,
                                                             "train_seconds": seconds, "tokens": tokens})
            result.checkpoint_step = step

        def log(record):
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()

        try:
            while step < plan.steps:
                if any_process(env, stop.requested):
                    result.status = "interrupted"
                    break
                t0 = time.perf_counter()
                is_eval_step = (step + 1) % plan.eval_every == 0 or step + 1 == plan.steps
                lr, loss_val, gnorm, per_layer_grad = self._step(step, order, model, step_model, opt, is_eval_step)
                if not (_finite(loss_val) and _finite(gnorm)):
                    # Stop before the update: the last checkpoint on disk is the last good state.
                    result.status, result.diverged_at = "diverged", step + 1
                    result.diverged_reason = f"loss is {loss_val}" if not _finite(loss_val) else f"gradient norm is {gnorm}"
                    log({"step": step + 1, "loss": None, "lr": lr, "grad_norm": None, "diverged": True,
                         "reason": result.diverged_reason})
                    break
                opt.step()
                opt.zero_grad(set_to_none=True)
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                seconds, tokens, step = seconds + dt, tokens + tokens_per_step, step + 1
                record = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm,
                          "tokens_per_s": tokens_per_step / dt, "tokens": tokens}
                result.final_loss, result.steps_done = loss_val, step
                if is_eval_step:
                    eval_loss, variances = evaluate(eval_model, eval_blocks, plan, env)
                    ppl = math.exp(min(eval_loss, 700.0))
                    record.update(eval_loss=eval_loss, eval_ppl=ppl, layer_grad_norm=per_layer_grad,
                                  layer_output_var=variances)
                    result.final_eval_loss, result.final_eval_ppl, result.layer_output_var = eval_loss, ppl, variances
                    if _finite(eval_loss) and (best_loss is None or eval_loss < best_loss):
                        best_loss, best_step = eval_loss, step
                        self._save_best(core, model)
                    result.best_eval_loss, result.best_step = best_loss, best_step
                log(record)  # before the checkpoint: a checkpoint never runs ahead of its metrics
                _after_step(self.dir, step)
                if step % plan.save_every == 0 or step == plan.steps:
                    save_last()
                if task is not None:
                    progress.update(task, completed=step, loss=loss_val, tps=tokens_per_step / dt,
                                    ppl=f"{result.final_eval_ppl:.1f}" if result.final_eval_ppl else "")
            else:
                result.status = "completed"
            if result.status == "interrupted" and step != result.checkpoint_step:
                save_last()
        finally:
            if metrics:
                metrics.close()
        result.seconds = seconds
        result.tokens_per_s = (tokens - tokens_before) / (seconds - seconds_before) if seconds > seconds_before else None
        if env.is_main:
            ckpt.write_run(self.dir, self._record(result, result.checkpoint_step or 0))
        barrier(env)
        return result

    @staticmethod
    def _sync(model, last_micro: bool):
        """Gradient all-reduce only on the last micro-batch of an accumulation."""
        if last_micro:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):  # DDP
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(False)

            @contextlib.contextmanager
            def resync():
                try:
                    yield
                finally:
                    model.set_requires_gradient_sync(True)
            return resync()
        return contextlib.nullcontext()


def _after_step(run_dir: Path, step: int) -> None:
    """Called after each step's metrics are written; a seam for fault-injection tests."""


# ---- all schemes ------------------------------------------------------------------------------------------

def _make_progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("eval ppl {task.fields[ppl]}"), TimeElapsedColumn(),
        console=Console(stderr=True), transient=False,
    )


def train_reference(settings: TrainSettings | None = None, **kwargs) -> TrainingSummary:
    """Train one reference model per scheme in `settings.norm`, in OUT/<scheme>, with identical data and seed.

    Returns a TrainingSummary; `interrupted` is set when Ctrl-C stopped the runs (after saving).
    A diverging scheme (NaN/Inf loss) is recorded as such and the next scheme starts.
    """
    s = settings or TrainSettings(**kwargs)
    if settings is not None and kwargs:
        s = TrainSettings(**{**asdict(settings), **kwargs})
    env = init_distributed(s.device)
    try:
        return _train_all(s, env)
    finally:
        shutdown(env)


def _train_all(s: TrainSettings, env: DistEnv) -> TrainingSummary:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    plan = resolve_plan(s, env)
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(s.out).expanduser()
    if env.is_main:
        ensure_writable_dir(out)
    barrier(env)

    # The tokenizer and the data are shared by every scheme.
    text_needed = plan.steps * plan.batch_size * plan.seq_len * 6  # characters to stream from hf: datasets
    docs = None
    if not s.data.endswith(".npy"):
        docs = read_training_text(s.data, s.text_column, text_needed)
        if not docs:
            raise LayerprobeError(f"the data {s.data!r} holds no text")
    if s.tokenizer:
        tokenizer = load_tokenizer(s.tokenizer)
    elif docs is None:
        tokenizer = None  # token ids given as they are
    else:
        tokenizer = train_bpe_tokenizer(docs, plan.vocab_size)
    vocab = len(tokenizer) if tokenizer is not None else plan.vocab_size
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    data = prepare_token_data(s.data, tokenizer, seq_len=plan.seq_len, batch_size=plan.batch_size,
                              eval_samples=s.eval_samples, seed=plan.data_seed, text_column=s.text_column,
                              vocab_size=vocab, docs=docs)
    if len(data.eval) < env.world_size:
        raise LayerprobeError(f"the held-out split has {len(data.eval)} blocks, fewer than the "
                              f"{env.world_size} processes; give more data")

    runs = []
    for scheme in plan.schemes:
        config = model_config(plan, scheme, vocab, tokenizer)
        runs.append(Run(plan, scheme, config, run_identity(plan, config, fingerprint), tokenizer, data, env, out))
    for run in runs:  # every folder is checked before anything is trained or deleted
        run.check_folder()
    barrier(env)
    for run in runs:
        run.prepare()

    summary = TrainingSummary(out=str(out), settings={
        "preset": plan.preset, "steps": plan.steps, "seq_len": plan.seq_len, "batch_size": plan.batch_size,
        "lr": plan.lr, "seed": s.seed, "data_seed": plan.data_seed, "data": s.data, "vocab_size": vocab,
        "train_blocks": len(data.train), "eval_blocks": len(data.eval), "world_size": env.world_size,
        "device": str(env.device), "autocast": str(plan.autocast_dtype) if plan.autocast_dtype else "float32"})
    with StopFlag() as stop, _make_progress(s.progress and env.is_main) as progress:
        for run in runs:
            if run.skip:
                summary.runs.append(run.result)
                continue
            result = run.train(stop, progress)
            summary.runs.append(result)
            if result.status == "interrupted":
                summary.interrupted = True
                break
    if env.is_main:
        write_json(out / "summary.json", summary.as_dict())
    return summary
