"""Find the parts every metric needs in any causal LM: embeddings, the layer list, final norm, head.

Known paths are tried first; otherwise the module list whose length matches the config's layer
count is taken. `layers_path` (e.g. "transformer.h") overrides both.

Tested on Llama, Mistral, Qwen2/3, Gemma/2, Phi/Phi-3, GPT-2, GPT-J, GPT-Neo, GPT-NeoX, OPT,
Falcon, Bloom and layerprobe's own models: in all of them a forward pre-hook on layer i sees the
residual stream as its first positional argument (`layer_input`), and its forward hook sees it
as the output or the output's first element (`residual_tensor`). tests/test_zoo.py runs every
architecture of transformers' causal-LM mapping that builds tiny (README: "Which architectures work").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LayerprobeError

# (layers, final norm) paths of the architectures we test; others fall back to discovery.
KNOWN_PATHS = [
    ("model.layers", "model.norm"),  # Llama, Mistral, Qwen2/3, Gemma/2, Phi-3, layerprobe
    ("model.layers", "model.final_layernorm"),  # Phi
    ("model.decoder.layers", "model.decoder.final_layer_norm"),  # OPT
    ("transformer.h", "transformer.ln_f"),  # GPT-2, GPT-J, GPT-Neo, Falcon, Bloom
    ("gpt_neox.layers", "gpt_neox.final_layer_norm"),  # GPT-NeoX / Pythia
    ("model.language_model.layers", "model.language_model.norm"),  # multimodal wrappers
]
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Norm scheme by model_type, for models whose config does not say it.
ARCH_NORM_SCHEME = {
    **{t: "pre" for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gpt2",
        "gptj", "gpt_neo", "gpt_neox", "falcon", "bloom", "gemma", "starcoder2", "stablelm", "olmo",
        "cohere", "smollm3", "granite", "persimmon", "codegen", "internlm2", "mpt", "gpt_bigcode",
    )},
    **{t: "sandwich" for t in ("gemma2", "gemma3", "gemma3_text")},
    "olmo2": "post-sublayer",
}

_NORM_RE = re.compile(r"(norm|^ln(_|$)|_ln(_|$)|^ln\d|layernorm)", re.IGNORECASE)
_FF_RE = re.compile(r"(^|_)ff(_|\d|$)", re.IGNORECASE)


def _kind_from_name(name: str) -> str:
    # Norms first: "post_attention_layernorm" and "self_attn_layer_norm" are norms, not attention.
    if _NORM_RE.search(name):
        return "norm"
    low = name.lower()
    if "residual" in low:  # Ergo's attention_residual_gate: the residual add, not the sublayer
        return "other"
    if "attn" in low or "attention" in low:
        return "attention"
    if any(k in low for k in ("mlp", "ffn", "feed_forward", "feedforward", "fc", "dense", "moe", "experts")):
        return "mlp"
    if _FF_RE.search(name):  # "ff", "ff_1": a whole word only, or "diff"/"offset" would match
        return "mlp"
    return "other"


def sublayer_kind(child_name: str, module: nn.Module | None = None) -> str:
    """attention, mlp, norm or other, from the name of a layer's top-level child module.

    The attribute name decides (it is what the architectures agree on: self_attn, attn,
    self_attention, attention; mlp, fc1/fc2; *norm*, ln_*); when it says nothing, the module's
    class name (LlamaRMSNorm, GPT2Attention, ...) is tried.
    """
    kind = _kind_from_name(child_name)
    if kind == "other" and module is not None:
        cls = type(module).__name__
        if "norm" in cls.lower():
            return "norm"
        if "attention" in cls.lower():
            return "attention"
        if any(k in cls.lower() for k in ("mlp", "feedforward", "moe")):
            return "mlp"
    return kind


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(module holding the attribute, attribute name) for a dotted path such as "model.layers"."""
    *head, attr = path.split(".")
    parent = root
    for part in head:
        parent = getattr(parent, part)
    return parent, attr


def num_layers_of(config) -> int | None:
    for key in LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    return num_layers_of(text) if text is not None else None


@dataclass
class Anatomy:
    """Where things are in one model. Layer index is 0-based, as in the model's own module list."""

    model: nn.Module
    layers: nn.ModuleList
    layers_path: str
    final_norm: nn.Module | None
    final_norm_path: str | None
    embed: nn.Module | None
    head: nn.Module | None
    model_type: str
    norm_scheme: str  # pre, post, mix, lns, deepnorm, sandwich, ... or "unknown"
    norm_scheme_source: str  # how it was determined
    post_ln_layers: int | None = None
    # parallel_residual: attention and MLP read the same input (GPT-J, Phi, NeoX, Falcon), None if
    # unknown; config_num_layers: what the config promised (differs only with --layers-path).
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the embedding's device (the first shard under device_map)."""
        device = execution_device(self.embed) if self.embed is not None else None
        return device if device is not None else execution_device(self.model) or next(self.model.parameters()).device

    @property
    def layers_parent(self) -> tuple[nn.Module, str]:
        """(module that holds the layer list, its attribute name): where removal swaps the list.

        The final norm and OPT's `project_out` are siblings of the layer list there.
        """
        return _parent_of(self.model, self.layers_path)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The model's own logits for residual-stream vectors h [..., H] (the logit lens' p_ℓ).

        What the CausalLM does after its last layer: the final norm, OPT's `project_out` when the
        model has one, the output head, then the final logit transform the config names
        (Gemma-2/3 `final_logit_softcapping`, Cohere `logit_scale`, Granite `logits_scaling`).
        h is cast to the head's dtype and device, as the model's own stream would be.
        """
        if self.head is None:
            raise LayerprobeError("this model has no output head (get_output_embeddings() is None): no logit lens")
        weight = getattr(self.head, "weight", None)
        if isinstance(weight, torch.Tensor):
            h = h.to(device=execution_device(self.head), dtype=weight.dtype)
        if self.final_norm is not None:
            h = self.final_norm(h)
        project_out = getattr(self.layers_parent[0], "project_out", None)
        if isinstance(project_out, nn.Module):
            h = project_out(h)
        return self.head_logits(h)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head and the final logit transform of `readout`, for vectors already through
        the final norm: what the CausalLM does with its base model's last hidden state."""
        if self.head is None:
            raise LayerprobeError("this model has no output head (get_output_embeddings() is None): no logit lens")
        logits = self.head(h)
        config = getattr(self.model, "config", None)
        config = getattr(config, "text_config", None) or config
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        scale = getattr(config, "logit_scale", None)
        if isinstance(scale, (int, float)) and getattr(config, "model_type", "").startswith("cohere"):
            logits = logits * scale
        divisor = getattr(config, "logits_scaling", None)
        if isinstance(divisor, (int, float)) and divisor:
            logits = logits / divisor
        return logits

    def sublayers(self, index: int) -> dict[str, tuple[str, nn.Module]]:
        """Top-level children of layer `index` that hold parameters: name -> (kind, module)."""
        out = {}
        for name, child in self.layers[index].named_children():
            if any(True for _ in child.parameters()):
                out[name] = (sublayer_kind(name, child), child)
        return out

    def parameter_groups(self, index: int) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every trainable parameter of layer `index`, grouped by its top-level child ("(direct)" if none)."""
        groups: dict[str, list] = {}
        for pname, p in self.layers[index].named_parameters():
            child = pname.split(".")[0] if "." in pname else "(direct)"
            groups.setdefault(child, []).append((pname, p))
        return groups


def execution_device(module: nn.Module) -> torch.device | None:
    """Where `module` computes. Under an accelerate device map that offloads it to cpu or disk, its weights
    are `meta` between calls and its hook's execution device is the answer; else its weight's device."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        where = getattr(h, "execution_device", None)
        if where is not None:
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return None


def _scheme_from_config(config) -> tuple[str, str, int | None] | None:
    scheme = getattr(config, "norm_scheme", None)
    if isinstance(scheme, str) and scheme:
        k = getattr(config, "post_ln_layers", None)
        return scheme.lower(), "config (norm_scheme)", k if isinstance(k, int) else None
    return None


def _scheme_from_arch(config) -> tuple[str, str] | None:
    model_type = getattr(config, "model_type", "") or ""
    if model_type == "opt":
        before = getattr(config, "do_layer_norm_before", True)
        return ("pre" if before else "post"), "architecture (opt, do_layer_norm_before=%s)" % before
    if model_type in ARCH_NORM_SCHEME:
        return ARCH_NORM_SCHEME[model_type], f"architecture ({model_type})"
    return None


def _parallel_residual(config) -> bool | None:
    """Whether attention and MLP read the same input and add to the residual together (GPT-J style).

    Still Pre-LN, but a capture of "the input of the MLP" must know that the MLP does not see the
    attention output. None when the architecture is not one we know.
    """
    model_type = getattr(config, "model_type", "") or ""
    if model_type in ("gptj", "phi", "cohere", "codegen"):
        return True
    if model_type == "gpt_neox":
        return bool(getattr(config, "use_parallel_residual", True))
    if model_type == "falcon":
        return bool(getattr(config, "new_decoder_architecture", False) or getattr(config, "parallel_attn", True))
    if model_type in ARCH_NORM_SCHEME or model_type in ("opt", "layerprobe"):
        return False
    return None


def _module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _find_layers(model: nn.Module, expected: int | None) -> tuple[str, nn.ModuleList, str | None]:
    """(layers path, layers, paired final-norm path or None): known paths first, then discovery."""
    for layers_path, norm_path in KNOWN_PATHS:
        cand = _get(model, layers_path)
        if isinstance(cand, nn.ModuleList) and len(cand) > 0 and (expected is None or len(cand) == expected):
            return layers_path, cand, norm_path
    # Unknown architecture: the module list with as many entries as the config has layers. Several
    # can match (per-layer lists of experts or adapters nest inside the layers); the layer list is
    # the one holding the most parameters, because it contains all the others.
    lists = _module_lists(model)
    matches = [(n, m) for n, m in lists if expected is None or len(m) == expected]
    if matches:
        path, layers = max(matches, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        return path, layers, None
    seen = ", ".join(f"{n} ({len(m)})" for n, m in lists[:5]) or "none"
    raise LayerprobeError(
        f"could not find the list of {expected} transformer layers the config promises "
        f"(module lists: {seen}); name it with --layers-path"
    )


def _find_final_norm(model: nn.Module, layers_path: str, paired: str | None) -> tuple[nn.Module | None, str | None]:
    """The norm between the last layer and the head, or (None, None) when there is none (Post-LN OPT)."""
    if paired is not None:
        cand = _get(model, paired)
        if isinstance(cand, nn.Module):
            return cand, paired
    # It is a sibling of the layer list in every architecture we know (model.norm, transformer.ln_f).
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent, _ = _parent_of(model, layers_path)
    for name in FINAL_NORM_NAMES:
        cand = getattr(parent, name, None)
        if isinstance(cand, nn.Module):
            return cand, (f"{parent_path}.{name}" if parent_path else name)
    return None, None


def find_anatomy(model: nn.Module, layers_path: str | None = None) -> Anatomy:
    """Locate layers, final norm, embeddings and head of `model`, and name its norm scheme.

    `layers_path` (dotted, e.g. "transformer.h") skips discovery and takes that module list as
    the layers, whatever the config says their number is.
    """
    config = getattr(model, "config", None)
    expected = num_layers_of(config) if config is not None else None
    if layers_path:
        layers = _get(model, layers_path)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            lists = ", ".join(n for n, _ in _module_lists(model)[:5]) or "none"
            raise LayerprobeError(
                f"--layers-path {layers_path!r} does not name a list of layers in this model (module lists: {lists})"
            )
        path, paired = layers_path, None
    else:
        try:
            path, layers, paired = _find_layers(model, expected)
        except LayerprobeError:
            # The decoder of an encoder-decoder family (BART, Blenderbot): num_hidden_layers is the encoder's.
            decoder = getattr(config, "decoder_layers", None)
            if not isinstance(decoder, int) or decoder == expected:
                raise
            path, layers, paired = _find_layers(model, decoder)
            expected = decoder

    final_norm, final_norm_path = _find_final_norm(model, path, paired)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    post_ln_layers = None
    found = _scheme_from_config(config) if config is not None else None
    if found is not None:
        scheme, source, post_ln_layers = found
    else:
        arch = _scheme_from_arch(config) if config is not None else None
        scheme, source = arch if arch is not None else ("unknown", "not determined yet")
    extra = {"parallel_residual": _parallel_residual(config) if config is not None else None,
             "config_num_layers": expected}
    return Anatomy(model=model, layers=layers, layers_path=path, final_norm=final_norm,
                   final_norm_path=final_norm_path, embed=embed, head=head,
                   model_type=getattr(config, "model_type", "") or type(model).__name__,
                   norm_scheme=scheme, norm_scheme_source=source, post_ln_layers=post_ln_layers, extra=extra)


def summarize_measured_scheme(per_layer: list[str]) -> tuple[str, int | None]:
    """Turn per-layer placements ("pre"/"post"/"sandwich"/"post-sublayer"/"?") into a scheme name and a
    Post-LN prefix length."""
    if not per_layer or any(p == "?" for p in per_layer):
        return "unknown", None
    if len(set(per_layer)) == 1 and per_layer[0] in ("sandwich", "post-sublayer"):
        return per_layer[0], 0
    if all(p == "pre" for p in per_layer):
        return "pre", 0
    if all(p == "post" for p in per_layer):
        return "post", len(per_layer)
    k = 0
    while k < len(per_layer) and per_layer[k] == "post":
        k += 1
    if k > 0 and all(p == "pre" for p in per_layer[k:]):
        return "mix", k
    return "mixed", None


def split_layer_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A layer call seen by a forward pre-hook (with_kwargs=True) as (residual stream, other args, kwargs).

    Every architecture we test passes the stream as the first positional argument; accept the
    keyword too, so a model that calls `layer(hidden_states=...)` works the same.
    """
    if args and isinstance(args[0], torch.Tensor):
        return args[0], tuple(args[1:]), dict(kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        rest = dict(kwargs)
        return rest.pop("hidden_states"), tuple(args), rest
    raise LayerprobeError("a layer was called without a hidden-state tensor; set --layers-path to the layer list")


def one_stream(h: torch.Tensor) -> torch.Tensor:
    """A layer's input, checked: every metric reads one residual stream [batch, tokens, hidden] per layer."""
    if h.dim() != 3:
        raise LayerprobeError(f"this model's layers pass a stream of shape {tuple(h.shape)}, not [batch, tokens, "
                              "hidden] (several residual streams, as in hyper-connections); layerprobe reads one")
    return h


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream entering a layer, from a forward pre-hook registered with_kwargs=True."""
    return split_layer_call(args, kwargs)[0]


def residual_tensor(x):
    """The hidden-state tensor of a layer's input args or output (tuple or tensor)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise LayerprobeError("a layer returned something that is not a hidden-state tensor; set --layers-path")


class _LayerStandIn(nn.Module):
    """Stands in for one layer while the model runs its own final path: returns the given stream.

    Attribute reads fall through to the real layer (v5 models pick a layer's mask from its
    `attention_type` before calling it); the real layer is held outside the module tree.
    """

    def __init__(self, layer: nn.Module, stream: torch.Tensor, output_len: int | None):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_stream", stream)
        self._output_len = output_len

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        y = object.__getattribute__(self, "_stream")
        return y if self._output_len is None else (y,) + (None,) * (self._output_len - 1)


def own_path_logits(anatomy: Anatomy, h: torch.Tensor, output_len: int | None = None) -> torch.Tensor:
    """Logits [..., V] the model's own forward makes of last-layer outputs h [..., H].

    For models whose path after the last layer is more than layerprobe rebuilds (LFM2's norm under
    another name, post-LN decoders' extra projections, ...): every layer is swapped for a stand-in
    that returns h, each row of h is its own one-token sequence, and the model runs as usual; so
    the final norm, scaling and soft-capping are the model's own code. `output_len`: how many
    elements the layers return (None: a tensor). Callers check the result against the model's logits.
    """
    parent, attr = anatomy.layers_parent
    layers = getattr(parent, attr)
    shape = h.shape
    rows = h.reshape(-1, 1, shape[-1])
    weight = getattr(anatomy.head, "weight", None)
    if isinstance(weight, torch.Tensor):
        rows = rows.to(dtype=weight.dtype)
    stand_ins = nn.ModuleList([_LayerStandIn(layer, rows, output_len) for layer in layers])
    ids = torch.zeros(rows.shape[0], 1, dtype=torch.long, device=anatomy.input_device)
    setattr(parent, attr, stand_ins)
    try:
        out = anatomy.model.forward(input_ids=ids, use_cache=False)  # forward, not __call__: no model hooks
    finally:
        setattr(parent, attr, layers)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -1].reshape(*shape[:-1], logits.shape[-1])
