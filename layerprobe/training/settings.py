"""What a training run is: the settings `train-reference` accepts, resolved against a preset into a `Plan`
and validated before anything heavy (no data read, no model built, no folder created), plus the identity a
run folder must keep to be resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LayerprobeError
from ..reference import NORM_SCHEMES, LayerprobeConfig, canonical_scheme, get_preset, reference_config
from .distributed import DistEnv

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
