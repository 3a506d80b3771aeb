"""Logit lens, residual updates and massive activations against plain loops written here.

The reference reads the residual stream from `output_hidden_states` (outputs of layers 0..L-2)
and a hook on the final norm's input (output of layer L-1), applies the final norm and head by hand
from their weights in float64, and loops over layers and tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import layerprobe
from layerprobe.anatomy import find_anatomy
from layerprobe.loading import load_model
from layerprobe.metrics import lock_in_layer
from tiny_models import ARCHS, make_tiny

TOL = 1e-5
SAMPLES, SEQ = 6, 24
LENS_ARCHS = ["llama", "gpt2", "opt", "gpt_neox", "qwen2"]


@pytest.fixture(scope="module", params=LENS_ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    loaded = load_model(str(make_tiny(arch, tmp_path_factory.mktemp(arch) / "model")), device="cpu", dtype="float32")
    # Random init gives near-uniform logits; a larger final-norm gain makes the lens distributions
    # differ (KL of order 0.1-1 nats) so the comparison below tests something. (Not the head: GPT-2
    # and OPT tie it to the embeddings, which would scale the stream instead.)
    with torch.no_grad():
        find_anatomy(loaded.model).final_norm.weight.mul_(30.0)
    ids = torch.randint(0, loaded.model.config.vocab_size, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(3))
    ids[0, :4] = 0  # padding ids: a zero embedding row in Llama/Qwen2 (the update ratio skips such tokens)
    npy = tmp_path_factory.mktemp(f"{arch}-ids") / "ids.npy"
    np.save(npy, ids.numpy())
    return arch, loaded, ids, str(npy)


def layer_outputs(model, ids):
    """(layer inputs x_0..x_{L-1}, layer outputs y_0..y_{L-1}, final logits), float64, from
    output_hidden_states and a pre-hook on the final norm (hidden_states[L] is after it)."""
    anatomy = find_anatomy(model)
    seen = {}
    handle = anatomy.final_norm.register_forward_pre_hook(lambda m, args: seen.update(y=args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    handle.remove()
    L = anatomy.num_layers
    xs = [out.hidden_states[i].double() for i in range(L)]
    ys = xs[1:] + [seen["y"].double()]
    return xs, ys, out.logits.double()


def hand_readout(model, h: torch.Tensor) -> torch.Tensor:
    """final norm and head written out from their weights, float64, for one vector h [H]."""
    anatomy = find_anatomy(model)
    norm = anatomy.final_norm
    w = norm.weight.double()
    if isinstance(norm, nn.LayerNorm):
        mu = sum(float(v) for v in h) / len(h)
        var = sum((float(v) - mu) ** 2 for v in h) / len(h)
        z = (h - mu) / math.sqrt(var + norm.eps) * w + norm.bias.double()
    else:  # RMSNorm (Llama, Qwen2)
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
        z = h / math.sqrt(float((h * h).sum()) / len(h) + eps) * w
    head = anatomy.head
    logits = head.weight.double() @ z
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias.double()
    return logits


@torch.no_grad()
def reference(loaded, ids, tokens):
    model = loaded.model
    xs, ys, final = layer_outputs(model, ids)
    L = len(ys)
    B, T, _ = ys[0].shape
    positions = [T - 1] if tokens == "last" else list(range(T))
    kl, top1 = [], []
    for l in range(L):
        k_sum, agree, n = 0.0, 0, 0
        for b in range(B):
            for t in positions:
                lp_f = torch.log_softmax(final[b, t], 0)
                lp_l = torch.log_softmax(hand_readout(model, ys[l][b, t]), 0)
                k_sum += sum(math.exp(lp_f[v]) * (lp_f[v] - lp_l[v]) for v in range(len(lp_f)))
                agree += int(int(lp_l.argmax()) == int(lp_f.argmax()))
                n += 1
        kl.append(k_sum / n)
        top1.append(agree / n)
    rel, cos, peak, mean_abs = [], [], [], []
    for l in range(L):
        r_sum, c_sum, n = 0.0, 0.0, 0
        for b in range(B):
            for t in range(T):
                x, y = xs[l][b, t], ys[l][b, t]
                if float(x.norm()) == 0.0:  # undefined ratio: left out, as documented
                    continue
                d = y - x
                r_sum += float(d.norm() / x.norm())
                c_sum += float(torch.dot(d, x) / (d.norm() * x.norm()))
                n += 1
        rel.append(r_sum / n)
        cos.append(c_sum / n)
        flat = [abs(float(v)) for v in ys[l].flatten()]
        peak.append(max(flat))
        mean_abs.append(sum(flat) / len(flat))
    return dict(lens_kl=kl, lens_top1=top1, relative_update=rel, update_cosine=cos,
                max_activation=peak, mean_abs_activation=mean_abs)


def test_lens_runs_the_models_own_path_where_the_rebuilt_readout_differs(tiny, monkeypatch):
    """A readout that misses a step of the final path (here the final norm, as for LFM2, whose norm has
    another name) is noticed on the first batch; the model's own forward gives the lens instead."""
    from layerprobe.anatomy import Anatomy

    arch, loaded, ids, npy = tiny
    monkeypatch.setattr(Anatomy, "readout", lambda self, h: self.head(h.to(self.head.weight.dtype)))
    result = layerprobe.analyze(loaded, data=npy, batch_size=4, tokens="all", grad=False, progress=False,
                                lens_chunk=5)
    want = reference(loaded, ids, "all")
    for col in ("lens_kl", "lens_top1"):
        np.testing.assert_allclose(result.layers[col], want[col], atol=TOL, rtol=TOL, err_msg=f"{arch} {col}")


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_layer_metrics_match_plain_loops(tiny, tokens):
    arch, loaded, ids, npy = tiny
    # Batches of 4 and 2; lens chunks of 5 tokens, fewer than either batch holds: chunking is exercised.
    result = layerprobe.analyze(loaded, data=npy, batch_size=4, tokens=tokens, grad=tokens == "last",
                                progress=False, lens_chunk=5)
    want = reference(loaded, ids, tokens)
    assert max(want["lens_kl"]) > 0.05, "the lens distributions barely differ: the test would be weak"
    for col, values in want.items():
        np.testing.assert_allclose(result.layers[col], values, atol=TOL, rtol=TOL, err_msg=f"{arch} {col}")
    assert result.summary["lens_lock_in_layer"] == lock_in_layer(want["lens_top1"])


def test_sublayer_updates_match_plain_loops(tiny):
    """Attention and MLP updates against the sublayers' outputs read by hooks written here."""
    arch, loaded, ids, npy = tiny
    model = loaded.model
    anatomy = find_anatomy(model)
    attn_name = {"gpt2": "attn", "gpt_neox": "attention"}.get(arch, "self_attn")
    mlp_name = {"opt": "fc2"}.get(arch, "mlp")
    parallel = arch == "gpt_neox"  # use_parallel_residual defaults to True
    outs = {}
    handles = []
    for i, layer in enumerate(anatomy.layers):
        for name, key in ((attn_name, "a"), (mlp_name, "m")):
            module = getattr(layer, name)
            handles.append(module.register_forward_hook(
                lambda mod, args, out, i=i, key=key: outs.__setitem__((i, key), out[0] if isinstance(out, tuple) else out)))
    xs, ys, _ = layer_outputs(model, ids)
    for h in handles:
        h.remove()
    result = layerprobe.analyze(loaded, data=npy, batch_size=4, grad=False, progress=False)
    sub = result.sublayers.set_index(["layer", "module"])
    for l in range(len(ys)):
        a = outs[(l, "a")].detach().double().reshape(ys[l].shape)
        m = outs[(l, "m")].detach().double().reshape(ys[l].shape)
        # The premise: this layer's output is input + attention + MLP.
        assert float((ys[l] - xs[l] - a - m).abs().max()) < 1e-4
        for key, upd in (("a", a), ("m", m)):
            stream = xs[l] if key == "a" or parallel else xs[l] + a
            r_sum, c_sum, n = 0.0, 0.0, 0
            for b in range(SAMPLES):
                for t in range(SEQ):
                    s, d = stream[b, t], upd[b, t]
                    if float(s.norm()) == 0.0:
                        continue
                    r_sum += float(d.norm() / s.norm())
                    c_sum += float(torch.dot(d, s) / (d.norm() * s.norm()))
                    n += 1
            row = sub.loc[(l, attn_name if key == "a" else mlp_name)]
            assert row["relative_update"] == pytest.approx(r_sum / n, abs=TOL, rel=TOL), (arch, l, key)
            assert row["update_cosine"] == pytest.approx(c_sum / n, abs=TOL, rel=TOL), (arch, l, key)
    others = result.sublayers[~result.sublayers["module"].isin([attn_name, mlp_name])]
    assert others["relative_update"].isna().all()
    if arch == "llama":  # the MLP's update really is of the stream x + a: apply the modules by hand
        layer = anatomy.layers[0]
        h_mid = (xs[0] + outs[(0, "a")].double()).float()
        with torch.no_grad():
            m = layer.mlp(layer.post_attention_layernorm(h_mid))
        torch.testing.assert_close(m.double(), outs[(0, "m")].double(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_readout_is_the_models_own_head(tmp_path, arch):
    """Anatomy.readout applied to the last layer's output gives the model's logits (final norm, OPT's
    project_out, head, Gemma-2's soft-capping...), so the lens at the last layer has KL 0, top-1 1."""
    loaded = load_model(str(make_tiny(arch, tmp_path / arch)), device="cpu", dtype="float32")
    anatomy = find_anatomy(loaded.model)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    last = anatomy.layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: seen.update(y=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, use_cache=False).logits
        handle.remove()
        torch.testing.assert_close(anatomy.readout(seen["y"]), logits, atol=1e-5, rtol=1e-5)
    np.save(tmp_path / "ids.npy", ids.numpy())
    r = layerprobe.analyze(loaded, data=str(tmp_path / "ids.npy"), grad=False, tokens="all", progress=False)
    assert abs(r.layers["lens_kl"].iloc[-1]) < 1e-6 and r.layers["lens_top1"].iloc[-1] == 1.0
    assert r.layers[["lens_kl", "lens_top1", "relative_update", "update_cosine", "max_activation",
                     "mean_abs_activation"]].notna().all().all()


def test_gemma2_softcapping_is_applied(tmp_path):
    loaded = load_model(str(make_tiny("gemma2", tmp_path / "g", final_logit_softcapping=0.5)), device="cpu",
                        dtype="float32")
    anatomy = find_anatomy(loaded.model)
    with torch.no_grad():
        anatomy.head.weight.mul_(50)
        logits = loaded.model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False).logits
    assert float(logits.abs().max()) <= 0.5  # the cap bites, so a readout without it would differ
    h = torch.randn(4, loaded.model.config.hidden_size)
    with torch.no_grad():
        raw = anatomy.head(anatomy.final_norm(h))
        torch.testing.assert_close(anatomy.readout(h), torch.tanh(raw / 0.5) * 0.5)


@pytest.mark.parametrize("arch,overrides", [("opt", {"do_layer_norm_before": False}), ("gemma2", {})])
def test_no_sublayer_updates_where_the_residual_add_is_inside_a_norm(tmp_path, arch, overrides):
    """Post-LN OPT and Gemma-2's sandwich norms: sublayer outputs are not the stream's updates."""
    loaded = load_model(str(make_tiny(arch, tmp_path / arch, **overrides)), device="cpu", dtype="float32")
    np.save(tmp_path / "ids.npy", np.random.RandomState(0).randint(3, 256, (2, 12)))
    r = layerprobe.analyze(loaded, data=str(tmp_path / "ids.npy"), grad=False, progress=False)
    assert r.sublayers["relative_update"].isna().all()
    assert r.layers["relative_update"].notna().all()  # the layer-level update y - x is still measured


@pytest.mark.parametrize("scheme,sub_rows", [("pre", 8), ("mix", 6), ("dyt", 8), ("post", 0), ("hybrid", 0), ("hybrid_star", 2)])
def test_reference_schemes_sublayer_rows(tmp_path, scheme, sub_rows):
    """Sublayer updates exist exactly for the blocks whose output is input + attention + MLP."""
    from layerprobe.reference.configuration import LayerprobeConfig
    from layerprobe.reference.modeling import LayerprobeForCausalLM

    torch.manual_seed(0)
    cfg = LayerprobeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, norm_scheme=scheme)
    LayerprobeForCausalLM(cfg).save_pretrained(tmp_path / "m")
    np.save(tmp_path / "ids.npy", np.random.RandomState(0).randint(0, 128, (2, 16)))
    r = layerprobe.analyze(str(tmp_path / "m"), data=str(tmp_path / "ids.npy"), grad=False, progress=False)
    assert int(r.sublayers["relative_update"].notna().sum()) == sub_rows
    assert abs(r.layers["lens_kl"].iloc[-1]) < 1e-6


def test_lock_in_layer():
    assert lock_in_layer([0.1, 0.6, 0.4, 0.5, 0.9, 1.0]) == 3
    assert lock_in_layer([0.9, 0.8, 1.0]) == 0
    assert lock_in_layer([0.9, 0.2]) is None
    assert lock_in_layer([0.1, float("nan"), 0.7]) == 2


def test_massive_onset_and_second_half_ratio():
    from layerprobe.metrics import massive_onset, second_half_ratio

    assert massive_onset([1.0, 50.0, 300.0, 290.0], [1.0, 1.0, 2.0, 2.0]) == 2
    assert massive_onset([1.0, 2.0], [1.0, 1.0]) is None
    # medians of [9, 1, 2] and [1, 0.5, 0.5] (middle layer 3 of 7 left out): 0.5 / 2
    assert second_half_ratio([9, 1, 2, 100, 1, 0.5, 0.5]) == pytest.approx(0.25)
    assert math.isnan(second_half_ratio([1.0]))


def test_depth_findings_sentences():
    import pandas as pd

    from layerprobe.report.depth_findings import depth_findings

    a = pd.DataFrame({"lens_top1": [0.1, 0.6, 0.4, 0.7, 1.0], "relative_update": [4.0, 1.0, 1.0, 0.5, 0.5],
                      "max_activation": [1.0, 500.0, 500.0, 500.0, 400.0], "mean_abs_activation": [1.0] * 5})
    b = a.assign(lens_top1=[0.0, 0.0, 0.0, 0.0, 1.0], max_activation=[2.0] * 5)
    lens, update, act = depth_findings([("A $x$", a), ("B", b), ("C", None)])
    assert "Csordás et al." in lens and "A $x$: layer 3 of 0–4 (depth 0.75)" in lens and "B: layer 4" in lens
    assert "C:" not in lens
    assert "A $x$: 0.20×" in update  # medians 2.5 (first two layers) -> 0.5 (last two)
    assert "Sun et al." in act and "A $x$: from layer 1" in act and "B: no layer (largest max/mean 2×)" in act
    assert depth_findings([("C", None)]) == []
