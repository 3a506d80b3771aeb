"""Tiny random models of every architecture in transformers' causal-LM mapping, built from each
architecture's own config class with only its sizes changed.

- `zoo_types()`: the model types of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, sorted
- `build(model_type) -> (model, None) | (None, reason)`: a seeded fp32 model in eval mode, or why not
  (the config fails, the model is still large, its forward fails, or it is not causal: BERT-family
  encoders are in the mapping but attend both ways unless is_decoder=True)

Sizes: hidden 32, 4 layers, 4 heads (2 KV), head_dim 8, vocab 256, every other size key the
config has shrunk to match (never grown: a smaller default stays). Nothing else changes:
attention kinds, norms, layer patterns, MoE and soft-capping stay the architecture's defaults
(per-layer lists are cut to the first 4 entries and lists of layer indices to those below 4, as
a 4-layer model of that architecture would have them).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

from layerprobe.pruning.surgery import INDEX_LISTS

VOCAB = 256
LAYERS = 4
SEED = 0
MAX_PARAMS = 5_000_000

# Size keys and the tiny value each gets when the config has it (at top level or in a sub-config).
SIZES = {
    "vocab_size": VOCAB, "hidden_size": 32, "n_embd": 32, "d_model": 32, "embed_dim": 32, "dim": 32,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "ffn_hidden_size": 64, "decoder_ffn_dim": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "intermediate_size_mlp": 64,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 8, "kv_channels": 8, "attention_head_dim": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "v_head_dim": 8, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_head_dim": 16,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS, "num_blocks": LAYERS,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "top_k": 2, "moe_topk": 2, "n_group": 1,
    "topk_group": 1, "n_shared_experts": 1,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
    "sliding_window": 16, "window_size": 16, "attention_window_size": 16,
    "query_pre_attn_scalar": 8,
    # state-space and linear-attention sizes
    "state_size": 8, "mamba_d_state": 8, "ssm_state_size": 8, "mamba_n_heads": 4, "mamba_d_head": 8,
    "mamba_head_dim": 8, "mamba_n_groups": 1, "n_groups": 1, "mamba_expand": 1, "expand": 1,
    "time_step_rank": 4, "mamba_dt_rank": 4, "conv_kernel": 4, "mamba_d_conv": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "rotary_dim": 4, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
    "lru_width": 32, "embedding_dim": 32, "qk_dim_factor": 1, "num_key_heads": 2, "num_value_heads": 4,
}
# Special ids that fit the tiny vocabulary (several configs default to ids of their real ones).
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# Per-layer pattern lists that must have exactly one entry per layer.
PATTERN_KEYS = ("layer_types", "layers_block_type", "block_types")


def zoo_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(config) -> None:
    stored = config.to_dict()
    depth = next((stored[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                  if isinstance(stored.get(k), int)), None)
    for key, value in SIZES.items():
        if key in stored and isinstance(stored[key], int) and not isinstance(stored[key], bool):
            setattr(config, key, min(stored[key], value) if stored[key] > 0 else value)
    for key, value in SPECIAL.items():
        if key in stored and stored[key] is not None:
            setattr(config, key, value)
    # Per-layer lists sized for the real depth (one entry per layer): keep the first LAYERS entries.
    for key, value in stored.items():
        if isinstance(value, list) and len(value) > LAYERS and (key in PATTERN_KEYS or len(value) == depth):
            setattr(config, key, value[:LAYERS])
        elif isinstance(value, dict) and "layer" in key and value and all(str(k).isdigit() for k in value):
            setattr(config, key, {k: v for k, v in value.items() if int(k) < LAYERS})  # per-layer overrides
        elif key in INDEX_LISTS and isinstance(value, list):
            setattr(config, key, [i for i in value if isinstance(i, int) and i < LAYERS])


def build(model_type: str):
    """(model, None) or (None, reason it cannot be built tiny)."""
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    try:
        config_class = CONFIG_MAPPING[model_type]
    except Exception as e:
        return None, f"no config class ({type(e).__name__})"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            config = config_class()
            for sub in ("text_config", "decoder"):
                inner = getattr(config, sub, None)
                if inner is not None and hasattr(inner, "to_dict"):
                    _shrink(inner)
            _shrink(config)
            with torch.device("meta"):  # count first: a size key we do not know could mean gigabytes
                n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if n > MAX_PARAMS:
                return None, f"still {n / 1e6:.1f}M parameters at these sizes (a size key the zoo does not shrink)"
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    model.eval()
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(SEED))
    changed = ids.clone()
    changed[0, -1] = 3 + (int(ids[0, -1]) - 2) % (VOCAB - 3)
    try:
        with torch.no_grad():
            a = model(input_ids=ids, use_cache=False).logits
            b = model(input_ids=changed, use_cache=False).logits
    except Exception as e:
        return None, f"its own forward fails at these sizes ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if not torch.allclose(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-6):
        # BERT-family encoders sit in the mapping but attend both ways unless is_decoder=True.
        return None, "not causal as its config builds it (earlier logits see later tokens)"
    return model, None
