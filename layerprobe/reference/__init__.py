"""Reference models: a LLaMA-style decoder with Pre-LN, Post-LN, Mix-LN, LNS, DeepNorm, Peri-LN, DyT, HybridNorm
or HybridNorm* blocks.

Importing this package registers the model with the transformers Auto classes, so that
`AutoModelForCausalLM.from_pretrained(folder)` loads checkpoints written by `layerprobe train-reference`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import (
    NORM_SCHEMES,
    LayerprobeConfig,
    canonical_scheme,
    deepnorm_alpha,
    deepnorm_beta,
    dyt_alpha_init,
    mix_post_ln_layers,
)
from .modeling import LayerprobeDecoderLayer, LayerprobeForCausalLM, LayerprobeModel, LayerprobePreTrainedModel
from .presets import PRESETS, Preset, get_preset, reference_config

AutoConfig.register(LayerprobeConfig.model_type, LayerprobeConfig, exist_ok=True)
AutoModel.register(LayerprobeConfig, LayerprobeModel, exist_ok=True)
AutoModelForCausalLM.register(LayerprobeConfig, LayerprobeForCausalLM, exist_ok=True)

__all__ = [
    "NORM_SCHEMES", "LayerprobeConfig", "LayerprobeDecoderLayer", "LayerprobeForCausalLM", "LayerprobeModel",
    "LayerprobePreTrainedModel", "PRESETS", "Preset", "canonical_scheme", "deepnorm_alpha", "deepnorm_beta",
    "dyt_alpha_init", "get_preset", "mix_post_ln_layers", "reference_config",
]
