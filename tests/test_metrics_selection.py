"""analyze --metrics: a subset of the statistics equals the full run's values, the others are absent,
and the tables, figures, reload and compare cope with what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import layerprobe
from layerprobe.defaults import METRIC_COLUMNS, METRICS
from layerprobe.loading import load_model
from layerprobe.report import render_analysis, summary_table
from layerprobe.results import AnalysisResult
from cli_helpers import assert_one_line_error, run_cli

SAMPLES, SEQ = 6, 24
SUBSETS = [("angular",), ("influence",), ("variance",), ("lens",), ("updates",), ("activations",), ("gradients",),
           ("loss",), ("angular", "influence"), ("angular", "lens", "gradients"), ("variance", "loss")]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def runs(request, tiny_dir, tmp_path_factory):
    """The full run (every metric, with gradients) and the model and data to repeat it on a subset."""
    loaded = load_model(str(tiny_dir(request.param)), device="cpu", dtype="float32")
    ids = torch.randint(0, loaded.model.config.vocab_size, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(3))
    npy = tmp_path_factory.mktemp("metrics-data") / "ids.npy"
    np.save(npy, ids.numpy())

    def run(metrics=None, grad=True, tokens="last"):
        return layerprobe.analyze(loaded, data=str(npy), samples=SAMPLES, batch_size=4, grad=grad, tokens=tokens,
                                  progress=False, metrics=metrics)

    return run, run()


def _close(got, want, what):
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    assert got.shape == want.shape, what
    assert np.array_equal(np.isnan(got), np.isnan(want)), what
    ok = ~np.isnan(want)
    assert np.allclose(got[ok], want[ok], rtol=1e-6, atol=1e-12), (what, np.abs(got - want).max())


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s))
def test_each_selected_metric_equals_the_full_run(runs, subset):
    run, full = runs
    part = run(",".join(subset))
    wanted = {c for m in subset for c in METRIC_COLUMNS[m]}
    absent = {c for m in METRICS if m not in subset for c in METRIC_COLUMNS[m]}
    for col in wanted:
        for c in (col, f"{col}_lo", f"{col}_hi"):
            if c in full.layers:
                _close(part.layers[c], full.layers[c], c)
    # nothing unmeasured shows up, not even as a NaN column or an interval
    assert not {c for c in part.layers.columns if c.removesuffix("_lo").removesuffix("_hi") in absent}
    assert list(part.layers["norm_placement"]) == list(full.layers["norm_placement"])
    if "loss" in subset or "gradients" in subset:
        assert part.summary["loss"] == pytest.approx(full.summary["loss"], rel=1e-6)
    else:  # neither head nor cross-entropy ran
        assert np.isnan(part.summary["loss"]) and np.isnan(part.summary["perplexity"])
    if "angular" in subset:
        for c in full.angular.columns:
            _close(part.angular[c], full.angular[c], f"angular.csv {c}")
    else:
        assert part.angular.empty
    sub_cols = {"relative_update", "update_cosine"} if "updates" in subset else set()
    sub_cols |= {"grad_norm"} if "gradients" in subset else set()
    assert {"relative_update", "update_cosine", "grad_norm"} & set(part.sublayers.columns) == sub_cols
    for c in sub_cols:
        _close(part.sublayers[c], full.sublayers[c], f"sublayers.csv {c}")
    assert part.manifest["metrics"] == [m for m in METRICS if m in subset]
    assert part.manifest["grad"] == ("gradients" in subset)  # no backward without the gradient norms


def test_tokens_all_subset_equals_full(runs):
    run, _ = runs
    full, part = run(grad=False, tokens="all"), run("angular,lens", grad=False, tokens="all")
    for c in ("angular_distance", "lens_kl", "lens_top1"):
        _close(part.layers[c], full.layers[c], c)
    _close(part.angular["angular_distance"], full.angular["angular_distance"], "angular map")


def test_a_subset_saves_reloads_renders_and_compares(runs, tmp_path):
    run, _ = runs
    part = run("influence,lens")
    render_analysis(part, tmp_path / "a")
    summary_table(part)  # the terminal table without the angular column and the loss
    assert not (tmp_path / "a" / "angular.csv").exists()
    back = AnalysisResult.load(tmp_path / "a")
    assert "angular_distance" not in back.layers and back.angular.empty
    _close(back.layers["block_influence"], part.layers["block_influence"], "reloaded BI")
    pngs = {p.name for p in (tmp_path / "a").glob("*.png")}
    assert {"layer_importance.png", "logit_lens.png"} <= pngs
    assert not pngs & {"angular_heatmap.png", "output_variance.png", "grad_norms.png", "activations.png"}
    layerprobe.compare([tmp_path / "a"], tmp_path / "cmp", progress=False)  # tables, figures and page
    assert (tmp_path / "cmp" / "index.html").exists()
    # a full run written over it leaves no trace of the subset, and the reverse removes the stale map
    render_analysis(run("angular"), tmp_path / "b")
    assert (tmp_path / "b" / "angular.csv").exists()
    render_analysis(part, tmp_path / "b")
    assert not (tmp_path / "b" / "angular.csv").exists()


def test_unknown_metric_is_one_error_line_before_loading(tmp_path):
    result, text = run_cli("analyze", tmp_path / "no-such-model", "--metrics", "angular,bogus", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "'bogus'", ", ".join(METRICS))
    assert not (tmp_path / "o").exists()


def test_gradients_with_no_grad_is_refused(tmp_path):
    result, text = run_cli("analyze", tmp_path / "no-such-model", "--no-grad", "--metrics", "gradients")
    assert_one_line_error(result, text, "--no-grad")


def test_api_refuses_unknown_metric_before_loading(tmp_path):
    with pytest.raises(layerprobe.LayerprobeError, match="unknown --metrics 'x'"):
        layerprobe.analyze(str(tmp_path / "no-such-model"), metrics=["angular", "x"])
