"""The fault battery for commands that write result folders (analyze, prune-sweep, compare).

Every fault gets exit code 2, exactly one `error:` line naming the problem (and the fix, where there is
one), no traceback, and leaves the output folder as it was. Hostile names are drawn literally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error, run_cli
from fault_helpers import assert_unchanged, snapshot

QUICK = ["--samples", "2", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--quiet"]
# `$...$` with an unknown command aborts matplotlib's mathtext parser; `[red]` is rich markup (a closing
# `[/]`, which aborts rich's parser, can only be in a path: it holds a separator).
HOSTILE = "m$\\nope$x[red]"
HOSTILE_PATH = "o[/]ut"


@pytest.fixture(scope="module")
def text_model(tiny_dir):
    return tiny_dir("llama", tokenizer=True)


@pytest.fixture(scope="module")
def analysed(text_model, tmp_path_factory):
    """A finished analyze + prune-sweep result folder (read it, copy it; never write into it)."""
    out = tmp_path_factory.mktemp("analysed") / "result"
    result, text = run_cli("analyze", text_model, *QUICK, "--out", out)
    assert result.exit_code == 0, text
    result, text = run_cli("prune-sweep", text_model, *QUICK, "--out", out)
    assert result.exit_code == 0, text
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- 1. names rendered as maths; a failure while drawing keeps the data ---------------------------------

def test_hostile_model_name_is_drawn_literally(text_model, tmp_path):
    model = _copy(text_model, tmp_path / HOSTILE)
    out = tmp_path / HOSTILE_PATH / HOSTILE
    result, text = run_cli("analyze", model, *QUICK, "--out", out)
    assert result.exit_code == 0, text
    assert HOSTILE in text  # the summary table's title, printed literally
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["analyze"]["model_name"] == HOSTILE
    assert {f["file"] for f in manifest["analyze"]["figures"]} <= {p.name for p in out.glob("*.png")}
    result, text = run_cli("prune-sweep", model, *QUICK, "--out", out)
    assert result.exit_code == 0, text
    # compare puts the name into titles, legends and tick labels
    assert f"wrote {out}/" in text.replace("\n", "")  # wrapped at 80 columns
    report = tmp_path / HOSTILE_PATH / "cmp"
    result, text = run_cli("compare", out, "--out", report, "--title", "a $\\b$ title", "--quiet")
    assert result.exit_code == 0, text
    assert (report / "index.html").is_file() and list(report.glob("*.png"))


def test_text_from_user_strings_is_literal():
    """The mechanism itself: a string with `$...$` in a title is drawn as text, not parsed as maths."""
    from layerprobe.report.style import new_figure

    fig, ax = new_figure()
    ax.set_title("m$\\nope$x")
    ax.set_xticks([0, 1], ["$\\nope$", "x$y$"])
    ax.legend([ax.plot([0, 1])[0]], ["a$\\frac{$b"])
    fig.canvas.draw()  # raises ParseFatalException if mathtext were on
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_render_failure_keeps_the_data(text_model, tmp_path, monkeypatch):
    import layerprobe.report.render as render

    def broken(result, folder):
        raise ValueError("a figure could not be drawn")

    monkeypatch.setattr(render, "write_analysis_figures", broken)
    out = tmp_path / "out"
    result, text = run_cli("analyze", text_model, *QUICK, "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, "drawing the figures", "a figure could not be drawn", "data is saved")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["analyze"]["summary"]["num_layers"] == 3
    for name in ("layers.csv", "angular.csv", "sublayers.csv"):
        assert (out / name).stat().st_size > 0
    from layerprobe.results import AnalysisResult

    assert len(AnalysisResult.load(out).layers) == 3


# ---- 2. --save-pruned checked before any work; the sweep kept when saving fails --------------------------

def test_save_pruned_under_a_file_fails_before_loading(text_model, tmp_path, monkeypatch):
    import layerprobe.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "out"
    result, text = run_cli("prune-sweep", text_model, *QUICK, "--remove", "1", "--save-pruned",
                           tmp_path / "afile" / "pruned", "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, "--save-pruned", "afile", "is a file", "choose another --save-pruned")
    assert not out.exists()


def test_sweep_saved_when_saving_the_model_fails(text_model, tmp_path, monkeypatch):
    import layerprobe.pruning as pruning

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pruning, "save_pruned", disk_full)
    out = tmp_path / "out"
    result, text = run_cli("prune-sweep", text_model, *QUICK, "--remove", "1", "--save-pruned",
                           tmp_path / "pruned", "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, "saving the pruned model", "No space left on device", "sweep.csv")
    from layerprobe.results import SweepResult

    sweep = SweepResult.load(out)
    assert set(sweep.table["mode"]) >= {"full", "remove"}


# ---- 4. a damaged manifest in --out: decided before writing ----------------------------------------------

@pytest.mark.parametrize("command", ["analyze", "prune-sweep"])
def test_damaged_manifest_is_refused_before_writing(command, text_model, analysed, tmp_path, monkeypatch):
    import layerprobe.loading as loading

    out = _copy(analysed, tmp_path / "out")
    text_before = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text_before[: len(text_before) // 2])
    before = snapshot(out)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result, text = run_cli(command, text_model, *QUICK, "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, "manifest.json is damaged", "delete it", "--out")
    assert_unchanged(out, before)
    # the way out it names works: without the manifest the command writes a whole result again
    monkeypatch.undo()
    (out / "manifest.json").unlink()
    result, text = run_cli(command, text_model, *QUICK, "--out", out)
    assert result.exit_code == 0, text
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 1


def test_damaged_manifest_refused_by_the_python_api(analysed, tmp_path):
    from layerprobe.errors import LayerprobeError
    from layerprobe.results import AnalysisResult

    result = AnalysisResult.load(analysed)
    out = _copy(analysed, tmp_path / "out")
    (out / "manifest.json").write_text("{\"format_version\": 1, \"anal")
    before = snapshot(out)
    with pytest.raises(LayerprobeError, match="damaged"):
        result.save(out)
    assert_unchanged(out, before)


def test_compare_refuses_a_damaged_report_folder(analysed, tmp_path):
    report = tmp_path / "report"
    result, text = run_cli("compare", analysed, "--out", report, "--quiet")
    assert result.exit_code == 0, text
    (report / "manifest.json").write_text("{")
    before = snapshot(report)
    result, text = run_cli("compare", analysed, "--out", report, "--quiet")
    assert_one_line_error(result, text, "manifest.json is damaged", "--out")
    assert result.exit_code == 2
    assert_unchanged(report, before)


# ---- 5. inputs compare cannot read ------------------------------------------------------------------------

@pytest.mark.parametrize("name,content", [("layers.csv", ""), ("angular.csv", ""), ("sweep.csv", ""),
                                          ("layers.csv", "\x00\x01garbage\n\"unclosed")])
def test_compare_on_an_unreadable_table(name, content, analysed, tmp_path):
    folder = _copy(analysed, tmp_path / "result")
    (folder / name).write_text(content)
    report = tmp_path / "report"
    result, text = run_cli("compare", folder, "--out", report, "--quiet")
    assert result.exit_code == 2
    assert_one_line_error(result, text, str(folder), name)
    assert not report.exists()


def test_compare_on_a_damaged_result_manifest(analysed, tmp_path):
    folder = _copy(analysed, tmp_path / "result")
    (folder / "manifest.json").write_text("{\"format")
    report = tmp_path / "report"
    result, text = run_cli("compare", folder, "--out", report, "--quiet")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "manifest.json", "not a readable")
    assert not report.exists()


# ---- 6. temporaries left by a killed run are removed by the next successful one ---------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed(text_model, analysed, tmp_path):
    out = _copy(analysed, tmp_path / "out")
    dead = _dead_pid()
    stale = [out / f".angular_heatmap.png.tmp-{dead}", out / f".sweep.csv.tmp-{dead}",
             out / f".manifest.json.tmp-{dead}"]
    for f in stale:
        f.write_bytes(b"half a file")
    (out / f".index.html.tmp-{dead}").mkdir()
    from layerprobe.io import _HOST

    stale += [out / f".headline.csv.tmp-{dead}-{_HOST}"]  # the tagged name this version writes
    stale[-1].write_bytes(b"half a file")
    alive = out / f".layers.csv.tmp-{os.getppid()}"  # a live process (our parent) may still be writing it
    alive.write_bytes(b"being written")
    other_host = "0" * 8 if _HOST != "0" * 8 else "1" * 8  # the PID of another machine sharing the folder
    elsewhere = out / f".summary.json.tmp-{dead}-{other_host}"
    elsewhere.write_bytes(b"being written over NFS")
    foreign = [out / "notes.tmp-1", out / f"layers.csv.tmp-{dead}", out / ".hidden"]  # not our pattern
    for f in foreign:
        f.write_bytes(b"mine")
    result, text = run_cli("analyze", text_model, *QUICK, "--out", out)
    assert result.exit_code == 0, text
    assert not any(f.exists() for f in stale) and not (out / f".index.html.tmp-{dead}").exists()
    assert alive.read_bytes() == b"being written" and elsewhere.read_bytes() == b"being written over NFS"
    assert all(f.read_bytes() == b"mine" for f in foreign)
    (out / f".sweep_loss.png.tmp-{dead}").write_bytes(b"half")
    result, text = run_cli("prune-sweep", text_model, *QUICK, "--out", out)
    assert result.exit_code == 0, text
    assert not (out / f".sweep_loss.png.tmp-{dead}").exists()


# ---- 8. every option checked before loading anything or creating any folder -------------------------------

@pytest.mark.parametrize("command", ["analyze", "prune-sweep"])
@pytest.mark.parametrize("option,value,needle", [
    ("--samples", "0", "--samples must be at least 1"),
    ("--seq-len", "1", "--seq-len must be at least 2"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--dtype", "float8", "unknown --dtype"),
    ("--device", "tpu", "unknown --device"),
    ("--device-map", "spread", "unknown --device-map"),
    ("--data", "no/such/file.txt", "no such data file"),
    ("--data", "pyproject.toml", "unsupported data file"),
    ("--data", "hf:", "names no dataset"),
])
def test_bad_options_fail_before_loading(command, option, value, needle, tmp_path, monkeypatch):
    """The smollm2 spec would take ~20 s to load: the loader must not even be called, and no --out made."""
    import layerprobe.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "new" / "out"
    args = _without(QUICK, option)
    result, text = run_cli(command, "smollm2", *args, option, value, "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, needle)
    assert not (tmp_path / "new").exists()


def _without(args: list[str], option: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == option:
            skip = a != "--quiet"
            continue
        out.append(a)
    return out


def test_tokens_option_fails_before_loading(tmp_path, monkeypatch):
    import layerprobe.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result, text = run_cli("analyze", "smollm2", *QUICK, "--tokens", "first", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "--tokens must be 'last' or 'all'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["analyze", "prune-sweep"])
def test_out_under_a_file_fails_before_loading(command, tmp_path, monkeypatch):
    import layerprobe.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "afile").write_text("x")
    result, text = run_cli(command, "smollm2", *QUICK, "--out", tmp_path / "afile" / "out")
    assert result.exit_code == 2
    assert_one_line_error(result, text, "afile is a file", "choose another --out")


def test_hostile_name_in_an_error_line(tmp_path):
    result, text = run_cli("analyze", tmp_path / HOSTILE_PATH, *QUICK, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert_one_line_error(result, text, f"no such file or folder: {tmp_path / HOSTILE_PATH}")


def test_failed_load_leaves_no_empty_out(tmp_path):
    """A model that does not load (here: no such path) leaves no --out folder behind."""
    out = tmp_path / "out"
    result, text = run_cli("analyze", tmp_path / "no-model", *QUICK, "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, "no such file or folder")
    assert not out.exists()


def test_python_api_checks_before_loading(monkeypatch):
    import layerprobe.opening as opening
    from layerprobe import analyze, prune_sweep
    from layerprobe.errors import LayerprobeError

    monkeypatch.setattr(opening, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(LayerprobeError, match="--samples must be at least 1"):
        analyze("smollm2", samples=0)
    with pytest.raises(LayerprobeError, match="--seq-len must be at least 2"):
        prune_sweep("smollm2", seq_len=1)


@pytest.mark.parametrize("content,needle", [("[1, 2]", "not a layerprobe manifest"), ("\xff\xfe", "damaged")])
def test_foreign_or_undecodable_manifest_is_refused(content, needle, tmp_path, monkeypatch):
    import layerprobe.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(content.encode("latin-1"))
    before = snapshot(out)
    result, text = run_cli("analyze", "smollm2", *QUICK, "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, needle, "choose another --out")
    assert_unchanged(out, before)
