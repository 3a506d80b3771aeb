"""Intervals over samples, removal verdicts, ranking stability and calibration hygiene (issue 23).

Every interval is checked against a bootstrap written here as a plain loop over per-sample values
computed independently (hooks and a hand-removed layer), with the resampling the docs promise:
numpy default_rng(seed).integers(0, S, (R, S)), linear quantiles.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import layerprobe
from layerprobe.data import pack, tokenize_documents
from layerprobe.loading import load_model
from layerprobe.metrics.depth import removal_verdicts
from layerprobe.metrics.intervals import (bootstrap_interval, chosen_agreement, half_split, interval_width_samples,
                                          kendall_tau, ratio, split_half_tau)
from tiny_models import make_tiny, random_ids

R, LEVEL, SEED = 1000, 0.95, 0


def plain_bootstrap(per_sample_fn, S: int, seed: int = SEED):
    """per_sample_fn(list of sample indices) -> statistic; the resamples drawn as the docs say."""
    idx = np.random.default_rng(seed).integers(0, S, size=(R, S))
    reps = np.array([per_sample_fn(list(idx[r])) for r in range(R)])
    return np.quantile(reps, (1 - LEVEL) / 2, axis=0), np.quantile(reps, (1 + LEVEL) / 2, axis=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("intervals")
    folder = make_tiny("llama", root / "llama")
    ids = random_ids(12, 10, 3)
    npy = root / "ids.npy"
    np.save(npy, ids.numpy())
    return load_model(str(folder), device="cpu", dtype="float32"), ids, str(npy)


def _layer_streams(model, ids):
    """(inputs, outputs) of every decoder layer, [L] lists of [S, T, H] float64, read by plain hooks."""
    ins, outs, handles = {}, {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: ins.__setitem__(i, (a[0] if a else k["hidden_states"]).detach().double()),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().double())))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    L = len(model.model.layers)
    return [ins[i] for i in range(L)], [outs[i] for i in range(L)]


def test_analyze_intervals_equal_a_plain_loop_bootstrap(llama):
    loaded, ids, npy = llama
    result = layerprobe.analyze(loaded, data=npy, batch_size=5, grad=False, progress=False)
    xs, ys = _layer_streams(loaded.model, ids)
    S, T, H = ids.shape[0], ids.shape[1], xs[0].shape[-1]
    for l in range(len(xs)):
        x, y = xs[l], ys[l]
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).numpy()  # [S, T]
        last = torch.nn.functional.cosine_similarity(x[:, -1], y[:, -1], dim=-1).clamp(-1, 1)
        ang = (torch.arccos(last) / math.pi).numpy()  # [S]
        ysum, ysq = y.sum((1, 2)).numpy(), (y ** 2).sum((1, 2)).numpy()

        def variance(pick):
            n = len(pick) * T * H
            m = ysum[pick].sum() / n
            return ysq[pick].sum() / n - m * m

        checks = {
            "block_influence": plain_bootstrap(lambda p: 1 - cos[p].sum() / (len(p) * T), S),
            "angular_distance": plain_bootstrap(lambda p: ang[p].mean(), S),
            "output_variance": plain_bootstrap(variance, S),
        }
        row = result.layers.iloc[l]
        for col, (lo, hi) in checks.items():
            assert row[f"{col}_lo"] == pytest.approx(lo, rel=1e-5, abs=1e-7), (col, l)
            assert row[f"{col}_hi"] == pytest.approx(hi, rel=1e-5, abs=1e-7), (col, l)
            assert row[f"{col}_lo"] <= row[col] <= row[f"{col}_hi"]
    iv = result.manifest["intervals"]
    assert (iv["level"], iv["resamples"], iv["seed"], iv["samples"]) == (LEVEL, R, SEED, S)
    assert "grad_norm" in iv["without"]


def test_sweep_delta_loss_interval_equals_a_plain_loop(llama):
    loaded, ids, npy = llama
    sweep = layerprobe.prune_sweep(loaded, mode="layer", data=npy, batch_size=5, progress=False)
    model = loaded.model

    def ce_per_sample(net):
        with torch.no_grad():
            logits = net(input_ids=ids, use_cache=False).logits.double()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (-lp).sum(1).numpy()

    full = ce_per_sample(model)
    layers = model.model.layers
    S, n = ids.shape[0], ids.shape[1] - 1
    for k in range(len(layers)):
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != k])
        try:
            pruned = ce_per_sample(model)
        finally:
            model.model.layers = layers
        lo, hi = plain_bootstrap(lambda p: (pruned[p].sum() - full[p].sum()) / (len(p) * n), S)
        row = sweep.rows("layer").iloc[k]
        assert row["delta_loss_lo"] == pytest.approx(lo, abs=1e-6), k
        assert row["delta_loss_hi"] == pytest.approx(hi, abs=1e-6), k
    assert sweep.manifest["intervals"]["samples"] == S


def _identity_layer_model(root, layer: int):
    """A Pre-LN tiny Llama whose layer `layer` adds exactly nothing: its o_proj and down_proj are zero."""
    folder = make_tiny("llama", root / "identity")
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    block = loaded.model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return loaded


def test_identity_layer_interval_contains_zero_and_others_exclude_it(tmp_path):
    loaded = _identity_layer_model(tmp_path, 1)
    ids = random_ids(16, 10, 5)
    np.save(tmp_path / "ids.npy", ids.numpy())
    a = layerprobe.analyze(loaded, data=str(tmp_path / "ids.npy"), batch_size=8, grad=False, progress=False)
    rows = a.layers.set_index("layer")
    for col in ("angular_distance", "block_influence"):
        assert rows.loc[1, f"{col}_lo"] <= 1e-6 and rows.loc[1, f"{col}_hi"] <= 1e-6, col  # contains 0 to rounding
        for far in (0, 2):
            assert rows.loc[far, f"{col}_lo"] > 0.01, (col, far)
    sweep = layerprobe.prune_sweep(loaded, mode="layer", data=str(tmp_path / "ids.npy"), batch_size=8, progress=False)
    one = sweep.rows("layer").set_index("first_layer").loc[1]
    assert one["delta_loss_lo"] == pytest.approx(0, abs=1e-6) and one["delta_loss_hi"] == pytest.approx(0, abs=1e-6)
    assert 1 in sweep.summary["removable_sure_layers"]


def test_intervals_shrink_about_as_one_over_sqrt_n(tmp_path):
    folder = make_tiny("llama", tmp_path / "llama")
    loaded = load_model(str(folder), device="cpu", dtype="float32")
    np.save(tmp_path / "ids.npy", random_ids(64, 8, 11).numpy())
    widths = {}
    for n in (16, 64):
        a = layerprobe.analyze(loaded, data=str(tmp_path / "ids.npy"), samples=n, batch_size=16, grad=False,
                               progress=False)
        cols = ("angular_distance", "block_influence", "output_variance", "relative_update")
        widths[n] = np.array([a.layers[f"{c}_hi"] - a.layers[f"{c}_lo"] for c in cols]).ravel()
    ratio_ = float(np.median(widths[16] / widths[64]))
    assert 1.4 < ratio_ < 2.9, ratio_  # √(64/16) = 2


# -- pure functions --------------------------------------------------------------------------

def test_ratio_bootstrap_matches_plain_loop_and_needs_two_samples():
    rng = np.random.default_rng(1)
    num, den = rng.normal(5, 1, size=(20, 3)), rng.integers(1, 9, size=20).astype(float)
    lo, hi = bootstrap_interval({"n": num, "d": den}, ratio("n", "d"), seed=7)
    plo, phi = plain_bootstrap(lambda p: num[p].sum(0) / den[p].sum(), 20, seed=7)
    np.testing.assert_allclose(lo, plo, rtol=1e-12)
    np.testing.assert_allclose(hi, phi, rtol=1e-12)
    lo1, hi1 = bootstrap_interval({"n": num[:1], "d": den[:1]}, ratio("n", "d"))
    assert lo1.shape == (3,) and np.isnan(lo1).all() and np.isnan(hi1).all()


def _tau_plain(a, b):
    conc = disc = ta = tb = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif da == db:
                conc += 1
            else:
                disc += 1
    return (conc - disc) / math.sqrt((conc + disc + ta) * (conc + disc + tb))


def test_kendall_tau_against_a_plain_loop():
    rng = np.random.default_rng(2)
    for _ in range(20):
        a, b = rng.integers(0, 5, 9).astype(float), rng.integers(0, 5, 9).astype(float)
        assert kendall_tau(a, b) == pytest.approx(_tau_plain(a, b))
    assert kendall_tau([1, 2, 3], [3, 4, 5]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0


def test_split_half_and_chosen_agreement():
    first, second = half_split(11, seed=3)
    assert len(first) == len(second) == 5 and not set(first) & set(second)
    rng = np.random.default_rng(4)
    # Per layer scores far apart: the ranking is the same on every half and every resample.
    clear = {"v": np.array([0.0, 1.0, 2.0, 3.0]) + rng.normal(0, 0.01, size=(40, 4)), "d": np.ones(40)}
    stat = ratio("v", "d")
    assert split_half_tau(clear, stat, seed=0) == 1.0
    lowest2 = lambda v: frozenset(int(i) for i in np.argsort(v)[:2])  # noqa: E731
    assert chosen_agreement(clear, stat, lowest2) == (1.0, 1.0)
    # Pure noise: the two halves disagree somewhere and the chosen pair changes across resamples.
    noise = {"v": rng.normal(0, 1, size=(40, 6)), "d": np.ones(40)}
    same, jac = chosen_agreement(noise, stat, lowest2)
    assert same < 0.9 and jac < 1.0


def test_removal_verdicts_and_samples_to_decide():
    v = removal_verdicts([0, 1, 2, 3], delta_loss=[0.01, 0.04, 0.2, 0.06], lo=[0.0, 0.03, 0.1, 0.02],
                         hi=[0.02, 0.07, 0.3, 0.1], threshold=0.05, samples=32)
    assert v["sure"] == [0] and v["kept"] == [2] and v["undecided"] == [1, 3]
    # layer 1: half-width 0.03 on the threshold's side, margin 0.01 -> 32 * 9; layer 3: 0.04 / 0.01 -> 32 * 16
    assert v["samples_to_decide"] == 32 * 16
    assert interval_width_samples(32, 0.03, 0.01) == pytest.approx(288)
    assert math.isnan(removal_verdicts([0], [0.0], [-0.1], [0.01], 0.05, 8)["samples_to_decide"])


# -- calibration hygiene ---------------------------------------------------------------------

class _WordTokenizer:
    eos_token_id = 2

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [[3 + len(w) for w in d.split()] for d in docs]}


def test_text_is_packed_into_full_blocks_never_padded():
    """No attention mask exists anywhere: documents of unequal length are joined (EOS between) and cut
    into full blocks; the tail is dropped, never padded."""
    docs = ["a bb ccc", "dddd", "e ff ggg hhhh iiiii jj k", "ll"]
    stream = tokenize_documents(docs, _WordTokenizer())
    assert stream.tolist() == [4, 5, 6, 2, 7, 2, 4, 5, 6, 7, 8, 5, 4, 2, 5, 2]
    blocks = pack(stream, 5)
    assert blocks.shape == (3, 5) and blocks.flatten().tolist() == stream[:15].tolist()


def test_every_position_counts_once_whatever_the_batching(llama):
    """Batches of unequal size (5, 5, 2 against 1 x 12) give the same statistics, intervals and per-sample
    sums: nothing is padded to a batch's length, and each sample weighs its own tokens."""
    loaded, ids, npy = llama
    a = layerprobe.analyze(loaded, data=npy, batch_size=5, grad=False, progress=False)
    b = layerprobe.analyze(loaded, data=npy, batch_size=1, grad=False, progress=False)
    cols = [c for c in a.layers.columns if c != "norm_placement"]
    np.testing.assert_allclose(a.layers[cols].to_numpy(float), b.layers[cols].to_numpy(float), rtol=1e-6, atol=1e-9)
    S, T = ids.shape
    assert (a.per_sample["tokens"] == T).all() and (a.per_sample["angular_tokens"] == 1).all()
    assert a.per_sample["cos"].shape == (S, 3)
    assert a.summary["tokens_scored"] == S * (T - 1)
    m = a.manifest
    assert (m["data"], m["samples"], m["seq_len"], m["seed"]) == (npy, S, T, 0)


def test_per_sample_sums_round_trip_and_rankings_read_them(llama, tmp_path):
    loaded, ids, npy = llama
    a = layerprobe.analyze(loaded, data=npy, batch_size=6, grad=False, progress=False)
    a.save(tmp_path)
    back = layerprobe.AnalysisResult.load(tmp_path)
    assert set(back.per_sample) == set(a.per_sample)
    np.testing.assert_array_equal(back.per_sample["angular"], a.per_sample["angular"])
    sweep = layerprobe.prune_sweep(loaded, mode="ranked", by="influence,angular,last", steps=2, data=npy,
                                   batch_size=6, analysis=str(tmp_path), progress=False)
    st = sweep.summary["ranking_stability"]
    assert set(st) == {"influence", "angular"}
    for s in st.values():
        assert -1 <= s["split_half_tau"] <= 1 and 0 <= s["chosen_identical"] <= 1 and 0 <= s["chosen_jaccard"] <= 1


def test_per_sample_sums_add_up_to_every_column_with_all_tokens(llama):
    """--tokens all: each sample's T tokens are grouped to it (lens chunks and angular chunks cut across
    samples); the per-sample sums total to the reported values."""
    loaded, ids, npy = llama
    a = layerprobe.analyze(loaded, data=npy, batch_size=5, tokens="all", grad=False, lens_chunk=7, progress=False)
    ps, T = a.per_sample, ids.shape[1]
    assert (ps["angular_tokens"] == T).all() and (ps["lens_tokens"] == T).all()
    L = len(a.layers)
    total = ps["angular"].sum(0) / ps["angular_tokens"].sum()
    np.testing.assert_allclose(a.layers["angular_distance"], [total[l, l + 1] for l in range(L)], rtol=1e-12)
    np.testing.assert_allclose(a.layers["lens_kl"], ps["lens_kl"].sum(0) / ps["lens_tokens"].sum(), rtol=1e-6)
    np.testing.assert_allclose(a.layers["lens_top1"], ps["lens_top1"].sum(0) / ps["lens_tokens"].sum(), rtol=1e-12)
    np.testing.assert_allclose(a.layers["relative_update"], ps["upd_ratio"].sum(0) / ps["upd_count"].sum(0), rtol=1e-12)


def test_variance_growth_interval_equals_a_plain_loop(llama):
    from layerprobe.metrics.depth import variance_growth
    from layerprobe.metrics.intervals import variance_growth_interval

    loaded, ids, npy = llama
    a = layerprobe.analyze(loaded, data=npy, batch_size=6, grad=False, progress=False)
    ps, L = a.per_sample, len(a.layers)

    def growth(pick):
        n = ps["out_n"][pick].sum()
        m = ps["out_s1"][pick].sum(0) / n
        return variance_growth(ps["out_s2"][pick].sum(0) / n - m * m, L)

    lo, hi = variance_growth_interval(ps, L)
    plo, phi = plain_bootstrap(growth, len(ids))
    assert lo == pytest.approx(plo, rel=1e-9) and hi == pytest.approx(phi, rel=1e-9)
    assert lo <= variance_growth(a.layers["output_variance"], L) <= hi
