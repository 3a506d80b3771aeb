"""The reference model: each norm scheme's block against its formula, written out by hand here."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import layerprobe  # noqa: F401
from transformers.masking_utils import create_causal_mask
from generation_checks import (
    assert_generate_matches_recompute,
    assert_left_padding_is_invisible,
    assert_manual_cache_matches_recompute,
    no_transformers_deprecation,
)
from layerprobe.reference import (
    NORM_SCHEMES,
    LayerprobeConfig,
    LayerprobeForCausalLM,
    canonical_scheme,
    mix_post_ln_layers,
)

D, HEADS, FFN, VOCAB = 32, 4, 48, 97
# The cache's keyword in the installed transformers (5.25 renamed past_key_values to cache): the one that must not warn.
CACHE_KW = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(scheme="pre", layers=4, **kw) -> LayerprobeConfig:
    base = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=layers,
                num_attention_heads=HEADS, max_position_embeddings=64, norm_scheme=scheme)
    base.update(kw)
    return LayerprobeConfig(**base)


def build(config, seed=0) -> LayerprobeForCausalLM:
    torch.manual_seed(seed)
    model = LayerprobeForCausalLM(config).eval()
    # Norm weights away from 1 (and biases away from 0), so a norm applied in the wrong place shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


# ---- the formulas, in plain tensor ops ---------------------------------------------------------------

def hand_norm(x, norm, eps=1e-6):
    if isinstance(norm, torch.nn.LayerNorm):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * norm.weight


def hand_rope(x, theta=10000.0):
    """x: [b, heads, t, hd]; rotate pairs (i, i + hd/2) by angle pos * theta^(-2i/hd)."""
    t, hd = x.shape[-2], x.shape[-1]
    half = hd // 2
    pos = torch.arange(t, dtype=torch.float32)[:, None]
    freq = theta ** (-torch.arange(half, dtype=torch.float32) * 2 / hd)
    ang = pos * freq  # [t, half]
    c, s = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def hand_attention(h, attn):
    b, t, d = h.shape
    hd = d // HEADS

    def heads(w):
        return (h @ w.T).view(b, t, HEADS, hd).transpose(1, 2)

    q, k, v = heads(attn.q_proj.weight), heads(attn.k_proj.weight), heads(attn.v_proj.weight)
    q, k = hand_rope(q), hand_rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, t, d) @ attn.o_proj.weight.T


def hand_mlp(h, mlp):
    g = h @ mlp.gate_proj.weight.T
    return (g * torch.sigmoid(g) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def hand_block(x, layer, scheme, index, num_layers, post_ln_layers=0):
    A = lambda h: hand_attention(h, layer.self_attn)  # noqa: E731
    M = lambda h: hand_mlp(h, layer.mlp)  # noqa: E731
    N1 = lambda h: hand_norm(h, layer.attn_norm)  # noqa: E731
    N2 = lambda h: hand_norm(h, layer.mlp_norm)  # noqa: E731
    if scheme == "mix":
        scheme = "post" if index < post_ln_layers else "pre"
    if scheme == "pre":
        h = x + A(N1(x))
        return h + M(N2(h))
    if scheme == "lns":
        s = 1.0 / math.sqrt(index + 1)
        h = x + A(N1(x) * s)
        return h + M(N2(h) * s)
    if scheme == "post":
        h = N1(x + A(x))
        return N2(h + M(h))
    if scheme == "deepnorm":
        a = (2 * num_layers) ** 0.25
        h = N1(a * x + A(x))
        return N2(a * h + M(h))
    if scheme == "sandwich":
        h = x + hand_norm(A(N1(x)), layer.attn_out_norm)
        return h + hand_norm(M(N2(h)), layer.mlp_out_norm)
    raise AssertionError(scheme)


# ---- blocks and whole models against the formulas ----------------------------------------------------

# The papers' placements; DyT and HybridNorm have theirs in test_norm_schemes.py, which checks the two lists
# together cover NORM_SCHEMES.
PAPER_SCHEMES = ("pre", "post", "mix", "lns", "deepnorm", "sandwich")


@pytest.mark.parametrize("scheme", PAPER_SCHEMES)
@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_every_block_matches_its_formula(scheme, norm_type):
    config = cfg(scheme, layers=4, post_ln_ratio=0.5, norm_type=norm_type)
    model = build(config)
    x = torch.randn(2, 7, D)
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            got = layer(x)
            want = hand_block(x, layer, scheme, i, 4, post_ln_layers=2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{scheme} block {i}")


@pytest.mark.parametrize("scheme", ["mix", "lns", "deepnorm", "sandwich"])
def test_whole_model_is_embed_blocks_final_norm_head(scheme):
    config = cfg(scheme, layers=4, post_ln_ratio=0.25)
    model = build(config)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        h = model.model.embed_tokens.weight[ids]
        for i, layer in enumerate(model.model.layers):
            h = hand_block(h, layer, scheme, i, 4, post_ln_layers=1)
        want = hand_norm(h, model.model.norm) @ model.lm_head.weight.T
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The loss is the mean next-token cross-entropy over every predicted position.
    loss = model(ids, labels=ids).loss
    manual = -torch.log_softmax(want[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["pre", "post"])
def test_chunked_loss_equals_the_unchunked_one(scheme, monkeypatch):
    """The labels' loss runs head + CE in chunks of rows (metrics/loss.py): loss and every gradient equal
    float32 CE over the whole [B, T, V] logits at 1e-6, with chunks that split samples and ignored targets."""
    import torch.nn.functional as F
    from layerprobe.metrics import loss as loss_module

    model = build(cfg(scheme, layers=3))
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, 4:7] = -100  # ignored targets inside a chunk
    logits = model(ids).logits
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    want = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(loss_module, "CE_CHUNK_ELEMENTS", 7 * VOCAB)  # 7 rows a chunk: 5 chunks of 33 rows
    model.train()
    out = model(ids, labels=labels)
    assert out.logits is None  # never formed whole in training
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)
    model.eval()  # evaluation (Trainer.evaluate, compute_metrics) gets the logits with the same loss
    with torch.no_grad():
        evaluated = model(ids, labels=labels)
    torch.testing.assert_close(evaluated.logits, logits.detach(), rtol=0, atol=0)
    torch.testing.assert_close(evaluated.loss, want.detach(), rtol=1e-6, atol=0)
    model.train()
    out.loss.backward()
    for n, p in model.named_parameters():
        scale = want_grads[n].abs().max()
        assert (p.grad - want_grads[n]).abs().max() <= 1e-6 * scale, (n, float((p.grad - want_grads[n]).abs().max()), float(scale))


def test_pre_ln_is_exactly_llama():
    """With the same weights, the Pre-LN reference model is transformers' LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = cfg("pre", layers=3)
    model = build(config)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=3, num_attention_heads=HEADS,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()
    renamed = {k.replace("attn_norm", "input_layernorm").replace("mlp_norm", "post_attention_layernorm"): v
               for k, v in model.state_dict().items()}
    llama.load_state_dict(renamed, strict=True)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding goes through the same mask path
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[:, 4:],
                                   llama(ids, attention_mask=mask).logits[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", NORM_SCHEMES)
def test_kv_cache_generation_equals_full_recompute(scheme):
    """generate() and cached decoding by hand (the cache under either name) give, at every step, the logits of a
    full recompute of the same tokens, for every scheme; with no deprecation message from the installed transformers."""
    model = build(cfg(scheme, layers=4, post_ln_ratio=0.5))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, VOCAB, (2, 5), generator=g)
    assert_generate_matches_recompute(model, prompt, steps=6)
    continuation = torch.randint(1, VOCAB, (2, 4), generator=g)
    with no_transformers_deprecation():
        assert_manual_cache_matches_recompute(model, prompt, continuation, cache_kw=CACHE_KW)
    assert_manual_cache_matches_recompute(model, prompt, continuation, cache_kw="past_key_values")


@pytest.mark.parametrize("scheme", ["pre", "mix", "hybrid"])
def test_left_padding_changes_no_logit(scheme):
    assert_left_padding_is_invisible(build(cfg(scheme, layers=3, post_ln_ratio=0.5)), VOCAB)


def test_two_different_caches_are_refused():
    from transformers import DynamicCache

    model = build(cfg("pre", layers=2))
    with pytest.raises(ValueError, match="not two different ones"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), cache=DynamicCache(config=model.config),
              past_key_values=DynamicCache(config=model.config))


# ---- Mix-LN split ------------------------------------------------------------------------------------

def placements(model):
    return [layer.placement for layer in model.model.layers]


def test_mix_split_is_floor_alpha_L():
    assert mix_post_ln_layers(12, 0.25) == 3
    assert mix_post_ln_layers(8, 0.25) == 2
    assert mix_post_ln_layers(10, 0.25) == 2  # floor(2.5)
    assert mix_post_ln_layers(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996 in floating point
    assert mix_post_ln_layers(7, 0.0) == 0 and mix_post_ln_layers(7, 1.0) == 7
    model = LayerprobeForCausalLM(cfg("mix", layers=8, post_ln_ratio=0.25))
    assert placements(model) == ["post"] * 2 + ["pre"] * 6
    assert model.config.post_ln_layers == 2
    explicit = LayerprobeForCausalLM(cfg("mix", layers=8, post_ln_layers=5, post_ln_ratio=0.25))
    assert placements(explicit) == ["post"] * 5 + ["pre"] * 3


@pytest.mark.parametrize("alpha,twin", [(0.0, "pre"), (1.0, "post")])
def test_mix_edges_are_pure_pre_and_pure_post(alpha, twin):
    mix = build(cfg("mix", layers=4, post_ln_ratio=alpha))
    other = LayerprobeForCausalLM(cfg(twin, layers=4)).eval()
    other.load_state_dict(mix.state_dict())
    assert placements(mix) == [twin] * 4
    assert mix.config.post_ln_layers == other.config.post_ln_layers
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(mix(ids).logits, other(ids).logits)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cfg("mix", post_ln_ratio=bad)
    with pytest.raises(ValueError):
        mix_post_ln_layers(4, bad)


def test_post_ln_layers_recorded_for_every_scheme():
    expected = {"pre": 0, "post": 6, "mix": 1, "lns": 0, "deepnorm": 0, "sandwich": 0, "dyt": 0, "hybrid": 0,
                "hybrid_star": 0}
    assert expected.keys() == set(NORM_SCHEMES)
    for scheme, k in expected.items():
        assert cfg(scheme, layers=6).post_ln_layers == k, scheme


# ---- scheme names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,canon", [("LNS", "lns"), ("Pre-LN", "pre"), ("POST", "post"), ("Mix_LN", "mix"),
                                        ("Peri-LN", "sandwich"), ("DeepNorm", "deepnorm"), (" sandwich ", "sandwich")])
def test_scheme_names_are_case_insensitive(name, canon):
    assert canonical_scheme(name) == canon


def test_upper_case_lns_really_scales():
    """The papers' bug: their code lower-cases the name, then compares it with 'LNS', so LNS blocks get no norms
    at all. Here 'LNS' and 'lns' both give the scaled model."""
    upper, lower, pre = (build(cfg(s, layers=3)) for s in ("LNS", "lns", "pre"))
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(upper(ids).logits, lower(ids).logits)
        assert not torch.allclose(upper(ids).logits, pre(ids).logits)
    assert upper.config.norm_scheme == "lns"


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown norm scheme"):
        cfg("prenorm")


# ---- LNS: a plain constant that survives save/load and meta-device init --------------------------------

def test_lns_factor_survives_save_load_and_meta_init(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = cfg("lns", layers=5)
    model = build(config)
    want = [1.0 / math.sqrt(i + 1) for i in range(5)]
    assert [layer.norm_scale for layer in model.model.layers] == pytest.approx(want, rel=0, abs=0)
    # Not a buffer nor a parameter: nothing to be lost or left uninitialised when weights are loaded.
    assert not any("scale" in n for n, _ in model.named_buffers())
    assert not any("scale" in n for n, _ in model.named_parameters())

    with torch.device("meta"):
        meta = LayerprobeForCausalLM(config)
    assert [layer.norm_scale for layer in meta.model.layers] == want

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # meta-device init, then the weights
    assert type(loaded) is LayerprobeForCausalLM
    assert AutoConfig.from_pretrained(tmp_path).norm_scheme == "lns"
    assert [layer.norm_scale for layer in loaded.model.layers] == want
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


# ---- DeepNorm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [4, 12])
def test_deepnorm_alpha_is_fourth_root_of_2L(layers):
    model = LayerprobeForCausalLM(cfg("deepnorm", layers=layers))
    alpha = (2 * layers) ** 0.25
    for layer in model.model.layers:
        assert layer.residual_scale == pytest.approx(alpha, rel=1e-12)
    assert alpha != pytest.approx(math.sqrt(8))  # the papers' code hard-coded √8


def test_deepnorm_init_gain():
    """v, out and FFN weights: Xavier-normal with gain β = (8L)^(-1/4); q and k: gain 1 (DeepNet)."""
    L, d, f = 8, 256, 512
    config = LayerprobeConfig(vocab_size=64, hidden_size=d, intermediate_size=f, num_hidden_layers=L,
                              num_attention_heads=4, norm_scheme="deepnorm")
    torch.manual_seed(0)
    model = LayerprobeForCausalLM(config)
    beta = (8 * L) ** -0.25
    assert beta < 1  # not inverted

    def xavier(fan_in, fan_out, gain):
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    checks = [(lambda lyr: lyr.self_attn.q_proj, d, d, 1.0), (lambda lyr: lyr.self_attn.k_proj, d, d, 1.0),
              (lambda lyr: lyr.self_attn.v_proj, d, d, beta), (lambda lyr: lyr.self_attn.o_proj, d, d, beta),
              (lambda lyr: lyr.mlp.gate_proj, d, f, beta), (lambda lyr: lyr.mlp.up_proj, d, f, beta),
              (lambda lyr: lyr.mlp.down_proj, f, d, beta)]
    for get, fan_in, fan_out, gain in checks:
        w = torch.stack([get(layer).weight for layer in model.model.layers])
        assert w.std().item() == pytest.approx(xavier(fan_in, fan_out, gain), rel=0.02)


def test_scaled_init_shrinks_residual_outputs():
    L = 6
    config = LayerprobeConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=L,
                              num_attention_heads=4, scaled_init=True)
    torch.manual_seed(0)
    model = LayerprobeForCausalLM(config)
    layers = model.model.layers
    o = torch.stack([lyr.self_attn.o_proj.weight for lyr in layers]).std().item()
    down = torch.stack([lyr.mlp.down_proj.weight for lyr in layers]).std().item()
    q = torch.stack([lyr.self_attn.q_proj.weight for lyr in layers]).std().item()
    assert q == pytest.approx(0.02, rel=0.02)
    assert o == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.02)
    assert down == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.02)


# ---- loading through the Auto classes and the analyzer's view ------------------------------------------

@pytest.mark.parametrize("scheme", ["mix", "sandwich"])
def test_auto_classes_and_loader_read_a_checkpoint(tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    from layerprobe.anatomy import find_anatomy
    from layerprobe.loading import load_model

    model = build(cfg(scheme, layers=4, post_ln_ratio=0.5))
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, model(ids).logits, rtol=0, atol=0)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.source == "layerprobe"
    anatomy = find_anatomy(loaded.model)
    assert anatomy.num_layers == 4 and anatomy.final_norm is loaded.model.model.norm
    assert anatomy.norm_scheme == scheme
    assert anatomy.post_ln_layers == (2 if scheme == "mix" else 0)
    kinds = {name: kind for name, (kind, _) in anatomy.sublayers(0).items()}
    assert kinds["self_attn"] == "attention" and kinds["mlp"] == "mlp"
    assert kinds["attn_norm"] == "norm" and kinds["mlp_norm"] == "norm"
