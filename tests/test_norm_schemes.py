"""DyT and HybridNorm / HybridNorm* in the reference model: each block against its formula written out here in
plain tensor ops, the DyT α0 table, save/load, KV cache, training through the CLI and `layerprobe.analyze`."""

from __future__ import annotations

import math

import pytest
import torch

import layerprobe  # noqa: F401
from fixtures_reference import MICRO, assert_one_line_error, read_json, read_metrics, run_cli  # noqa: F401
from layerprobe.reference import NORM_SCHEMES, LayerprobeConfig, LayerprobeForCausalLM, canonical_scheme, dyt_alpha_init
from test_reference_model import PAPER_SCHEMES, hand_mlp, hand_norm, hand_rope

D, HEADS, FFN, VOCAB = 32, 4, 48, 97
HD = D // HEADS
NEW = ("dyt", "hybrid", "hybrid_star")
pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(scheme, layers=3, **kw) -> LayerprobeConfig:
    return LayerprobeConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=layers,
                            num_attention_heads=HEADS, max_position_embeddings=64, norm_scheme=scheme, **kw)


def build(config, seed=0) -> LayerprobeForCausalLM:
    """Norm weights away from 1, biases away from 0, DyT's α and the embedding scale away from their inits,
    so a norm (or a scale) applied in the wrong place, or not at all, shows."""
    torch.manual_seed(seed)
    model = LayerprobeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".alpha"):
                p.copy_(0.3 + torch.rand_like(p))
            elif name.endswith("embed_scale.scale"):
                p.mul_(0.7)
            elif "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


# ---- the formulas, in plain tensor ops ---------------------------------------------------------------

def hand_dyt(x, dyt):
    y = dyt.weight * torch.tanh(dyt.alpha * x)
    return y + dyt.bias if dyt.bias is not None else y


def hand_attention(h, attn, qkv_norm=False):
    """Causal attention; with qkv_norm each head's q, k and v are normalised over head_dim before RoPE."""
    b, t, d = h.shape

    def heads(w):
        return (h @ w.T).view(b, t, HEADS, HD).transpose(1, 2)

    q, k, v = heads(attn.q_proj.weight), heads(attn.k_proj.weight), heads(attn.v_proj.weight)
    if qkv_norm:
        q, k, v = hand_norm(q, attn.q_norm), hand_norm(k, attn.k_norm), hand_norm(v, attn.v_norm)
    q, k = hand_rope(q), hand_rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HD)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, t, d) @ attn.o_proj.weight.T


def hand_block(x, layer, scheme, index):
    M = lambda h: hand_mlp(h, layer.mlp)  # noqa: E731
    if scheme == "dyt":  # Pre-LN with DyT in place of both norms
        h = x + hand_attention(hand_dyt(x, layer.attn_norm), layer.self_attn)
        return h + M(hand_dyt(h, layer.mlp_norm))
    A = lambda h: hand_attention(h, layer.self_attn, qkv_norm=True)  # noqa: E731
    if scheme == "hybrid_star" and index == 0:  # HybridNorm*: block 0 Pre-LN, QKV-norm kept
        h = x + A(hand_norm(x, layer.attn_norm))
        return h + M(hand_norm(h, layer.mlp_norm))
    # HybridNorm (official OLMoSequentialBlock): no norm before attention; the FFN's skip starts after its norm
    n = hand_norm(x + A(x), layer.mlp_norm)
    return n + M(n)


def hand_final(h, model, scheme):
    norm = model.model.norm
    return hand_dyt(h, norm) if scheme == "dyt" else hand_norm(h, norm)


def test_every_scheme_has_a_formula_test():
    assert set(NORM_SCHEMES) == set(PAPER_SCHEMES) | set(NEW)


@pytest.mark.parametrize("scheme", NEW)
@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_every_block_matches_its_formula(scheme, norm_type):
    model = build(cfg(scheme, norm_type=norm_type))
    x = torch.randn(2, 7, D)
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            got, want = layer(x), hand_block(x, layer, scheme, i)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{scheme} block {i}")


@pytest.mark.parametrize("scheme", NEW)
def test_whole_model_is_embed_blocks_final_norm_head(scheme):
    model = build(cfg(scheme))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        h = model.model.embed_tokens.weight[ids]
        if scheme == "dyt":  # the learnable scalar after the embedding
            h = h * model.model.embed_scale.scale
        for i, layer in enumerate(model.model.layers):
            h = hand_block(h, layer, scheme, i)
        want = hand_final(h, model, scheme) @ model.lm_head.weight.T
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_structure_of_each_scheme():
    dyt, hybrid, star = (LayerprobeForCausalLM(cfg(s)) for s in NEW)
    # DyT: a DyT wherever Pre-LN has a norm, no norm anywhere else, no q/k/v norms.
    assert all(type(m).__name__ == "DyT" for n, m in dyt.named_modules() if n.endswith("norm"))
    assert not any(hasattr(layer.self_attn, "q_norm") for layer in dyt.model.layers)
    # HybridNorm: q/k/v norms in every block (width head_dim), no norm before attention; HybridNorm*: block 0 has one.
    for model in (hybrid, star):
        for layer in model.model.layers:
            assert all(getattr(layer.self_attn, f"{p}_norm").weight.shape == (HD,) for p in "qkv")
    assert [hasattr(layer, "attn_norm") for layer in hybrid.model.layers] == [False] * 3
    assert [hasattr(layer, "attn_norm") for layer in star.model.layers] == [True, False, False]
    assert [layer.placement for layer in star.model.layers] == ["pre", "hybrid", "hybrid"]
    assert hybrid.model.embed_scale is None and star.model.embed_scale is None


def test_new_schemes_start_from_the_same_projection_weights_as_pre_ln():
    """Their extra parameters are constants at init, so the random draws (and the comparison) line up."""
    states = {}
    for s in ("pre", *NEW):
        torch.manual_seed(7)
        states[s] = LayerprobeForCausalLM(cfg(s)).state_dict()
    for s in NEW:
        shared = [k for k in states[s] if k in states["pre"] and "norm" not in k]
        assert len(shared) == 2 + 7 * 3, s  # embeddings, head, 7 projections per block
        assert all(torch.equal(states[s][k], states["pre"][k]) for k in shared), s


# ---- DyT's α0 and the embedding scale ----------------------------------------------------------------

def test_dyt_alpha_follows_the_papers_width_table():
    # Zhu et al. 2025 Table 12 (1024..8192) and Table 11 / the official LLaMA commands (4096, 5120, 8192).
    table = {32: (1.0, 1.0), 512: (1.0, 1.0), 1024: (1.0, 1.0), 2048: (1.0, 0.5), 4096: (0.8, 0.2),
             5120: (0.6, 0.15), 8192: (0.2, 0.05)}
    for width, want in table.items():
        assert dyt_alpha_init(width) == want, width
    c = LayerprobeConfig(vocab_size=16, hidden_size=2048, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=16, norm_scheme="dyt")
    assert (c.dyt_alpha_attn, c.dyt_alpha_ffn, c.dyt_alpha_final) == (1.0, 0.5, 0.5)
    assert cfg("pre").dyt_alpha_attn is None


def test_dyt_init_values_and_overrides():
    model = LayerprobeForCausalLM(cfg("dyt", dyt_alpha_attn=0.8, dyt_alpha_ffn=0.2, dyt_alpha_final=0.3))
    for layer in model.model.layers:
        assert layer.attn_norm.alpha.item() == pytest.approx(0.8) and layer.mlp_norm.alpha.item() == pytest.approx(0.2)
        assert torch.equal(layer.attn_norm.weight, torch.ones(D)) and layer.attn_norm.bias is None
    assert model.model.norm.alpha.item() == pytest.approx(0.3)
    assert model.model.embed_scale.scale.item() == pytest.approx(math.sqrt(D))
    ln = LayerprobeForCausalLM(cfg("dyt", norm_type="layernorm"))
    assert torch.equal(ln.model.norm.bias, torch.zeros(D))  # β only where the norm it replaces had one
    with pytest.raises(ValueError, match="dyt_alpha_attn"):
        cfg("dyt", dyt_alpha_attn=0.0)


# ---- names, cache, save/load, colours ----------------------------------------------------------------

@pytest.mark.parametrize("name,canon", [("DyT", "dyt"), ("dynamic-tanh", "dyt"), ("HybridNorm", "hybrid"),
                                        ("hybrid", "hybrid"), ("HybridNorm*", "hybrid_star"),
                                        ("hybrid*", "hybrid_star"), ("Hybrid-Star", "hybrid_star")])
def test_scheme_names(name, canon):
    assert canonical_scheme(name) == canon


def test_norm_option_lists_the_new_schemes(tmp_path):
    result, text = run_cli("train-reference", *MICRO, "--norm", "tanh", "--steps", 2, "--out", tmp_path / "x")
    assert_one_line_error(result, text, "unknown norm scheme 'tanh'", "dyt", "hybrid", "hybrid_star")


@pytest.mark.parametrize("scheme", NEW)
def test_save_and_reload_keep_scheme_and_trained_values(tmp_path, scheme):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = build(cfg(scheme))  # α and the embedding scale already moved away from their inits
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.norm_scheme == scheme
    if scheme == "dyt":
        assert (config.dyt_alpha_attn, config.dyt_alpha_ffn, config.dyt_alpha_final) == (1.0, 1.0, 1.0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # meta init, then the weights
    assert type(loaded) is LayerprobeForCausalLM
    assert [layer.placement for layer in loaded.model.layers] == [layer.placement for layer in model.model.layers]
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)  # not re-initialised
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_colours_are_distinct_and_cover_every_scheme():
    from layerprobe.report.style import SCHEME_COLORS, model_styles

    assert set(NORM_SCHEMES) <= SCHEME_COLORS.keys()
    colours = [SCHEME_COLORS[s] for s in NORM_SCHEMES]
    assert len(set(colours)) == len(colours) and SCHEME_COLORS["unknown"] not in colours
    styles = model_styles([(s, s) for s in NEW] + [("x", "weird")])
    assert [styles[s]["color"] for s in NEW] == [SCHEME_COLORS[s] for s in NEW]
    assert styles["x"]["color"] not in colours


# ---- trained through the CLI, then analysed ----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result, text = run_cli("train-reference", *MICRO, "--norm", "DyT,HybridNorm,HybridNorm*", "--steps", 8,
                           "--eval-every", 4, "--out", out)
    assert result.exit_code == 0, text
    return out


def test_each_new_scheme_trains_and_saves_its_scheme(trained):
    from transformers import AutoModelForCausalLM

    from layerprobe.reference import reference_config

    summary = read_json(trained / "summary.json")
    assert [(r["scheme"], r["status"]) for r in summary["runs"]] == [(s, "completed") for s in NEW]
    for scheme in NEW:
        records = read_metrics(trained / scheme)
        losses = [r["loss"] for r in records]
        assert len(losses) == 8 and all(math.isfinite(v) for v in losses), scheme
        assert sum(losses[-2:]) / 2 < losses[0], (scheme, losses)  # it learns
        model = AutoModelForCausalLM.from_pretrained(trained / scheme)
        assert model.config.norm_scheme == scheme
        torch.manual_seed(0)
        fresh = LayerprobeForCausalLM(reference_config("micro", scheme, vocab_size=model.config.vocab_size))
        if scheme == "dyt":  # α and the embedding scale are trained, not frozen
            assert model.model.layers[0].attn_norm.alpha.item() != fresh.model.layers[0].attn_norm.alpha.item()
            assert model.model.embed_scale.scale.item() != pytest.approx(math.sqrt(32), abs=0)
        else:  # so are the q/k/v norms
            assert not torch.equal(model.model.layers[1].self_attn.k_norm.weight, torch.ones(8))


@pytest.mark.parametrize("scheme", NEW)
def test_analyze_finds_the_layers_of_a_trained_run(trained, scheme):
    from layerprobe.anatomy import find_anatomy
    from layerprobe.loading import load_model

    loaded = load_model(str(trained / scheme), device="cpu", dtype="float32")
    anatomy = find_anatomy(loaded.model)
    assert anatomy.num_layers == 4 and anatomy.final_norm is loaded.model.model.norm
    assert anatomy.norm_scheme == scheme and anatomy.norm_scheme_source == "config (norm_scheme)"
    kinds = {name: kind for name, (kind, _) in anatomy.sublayers(1).items()}
    assert kinds["self_attn"] == "attention" and kinds["mlp"] == "mlp" and kinds["mlp_norm"] == "norm"
    assert ("attn_norm" in kinds) == (scheme == "dyt")

    result = layerprobe.analyze(loaded, samples=4, seq_len=16, batch_size=2, progress=False)
    layers = result.layers
    assert len(layers) == 4 and result.summary["norm_scheme"] == scheme
    assert math.isfinite(result.summary["loss"])
    assert layers["angular_distance"].between(0, 1).all() and layers["block_influence"].notna().all()
    assert (layers["grad_norm"] > 0).all() and (layers["grad_norm_attention"] > 0).all()
    # Placement measured from tensor identity: DyT's norms read the block input (Pre-LN); a HybridNorm block's
    # only norm reads h = x + Attn(x) and its output is N(h) + FFN(N(h)), so it is neither pre nor post.
    want = {"dyt": ["pre"] * 4, "hybrid": ["?"] * 4, "hybrid_star": ["pre", "?", "?", "?"]}[scheme]
    assert list(layers["norm_placement"]) == want
    assert result.summary["measured_norm_scheme"] == ("pre" if scheme == "dyt" else "unknown")
