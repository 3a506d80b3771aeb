"""Layer discovery across architectures, on tiny random models loaded through `load_model`."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tiny_models import ARCHS, make_tiny, random_ids

from layerprobe.anatomy import (
    find_anatomy,
    layer_input,
    residual_tensor,
    split_layer_call,
    sublayer_kind,
    summarize_measured_scheme,
)
from layerprobe.errors import LayerprobeError
from layerprobe.loading import load_model

A, M, N = "attention", "mlp", "norm"
LLAMA_KINDS = {"self_attn": A, "mlp": M, "input_layernorm": N, "post_attention_layernorm": N}
GPT2_KINDS = {"ln_1": N, "attn": A, "ln_2": N, "mlp": M}

# arch -> (layers path, final norm path, kind of every top-level child holding parameters,
#          norm scheme, parallel attention + MLP)
EXPECTED = {
    "llama": ("model.layers", "model.norm", LLAMA_KINDS, "pre", False),
    "mistral": ("model.layers", "model.norm", LLAMA_KINDS, "pre", False),
    "qwen2": ("model.layers", "model.norm", LLAMA_KINDS, "pre", False),
    "qwen3": ("model.layers", "model.norm", LLAMA_KINDS, "pre", False),
    "gemma": ("model.layers", "model.norm", LLAMA_KINDS, "pre", False),
    "gemma2": ("model.layers", "model.norm",
               dict(LLAMA_KINDS, pre_feedforward_layernorm=N, post_feedforward_layernorm=N), "sandwich", False),
    "phi": ("model.layers", "model.final_layernorm", {"self_attn": A, "mlp": M, "input_layernorm": N}, "pre", True),
    "phi3": ("model.layers", "model.norm", LLAMA_KINDS, "pre", False),
    "gpt2": ("transformer.h", "transformer.ln_f", GPT2_KINDS, "pre", False),
    "gptj": ("transformer.h", "transformer.ln_f", {"ln_1": N, "attn": A, "mlp": M}, "pre", True),
    "gpt_neo": ("transformer.h", "transformer.ln_f", GPT2_KINDS, "pre", False),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm",
                 {"input_layernorm": N, "post_attention_layernorm": N, "attention": A, "mlp": M}, "pre", True),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm",
            {"self_attn": A, "self_attn_layer_norm": N, "fc1": M, "fc2": M, "final_layer_norm": N}, "pre", False),
    "falcon": ("transformer.h", "transformer.ln_f",
               {"self_attention": A, "mlp": M, "ln_attn": N, "ln_mlp": N}, "pre", True),
    "bloom": ("transformer.h", "transformer.ln_f",
              {"input_layernorm": N, "self_attention": A, "post_attention_layernorm": N, "mlp": M}, "pre", False),
}
assert set(EXPECTED) == set(ARCHS)


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


@pytest.fixture(scope="module")
def models(tiny_dir):
    """arch -> model, each loaded once per module through the real loader."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_model(str(tiny_dir(arch)), load_tokenizer=False).model
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_final_norm_and_sublayers(models, arch):
    model = models(arch)
    layers_path, norm_path, kinds, scheme, parallel = EXPECTED[arch]
    an = find_anatomy(model)

    assert an.layers_path == layers_path
    assert an.layers is _get(model, layers_path)
    assert an.num_layers == model.config.num_hidden_layers == 3
    assert an.final_norm_path == norm_path and an.final_norm is _get(model, norm_path)
    assert an.embed is model.get_input_embeddings() and isinstance(an.embed, nn.Embedding)
    assert an.head is model.get_output_embeddings() and isinstance(an.head, nn.Linear)
    assert an.model_type == arch
    assert an.norm_scheme == scheme and an.norm_scheme_source.startswith(f"architecture ({arch}")
    assert an.extra["parallel_residual"] is parallel
    # What the hooks, the sweep and removal share: where ids go, and who holds the layer list.
    parent, attr = an.layers_parent
    assert getattr(parent, attr) is an.layers and parent is _get(model, layers_path.rpartition(".")[0])
    assert an.input_device == model.get_input_embeddings().weight.device

    for i in range(an.num_layers):
        found = {name: kind for name, (kind, _) in an.sublayers(i).items()}
        assert found == kinds, f"layer {i}"
        # Every parameter of the layer sits in exactly one classified group.
        groups = an.parameter_groups(i)
        assert set(groups) == set(kinds)
        n_grouped = sum(p.numel() for params in groups.values() for _, p in params)
        assert n_grouped == sum(p.numel() for p in an.layers[i].parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_see_the_residual_stream(models, arch):
    """Layer 0's input is the embedding output, layer i's output is layer i+1's input, and the
    final norm turns the last layer's output into the model's last hidden state."""
    _check_residual_stream(models(arch))


def _check_residual_stream(model):
    an = find_anatomy(model)
    inputs, outputs, handles = [], [], []
    for layer in an.layers:
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs: inputs.append(layer_input(args, kwargs)), with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda mod, args, kwargs, out: outputs.append(residual_tensor(out)), with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(random_ids(), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()

    assert len(inputs) == len(outputs) == an.num_layers
    assert torch.equal(inputs[0], out.hidden_states[0])
    for i in range(an.num_layers - 1):
        assert torch.equal(outputs[i], inputs[i + 1]), f"layer {i} output != layer {i + 1} input"
    # hidden_states[-1] comes after the final norm, which is why capture hooks the layers instead.
    with torch.no_grad():
        torch.testing.assert_close(an.final_norm(outputs[-1]), out.hidden_states[-1])
    assert not torch.equal(outputs[-1], out.hidden_states[-1])


# Variants whose block layout differs from the default tiny config of the same model_type.
VARIANTS = {
    "falcon-7b": ("falcon", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
                  {"input_layernorm": N, "self_attention": A, "mlp": M}, True),
    "falcon-sequential": ("falcon", dict(new_decoder_architecture=False, parallel_attn=False),
                          {"input_layernorm": N, "post_attention_layernorm": N, "self_attention": A, "mlp": M},
                          False),
    "falcon-alibi": ("falcon", dict(alibi=True), {"ln_attn": N, "ln_mlp": N, "self_attention": A, "mlp": M}, True),
    "neox-sequential": ("gpt_neox", dict(use_parallel_residual=False),
                        {"input_layernorm": N, "post_attention_layernorm": N, "attention": A, "mlp": M}, False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_layout_variants(tmp_path, variant):
    arch, overrides, kinds, parallel = VARIANTS[variant]
    model = load_model(str(make_tiny(arch, tmp_path / variant, **overrides)), load_tokenizer=False).model
    an = find_anatomy(model)
    assert an.num_layers == 3 and an.final_norm_path == EXPECTED[arch][1]
    assert {name: kind for name, (kind, _) in an.sublayers(0).items()} == kinds
    assert an.extra["parallel_residual"] is parallel and an.norm_scheme == "pre"
    _check_residual_stream(model)


def test_post_ln_opt_has_no_final_norm(tmp_path):
    model = load_model(str(make_tiny("opt", tmp_path / "opt_post", do_layer_norm_before=False))).model
    an = find_anatomy(model)
    assert an.layers_path == "model.decoder.layers" and an.num_layers == 3
    assert an.norm_scheme == "post" and "do_layer_norm_before=False" in an.norm_scheme_source
    assert an.final_norm is None and an.final_norm_path is None
    with torch.no_grad():
        out = model(random_ids(), output_hidden_states=True)
    last = []
    h = an.layers[-1].register_forward_hook(lambda m, a, o: last.append(residual_tensor(o)))
    with torch.no_grad():
        model(random_ids())
    h.remove()
    assert torch.equal(last[0], out.hidden_states[-1])  # nothing between the last layer and the head


def test_norm_scheme_from_config_wins(models):
    model = models("llama")
    model.config.norm_scheme = "mix"
    model.config.post_ln_layers = 1
    try:
        an = find_anatomy(model)
    finally:
        del model.config.norm_scheme, model.config.post_ln_layers
    assert (an.norm_scheme, an.post_ln_layers, an.norm_scheme_source) == ("mix", 1, "config (norm_scheme)")
    assert find_anatomy(model).norm_scheme == "pre"


# --- a model whose layer list is where no known path looks ---------------------------------------

class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mixer = nn.Linear(d, d)
        self.ff = nn.Linear(d, d)

    def forward(self, x):
        return x + self.ff(self.mixer(self.norm(x)))


class _Config:
    model_type = "oddball"

    def __init__(self, n):
        self.num_hidden_layers = n


class _OddModel(nn.Module):
    """Blocks at trunk.blocks, plus decoys: a same-length list of small adapters and a shorter list."""

    def __init__(self, n=3, d=16):
        super().__init__()
        self.config = _Config(n)
        self.embed = nn.Embedding(32, d)
        self.adapters = nn.ModuleList(nn.Linear(d, 1) for _ in range(n))
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.trunk.norm_f = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, 32) for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.trunk.blocks:
            x = block(x)
        return self.heads[0](self.trunk.norm_f(x))


def test_discovery_by_num_hidden_layers():
    model = _OddModel()
    an = find_anatomy(model)
    assert an.layers_path == "trunk.blocks" and an.layers is model.trunk.blocks
    assert an.final_norm is model.trunk.norm_f and an.final_norm_path == "trunk.norm_f"
    assert (an.norm_scheme, an.model_type) == ("unknown", "oddball")
    assert an.extra["parallel_residual"] is None
    # "mixer" says nothing by name or class (a Linear); "ff" is a known abbreviation.
    assert {k: kind for k, (kind, _) in an.sublayers(0).items()} == {"norm": N, "mixer": "other", "ff": M}


def test_layers_path_override():
    model = _OddModel()
    an = find_anatomy(model, layers_path="heads")  # the override is taken even against the config
    assert an.layers is model.heads and an.num_layers == 2 and an.final_norm is None
    an = find_anatomy(model, layers_path="trunk.blocks")
    assert an.layers is model.trunk.blocks and an.final_norm is model.trunk.norm_f
    for bad in ("trunk.nothing", "trunk.norm_f", "embed"):
        with pytest.raises(LayerprobeError, match="--layers-path") as e:
            find_anatomy(model, layers_path=bad)
        assert "\n" not in str(e.value)


def test_no_layer_list_is_a_clear_error():
    model = _OddModel()
    model.config.num_hidden_layers = 7
    with pytest.raises(LayerprobeError, match="--layers-path") as e:
        find_anatomy(model)
    assert "7 transformer layers" in str(e.value) and "trunk.blocks (3)" in str(e.value)


def test_known_path_with_wrong_count_is_not_taken_silently(models):
    model = models("llama")
    model.config.num_hidden_layers = 5  # as if the config lied after pruning
    try:
        with pytest.raises(LayerprobeError, match="model.layers \\(3\\)"):
            find_anatomy(model)
        assert find_anatomy(model, layers_path="model.layers").num_layers == 3
    finally:
        model.config.num_hidden_layers = 3


@pytest.mark.parametrize("name, kind", [
    ("self_attn", A), ("attn", A), ("self_attention", A), ("attention", A), ("crossattention", A),
    ("mlp", M), ("fc1", M), ("fc2", M), ("feed_forward", M), ("block_sparse_moe", M), ("ffn", M),
    ("input_layernorm", N), ("post_attention_layernorm", N), ("self_attn_layer_norm", N), ("ln_1", N),
    ("ln_attn", N), ("ln_mlp", N), ("norm1", N), ("final_layer_norm", N), ("pre_feedforward_layernorm", N),
    ("ff", M), ("ff_1", M), ("mixer", "other"), ("dropout", "other"), ("diff_proj", "other"),
])
def test_sublayer_kind_by_name(name, kind):
    assert sublayer_kind(name) == kind


def test_sublayer_kind_falls_back_on_the_module_class():
    class FancyRMSNorm(nn.Module):
        pass

    class GatedAttention(nn.Module):
        pass

    assert sublayer_kind("mixer", FancyRMSNorm()) == N
    assert sublayer_kind("token_mixer", GatedAttention()) == A
    assert sublayer_kind("mixer", nn.Linear(2, 2)) == "other"
    assert sublayer_kind("mlp", FancyRMSNorm()) == M  # the name wins when it says something


def test_layer_input_reads_args_or_keyword():
    x = torch.ones(2)
    assert layer_input((x, None), {}) is x
    assert layer_input((), {"hidden_states": x}) is x
    assert residual_tensor((x, None)) is x and residual_tensor(x) is x
    with pytest.raises(LayerprobeError):
        layer_input((), {"attention_mask": x})
    mask = torch.zeros(2)
    hidden, rest, kwargs = split_layer_call((x, mask), {"position_ids": 1})
    assert hidden is x and rest[0] is mask and kwargs == {"position_ids": 1}
    hidden, rest, kwargs = split_layer_call((None,), {"hidden_states": x, "use_cache": False})
    assert hidden is x and rest == (None,) and kwargs == {"use_cache": False}
    with pytest.raises(LayerprobeError):
        residual_tensor((None,))


@pytest.mark.parametrize("per_layer, expected", [
    (["pre"] * 4, ("pre", 0)),
    (["post"] * 4, ("post", 4)),
    (["post", "pre", "pre", "pre"], ("mix", 1)),
    (["pre", "post", "pre"], ("mixed", None)),
    (["pre", "?"], ("unknown", None)),
    ([], ("unknown", None)),
    (["sandwich"] * 3, ("sandwich", 0)),
    (["post-sublayer"] * 3, ("post-sublayer", 0)),
    (["sandwich", "pre"], ("mixed", None)),
])
def test_summarize_measured_scheme(per_layer, expected):
    assert summarize_measured_scheme(per_layer) == expected
