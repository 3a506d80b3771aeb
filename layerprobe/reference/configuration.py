"""Configuration of the layerprobe reference models: one LLaMA-style decoder, nine norm schemes.

The config records everything needed to rebuild a model (`norm_scheme`, the resolved
`post_ln_layers`, `scaled_init`, ...); derived constants (DeepNorm's α and β, the LNS factors)
are computed from it, never stored, so they cannot drift from the layer count.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# Canonical scheme names. Users may write any case and the papers' spellings ("Pre-LN", "Peri-LN", "DyT",
# "HybridNorm*", ...). The Curse-of-Depth paper's public code (lmsdss/LayerNorm-Scaling,
# peft_pretraining/modeling_llama.py, LlamaDecoderLayer) lower-cases NORM_TYPE and then compares it with
# 'LNS': no branch matches, so its blocks get no norms at all. With the shipped configs (use_cache: true)
# the first forward fails (present_key_value is never assigned); with the cache off every block returns
# its input unchanged. Here names are matched case-insensitively, once, in `canonical_scheme`.
NORM_SCHEMES = ("pre", "post", "mix", "lns", "deepnorm", "sandwich", "dyt", "hybrid", "hybrid_star")
_ALIASES = {"peri": "sandwich", "deepnet": "deepnorm", "layernorm_scaling": "lns", "scaled": "lns",
            "dynamic_tanh": "dyt", "dynamictanh": "dyt", "hybridnorm": "hybrid", "hybrid*": "hybrid_star",
            "hybridnorm*": "hybrid_star", "hybridnorm_star": "hybrid_star"}
NORM_TYPES = ("rmsnorm", "layernorm")
# Schemes whose attention normalises queries, keys and values per head (HybridNorm's QKV-norm).
QKV_NORM_SCHEMES = ("hybrid", "hybrid_star")

# DyT's α0 (attention / other) by model width, LLaMA recipe (Zhu et al. 2025, arXiv 2503.10622): Table 12
# (widths 1024-8192, "model depth has negligible influence") and Table 11 / the official LLaMA commands
# (jiachenzhu/DyT, other_tasks/LLaMA/README.md: 7B 4096 -> 0.8/0.2, 13B 5120 -> 0.6/0.15, 34B and 70B
# -> 0.2/0.05). "Other" is the FFN norms and the final norm. Narrower than 1024 takes 1024's row.
DYT_ALPHA_BY_WIDTH = ((1024, 1.0, 1.0), (2048, 1.0, 0.5), (4096, 0.8, 0.2), (5120, 0.6, 0.15))
DYT_ALPHA_WIDEST = (0.2, 0.05)


def dyt_alpha_init(hidden_size: int) -> tuple[float, float]:
    """(α0 of the attention DyTs, α0 of the FFN and final DyTs) for a model `hidden_size` wide: the row of
    the paper's table for the smallest tabulated width at least as wide."""
    for width, attn, other in DYT_ALPHA_BY_WIDTH:
        if hidden_size <= width:
            return attn, other
    return DYT_ALPHA_WIDEST


def canonical_scheme(name: str) -> str:
    """'Pre-LN', 'pre_ln', 'PRE' -> 'pre'; 'Peri-LN' -> 'sandwich'; 'DyT' -> 'dyt'; 'HybridNorm*' ->
    'hybrid_star'. ValueError for anything else."""
    key = str(name).strip().lower().replace("_", "-")
    if key.endswith("-ln"):
        key = key[: -len("-ln")]
    key = key.replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in NORM_SCHEMES:
        raise ValueError(f"unknown norm scheme {name!r}; choose from {', '.join(NORM_SCHEMES)}")
    return key


def mix_post_ln_layers(num_layers: int, ratio: float) -> int:
    """Mix-LN's split: the first ⌊αL⌋ blocks are Post-LN. α = 0 is pure Pre-LN, α = 1 pure Post-LN."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"post_ln_ratio (α) must lie in [0, 1] (got {ratio})")
    # The epsilon keeps ⌊0.29 * 100⌋ at 29 although 0.29 * 100 == 28.999999999999996 in floating point.
    return min(num_layers, math.floor(ratio * num_layers + 1e-9))


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNet's residual up-weighting for an L-block decoder-only model: α = (2L)^(1/4)."""
    return (2 * num_layers) ** 0.25


def deepnorm_beta(num_layers: int) -> float:
    """DeepNet's init gain for v, out and FFN weights of an L-block decoder-only model: β = (8L)^(-1/4)."""
    return (8 * num_layers) ** -0.25


class LayerprobeConfig(PretrainedConfig):
    r"""A LLaMA-style causal LM (RoPE, SwiGLU, SDPA attention, RMSNorm or LayerNorm) with a choice of norm scheme.

    norm_scheme: ``pre`` ``h = x + F(N(x))``; ``post`` ``h = N(x + F(x))``; ``mix`` Post-LN for blocks
        ``0..post_ln_layers-1`` and Pre-LN after; ``lns`` Pre-LN with ``N(x)`` of block ℓ (0-based) scaled by
        ``1/sqrt(ℓ+1)``; ``deepnorm`` ``h = N(α·x + F(x))``, α = (2L)^¼; ``sandwich`` (Peri-LN)
        ``h = x + N_out(F(N_in(x)))``; ``dyt`` Pre-LN with every norm (and the final norm) replaced by
        ``γ·tanh(α·x)`` (``+ β`` with ``norm_type="layernorm"``) and a learnable scalar after the embedding,
        initialised to √d; ``hybrid`` (HybridNorm) ``h = x + Attn_QKVnorm(x)``, then ``y = N(h) + FFN(N(h))``;
        ``hybrid_star`` (HybridNorm*) is ``hybrid`` with block 0 Pre-LN (its attention keeps the QKV-norm).
        Every scheme keeps the final norm before the LM head (as the Mix-LN reference code does), so ``mix``
        with α = 1 is exactly ``post``.
    post_ln_ratio: α of Mix-LN; ``post_ln_layers = ⌊α·L⌋`` unless ``post_ln_layers`` is given.
    post_ln_layers: resolved on construction: the number of Post-LN blocks (L for ``post``, 0 for schemes
        without a Post-LN prefix).
    scaled_init: residual output projections (``o_proj``, ``down_proj``) get std ``σ/√(2L)``.
    dyt_alpha_attn, dyt_alpha_ffn, dyt_alpha_final: DyT's initial α for the pre-attention, pre-FFN and final
        norms; resolved on construction for ``dyt`` from the width (`dyt_alpha_init`) unless given, None for
        the other schemes. Recorded so a checkpoint says what it started from.
    """

    model_type = "layerprobe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1368
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 256
    hidden_act: str = "silu"
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    norm_scheme: str = "pre"
    post_ln_ratio: float = 0.25
    post_ln_layers: int | None = None
    scaled_init: bool = False
    dyt_alpha_attn: float | None = None
    dyt_alpha_ffn: float | None = None
    dyt_alpha_final: float | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self.norm_scheme = canonical_scheme(self.norm_scheme)
        self.norm_type = str(self.norm_type).lower()
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)} (got {self.norm_type!r})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be at least 1 (got {getattr(self, key)})")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE (got {self.head_dim})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

        L = self.num_hidden_layers
        if not 0.0 <= float(self.post_ln_ratio) <= 1.0:
            raise ValueError(f"post_ln_ratio (α) must lie in [0, 1] (got {self.post_ln_ratio})")
        if self.norm_scheme == "mix":
            if self.post_ln_layers is None:
                self.post_ln_layers = mix_post_ln_layers(L, float(self.post_ln_ratio))
            elif not 0 <= int(self.post_ln_layers) <= L:
                raise ValueError(f"post_ln_layers must lie in [0, {L}] for {L} layers (got {self.post_ln_layers})")
            self.post_ln_layers = int(self.post_ln_layers)
        else:
            # Only Mix-LN has a Post-LN prefix of chosen length; for the others it follows from the scheme.
            self.post_ln_layers = L if self.norm_scheme == "post" else 0
        if self.norm_scheme == "dyt":
            attn, other = dyt_alpha_init(self.hidden_size)
            for key, default in (("dyt_alpha_attn", attn), ("dyt_alpha_ffn", other), ("dyt_alpha_final", other)):
                value = getattr(self, key)
                value = default if value is None else float(value)
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"{key} must be a positive number (got {getattr(self, key)})")
                setattr(self, key, value)
        else:
            self.dyt_alpha_attn = self.dyt_alpha_ffn = self.dyt_alpha_final = None
        super().__post_init__(**kwargs)

    @property
    def deepnorm_alpha(self) -> float:
        return deepnorm_alpha(self.num_hidden_layers)

    @property
    def deepnorm_beta(self) -> float:
        return deepnorm_beta(self.num_hidden_layers)

    @property
    def qkv_norm(self) -> bool:
        """Whether attention normalises q, k and v per head (HybridNorm, in every block)."""
        return self.norm_scheme in QKV_NORM_SCHEMES

    def layer_placement(self, layer_idx: int) -> str:
        """Where block `layer_idx` puts its norms: pre, post, deepnorm, sandwich or hybrid (lns is pre with
        scaling, dyt is pre with DyT in place of the norms, HybridNorm*'s block 0 is pre)."""
        scheme = self.norm_scheme
        if scheme == "mix":
            return "post" if layer_idx < self.post_ln_layers else "pre"
        if scheme in ("lns", "dyt"):
            return "pre"
        if scheme == "hybrid_star":
            return "pre" if layer_idx == 0 else "hybrid"
        return scheme


__all__ = ["LayerprobeConfig", "NORM_SCHEMES", "canonical_scheme", "mix_post_ln_layers",
           "deepnorm_alpha", "deepnorm_beta", "dyt_alpha_init"]
