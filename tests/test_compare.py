"""`compare`: headline numbers against their definitions, pairing of results, the report's files and
figures, and one clear line for every bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import layerprobe
from layerprobe.comparison import DEFAULT_THRESHOLD, load_results
from layerprobe.metrics.depth import grad_ratio, quarter, variance_growth
from layerprobe.report.style import SCHEME_COLORS, model_styles
from cli_helpers import assert_one_line_error, run_cli
from tiny_models import make_tiny





@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Analyze + layer sweep of a 3-layer Pre-LN Llama and a 4-layer Post-LN OPT; analyze only of a
    2nd Llama (same scheme as the first); a micro train-reference run analysed into another folder."""
    root = tmp_path_factory.mktemp("compare")
    tokens = root / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(3, 256, size=(8, 32)))
    out = {}
    for name, arch, kw, sweep in [("llama", "llama", {}, True),
                                  ("opt-post", "opt", {"do_layer_norm_before": False, "num_hidden_layers": 4}, True),
                                  ("llama-b", "llama", {"num_hidden_layers": 2}, False)]:
        model = make_tiny(arch, root / "models" / name, **kw)
        loaded = layerprobe.load_model(str(model))
        res = layerprobe.analyze(loaded, data=str(tokens), seq_len=32, samples=8, progress=False)
        folder = res.save(root / "results" / name)
        if sweep:
            layerprobe.prune_sweep(loaded, mode="layer", data=str(tokens), seq_len=32, samples=8,
                                   analysis=res, progress=False).save(folder)
        out[name] = folder
    from layerprobe.training import train_reference

    summary = train_reference(norm="lns", preset="micro", steps=4, eval_every=2, eval_samples=8,
                              out=str(root / "runs"), progress=False)
    run = Path(summary.runs[0].path)
    res = layerprobe.analyze(str(run), data="builtin", seq_len=32, samples=8, progress=False)
    out["run"] = run
    out["run-analysis"] = res.save(root / "results" / "run-analysis")
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def comparison(results):
    folders = [results[k] for k in ("llama", "opt-post", "run", "run-analysis")]
    return layerprobe.compare(folders, out=results["root"] / "report", progress=False)


# ----------------------------------------------------------------------------- numbers

def test_variance_growth_is_the_log_slope_against_normalised_depth():
    d = np.linspace(0, 1, 7)
    assert variance_growth(3.0 * np.exp(2.5 * d)) == pytest.approx(2.5)
    assert variance_growth(np.full(5, 0.7)) == pytest.approx(0.0, abs=1e-12)
    assert variance_growth(np.exp(-1.0 * np.linspace(0, 1, 12))) == pytest.approx(-1.0)


def test_grad_ratio_uses_ceil_quarter():
    assert [quarter(L) for L in (1, 3, 4, 5, 8, 12, 24)] == [1, 1, 1, 2, 2, 3, 6]
    assert grad_ratio([1, 1, 5, 5, 2, 2, 4, 4]) == pytest.approx(4.0)  # L = 8: last 2 / first 2
    assert grad_ratio([2, 9, 9, 9, 1]) == pytest.approx(((9 + 1) / 2) / ((2 + 9) / 2))  # L = 5: quarter = 2
    assert math.isnan(grad_ratio([1.0]))


def test_headline_matches_the_result_files(results, comparison):
    h = comparison.headline.set_index("model")
    for name in ("llama", "opt-post"):
        folder = results[name]
        layers = pd.read_csv(folder / "layers.csv")
        sweep = pd.read_csv(folder / "sweep.csv", dtype={"removed": str})
        L = len(layers)
        # Written out independently of the code under test: least squares by hand.
        d = np.arange(L) / (L - 1)
        y = np.log(layers["output_variance"].to_numpy())
        slope = ((d - d.mean()) * (y - y.mean())).sum() / ((d - d.mean()) ** 2).sum()
        q = -(-L // 4)
        g = layers["grad_norm"].to_numpy()
        single = sweep[(sweep["mode"] == "layer") & sweep["removed"].str.fullmatch(r"\d+")]
        manifest = json.loads((folder / "manifest.json").read_text())
        row = h.loc[name]
        assert row["layers"] == L
        assert row["perplexity"] == pytest.approx(manifest["analyze"]["summary"]["perplexity"])
        assert row["variance_growth"] == pytest.approx(slope, abs=1e-9)
        assert row["variance_growth_factor"] == pytest.approx(math.exp(slope))
        assert row["grad_ratio"] == pytest.approx(g[-q:].mean() / g[:q].mean())
        assert row["removable_layers"] == (single["delta_loss"] < DEFAULT_THRESHOLD).sum()
        assert len(single) == L
    assert h.loc["llama", "norm_scheme"] == "pre" and h.loc["opt-post", "norm_scheme"] == "post"
    # Post-LN normalises every layer's output: its variance does not grow with depth.
    assert abs(h.loc["opt-post", "variance_growth"]) < 0.05


def test_threshold_changes_the_count(results):
    folders = [results["llama"], results["opt-post"]]
    low = layerprobe.compare(folders, out=None, threshold=-1.0, progress=False).headline
    high = layerprobe.compare(folders, out=None, threshold=1e9, progress=False).headline
    assert (low["removable_layers"] == 0).all()
    assert list(high["removable_layers"]) == [3, 4]


def test_depth_is_normalised_when_depths_differ(results, comparison):
    assert comparison.depth == "normalised"
    pl = comparison.per_layer
    for model, g in pl.groupby("model"):
        assert g["depth"].iloc[0] == 0 and g["depth"].iloc[-1] == pytest.approx(1)
        assert g["depth"].is_monotonic_increasing
    same = layerprobe.compare([results["llama"]], out=None, progress=False)
    assert same.depth == "layer"
    with pytest.raises(layerprobe.LayerprobeError, match="--depth"):
        layerprobe.compare([results["llama"]], out=None, depth="sideways", progress=False)


def test_training_run_and_its_analysis_are_one_model(results, comparison):
    labels = [m.label for m in comparison.models]
    assert len(comparison.models) == 3, labels
    run = next(m for m in comparison.models if m.training is not None)
    assert run.analysis is not None and run.kinds == ["analyze", "train-reference"]
    assert run.norm_scheme == "lns"
    assert {results["run"], results["run-analysis"]} == set(run.folders)
    # The logged per-layer statistics of every evaluation, for every layer.
    tl = run.training_layers
    assert sorted(tl["step"].unique()) == [2, 4]
    assert set(tl.columns) >= {"step", "layer", "grad_norm", "output_variance"}
    assert len(tl) == 2 * run.num_layers
    metrics = [json.loads(line) for line in (results["run"] / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert tl[tl["step"] == 4]["output_variance"].tolist() == pytest.approx(last["layer_output_var"])
    h = comparison.headline.set_index("model").loc[run.label]
    assert h["final_eval_perplexity"] == pytest.approx(last["eval_ppl"])
    assert h["trained_steps"] == 4


def test_same_scheme_models_share_a_colour_and_differ_in_style():
    styles = model_styles([("a", "pre"), ("b", "pre"), ("c", "post"), ("d", "weird"), ("e", None)])
    assert styles["a"]["color"] == styles["b"]["color"] == SCHEME_COLORS["pre"]
    assert styles["a"]["linestyle"] != styles["b"]["linestyle"]
    assert styles["c"]["color"] == SCHEME_COLORS["post"]
    assert styles["d"]["color"] not in SCHEME_COLORS.values()
    assert styles["d"]["color"] != styles["e"]["color"]


def _has_colour(png: Path, hex_colour: str, min_pixels: int = 20) -> bool:
    import matplotlib.image as mpimg

    img = (mpimg.imread(png)[..., :3] * 255).round().astype(int)
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((np.abs(img - rgb).sum(axis=-1) <= 6).sum()) >= min_pixels


def test_every_curve_figure_uses_the_scheme_colours(comparison):
    out = comparison.out
    files = {f["file"] for f in comparison.figures}
    for name in ("compare_angular_distance.png", "compare_block_influence.png", "compare_output_variance.png",
                 "compare_grad_norm.png", "compare_delta_loss.png", "compare_angular_heatmaps.png",
                 "compare_training_loss.png", "compare_training_dynamics.png", "compare_training_grad_norm.png",
                 "compare_training_output_variance.png"):
        assert name in files, name
        assert (out / name).stat().st_size > 5000
    schemes = {"pre", "post", "lns"}
    for name in ("compare_angular_distance.png", "compare_output_variance.png", "compare_grad_norm.png"):
        for s in schemes:
            assert _has_colour(out / name, SCHEME_COLORS[s]), (name, s)
    # Δloss exists only for the swept models (pre and post), training only for lns.
    for s in ("pre", "post"):
        assert _has_colour(out / "compare_delta_loss.png", SCHEME_COLORS[s])
    assert _has_colour(out / "compare_training_loss.png", SCHEME_COLORS["lns"])
    assert not _has_colour(out / "compare_training_loss.png", SCHEME_COLORS["post"])


def test_report_files_are_self_contained(comparison):
    out = comparison.out
    html = (out / "index.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    imgs = re.findall(r"<img [^>]*src=\"([^\"]+)\"", html)
    assert len(imgs) == len(comparison.figures) and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    assert re.search(r"(src|href)=\"(https?:)?//", html) is None
    for text in ("At a glance", "How each number is defined", f"{DEFAULT_THRESHOLD:g} nats", "⌈L/4⌉",
                 "ℓ/(L−1)", "Training", "Angular distance maps"):
        assert text in html, text
    headline = pd.read_csv(out / "headline.csv")
    assert list(headline["model"]) == [m.label for m in comparison.models]
    per_layer = pd.read_csv(out / "per_layer.csv")
    assert set(per_layer.columns) >= {"model", "norm_scheme", "layer", "depth", "angular_distance",
                                      "block_influence", "output_variance", "grad_norm", "delta_loss"}
    assert (out / "training.csv").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compare"]["threshold_nats"] == DEFAULT_THRESHOLD
    assert len(manifest["compare"]["models"]) == 3


def test_user_strings_are_escaped(tmp_path, results):
    hostile = tmp_path / '<b onmouseover="x()">&name'
    shutil.copytree(results["llama"], hostile)
    manifest = json.loads((hostile / "manifest.json").read_text())
    manifest["analyze"]["summary"]["model"] = "<script>alert(1)</script>"
    (hostile / "manifest.json").write_text(json.dumps(manifest))
    comp = layerprobe.compare([hostile], out=tmp_path / "r", title="<i>title</i>", progress=False)
    html = comp.html.read_text(encoding="utf-8")
    assert "<script>" not in html and "<b onmouseover" not in html and "<i>title" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b onmouseover=&quot;x()&quot;&gt;&amp;name" in html
    assert "&lt;i&gt;title&lt;/i&gt;" in html


# ----------------------------------------------------------------------------- CLI

def test_cli_compare(results, tmp_path):
    out = tmp_path / "cli"
    result, text = run_cli("compare", results["llama"], results["opt-post"], "--out", out, "--threshold", "0.1")
    assert result.exit_code == 0, text
    assert "llama" in text and "opt-post" in text and "removable" in text
    assert "wrote" in text and (out / "index.html").is_file()
    assert json.loads((out / "manifest.json").read_text())["compare"]["threshold_nats"] == 0.1


def test_no_folders():
    result, text = run_cli("compare", "--out", "x")
    assert_one_line_error(result, text, "give at least one result folder")


def test_folder_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    result, text = run_cli("compare", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "holds no layerprobe results")


def test_missing_folder(tmp_path):
    result, text = run_cli("compare", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "no such folder")


def test_incompatible_format_version(tmp_path, results):
    old = tmp_path / "old"
    shutil.copytree(results["llama"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"], manifest["layerprobe_version"] = 99, "9.9.9"
    (old / "manifest.json").write_text(json.dumps(manifest))
    result, text = run_cli("compare", results["opt-post"], old, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "format 99", "9.9.9", "re-run")


def test_sweep_from_another_version(tmp_path, results):
    old = tmp_path / "old-sweep"
    shutil.copytree(results["opt-post"], old)
    sweep = pd.read_csv(old / "sweep.csv").drop(columns=["delta_loss"])
    sweep.to_csv(old / "sweep.csv", index=False)
    result, text = run_cli("compare", old, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "delta_loss", "re-run prune-sweep")


def test_training_metrics_from_another_version(tmp_path, results):
    run = tmp_path / "run"
    shutil.copytree(results["run"], run)
    (run / "metrics.jsonl").write_text('{"step": 1, "objective": 3.0}\n')
    result, text = run_cli("compare", run, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "another layerprobe version")


def test_unwritable_out(tmp_path, results):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result, text = run_cli("compare", results["llama"], "--out", blocker / "report")
    assert_one_line_error(result, text, "cannot write to output folder")


def test_report_folder_as_input(results, comparison, tmp_path):
    result, text = run_cli("compare", comparison.out, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "is a comparison report")


def test_file_instead_of_folder(results, tmp_path):
    result, text = run_cli("compare", results["llama"] / "layers.csv", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "is a file")


def test_bad_depth_option(results, tmp_path):
    result, text = run_cli("compare", results["llama"], "--depth", "sideways", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "--depth")


def test_load_results_reads_a_sweep_only_folder(tmp_path, results):
    only = tmp_path / "sweep-only"
    only.mkdir()
    shutil.copy(results["opt-post"] / "sweep.csv", only)
    manifest = json.loads((results["opt-post"] / "manifest.json").read_text())
    del manifest["analyze"]
    (only / "manifest.json").write_text(json.dumps(manifest))
    res = load_results(only)
    assert res.analysis is None and res.sweep is not None and res.kinds == ["prune-sweep"]
    comp = layerprobe.compare([only], out=tmp_path / "r", progress=False)
    row = comp.headline.iloc[0]
    full = res.sweep[res.sweep["removed"] == "none"].iloc[0]
    assert row["perplexity"] == pytest.approx(full["perplexity"]) and row["layers"] == 4
    assert math.isnan(row["variance_growth"])
    assert [f["file"] for f in comp.figures] == ["compare_delta_loss.png"]


def test_diverged_run_and_missing_gradients(tmp_path, results):
    """A run that diverged (loss null after some step) and an analysis without gradients still compare:
    the numbers that cannot be computed are empty, the rest is there, and the page says the run diverged."""
    run = tmp_path / "diverged"
    shutil.copytree(results["run"], run)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 5, "loss": None, "lr": 1e-3, "grad_norm": None, "diverged": True,
                             "reason": "loss is nan"}) + "\n")
    record = json.loads((run / "run.json").read_text())
    record.update(status="diverged", diverged_at=5)
    (run / "run.json").write_text(json.dumps(record))
    nograd = layerprobe.analyze(layerprobe.load_model(str(results["root"] / "models" / "llama")),
                                data=str(results["root"] / "tokens.npy"), seq_len=32, samples=8, grad=False,
                                progress=False).save(tmp_path / "nograd")
    comp = layerprobe.compare([run, nograd], out=tmp_path / "r", progress=False)
    h = comp.headline.set_index("model")
    assert math.isnan(h.loc["llama", "grad_ratio"]) and math.isfinite(h.loc["llama", "variance_growth"])
    assert h.loc[comp.models[0].label, "trained_steps"] == 5
    html = comp.html.read_text(encoding="utf-8")
    assert "diverged at step 5" in html
    assert "compare_training_loss.png" in {f["file"] for f in comp.figures}


def test_relative_model_path_pairs_from_another_folder(tmp_path, results, monkeypatch):
    """analyze ran in a project folder with a relative run path; compare runs elsewhere with absolute paths:
    the analysis still joins its run, and same-named models get labels that tell them apart."""
    project = tmp_path / "project"
    shutil.copytree(results["run"], project / "runs" / "lns")
    monkeypatch.chdir(project)
    layerprobe.analyze("runs/lns", data="builtin", seq_len=32, samples=4, grad=False,
                       progress=False).save("reports/lns")
    monkeypatch.chdir(tmp_path)
    comp = layerprobe.compare([project / "runs" / "lns", project / "reports" / "lns", results["run-analysis"]],
                              out=None, progress=False)
    paired = [m for m in comp.models if m.training is not None]
    assert len(paired) == 1 and paired[0].kinds == ["analyze", "train-reference"]
    assert paired[0].folders == [project / "runs" / "lns", project / "reports" / "lns"]
    labels = sorted(m.label for m in comp.models)
    assert len(set(labels)) == 2 and all(label.startswith("lns (") for label in labels), labels
