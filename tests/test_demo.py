"""`layerprobe demo` end to end on a micro configuration, and the committed demo report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import layerprobe
from layerprobe.cli import app
from layerprobe.results import FORMAT_VERSION
from cli_helpers import assert_one_line_error

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def micro_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    args = ["demo", "--preset", "micro", "--steps", "6", "--norm", "pre,lns", "--no-block-sweep",
            "--threads", "1", "--out", str(root / "report"), "--runs", str(root / "runs"), "-q"]
    result = runner.invoke(app, args)
    return root, args, result


def test_demo_end_to_end(micro_demo):
    root, _, result = micro_demo
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "index.html" in result.output and "1 seed per scheme" in result.output
    report = root / "report"
    html = (report / "index.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 9
    assert "Each scheme was trained once (1 seed)" in html and "on 1 seed)." in html
    headline = pd.read_csv(report / "headline.csv")
    assert list(headline["model"]) == ["pre", "lns"] and list(headline["norm_scheme"]) == ["pre", "lns"]
    for col in ("perplexity", "final_eval_perplexity", "removable_layers", "variance_growth", "grad_ratio"):
        assert headline[col].map(math.isfinite).all(), col
    manifest = json.loads((report / "manifest.json").read_text())
    for model in manifest["compare"]["models"]:
        assert model["results"] == ["analyze", "prune-sweep", "train-reference"]
    assert {f["file"] for f in manifest["compare"]["figures"]} >= {
        "compare_training_loss.png", "compare_training_dynamics.png", "compare_delta_loss.png"}


def test_demo_analyses_the_held_out_blocks(micro_demo):
    """analyze runs on exactly the trainer's held-out split: its loss equals the last evaluation's."""
    root, _, _ = micro_demo
    for scheme in ("pre", "lns"):
        run = json.loads((root / "runs" / scheme / "run.json").read_text())
        analysis = json.loads((root / "report" / scheme / "manifest.json").read_text())["analyze"]
        assert analysis["summary"]["loss"] == pytest.approx(run["final_eval_loss"], rel=1e-5)
        assert analysis["data"].endswith("heldout.npy")


def test_parallel_demo_equals_the_sequential_one(micro_demo, tmp_path):
    """The default demo trains, analyses and sweeps each scheme in its own spawned process; one after another
    in this process (--workers 1) it logs the same losses and writes the same numbers."""
    root, args, _ = micro_demo
    seq = [a for a in args]
    seq[seq.index("--out") + 1], seq[seq.index("--runs") + 1] = str(tmp_path / "report"), str(tmp_path / "runs")
    result = runner.invoke(app, [*seq, "--workers", "1"])
    assert result.exit_code == 0, result.output
    timing = {"tokens_per_s"}
    for scheme in ("pre", "lns"):
        lines = [[{k: v for k, v in json.loads(x).items() if k not in timing}
                  for x in (folder / scheme / "metrics.jsonl").read_text().splitlines()]
                 for folder in (root / "runs", tmp_path / "runs")]
        assert lines[0] == lines[1] and len(lines[0]) == 6
        layers = [pd.read_csv(folder / scheme / "layers.csv") for folder in (root / "report", tmp_path / "report")]
        pd.testing.assert_frame_equal(*layers)
    heads = [pd.read_csv(folder / "headline.csv") for folder in (root / "report", tmp_path / "report")]
    pd.testing.assert_frame_equal(*heads)
    summary = json.loads((root / "runs" / "summary.json").read_text())
    assert [r["scheme"] for r in summary["runs"]] == ["pre", "lns"]  # every worker's run, not the last one's


def test_plan_workers():
    from layerprobe.demo_pipeline import plan_workers

    assert plan_workers(4, None, None, cores=2) == (4, 1)  # busy-machine fair share: one process per model
    assert plan_workers(4, None, None, cores=16) == (4, 4)  # a workstation: the cores shared out
    assert plan_workers(4, 1, None, cores=2) == (1, 2)  # one after another, every core
    assert plan_workers(2, 8, None, cores=16) == (2, 8)  # never more processes than models
    assert plan_workers(4, None, 3, cores=2) == (4, 3)  # --threads is per process


def test_demo_bad_preset_says_nothing_before_its_error(tmp_path):
    result = runner.invoke(app, ["demo", "--preset", "huge", "--out", str(tmp_path / "r"), "--runs",
                                 str(tmp_path / "runs")])
    assert_one_line_error(result, result.output, "huge")
    assert result.output.startswith("error:"), result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


def test_demo_bad_workers(tmp_path):
    result = runner.invoke(app, ["demo", "--workers", "0", "--out", str(tmp_path / "r")])
    assert_one_line_error(result, result.output, "--workers")


def test_demo_rerun_reuses_the_trained_models(micro_demo):
    root, args, _ = micro_demo
    metrics = root / "runs" / "pre" / "metrics.jsonl"
    before = metrics.read_text()
    stamp = metrics.stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert metrics.read_text() == before and metrics.stat().st_mtime_ns == stamp


def test_demo_runs_of_another_config(micro_demo):
    """Runs from another preset are not silently reused or replaced: the error names the demo's own flags."""
    root, _, _ = micro_demo
    result = runner.invoke(app, ["demo", "--preset", "tiny", "--steps", "2", "--norm", "pre,lns",
                                 "--runs", str(root / "runs"), "--out", str(root / "other")])
    assert_one_line_error(result, result.output, "different config", "--fresh", "--runs")


def test_demo_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["demo", "--preset", "micro", "--steps", "2", "--out", str(blocker / "r"),
                                 "--runs", str(tmp_path / "runs")])
    assert_one_line_error(result, result.output, "cannot write to output folder")


def test_demo_unknown_scheme(tmp_path):
    result = runner.invoke(app, ["demo", "--preset", "micro", "--steps", "2", "--norm", "pre,sideways",
                                 "--out", str(tmp_path / "r"), "--runs", str(tmp_path / "runs")])
    assert_one_line_error(result, result.output, "sideways")


def test_committed_demo_report_is_current():
    """examples/demo-report/ was made by this version of the code, from all four schemes."""
    folder = REPO / "examples" / "demo-report"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["layerprobe_version"] == layerprobe.__version__
    models = manifest["compare"]["models"]
    assert [m["norm_scheme"] for m in models] == ["pre", "post", "mix", "lns"]
    for m in models:
        assert m["results"] == ["analyze", "prune-sweep", "train-reference"]
        assert (folder / m["label"] / "layers.csv").is_file() and (folder / m["label"] / "sweep.csv").is_file()
    for f in manifest["compare"]["figures"]:
        assert (folder / f["file"]).is_file(), f["file"]
    headline = pd.read_csv(folder / "headline.csv")
    assert len(headline) == 4 and headline["perplexity"].map(math.isfinite).all()


@pytest.mark.slow
def test_a_failing_worker_ends_the_demo_with_its_error(tmp_path):
    """One scheme fails at once while another is still training: the demo stops the other worker (its run
    stays resumable) and ends with the failure's one line instead of waiting for a pool that never empties."""
    import os
    import subprocess
    import sys

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "post").write_text("a file where the post run's folder would go")
    args = [sys.executable, "-m", "layerprobe", "demo", "--preset", "micro", "--steps", "400", "--norm", "pre,post",
            "--workers", "2", "--threads", "1", "--no-block-sweep", "-q", "--out", str(tmp_path / "report"),
            "--runs", str(runs)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # The timeout only turns a hang into a failure; it is no performance bound.
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "post" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "report" / "index.html").exists()
