"""The fault battery for train-reference: damaged resume state, stuck and blown-up runs, bad --tokenizer.

A damaged checkpoint gets exit code 2 and one `error:` line naming the file and the way out, before
run.json or anything else in the run folder changes.
"""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import assert_one_line_error, run_cli
from fault_helpers import assert_unchanged, snapshot

MICRO = ["--preset", "micro", "--device", "cpu", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 4-step Pre-LN run (read it, copy it; never write into it)."""
    out = tmp_path_factory.mktemp("runs") / "runs"
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "4", "--eval-every", "2",
                           "--out", out)
    assert result.exit_code == 0, text
    return out


def _half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- 3. corrupt resume state ----------------------------------------------------------------------------

@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors"])
def test_resume_from_a_truncated_checkpoint(damaged, finished_run, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(finished_run, out)
    run_dir = out / "pre"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["best_step"] is not None
    target = run_dir / "last" / damaged
    if damaged == "model.safetensors":  # the top-level copy is a hard link to last/'s: cut a copy instead
        target.unlink()
        shutil.copy2(run_dir / "best" / damaged, target)
    _half(target)
    before = snapshot(out)
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "8", "--eval-every", "2",
                           "--out", out, "--resume")
    assert result.exit_code == 2
    assert_one_line_error(result, text, str(target), "damaged", "--overwrite", str(run_dir / "best"))
    assert_unchanged(out, before)
    # the way out it names works
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "8", "--eval-every", "2",
                           "--out", out, "--overwrite")
    assert result.exit_code == 0, text
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_garbled_state_is_refused_before_run_json_changes(finished_run, tmp_path):
    """A state file of the right length but garbled inside passes the cheap check and fails on reading,
    still before the run record is touched."""
    out = tmp_path / "runs"
    shutil.copytree(finished_run, out)
    state = out / "pre" / "last" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[100:4000] = b"\x00" * 3900
    state.write_bytes(bytes(data))
    before = snapshot(out)
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "8", "--eval-every", "2",
                           "--out", out, "--resume")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "trainer_state.pt", "damaged", "--overwrite")
    assert_unchanged(out, before)


def test_demo_names_its_own_flag(finished_run, tmp_path):
    """The advice is rendered per caller: the demo says --fresh where train-reference says --overwrite."""
    from layerprobe.training import checkpoint as ckpt

    run_dir = tmp_path / "pre"
    shutil.copytree(finished_run / "pre", run_dir)
    _half(run_dir / "last" / "trainer_state.pt")
    with pytest.raises(Exception) as info:
        ckpt.check_resumable(run_dir)
    assert "--overwrite" in str(info.value)
    assert "--fresh" in str(info.value.renamed(overwrite="--fresh"))


def test_resume_keeps_the_best_step_in_run_json(finished_run, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(finished_run, out)
    best_before = json.loads((out / "pre" / "run.json").read_text())["best_step"]
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "6", "--eval-every", "2",
                           "--out", out, "--resume")
    assert result.exit_code == 0, text
    record = json.loads((out / "pre" / "run.json").read_text())
    assert record["step"] == 6 and record["best_step"] is not None and record["best_step"] >= best_before


# ---- 9. a stuck or blown-up run is not called done ------------------------------------------------------

def test_stuck_run_is_reported_diverged(tmp_path):
    from layerprobe.training.health import STUCK_MIN_STEPS

    out = tmp_path / "runs"
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", str(STUCK_MIN_STEPS), "--lr", "5",
                           "--out", out)
    assert result.exit_code == 0, text
    record = json.loads((out / "pre" / "run.json").read_text())
    assert record["status"] == "diverged"
    assert "never fell below its starting value" in record["diverged_reason"]
    lines = [line for line in text.splitlines() if line.startswith("pre: diverged")]
    assert len(lines) == 1 and "stuck" in lines[0], text
    first = [r for r in map(json.loads, (out / "pre" / "metrics.jsonl").read_text().splitlines()) if r["step"] == 1]
    assert f"first step {first[0]['loss']:.3f}" in record["diverged_reason"]


def test_infinite_layer_statistic_stops_the_run(tmp_path, monkeypatch):
    """A finite loss with an infinite per-layer output variance (a blown-up residual stream hidden by the
    final norm) is a divergence: the run stops there and keeps its last checkpoint before it."""
    import layerprobe.training.trainer as trainer

    real = trainer.evaluate
    calls = []

    def blown_up_at_second_eval(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            stats.output_variance[-1] = float("inf")
        return stats

    monkeypatch.setattr(trainer, "evaluate", blown_up_at_second_eval)
    out = tmp_path / "runs"
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "6", "--eval-every", "2",
                           "--out", out)
    assert result.exit_code == 0, text
    record = json.loads((out / "pre" / "run.json").read_text())
    assert record["status"] == "diverged" and record["diverged_at"] == 4
    assert record["diverged_reason"] == "output variance of layer 3 is inf"
    assert record["checkpoint_step"] == 2  # the blown-up state never became the checkpoint
    assert "pre: diverged at step 4 (output variance of layer 3 is inf)" in text


def test_health_definitions():
    """The two definitions against plain numbers."""
    from layerprobe.training.health import STUCK_MIN_STEPS, nonfinite_statistic, stuck_reason

    assert nonfinite_statistic({"eval_loss": 3.0, "layer_output_var": [1.0, 2.0]}) is None
    assert nonfinite_statistic({"eval_loss": 3.0, "layer_output_var": [1.0, float("nan")]}) == \
        "output variance of layer 1 is nan"
    assert nonfinite_statistic({"eval_loss": float("inf")}) == "held-out loss is inf"
    assert nonfinite_statistic({"layer_grad_norm": [float("inf")]}) == "gradient norm of layer 0 is inf"
    n = STUCK_MIN_STEPS
    assert stuck_reason(8.3, 8.3, n).startswith("stuck")  # sits where it started
    assert stuck_reason(8.3, 8.25, n).startswith("stuck")  # within noise (< 1%)
    assert stuck_reason(8.3, 7.0, n) is None  # learned
    assert stuck_reason(8.3, 9.0, n - 1) is None  # too short to say
    assert "never finite" in stuck_reason(8.3, None, n)


# ---- 7. --tokenizer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["/no/such/tokenizer", "./missing-tok", "a/b/c"])
def test_tokenizer_folder_that_does_not_exist(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "2", "--tokenizer", spec,
                           "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert_one_line_error(result, text, f"--tokenizer folder {spec} does not exist")
    assert "Repo id" not in text
    assert not (tmp_path / "runs").exists()


def test_tokenizer_with_custom_code(tiny_dir, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(tiny_dir("llama", tokenizer=True), tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]},
                  tokenizer_class="CustomTokenizer")
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "tokenization_custom.py").write_text("raise SystemExit('custom code ran')\n")
    result, text = run_cli("train-reference", *MICRO, "--norm", "pre", "--steps", "2", "--tokenizer", tok,
                           "--out", tmp_path / "runs")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "needs its own code")
    assert "custom code ran" not in text
