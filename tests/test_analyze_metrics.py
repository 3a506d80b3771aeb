"""Every analyze metric against an independent computation written here with plain loops.

The reference side reads the residual stream from `output_hidden_states` (inputs of layers
0..L-1) and a hook on the final norm's input (x^L, the last layer's output before the final
norm), then computes each metric in float64 with explicit Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import layerprobe
from layerprobe.anatomy import find_anatomy
from layerprobe.capture import LayerCapture
from layerprobe.loading import load_model
from layerprobe.report import render_analysis
from tiny_models import ARCHS, make_tiny

TOL = 1e-5
SAMPLES, SEQ = 6, 24


@pytest.fixture(scope="module", params=["llama", "gpt2", "opt"])
def tiny(request, tmp_path_factory, tiny_dir):
    arch = request.param
    folder = tiny_dir(arch)
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    ids = torch.randint(0, loaded.model.config.vocab_size, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))
    npy = tmp_path_factory.mktemp(f"{arch}-data") / "ids.npy"
    np.save(npy, ids.numpy())
    return arch, loaded, ids, str(npy)


def residual_stream(loaded, ids) -> list[torch.Tensor]:
    """x^0..x^L for every sample, float64: [L+1] tensors of [B, T, H]."""
    model = loaded.model
    anatomy = find_anatomy(model)
    captured = {}
    handle = anatomy.final_norm.register_forward_pre_hook(lambda m, args: captured.setdefault("xL", args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    handle.remove()
    L = anatomy.num_layers
    xs = [out.hidden_states[i].double() for i in range(L)] + [captured["xL"].double()]
    return xs


def reference_metrics(loaded, ids, tokens="last"):
    xs = residual_stream(loaded, ids)
    L = len(xs) - 1
    B, T, _ = xs[0].shape
    ang = np.zeros((L + 1, L + 1))
    for i in range(L + 1):
        for j in range(L + 1):
            total, count = 0.0, 0
            for b in range(B):
                positions = [T - 1] if tokens == "last" else range(T)
                for t in positions:
                    u, v = xs[i][b, t], xs[j][b, t]
                    c = float(torch.dot(u, v) / (u.norm() * v.norm()))
                    total += math.acos(max(-1.0, min(1.0, c))) / math.pi
                    count += 1
            ang[i, j] = total / count
    bi, out_var, upd_var = [], [], []
    for l in range(L):
        x, y = xs[l].reshape(-1, xs[l].shape[-1]), xs[l + 1].reshape(-1, xs[l].shape[-1])
        cos = [float(torch.dot(x[r], y[r]) / (x[r].norm() * y[r].norm())) for r in range(x.shape[0])]
        bi.append(1.0 - sum(cos) / len(cos))
        vals = y.flatten()
        mean = float(vals.sum()) / vals.numel()
        out_var.append(float(((vals - mean) ** 2).sum()) / vals.numel())
        d = (y - x).flatten()
        dmean = float(d.sum()) / d.numel()
        upd_var.append(float(((d - dmean) ** 2).sum()) / d.numel())
    return ang, bi, out_var, upd_var


def reference_grads(loaded, ids):
    model = loaded.model
    anatomy = find_anatomy(model)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits.double()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    per_layer, per_kind = [], []
    for layer in anatomy.layers:
        total = 0.0
        kinds: dict[str, float] = {}
        for name, p in layer.named_parameters():
            sq = float((p.grad.double() ** 2).sum())
            total += sq
            child = name.split(".")[0]
            kinds[child] = kinds.get(child, 0.0) + sq
        per_layer.append(math.sqrt(total))
        per_kind.append({k: math.sqrt(v) for k, v in kinds.items()})
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), per_layer, per_kind


def test_metrics_match_plain_loops(tiny):
    arch, loaded, ids, npy = tiny
    result = layerprobe.analyze(loaded, data=npy, batch_size=4, progress=False)  # 6 samples: batches of 4 and 2
    ang, bi, out_var, upd_var = reference_metrics(loaded, ids)
    L = len(bi)

    got = result.angular.set_index(["layer", "n"])["angular_distance"]
    assert len(got) == L * (L + 1) // 2
    for l in range(L):
        for n in range(1, L - l + 1):
            assert got[(l, n)] == pytest.approx(ang[l, l + n], abs=TOL), (arch, l, n)
    np.testing.assert_allclose(result.layers["angular_distance"], [ang[l, l + 1] for l in range(L)], atol=TOL)
    np.testing.assert_allclose(result.layers["block_influence"], bi, atol=TOL)
    np.testing.assert_allclose(result.layers["output_variance"], out_var, rtol=TOL)
    np.testing.assert_allclose(result.layers["update_variance"], upd_var, rtol=TOL)

    loss, grad_layer, grad_child = reference_grads(loaded, ids)
    assert result.summary["loss"] == pytest.approx(loss, rel=TOL)
    assert result.summary["perplexity"] == pytest.approx(math.exp(loss), rel=TOL)
    np.testing.assert_allclose(result.layers["grad_norm"], grad_layer, rtol=TOL)
    for l in range(L):
        rows = result.sublayers[result.sublayers["layer"] == l].set_index("module")["grad_norm"]
        assert set(rows.index) == set(grad_child[l])
        for child, norm in grad_child[l].items():
            assert rows[child] == pytest.approx(norm, rel=TOL), (arch, l, child)


def test_all_tokens_angular_distance(tiny):
    arch, loaded, ids, npy = tiny
    result = layerprobe.analyze(loaded, data=npy, batch_size=6, tokens="all", grad=False, progress=False)
    ang, *_ = reference_metrics(loaded, ids, tokens="all")
    got = result.angular.set_index(["layer", "n"])["angular_distance"]
    for (l, n), v in got.items():
        assert v == pytest.approx(ang[l, l + n], abs=TOL)


def test_no_grad_and_batch_size_do_not_change_forward_metrics(tiny):
    arch, loaded, ids, npy = tiny
    a = layerprobe.analyze(loaded, data=npy, batch_size=1, grad=False, progress=False)
    b = layerprobe.analyze(loaded, data=npy, batch_size=6, grad=True, progress=False)
    cols = ["angular_distance", "block_influence", "output_variance", "update_variance"]
    np.testing.assert_allclose(a.layers[cols].to_numpy(), b.layers[cols].to_numpy(), rtol=1e-5, atol=1e-7)
    assert a.layers["grad_norm"].isna().all() and b.layers["grad_norm"].notna().all()
    assert a.summary["loss"] == pytest.approx(b.summary["loss"], rel=1e-6)


def test_capture_keeps_no_per_sample_state(tmp_path):
    """Memory for the streamed metrics does not grow with the number of samples."""
    loaded = load_model(str(make_tiny("llama", tmp_path / "m")), device="cpu", dtype="float32")
    anatomy = find_anatomy(loaded.model)
    capture = LayerCapture(anatomy, tokens="all")

    def state_bytes():
        moments = capture.output_moments + capture.update_moments
        tensors = [capture.angular_sum] + [t for m in moments for t in (m.s1, m.s2)] + list(capture.cos_sum)
        tensors += capture.lens_kl_sum + capture.lens_top1_sum + capture.update_ratio_sum + capture.update_cos_sum
        tensors += capture.update_count + capture.act_max + capture.act_abs_sum + capture.decomposition_error
        tensors += [t for sums in capture.sub_sums.values() for t in sums]
        return sum(t.numel() * t.element_size() for t in tensors)

    sizes = []
    with capture, torch.no_grad():
        for step in range(5):
            loaded.model(input_ids=torch.randint(0, 256, (3, 16)), use_cache=False)
            capture.end_batch()
            assert capture._inputs == {} and capture._sub_out == {} and all(u is None for u in capture._units)
            sizes.append(state_bytes())
    assert len(set(sizes)) == 1
    assert capture.angular_count == 5 * 3 * 16 and capture.lens_count == 5 * 3 * 16


def test_norm_placement_is_measured(tmp_path):
    pre = load_model(str(make_tiny("opt", tmp_path / "pre")), device="cpu", dtype="float32")
    post = load_model(str(make_tiny("opt", tmp_path / "post", do_layer_norm_before=False)), device="cpu",
                      dtype="float32")
    ids = torch.randint(0, 256, (2, 16))
    np.save(tmp_path / "ids.npy", ids.numpy())
    r_pre = layerprobe.analyze(pre, data=str(tmp_path / "ids.npy"), grad=False, progress=False)
    r_post = layerprobe.analyze(post, data=str(tmp_path / "ids.npy"), grad=False, progress=False)
    assert list(r_pre.layers["norm_placement"]) == ["pre"] * r_pre.summary["num_layers"]
    assert list(r_post.layers["norm_placement"]) == ["post"] * r_post.summary["num_layers"]
    assert r_pre.summary["measured_norm_scheme"] == "pre" and r_post.summary["measured_norm_scheme"] == "post"
    assert r_post.summary["norm_scheme"] == "post"


def test_save_and_load_round_trip(tiny, tmp_path):
    arch, loaded, ids, npy = tiny
    result = layerprobe.analyze(loaded, data=npy, grad=True, progress=False)
    render_analysis(result, tmp_path / "out")  # result.save writes the data, render_analysis draws it too
    for name in ("layers.csv", "angular.csv", "sublayers.csv", "manifest.json", "index.html",
                 "angular_heatmap.png", "layer_importance.png", "output_variance.png", "grad_norms.png"):
        assert (tmp_path / "out" / name).is_file(), name
    assert not list((tmp_path / "out").glob(".*tmp*")), "temporary files left behind"
    back = layerprobe.load(tmp_path / "out")
    pd.testing.assert_frame_equal(back.layers, result.layers, check_dtype=False, rtol=1e-9)
    pd.testing.assert_frame_equal(back.angular, result.angular, check_dtype=False, rtol=1e-9)
    assert back.summary["loss"] == result.summary["loss"]
    assert back.summary["norm_scheme"] == result.summary["norm_scheme"]
    assert back.manifest["seq_len"] == SEQ and back.manifest["samples"] == SAMPLES
    for key in ("model", "dtype", "device", "data", "seed", "versions", "wall_time_s"):
        assert key in back.manifest


@pytest.mark.parametrize("scheme,measured,post_k", [("pre", "pre", 0), ("post", "post", 8), ("mix", "mix", 2),
                                                    ("lns", "pre", 0), ("deepnorm", "post", 8),
                                                    ("sandwich", "sandwich", 0)])
def test_reference_checkpoint_scheme_from_config_and_measured(tmp_path, scheme, measured, post_k):
    """Our checkpoints say their scheme; the measured placement of the norms must agree with it."""
    from layerprobe.reference.configuration import LayerprobeConfig
    from layerprobe.reference.modeling import LayerprobeForCausalLM

    torch.manual_seed(0)
    cfg = LayerprobeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                           num_attention_heads=4, norm_scheme=scheme)
    LayerprobeForCausalLM(cfg).save_pretrained(tmp_path / "m")
    np.save(tmp_path / "ids.npy", np.random.RandomState(0).randint(0, 128, (2, 16)))
    r = layerprobe.analyze(str(tmp_path / "m"), data=str(tmp_path / "ids.npy"), grad=False, progress=False)
    assert r.summary["norm_scheme"] == scheme and r.summary["norm_scheme_source"].startswith("config")
    assert r.summary["measured_norm_scheme"] == measured
    assert r.summary["measured_post_ln_layers"] == post_k


@pytest.mark.parametrize("arch", ARCHS)
def test_measured_placement_on_every_architecture(tmp_path, arch):
    """All tested archs put a norm before each sublayer: the identity-based measurement must say pre;
    Gemma-2 also norms each sublayer's output before the residual add: sandwich."""
    loaded = load_model(str(make_tiny(arch, tmp_path / arch)), device="cpu", dtype="float32")
    np.save(tmp_path / "ids.npy", np.random.RandomState(0).randint(0, 256, (2, 16)))
    r = layerprobe.analyze(loaded, data=str(tmp_path / "ids.npy"), grad=False, progress=False)
    want = "sandwich" if arch == "gemma2" else "pre"
    assert list(r.layers["norm_placement"]) == [want] * r.summary["num_layers"]
    assert r.summary["measured_norm_scheme"] == want


def test_import_layerprobe_registers_reference_checkpoints(tmp_path):
    """`import layerprobe` alone is enough for AutoModelForCausalLM to load our checkpoints."""
    import subprocess
    import sys

    from layerprobe.reference.configuration import LayerprobeConfig
    from layerprobe.reference.modeling import LayerprobeForCausalLM

    cfg = LayerprobeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, norm_scheme="LNS")
    LayerprobeForCausalLM(cfg).save_pretrained(tmp_path / "m")
    code = ("import layerprobe; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}); "
            "print(type(m).__name__, m.config.norm_scheme)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["LayerprobeForCausalLM", "lns"]


def test_next_token_loss_against_plain_loop():
    """metrics.loss against −log softmax written out per position, including the bf16 path and overflow."""
    from layerprobe.metrics import cross_entropy_rows, next_token_loss_sum, perplexity, predicted_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 4
    ids = torch.randint(0, 11, (3, 7), generator=g)
    want = 0.0
    for b in range(3):
        for t in range(6):
            z = logits[b, t].double()
            want += float(math.log(z.exp().sum()) - z[ids[b, t + 1]])
    assert float(next_token_loss_sum(logits, ids)) == pytest.approx(want, rel=1e-5)
    assert float(next_token_loss_sum(logits.bfloat16(), ids)) == pytest.approx(want, rel=2e-2)
    assert predicted_tokens(ids) == 18
    rows = cross_entropy_rows(logits[0], ids[0])
    assert float(rows[2]) == pytest.approx(float(torch.logsumexp(logits[0, 2], 0) - logits[0, 2, ids[0, 2]]), rel=1e-6)
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(800.0) == float("inf") and math.isnan(perplexity(float("nan")))


def test_computation_imports_no_report_layer():
    """Computing (analyze, prune_sweep, save_pruned, results) never loads the layer that draws."""
    import subprocess
    import sys

    code = ("import sys, layerprobe, layerprobe.analysis, layerprobe.pruning, layerprobe.results, layerprobe.opening; "
            "print(sorted(m for m in sys.modules if m.startswith('layerprobe.report') or m == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_model_in_training_mode_is_measured_in_eval_mode_and_given_back_training(tmp_path):
    """GPT-2 has dropout: handed over in training mode (from someone's loop), analyze measures the model without
    a random mask (the numbers of the model in eval mode) and gives it back in training mode, module by module."""
    lm = load_model(str(make_tiny("gpt2", tmp_path / "gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)),
                    device="cpu", dtype="float32")
    ids = torch.randint(0, lm.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "ids.npy", ids.numpy())
    want = layerprobe.analyze(lm, data=str(tmp_path / "ids.npy"), batch_size=2, progress=False).layers
    lm.model.train()
    lm.model.transformer.h[1].eval()  # a mixed state is given back as it was
    got = layerprobe.analyze(lm, data=str(tmp_path / "ids.npy"), batch_size=2, progress=False).layers
    cols = ["angular_distance", "block_influence", "output_variance", "grad_norm"]
    np.testing.assert_allclose(got[cols].to_numpy(), want[cols].to_numpy(), rtol=1e-6)
    assert lm.model.training and lm.model.transformer.h[0].training and not lm.model.transformer.h[1].training
