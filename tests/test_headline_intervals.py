"""Intervals on compare's deep-half share and gradient ratio, and what compare says about them (issue 23).

Each interval is checked against a bootstrap written here as a plain loop: the per-sample losses of a
hand-removed layer (deep-half share), the per-batch gradients taken one batch at a time by autograd
(gradient ratio), resampled as the docs say: numpy default_rng(seed).integers(0, n, (R, n)), linear quantiles.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

import layerprobe
from layerprobe.comparison import compare_results, interval_findings, interval_gaps, interval_warnings
from layerprobe.loading import load_model
from layerprobe.metrics.depth import quarter
from layerprobe.report.compare_table import headline_table
from tiny_models import make_tiny, random_ids

R, LEVEL, SEED, LAYERS = 1000, 0.95, 0, 6


def plain_bootstrap(statistic, n: int, seed: int = SEED):
    """statistic(list of drawn indices) -> value; the resamples drawn as the docs say."""
    idx = np.random.default_rng(seed).integers(0, n, size=(R, n))
    reps = np.array([statistic(list(idx[r])) for r in range(R)])
    # an undefined replicate (NaN: no removal costs anything in it) is left out, as the docs say
    return np.nanquantile(reps, (1 - LEVEL) / 2), np.nanquantile(reps, (1 + LEVEL) / 2)


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    root = tmp_path_factory.mktemp("headline_intervals")
    folder = make_tiny("llama", root / "llama", num_hidden_layers=LAYERS)
    ids = random_ids(12, 10, 5)
    npy = root / "ids.npy"
    np.save(npy, ids.numpy())
    return load_model(str(folder), device="cpu", dtype="float32"), ids, str(npy), root


def _ce_per_sample(net, ids) -> np.ndarray:
    with torch.no_grad():
        logits = net(input_ids=ids, use_cache=False).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (-lp).sum(1).numpy()


def test_deep_half_share_interval_equals_a_plain_loop(six):
    loaded, ids, npy, root = six
    out = root / "sweep"
    layerprobe.prune_sweep(loaded, mode="layer", data=npy, batch_size=5, progress=False).save(out)
    with np.load(out / "sweep_samples.npz") as f:  # one row per row of sweep.csv, the full model first
        assert f["ce"].shape == (LAYERS + 1, ids.shape[0]) and list(f["removed"]) == ["none", *map(str, range(LAYERS))]
    row = compare_results([out], progress=False).headline.iloc[0]

    model, layers = loaded.model, loaded.model.model.layers
    full = _ce_per_sample(model, ids)
    pruned = []
    for k in range(LAYERS):
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != k])
        try:
            pruned.append(_ce_per_sample(model, ids))
        finally:
            model.model.layers = layers
    pruned = np.array(pruned)  # [L, S]

    def share(pick):
        cost = [max((pruned[k][pick].sum() - full[pick].sum()) / (len(pick) * (ids.shape[1] - 1)), 0.0)
                for k in range(LAYERS)]
        return sum(cost[LAYERS - LAYERS // 2:]) / sum(cost) if sum(cost) > 0 else float("nan")

    lo, hi = plain_bootstrap(share, ids.shape[0])
    assert row["deep_half_share"] == pytest.approx(share(list(range(ids.shape[0]))), abs=1e-4)
    assert row["deep_half_share_lo"] == pytest.approx(lo, abs=1e-4)
    assert row["deep_half_share_hi"] == pytest.approx(hi, abs=1e-4)
    assert hi - lo > 1e-2  # a real spread: the tolerance above cannot hide a wrong interval


def test_grad_ratio_interval_equals_a_plain_loop_over_batches(six):
    loaded, ids, npy, root = six
    batch = 3  # 12 samples: 4 batches
    out = root / "analysis"
    a = layerprobe.analyze(loaded, data=npy, batch_size=batch, grad=True, progress=False)
    a.save(out)
    row = compare_results([out], progress=False).headline.iloc[0]

    model, layers = loaded.model, loaded.model.model.layers
    params = [list(layer.parameters()) for layer in layers]
    n_pred = ids.shape[0] * (ids.shape[1] - 1)
    per_batch = []  # [B][L] flattened gradient of d(batch's summed loss / all predicted tokens)
    for chunk in torch.split(ids, batch):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(input_ids=chunk, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     chunk[:, 1:].reshape(-1), reduction="sum")
            grads = torch.autograd.grad(loss / n_pred, [p for ps in params for p in ps])
        flat, i = [], 0
        for ps in params:
            flat.append(torch.cat([g.reshape(-1) for g in grads[i:i + len(ps)]]).double())
            i += len(ps)
        per_batch.append(flat)
    B, q = len(per_batch), quarter(LAYERS)

    def ratio(pick):
        norms = [float(torch.linalg.vector_norm(sum(per_batch[b][k] for b in pick))) for k in range(LAYERS)]
        return np.mean(norms[-q:]) / np.mean(norms[:q])

    lo, hi = plain_bootstrap(ratio, B)
    assert row["grad_ratio"] == pytest.approx(ratio(list(range(B))), rel=1e-4)
    assert row["grad_ratio_lo"] == pytest.approx(lo, rel=1e-4)
    assert row["grad_ratio_hi"] == pytest.approx(hi, rel=1e-4)
    assert hi - lo > 1e-2 * row["grad_ratio"]  # a real spread over the 4 batches
    gram = a.per_sample["grad_gram"]  # the Gram's all-ones form is the analysed gradient's norm
    for k, name in enumerate(a.per_sample["grad_gram_groups"]):
        assert np.sqrt(gram[k].sum()) == pytest.approx(a.layers["grad_norm"][int(name)], rel=1e-4)
    assert sorted(int(x) for x in a.per_sample["grad_gram_groups"]) == [0, 1, LAYERS - 2, LAYERS - 1]


def test_old_results_without_the_sums_have_no_interval_said_once(six, tmp_path):
    loaded, ids, npy, root = six
    folders = []
    for name in ("a", "b"):
        out = tmp_path / name
        layerprobe.analyze(loaded, data=npy, batch_size=4, grad=True, progress=False).save(out)
        layerprobe.prune_sweep(loaded, mode="layer", data=npy, batch_size=6, progress=False).save(out)
        # as written before the sums were kept: no sweep_samples.npz, no gradient Gram
        (out / "sweep_samples.npz").unlink()
        with np.load(out / "samples.npz") as f:
            kept = {k: f[k] for k in f.files if not k.startswith("grad_gram")}
        np.savez(out / "samples.npz", **kept)
        folders.append(out)
    comp = compare_results(folders, progress=False)
    h = comp.headline
    assert h["deep_half_share"].notna().all() and h["grad_ratio"].notna().all()
    assert h["deep_half_share_lo"].isna().all() and h["grad_ratio_hi"].isna().all()
    assert h["variance_growth_lo"].notna().all()  # samples.npz itself is still there
    console = Console(width=120, record=True)
    console.print(headline_table(comp, width=120))
    text = " ".join(console.export_text().split())
    assert text.count("no interval on the deep-half share of llama (a), llama (b): no sweep_samples.npz") == 1
    assert text.count("no interval on the gradient ratio of llama (a), llama (b): no per-batch gradient Gram") == 1
    assert "variance growth" not in " ".join(interval_gaps(h))
    assert "Variance growth (slope) with its 95% interval" in text


def test_a_sweep_samples_file_of_another_sweep_is_not_used(six, tmp_path):
    loaded, ids, npy, root = six
    out = tmp_path / "s"
    layerprobe.prune_sweep(loaded, mode="layer", data=npy, batch_size=6, progress=False).save(out)
    other = tmp_path / "o"
    layerprobe.prune_sweep(loaded, mode="block", block_size=2, data=npy, batch_size=6, progress=False).save(other)
    shutil.copy(other / "sweep_samples.npz", out / "sweep_samples.npz")
    row = compare_results([out], progress=False).headline.iloc[0]
    assert np.isfinite(row["deep_half_share"]) and np.isnan(row["deep_half_share_lo"])


def _headline(rows):
    return pd.DataFrame([dict(model=m, deep_half_share=v, deep_half_share_lo=lo, deep_half_share_hi=hi,
                              grad_ratio=g, grad_ratio_lo=glo, grad_ratio_hi=ghi)
                         for m, v, lo, hi, g, glo, ghi in rows])


def test_compare_says_which_differences_are_larger_than_the_intervals():
    df = _headline([("pre", 0.30, 0.22, 0.37, 0.50, 0.45, 0.55),
                    ("mix", 0.48, 0.41, 0.55, 0.52, 0.47, 0.60),
                    ("lns", 0.40, 0.36, 0.44, 1.00, 0.90, 1.10)])
    lines = interval_findings(df)
    share = next(s for s in lines if s.startswith("Deep-half share"))
    assert "pre 30% [22%, 37%], lns 40% [36%, 44%], mix 48% [41%, 55%]" in share  # lowest first
    apart, within = share.split("larger than their intervals (they do not overlap): ")[1].split("; not larger")
    assert apart.strip() == "mix vs pre"  # 41% > 37%: the only pair whose intervals are disjoint
    assert "lns vs pre" in within and "mix vs lns" in within
    grad = next(s for s in lines if s.startswith("Gradient ratio"))
    assert "lns vs pre, lns vs mix" in grad and "mix vs pre" in grad.split("not larger")[1]
    assert not any("Variance" in s for s in lines)  # no column: no sentence


def test_a_warning_when_an_interval_is_wider_than_its_number():
    df = _headline([("pre", 0.30, 0.22, 0.37, 0.20, 0.05, 0.40),  # ratio 0.2, interval 0.35 wide
                    ("mix", 0.05, 0.00, 0.06, 0.50, 0.45, 0.55)])  # share 5%, interval 6 points wide
    warnings = interval_warnings(df)
    assert len(warnings) == 2
    assert any(w.startswith("the gradient ratio of pre, 0.2 [0.05, 0.4]") and "more batches" in w for w in warnings)
    assert any(w.startswith("the deep-half share of mix, 5% [0%, 6%]") for w in warnings)
    assert interval_gaps(df) == []


def test_the_gradient_gram_is_the_same_with_checkpointed_layers(six):
    """On an accelerator analyze checkpoints every layer: the hooks must see the same per-batch gradients."""
    from layerprobe.analysis import _gradient_gram, _measure
    from layerprobe.opening import open_model

    loaded, ids, npy, root = six
    opening = open_model(loaded, grad=True, progress=False)
    opening.load_blocks(npy, seq_len=ids.shape[1], samples=None, seed=0, text_column=None, progress=False)
    grams = []
    for checkpointed in (False, True):
        gram = _gradient_gram(opening.anatomy, 4)
        _measure(opening, batch_size=3, tokens="last", grad=True, progress=False, checkpoint_layers=checkpointed,
                 gram=gram)
        grams.append(gram.result()["grad_gram"])
        assert gram.batches == 4 and not gram._handles  # the hooks are gone after the pass
    np.testing.assert_allclose(grams[1], grams[0], rtol=1e-5, atol=1e-12)
    assert (np.diagonal(grams[0], axis1=1, axis2=2) > 0).all()
