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
    """What `layerprobe train-reference` accepts. None means "not given": the recipe's value when a --recipe is
    named, else the default in DEFAULTS, else the preset's."""

    norm: str | list[str] | None = None
    preset: str | None = None
    steps: int | None = None
    tokens: str | int | None = None  # a token budget ("1.1B"), instead of steps: ceil(tokens / (batch x seq))
    recipe: str | None = None  # a paper's settings in one name (layerprobe.training.recipes); flags given override
    data: str = "builtin"
    eval_data: str | None = None  # a separate held-out set; default: the last blocks of the data
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
    warmup_ratio: float | None = None
    min_lr_ratio: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    post_ln_ratio: float = 0.25
    post_ln_layers: int | None = None
    scaled_init: bool = False
    norm_type: str = "rmsnorm"
    vocab_size: int | None = None
    tokenizer: str | None = None
    eval_every: int | None = None
    eval_samples: int | None = None
    save_every: int | None = None
    seed: int = 0
    data_seed: int | None = None
    device: str = "auto"
    dtype: str | None = None
    threads: int | None = None  # CPU threads for torch (default: torch's choice)
    compile: bool = False
    fsdp: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


# Values of the settings a recipe can set, when neither a flag nor a recipe gives them.
DEFAULTS = {"norm": "pre,post,mix,lns", "preset": "tiny", "warmup_ratio": 0.1, "min_lr_ratio": 0.1,
            "weight_decay": 0.0, "grad_clip": 1.0, "dtype": "auto", "eval_samples": 64}
# Recipe field -> setting (the rest have the same name).
_RECIPE_FIELDS = {"norms": "norm"}


def effective_settings(s: TrainSettings) -> TrainSettings:
    """The settings with the recipe's values where none was given, then DEFAULTS: what actually runs.

    A recipe's `eval_tokens` becomes held-out blocks of its sequence length; its `steps` yield to --tokens."""
    from dataclasses import replace

    from .recipes import get_recipe

    values: dict = {}
    if s.recipe:
        r = get_recipe(s.recipe)
        for key, value in r.settings().items():
            name = _RECIPE_FIELDS.get(key, key)
            if name == "eval_tokens":
                seq = s.seq_len or r.seq_len
                name, value = "eval_samples", -(-value // seq)
            if name == "steps" and s.tokens is not None:
                continue
            if getattr(s, name) is None:
                values[name] = value
    for key, value in DEFAULTS.items():
        if getattr(s, key) is None and key not in values:
            values[key] = value
    return replace(s, **values)


def explicit_settings(s: TrainSettings) -> dict:
    """The recipe-controlled settings the caller gave (for the printed plan's "overrides" notes)."""
    from .recipes import SETTING_NAMES

    out = {}
    for key in SETTING_NAMES:
        name = _RECIPE_FIELDS.get(key, key)
        if hasattr(s, name) and getattr(s, name) is not None:
            out[key] = getattr(s, name)
    return out


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
    settings: TrainSettings  # effective: recipe and defaults filled in
    tokenizer_spec: str | None = None  # what the data is tokenized with (None: token ids / a prepared folder's own)
    budget_tokens: int | None = None  # --tokens, when the steps were derived from it

    def describe(self, given: TrainSettings | None = None) -> list[str]:
        """What will run, printed before training: the recipe (with the flags that override it) and the plan."""
        from .recipes import describe as describe_recipe

        s = self.settings
        lines = describe_recipe(s.recipe, explicit_settings(given)) if s.recipe and given is not None else []
        budget = (f" = --tokens {self.budget_tokens:,} rounded up to whole steps" if self.budget_tokens else "")
        lines.append(
            f"plan: {', '.join(self.schemes)} · preset {self.preset} · {self.steps:,} steps x {self.batch_size} x "
            f"{self.seq_len} = {self.steps * self.batch_size * self.seq_len:,} tokens{budget}")
        lines.append(
            f"  lr {self.lr:g}, warmup {self.warmup_steps:,} steps, cosine to {s.min_lr_ratio:.0%}, weight decay "
            f"{s.weight_decay:g}, clip {s.grad_clip:g} (0 = none), micro-batch {self.micro_batch_size} x "
            f"{self.accum} accumulation, {'bf16 autocast' if self.autocast_dtype else 'fp32'}, data seed {self.data_seed}")
        if str(s.data).endswith(".npy"):
            tokenizer = "none (token ids)"
        else:
            tokenizer = self.tokenizer_spec or "the one the prepared data was made with"
        lines.append(f"  tokenizer {tokenizer}")
        return lines


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


def _check_options(s: TrainSettings) -> None:
    """The checks of single options and of pairs that contradict each other: no preset, data or process needed."""
    if not 0.0 <= s.post_ln_ratio <= 1.0:
        raise LayerprobeError(f"--post-ln-ratio (Mix-LN's α) must lie in [0, 1] (got {s.post_ln_ratio})")
    if s.resume and s.overwrite:
        raise LayerprobeError("--resume and --overwrite contradict each other; give one")
    if str(s.norm_type).lower() not in ("rmsnorm", "layernorm"):
        raise LayerprobeError(f"unknown --norm-type {s.norm_type!r}; use rmsnorm or layernorm")
    if s.dtype not in ("auto", "float32", "bfloat16"):
        raise LayerprobeError(f"unknown --dtype {s.dtype!r}; use auto, float32 or bfloat16")
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


# Tokens per forward pass when --micro-batch-size is not given: the logits of 32,768 tokens at a
# 32,000 vocabulary (bf16, their fp32 copy, log-softmax and gradient) take ~14 GiB, so the 71m/130m
# recipes' default 512 x 256 batch runs as 4 micro-batches of 128 on one 80 GB GPU.
MICRO_BATCH_TOKENS = 1 << 15


def default_micro_batch(per_rank: int, seq_len: int, budget: int = MICRO_BATCH_TOKENS) -> int:
    """The largest divisor of `per_rank` whose micro-batch holds at most `budget` tokens (at least 1)."""
    fit = max(1, budget // max(seq_len, 1))
    return max(d for d in range(1, min(per_rank, fit) + 1) if per_rank % d == 0)


def _batching(s: TrainSettings, preset, env: DistEnv, seq_len: int) -> tuple[int, int]:
    """(global batch, micro-batch per process), checked against the number of processes."""
    batch = s.batch_size or preset.batch_size
    if batch % env.world_size:
        raise LayerprobeError(f"--batch-size {batch} is not divisible by the {env.world_size} processes")
    per_rank = batch // env.world_size
    micro = min(s.micro_batch_size or default_micro_batch(per_rank, seq_len), per_rank)
    if per_rank % micro:
        raise LayerprobeError(f"the per-process batch {per_rank} is not a multiple of --micro-batch-size {micro}")
    if s.eval_samples < env.world_size:
        raise LayerprobeError(f"--eval-samples {s.eval_samples} is smaller than the {env.world_size} processes")
    return batch, micro


def _length(given: TrainSettings, s: TrainSettings, preset, batch: int, seq_len: int) -> tuple[int, int | None]:
    """(steps, token budget or None): --tokens buys steps of batch × seq_len tokens, else --steps or the preset's."""
    if given.tokens is None:
        return s.steps or preset.steps, None
    from ..corpus import parse_token_count, steps_for_tokens

    if given.steps is not None:
        raise LayerprobeError("--steps and --tokens both say how long to train; give one")
    budget = parse_token_count(given.tokens)
    return steps_for_tokens(budget, batch, seq_len), budget


def _check_data(s: TrainSettings) -> None:
    from .data import check_data_spec

    check_data_spec(s.data)
    if s.eval_data is not None:
        check_data_spec(s.eval_data, "--eval-data")
        if str(s.eval_data).endswith(".npy") != str(s.data).endswith(".npy"):
            raise LayerprobeError("--eval-data and --data must both be token ids (.npy) or both text/prepared data")


def resolve_plan(s: TrainSettings, env: DistEnv) -> Plan:
    """Settings (as given) -> the Plan that runs, with the recipe and defaults filled in; every check that
    needs no data happens here, before any folder is made."""
    from .data import tokenizer_spec_for

    given = s
    s = effective_settings(s)
    schemes = parse_schemes(s.norm)
    try:
        preset = get_preset(s.preset)
    except ValueError as e:
        raise LayerprobeError(str(e)) from None
    _check_options(s)
    seq_len = s.seq_len or preset.seq_len
    if seq_len < 2:
        raise LayerprobeError(f"--seq-len must be at least 2 (got {seq_len})")
    layers = s.layers or preset.num_hidden_layers
    if s.post_ln_layers is not None and not 0 <= s.post_ln_layers <= layers:
        raise LayerprobeError(f"--post-ln-layers must lie in [0, {layers}] for {layers} layers (got {s.post_ln_layers})")
    batch, micro = _batching(s, preset, env, seq_len)
    steps, budget = _length(given, s, preset, batch, seq_len)
    eval_every = s.eval_every or min(preset.eval_every, steps)
    _check_data(s)
    vocab = s.vocab_size or preset.vocab_size
    tok_spec = tokenizer_spec_for(s.data, s.tokenizer, vocab)
    # bf16 autocast on a GPU; fp32 on the CPU, where bf16 matmuls are many times slower.
    use_bf16 = s.dtype == "bfloat16" or (s.dtype == "auto" and env.device.type == "cuda")
    return Plan(
        schemes=schemes, preset=preset.name, steps=steps, seq_len=seq_len, batch_size=batch,
        micro_batch_size=micro, accum=batch // env.world_size // micro, lr=s.lr or preset.lr,
        warmup_steps=int(s.warmup_ratio * steps), eval_every=eval_every, save_every=s.save_every or eval_every,
        vocab_size=vocab, data_seed=s.seed if s.data_seed is None else s.data_seed,
        autocast_dtype=torch.bfloat16 if use_bf16 else None, settings=s, tokenizer_spec=tok_spec, budget_tokens=budget,
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


# How blocks are cut, held out and ordered: prepared token files, the last blocks held out, Feistel step rows.
# Runs made before (an in-memory split with a random held-out set) differ in their data and are not resumed.
DATA_FORMAT = 2


def run_identity(plan: Plan, config: LayerprobeConfig, tok_fingerprint: str | None) -> dict:
    """What a run folder must agree on before it can be resumed (or left alone).

    Left out on purpose, because they do not change what a step computes: --steps (a run can be extended; the
    cosine is then stretched from the resume point), --eval-every, --save-every, --micro-batch-size, the device,
    dtype, threads, compile, FSDP and the number of processes. A streamed hf: dataset is the exception: it is
    read as far as --steps needs, so its length (`data_tokens`) is part of the identity, and extending such a
    run is refused rather than trained on other data with another held-out set.
    """
    from .data import streamed_tokens

    s = plan.settings
    data_tokens = streamed_tokens(s.data, plan.steps * plan.batch_size, s.eval_samples, plan.seq_len, s.eval_data)
    return {
        "model": {k: getattr(config, k) for k in MODEL_KEYS},
        "train": {"preset": plan.preset, "data": s.data, "eval_data": s.eval_data, "text_column": s.text_column,
                  "data_format": DATA_FORMAT, "seq_len": plan.seq_len,
                  "batch_size": plan.batch_size, "lr": plan.lr, "warmup_ratio": s.warmup_ratio,
                  "min_lr_ratio": s.min_lr_ratio, "weight_decay": s.weight_decay, "grad_clip": s.grad_clip,
                  "seed": s.seed, "data_seed": plan.data_seed, "eval_samples": s.eval_samples,
                  "tokenizer": plan.tokenizer_spec, "tokenizer_sha": tok_fingerprint,
                  **({"data_tokens": data_tokens} if data_tokens is not None else {})},
    }


def identity_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for part in ("model", "train"):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return diffs
