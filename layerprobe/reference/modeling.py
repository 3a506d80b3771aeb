"""The layerprobe reference model: a LLaMA-style decoder whose norm placement is a config choice.

One file, in the spirit of transformers' modeling_llama.py and nanoGPT's model.py. Every block
is two residual sublayers (attention, then SwiGLU MLP), each wrapped by `_residual` according
to the block's placement:

    pre       h = x + F(N(x))                 (lns: h = x + F(N(x) / sqrt(ℓ+1)), ℓ 0-based)
    post      h = N(x + F(x))
    deepnorm  h = N(α·x + F(x)),  α = (2L)^(1/4)
    sandwich  h = x + N_out(F(N_in(x)))       (Peri-LN)

Mix-LN is Post-LN for blocks 0..⌊αL⌋-1 and Pre-LN after. All schemes keep the final norm before
the LM head. Two schemes change more than where the norms sit:

DyT (Zhu et al. 2025, "Transformers without Normalization", arXiv 2503.10622) is Pre-LN with every
norm, the final one included, replaced by DyT(x) = γ ⊙ tanh(α·x), α a learnable scalar. Followed:
jiachenzhu/DyT, other_tasks/LLaMA/fms_fsdp/models/llama.py: `LayerNormParameterized` (weight ⊙
tanh(alpha·x), no β in the LLaMA variant; β only with norm_type="layernorm", as their generic
`dynamic_tanh.py` DynamicTanh that replaces nn.LayerNorm has), `LLaMABlock` (`ln` with
attn_alpha_init_value, `ff_ln` with ffn_alpha_init_value), `LLaMA.dec_norm` (dec_alpha_init_value)
and `LLaMA.shared_scale` (a learnable scalar multiplying the embedding output, initialised to √d).
α0 by width: `configuration.dyt_alpha_init`.

HybridNorm (Zhuo et al. 2025, arXiv 2503.04598): no norm before attention, queries, keys and values
each normalised per head inside it, and the FFN's residual starts after its norm:

    hybrid    h = x + Attn(x) with q, k, v ← N_q(q), N_k(k), N_v(v);   y = N(h) + FFN(N(h))

Followed: BryceZhuo/HybridNorm, dense_model/olmo/model.py, `OLMoSequentialBlock.forward` with the
flags of dense_model/configs/exps/1.2B-dense-HybriedNorm.yaml (attn_norm false, use_query/key/
value_norm true, ffn_norm true, ffn_residual_after_norm true): `og_x = x` is taken *after*
`x = self.ff_norm(x)`, so the skip carries N(h), not h, and nothing normalises N(h) + FFN(N(h)).
The paper's "Post-Norm in the FFN" could also read N(h + FFN(h)); the code is what was trained.
`OLMoBlock.attention` normalises q, k, v after splitting heads (one weight of size head_dim shared
by the heads) and before RoPE and the KV cache; we do the same. HybridNorm* (README:
norm_pos_special_config "{0:{'attn_norm':True,'ffn_residual':False}}") makes block 0 Pre-LN; the
QKV-norm flags are global, so block 0 keeps its q, k, v norms. The final norm (OLMo's ln_f) stays.
Their runs use Megatron init (σ/√(2L) on the output projections, truncated at 3σ): our `scaled_init=True`
is the untruncated equivalent; it stays a separate choice here, off by default as for every scheme.

Module names follow the analyzer's conventions: `self_attn`, `mlp`, and norms whose names contain
"norm" (`attn_norm` and `mlp_norm` belong to the attention and MLP sublayers whatever side of the
residual add they sit on; `Llama`'s `input_layernorm` and `post_attention_layernorm` are the same
weights under Pre-LN; a DyT sits where the norm it replaces sat, under the same name; HybridNorm
blocks have no `attn_norm`, and their q/k/v norms live inside `self_attn`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..metrics.loss import IGNORE, chunked_loss_sum, cross_entropy_rows
from .configuration import LayerprobeConfig

# transformers 5.25 renamed the KV cache from `past_key_values` to `cache` (in `generate`, the mask helpers and the
# output classes; the old name warns and goes in 5.40). The model accepts both names and talks to transformers in the
# name the installed version uses, so generation is right, and silent, on every version pyproject.toml admits.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
_MASK_CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache given under either name (a caller that passes both must mean one object)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("give the KV cache as `cache` or `past_key_values`, not two different ones")
    return cache if cache is not None else past_key_values


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 even under bf16 autocast; the fused kernel is faster than pow/mean/rsqrt.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DyT(nn.Module):
    """Dynamic Tanh: γ ⊙ tanh(α·x) (+ β), α one learnable scalar, γ (and β) per channel."""

    def __init__(self, hidden_size: int, alpha_init: float, bias: bool = False):
        super().__init__()
        self.alpha_init = float(alpha_init)  # a plain float: survives meta-device init; _init_weights reads it
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 under bf16 autocast, as RMSNorm: tanh saturates, but α·x and γ must not round.
        y = self.weight.float() * torch.tanh(self.alpha.float() * x.float())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}, bias={self.bias is not None}"


class ScalarScale(nn.Module):
    """x · s with s one learnable scalar (DyT's LLaMA recipe puts one after the embedding, s0 = √d)."""

    def __init__(self, init_value: float):
        super().__init__()
        self.init_value = float(init_value)
        self.scale = nn.Parameter(torch.full((1,), self.init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"init_value={self.init_value:g}"


def make_norm(config: LayerprobeConfig, role: str = "attn", size: int | None = None) -> nn.Module:
    """The norm at `role` (attn, ffn, final, qkv): DyT for the dyt scheme, else RMSNorm or LayerNorm.
    `size`: the normalised width (head_dim for q/k/v norms), hidden_size by default."""
    size = size or config.hidden_size
    if config.norm_scheme == "dyt":
        alpha = {"attn": config.dyt_alpha_attn, "ffn": config.dyt_alpha_ffn, "final": config.dyt_alpha_final}[role]
        return DyT(size, alpha, bias=config.norm_type == "layernorm")
    if config.norm_type == "layernorm":
        return nn.LayerNorm(size, eps=config.norm_eps)
    return RMSNorm(size, eps=config.norm_eps)


@torch.no_grad()
def rope_tables(x: torch.Tensor, position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables for RoPE, [b, t, head_dim], in x's dtype."""
    steps = torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [b, t, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE tables, recomputed per call (head_dim/2 frequencies): no buffer to lose under meta-device init."""

    def __init__(self, config: LayerprobeConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(x, position_ids, self.head_dim, self.theta)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LayerprobeAttention(nn.Module):
    """Causal multi-head (optionally grouped-query) attention with RoPE, through PyTorch's SDPA."""

    def __init__(self, config: LayerprobeConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_proj.init_role = self.k_proj.init_role = "qk"
        self.v_proj.init_role = "v"
        self.o_proj.init_role = "attn_out"
        if config.qkv_norm:  # HybridNorm: each head's q, k, v normalised over head_dim, one weight for all heads
            self.q_norm = make_norm(config, "qkv", self.head_dim)
            self.k_norm = make_norm(config, "qkv", self.head_dim)
            self.v_norm = make_norm(config, "qkv", self.head_dim)

    def forward(self, x, position_embeddings, attention_mask=None, cache: Cache | None = None, layer_idx: int = 0):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):  # before RoPE and the cache, as HybridNorm's OLMoBlock.attention
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        q, k = apply_rotary(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        # No mask means "plain causal": SDPA's is_causal path. A single query attends to the whole cache.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None and t > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LayerprobeMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LayerprobeConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.gate_proj.init_role = self.up_proj.init_role = "mlp_in"
        self.down_proj.init_role = "mlp_out"

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LayerprobeDecoderLayer(nn.Module):
    def __init__(self, config: LayerprobeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # also the KV-cache slot; pruning re-indexes it
        self.placement = config.layer_placement(layer_idx)
        # Plain Python floats, computed from the config: they survive save/load and meta-device init
        # because they are neither buffers nor parameters.
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if config.norm_scheme == "lns" else 1.0
        self.residual_scale = config.deepnorm_alpha if config.norm_scheme == "deepnorm" else 1.0
        self.rope_theta = config.rope_theta
        self.self_attn = LayerprobeAttention(config)
        self.mlp = LayerprobeMLP(config)
        if self.placement != "hybrid":  # HybridNorm has no norm before attention
            self.attn_norm = make_norm(config, "attn")
        self.mlp_norm = make_norm(config, "ffn")
        if self.placement == "sandwich":
            self.attn_out_norm = make_norm(config)
            self.mlp_out_norm = make_norm(config)

    def _residual(self, x, fn, norm, out_norm=None):
        if self.placement == "pre":
            h = norm(x)
            if self.norm_scale != 1.0:
                h = h * self.norm_scale
            return x + fn(h)
        if self.placement == "post":
            return norm(x + fn(x))
        if self.placement == "deepnorm":
            return norm(self.residual_scale * x + fn(x))
        return x + out_norm(fn(norm(x)))  # sandwich

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache: Cache | None = None,
                past_key_values: Cache | None = None, **kwargs):
        cache = _one_cache(cache, past_key_values)
        if position_embeddings is None:  # a layer called on its own: positions 0..t-1
            pos = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
            position_embeddings = rope_tables(hidden_states, pos, self.self_attn.head_dim, self.rope_theta)

        def attn(h):
            return self.self_attn(h, position_embeddings, attention_mask, cache, self.layer_idx)

        if self.placement == "hybrid":
            # HybridNorm: QKV-norm is inside self_attn; the FFN's skip starts after its norm (see the docstring).
            h = self.mlp_norm(hidden_states + attn(hidden_states))
            return h + self.mlp(h)
        h = self._residual(hidden_states, attn, self.attn_norm, getattr(self, "attn_out_norm", None))
        return self._residual(h, self.mlp, self.mlp_norm, getattr(self, "mlp_out_norm", None))


class LayerprobePreTrainedModel(PreTrainedModel):
    config_class = LayerprobeConfig
    config: LayerprobeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LayerprobeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Called bottom-up on every module, skipping weights loaded from a checkpoint (init.* respects that).

        Projections carry an `init_role` (set where they are built) because transformers only offers
        leaf modules with parameters to this method, not the attention or MLP that holds them.
        """
        cfg = self.config
        if isinstance(module, nn.Linear):
            role = getattr(module, "init_role", None)
            # scaled_init: residual output projections get std σ/√(2L) (GPT-2 / Megatron style).
            out_factor = 1.0 / math.sqrt(2 * cfg.num_hidden_layers) if cfg.scaled_init else 1.0
            factor = out_factor if role in ("attn_out", "mlp_out") else 1.0
            if cfg.norm_scheme == "deepnorm" and role is not None:
                # DeepNet: Xavier-normal; gain 1 for q and k, β = (8L)^(-1/4) for v, the output projection and the FFN.
                gain = 1.0 if role == "qk" else cfg.deepnorm_beta
                init.xavier_normal_(module.weight, gain=gain * factor)
            else:
                init.normal_(module.weight, mean=0.0, std=cfg.initializer_range * factor)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, (RMSNorm, nn.LayerNorm, DyT)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if isinstance(module, DyT):
                init.constant_(module.alpha, module.alpha_init)
        elif isinstance(module, ScalarScale):
            init.constant_(module.scale, module.init_value)


class LayerprobeModel(LayerprobePreTrainedModel):
    def __init__(self, config: LayerprobeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        # DyT's LLaMA recipe: a learnable scalar on the embedding output, initialised to √d (fms LLaMA.shared_scale).
        self.embed_scale = ScalarScale(math.sqrt(config.hidden_size)) if config.norm_scheme == "dyt" else None
        self.layers = nn.ModuleList(LayerprobeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, "final")
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        cache = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.embed_scale is not None:  # part of the model, like Gemma's √d: applied to given embeddings too
            inputs_embeds = self.embed_scale(inputs_embeds)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]

        if attention_mask is None and cache is None:
            mask = None  # training and scoring: SDPA's causal kernel, no mask tensor
        else:
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, **{_MASK_CACHE_KW: cache})

        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden = layer(hidden, position_embeddings=position_embeddings, attention_mask=mask, cache=cache)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_OUTPUT_CACHE_FIELD: cache},
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class LayerprobeForCausalLM(LayerprobePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LayerprobeConfig):
        super().__init__(config)
        self.model = LayerprobeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, logits_to_keep: int = 0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        loss = logits = None
        if labels is not None:
            # Next-token loss, mean over every predicted token (-100 ignored), with float32 CE. Shifting the labels
            # (not the logits) avoids copying a [batch, seq, vocab] tensor.
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
            if self.training:
                # Training: the head and the CE run a chunk of rows at a time (metrics/loss.py; checkpointed
                # under autograd), so the logits and their float32 copy never exist whole, and none are
                # returned (as Liger's fused CE does). In eval mode, callers (Trainer.evaluate) get logits.
                loss = chunked_loss_sum(self.lm_head, hidden, targets, self.config.vocab_size)
            else:
                logits = self.lm_head(hidden)
                loss = cross_entropy_rows(logits, targets).sum()
            loss = loss / (targets != IGNORE).sum()
        else:
            logits = self.lm_head(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{_OUTPUT_CACHE_FIELD: getattr(out, _OUTPUT_CACHE_FIELD)})


__all__ = ["LayerprobeForCausalLM", "LayerprobeModel", "LayerprobePreTrainedModel", "LayerprobeDecoderLayer",
           "LayerprobeAttention", "LayerprobeMLP", "RMSNorm", "DyT", "ScalarScale", "RotaryEmbedding"]
