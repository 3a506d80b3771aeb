"""bench/bench_gpu.py (issues 13, 22): its CPU dry run completes with every correctness check passing; the budget
orders, skips and stops checks; every row is on disk as soon as it is measured; the first line refuses versions
layerprobe's requirements exclude; its comparisons flag a result that is off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import layerprobe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_gpu.py"
sys.path.insert(0, str(REPO / "bench"))

import bench_gpu  # noqa: E402

SECTIONS = ("correctness", "memory", "speed", "scale")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_script(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(text: str) -> list[list[str]]:
    """[section, check, result, target, status] for each row of the Markdown table, in order."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] in SECTIONS:
            rows.append(cells)
    return rows


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_dry_run_records_every_path_and_the_correctness_checks_pass(tmp_path):
    out = tmp_path / "gpu.md"
    proc = run_script("--dry-run", "--out", out)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("versions: python ")  # the first line: versions, requirements met
    text = out.read_text()
    assert text in proc.stdout  # the same table, on stdout and in the file
    assert f"torch {torch.__version__}" in text and f"CUDA {torch.version.cuda or 'none'}" in text and "Finished in" in text
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["finished"] is True
    assert [c["name"] for c in side["checks"]] == list(bench_gpu.ESTIMATES)
    assert all(c["outcome"] == "done" for c in side["checks"]), side["checks"]
    rows = table_rows(text)
    assert [[r[k] for k in ("section", "check", "result", "target", "status")] for r in side["rows"]] == rows

    def row(*needles):
        found = [r for r in rows if all(n in r[1] for n in needles)]
        assert len(found) == 1, (needles, [r[1] for r in rows])
        return found[0]

    for needles in (("analyze fp32",), ("analyze bf16",), ("prune-sweep", "cached vs naive"), ("killed", "resumed")):
        section, _, result, _, status = row(*needles)
        assert section == "correctness" and status == "pass", (needles, result)
    assert "bit-identical" in row("killed", "resumed")[2]
    for name in ("angular distance", "Block Influence", "output variance", "loss", "gradient norms"):
        assert name in row("analyze bf16")[2]
    # The per-layer statistics of a bf16 pass as one compiled kernel (Inductor's C++ backend here) equal the
    # float32 copies', and the time of each over a bare forward is recorded.
    section, _, result, _, status = row("fused statistics kernel vs float32 copies")
    assert section == "correctness" and status == "pass", result
    for name in ("block_influence", "update_cosine", "max_activation", "sublayer relative_update"):
        assert name in result
    section, _, result, _, status = row("fused statistics kernel:", "with float32 copies")
    assert section == "speed" and status.startswith("measured") and " fused vs " in result, result
    memory = [r for r in rows if r[0] == "memory"]
    assert len(memory) == 4 and all(r[4].startswith("skipped: no GPU") for r in memory)  # 2 modes x batch 1, 4
    for needles in (("analyze / bare forward+backward", "tiny slice"), ("analyze --no-grad / bare forward", "tiny slice"),
                    ("analyze / bare forward+backward", "cpu, tiny, "), ("prune-sweep cached / naive",),
                    ("prune-sweep scoring share",), ("train-reference micro", "eager"), ("twin of micro",)):
        section, _, result, _, status = row(*needles)
        assert section == "speed" and status.startswith("measured") and any(ch.isdigit() for ch in result), needles
    assert row("train-reference micro", "--compile")[4] == "skipped: no GPU (--compile is timed on CUDA only)"
    for needles in (("torchrun", "DDP", "gloo"), ("torchrun", "--fsdp", "gloo")):
        assert row(*needles)[4] == "pass", needles
    # Offloading to disk on the CPU: the same numbers as on one device, with modules really offloaded, and
    # gradients of offloaded layers refused.
    offload = [r for r in rows if "offloaded to disk" in r[1]]
    assert len(offload) == 4 and all(r[4] == "pass" for r in offload), offload
    assert all("modules offloaded" in r[2] and not r[2].endswith("; 0 modules offloaded") for r in offload[:3])
    assert offload[3][2].startswith("refused: ")
    assert not [r for r in rows if r[4] == "FAIL"]
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_budget_that_fits_nothing_skips_every_check_in_order_with_its_reason(tmp_path):
    out = tmp_path / "gpu.md"
    proc = run_script("--dry-run", "--budget-s", 0.5, "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("versions: ")
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["finished"] is True and side["budget_s"] == 0.5
    assert [c["name"] for c in side["checks"]] == list(bench_gpu.ESTIMATES)
    rows = table_rows(out.read_text())
    assert len(rows) == len(bench_gpu.ESTIMATES)
    for r, name in zip(rows, bench_gpu.ESTIMATES):
        est = bench_gpu.ESTIMATES[name][1]
        assert r[4].startswith(f"skipped: needs ~{est:.0f} s, 0 s of the budget left"), (name, r)


@pytest.mark.slow
def test_a_killed_run_leaves_every_row_measured_before_the_kill(tmp_path):
    out = tmp_path / "gpu.md"
    side = out.with_suffix(".json")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--only", "analyze-correctness,analyze-speed-small",
                             "--out", str(out)], env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if side.exists() and len(json.loads(side.read_text())["rows"]) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    data = json.loads(side.read_text())  # whole files: the renames are atomic
    assert data["finished"] is False
    rows = table_rows(out.read_text())
    assert [r[1] for r in rows] == [r["check"] for r in data["rows"]]
    assert [r[1] for r in rows[:2]] == ["analyze fp32 on cpu (TF32 off) vs CPU fp32", "analyze bf16 on cpu vs CPU fp32"]
    assert all(r[4] == "pass" for r in rows[:2])
    assert "Still running" in out.read_text()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporaries beside them either


# ---- the budget, with fake checks ---------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _check(name, estimate, work=None):
    return bench_gpu.Check(name, "speed", f"label {name}", estimate, work or (lambda: None))


def test_checks_are_planned_in_the_order_of_their_value(tmp_path):
    ctx = bench_gpu.Ctx(tmp_path, torch.device("cpu"), bench_gpu.DRY, True, None, "no GPU")
    assert [c.name for c in bench_gpu.plan(ctx)] == [
        "analyze-correctness", "memory", "analyze-fused", "analyze-speed", "train-eager", "train-compiled", "prune", "torchrun",
        "offload", "resume", "train-twin", "analyze-speed-small"]
    assert [c.estimate_s for c in bench_gpu.plan(ctx)] == [v[1] for v in bench_gpu.ESTIMATES.values()]
    full = bench_gpu.Ctx(tmp_path, torch.device("cpu"), bench_gpu.FULL, False, None, "no GPU")
    assert [c.estimate_s for c in bench_gpu.plan(full)] == [v[0] for v in bench_gpu.ESTIMATES.values()]
    # The checks a GPU session needs first fit the 420 s of its command by their estimates.
    assert sum(v[0] for v in list(bench_gpu.ESTIMATES.values())[:8]) <= 400  # and ~10 s of imports
    picked = bench_gpu.selected(bench_gpu.plan(ctx), "scale,prune")
    assert [c.name for c in picked] == ["prune", "torchrun", "offload"]


def test_the_budget_skips_what_would_not_fit_and_runs_cheaper_checks_after_it(tmp_path):
    clock = FakeClock()
    ran = []

    def work(name, seconds):
        def run():
            ran.append(name)
            clock.now += seconds
            bench_gpu.TABLE.record("speed", name, f"{seconds} s")
        return run

    table = bench_gpu.Table(out=tmp_path / "t.md")
    checks = [_check("a", 30, work("a", 30)),   # fits (100 left), runs exactly its estimate: scale 1
              _check("b", 80, work("b", 80)),   # 70 left: skipped
              _check("c", 20, work("c", 25)),   # fits; takes 1.25x its estimate: scale median(1, 1.25) = 1.125
              _check("d", 44, work("d", 1)),    # 45 left, 44 x 1.125 = 49.5: skipped
              _check("e", 10, work("e", 10))]   # 10 x 1.125 = 11.25 fits: runs
    old = bench_gpu.TABLE
    bench_gpu.TABLE = table
    try:
        bench_gpu.run_checks(checks, table, 100, clock=clock, start=clock.now)
    finally:
        bench_gpu.TABLE = old
    assert ran == ["a", "c", "e"]
    status = {r.check: r.status for r in table.rows}
    assert status["label b"] == "skipped: needs ~80 s, 70 s of the budget left"
    assert status["label d"] == "skipped: needs ~50 s, 45 s of the budget left"
    assert [r.check for r in table.rows] == ["a", "label b", "c", "label d", "e"]
    assert [c["outcome"] for c in table.checks] == ["done", "skipped: needs ~80 s, 70 s of the budget left", "done",
                                                    "skipped: needs ~50 s, 45 s of the budget left", "done"]
    assert [c["estimate_s"] for c in table.checks] == [30, 80, 20, 49.5, 11.2]


def test_a_check_that_raises_is_a_fail_row_the_next_check_runs_and_earlier_rows_were_already_on_disk(tmp_path):
    out = tmp_path / "t.md"
    table = bench_gpu.Table(out=out, header=["header line"])
    seen = {}

    def first():
        table.record("correctness", "first", "1.0e-05", "≤ 1e-4", "pass")

    def broken():
        seen["md"] = table_rows(out.read_text())  # what a kill at this moment would leave
        seen["json"] = json.loads(out.with_suffix(".json").read_text())
        raise ValueError("bf16 and float32 do not match\nsecond line")

    def third():
        table.record("scale", "third", "done")

    bench_gpu.run_checks([_check("first", 1, first), _check("broken", 1, broken), _check("third", 1, third)],
                         table, None)
    assert seen["md"] == [["correctness", "first", "1.0e-05", "≤ 1e-4", "pass"]]
    assert seen["json"]["finished"] is False and [r["check"] for r in seen["json"]["rows"]] == ["first"]
    assert [(r.check, r.status) for r in table.rows] == [("first", "pass"), ("label broken", "FAIL"), ("third", "measured")]
    assert table.rows[1].result == "raised ValueError: bf16 and float32 do not match"
    assert [c["outcome"] for c in table.checks] == ["done", "error", "done"]
    table.finish()
    assert json.loads(out.with_suffix(".json").read_text())["finished"] is True
    assert "Finished in" in out.read_text() and "1 pass, 1 FAIL, 1 measured, 0 skipped" in out.read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="the budget's stop uses SIGALRM")
def test_a_check_still_running_at_the_budget_is_stopped_with_its_subprocess_and_the_rest_skipped(tmp_path):
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    table = bench_gpu.Table(out=tmp_path / "t.md")
    start = time.monotonic()
    checks = [_check("sleeps", 0.1, lambda: time.sleep(0.1)),
              _check("hangs", 0.1, lambda: bench_gpu.run_sub([sys.executable, "-c", child])),
              _check("after", 0.1, lambda: table.record("speed", "after", "ran"))]
    bench_gpu.run_checks(checks, table, 3.0, start=start)
    assert time.monotonic() - start < 20
    assert [r.status for r in table.rows] == ["skipped: stopped at the budget", "skipped: stopped at the budget earlier"]
    assert table.rows[0].check == "label hangs" and table.rows[0].result.startswith("stopped after")
    assert not _alive(int(pid_file.read_text()))  # its process group was killed, nothing left holding a GPU
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# ---- the first line ---------------------------------------------------------------------------------------

def test_requirement_problems_name_what_is_missing_or_too_old(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\nrequires-python = ">=3.10"\n'
                         'dependencies = ["torch>=2.2", "transformers>=5.20", "typer", "absent>=1", "numpy"]\n')
    have = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "typer": "0.12.0", "numpy": "2.0"}

    def version_of(name):
        if name not in have:
            raise __import__("importlib.metadata").metadata.PackageNotFoundError(name)
        return have[name]

    problems = bench_gpu.requirement_problems(pyproject, version_of, python_version="3.12.3")
    assert problems == [("transformers", "transformers>=5.20 (this machine has 5.17.0)"),
                        ("absent", "absent (not installed)")]
    assert bench_gpu.requirement_problems(pyproject, version_of, python_version="3.9.1")[0] == \
        ("python", "python>=3.10 (this machine has 3.9.1)")
    # The repository's own declared requirements that the checks use, as this machine has them: met.
    assert [p for p in bench_gpu.requirement_problems() if p[0] in bench_gpu.CHECKS_NEED] == []


def test_the_first_line_names_a_missing_package_no_check_uses_and_goes_on(monkeypatch):
    monkeypatch.setattr(bench_gpu, "requirement_problems", lambda: [("pyarrow", "pyarrow (not installed)")])
    ok, line = bench_gpu.first_line()
    assert ok and line.startswith("versions: python ")
    assert line.endswith("are met for these checks; also declared: pyarrow (not installed) (no check uses it)")


@pytest.mark.parametrize("what", ["too old", "does not import"])
def test_the_first_line_refuses_what_layerprobe_needs_and_nothing_runs(tmp_path, monkeypatch, capsys, what):
    if what == "too old":
        monkeypatch.setattr(bench_gpu, "requirement_problems",
                            lambda: [("transformers", "transformers>=9.0 (this machine has 5.17.0)"),
                                     ("pyarrow", "pyarrow (not installed)")])
        needle = "error: layerprobe needs transformers>=9.0 (this machine has 5.17.0); nothing was run"
    else:
        def load_stack():
            raise ImportError("cannot import name 'NewThing' from 'transformers'")
        monkeypatch.setattr(bench_gpu, "load_stack", load_stack)
        monkeypatch.setitem(sys.modules, "layerprobe.io", None)  # nothing of layerprobe imports: --out still written
        needle = "error: layerprobe does not import here (ImportError: cannot import name 'NewThing' from 'transformers')"
    monkeypatch.setattr(bench_gpu, "plan", lambda ctx: pytest.fail("a check was planned"))
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(["--out", str(out)]) == 2
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(needle)
    assert out.read_text().splitlines()[0] == first  # $OUT says it too
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == []


# ---- the memory check's predictor -------------------------------------------------------------------------

def test_the_memory_rows_call_the_predictor_with_the_agreed_signature(tmp_path, monkeypatch):
    (tmp_path / "fake_predictor.py").write_text(
        "CALLS = []\n"
        "def predict_peak_bytes(config, *, batch, seq_len, mode, dtype):\n"
        "    CALLS.append((config.vocab_size, config.num_hidden_layers, batch, seq_len, mode, dtype))\n"
        "    return int(1.5 * 2**30) * batch\n")
    (tmp_path / "broken_predictor.py").write_text("raise ImportError('needs FakeTensorMode from a newer torch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench_gpu, "PREDICTORS", (("no_such_module", "predict_peak_bytes"),))
    assert bench_gpu.find_predictor() == (None, "predictor not available")
    monkeypatch.setattr(bench_gpu, "PREDICTORS", (("broken_predictor", "predict_peak_bytes"),))
    assert bench_gpu.find_predictor()[1].startswith("predictor broken_predictor does not import (ImportError: needs")
    monkeypatch.setattr(bench_gpu, "PREDICTORS", (("no_such_module", "x"), ("fake_predictor", "predict_peak_bytes")))
    fn, source = bench_gpu.find_predictor()
    assert source == "fake_predictor.predict_peak_bytes"

    table = bench_gpu.Table(out=None)
    monkeypatch.setattr(bench_gpu, "TABLE", table)
    ctx = bench_gpu.Ctx(tmp_path, torch.device("cpu"), bench_gpu.DRY, True, None, "no GPU")
    bench_gpu.check_memory(ctx)
    import fake_predictor

    L, V, T = bench_gpu.TINY_SLICE["num_hidden_layers"], bench_gpu.TINY_SLICE["vocab_size"], bench_gpu.DRY.big_seq_len
    assert fake_predictor.CALLS == [(V, L, b, T, mode, "float32") for mode in ("analyze", "prune-layer") for b in (1, 4)]
    assert [r.result for r in table.rows] == [f"predicted {1.5 * b:.2f} GiB (fake_predictor.predict_peak_bytes)"
                                              for _ in range(2) for b in (1, 4)]
    assert all(r.section == "memory" and r.status == "skipped: no GPU" for r in table.rows)


def test_the_memory_rows_hold_prediction_against_measurement_within_15_percent(tmp_path, monkeypatch):
    """The measured path, with the allocator's figures replaced (no GPU here) and the real analyze and prune-sweep
    run on the tiny slice."""
    (tmp_path / "fake_predictor2.py").write_text(
        "def predict_peak_bytes(config, *, batch, seq_len, mode, dtype):\n"
        "    return 1000 * batch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bench_gpu.load_stack()
    off = iter([0.0, 0.2, -0.1, -0.16])  # predicted / measured - 1, per row in order
    calls = []

    def fake_measure(fn, device):
        out = fn()
        calls.append(type(out).__name__)
        batch = (1, 4)[(len(calls) - 1) % 2]
        return {"peak": 1000 * batch / (1 + next(off)), "before": 100.0, "reserved": 2000.0, "seconds": 0.5, "out": out}

    for predictors, statuses in (((("fake_predictor2", "predict_peak_bytes"),), ["pass", "FAIL", "pass", "FAIL"]),
                                 ((), ["skipped: predictor not available"] * 4)):
        monkeypatch.setattr(bench_gpu, "PREDICTORS", predictors)
        table = bench_gpu.Table(out=None)
        monkeypatch.setattr(bench_gpu, "TABLE", table)
        off = iter([0.0, 0.2, -0.1, -0.16])
        calls.clear()
        ctx = bench_gpu.Ctx(tmp_path, torch.device("cpu"), bench_gpu.DRY, True, None, "no GPU")
        bench_gpu.check_memory(ctx, measure=fake_measure)
        assert calls == ["AnalysisResult", "AnalysisResult", "dict", "dict"]
        memory = [r for r in table.rows if r.section == "memory"]
        assert [r.status for r in memory] == statuses
        assert all(r.result.startswith("measured ") for r in memory)
        if predictors:
            assert memory[1].result.endswith(": +20.0%") and memory[3].result.endswith(": -16.0%")
        share = [r for r in table.rows if r.section == "speed"]
        assert len(share) == 1 and "scoring share" in share[0].check and "B=4" in share[0].check
        assert "% of the sweep's time in scoring" in share[0].result


def test_scoring_share_times_score_and_still_sweeps_where_score_has_moved(tmp_path, monkeypatch):
    bench_gpu.load_stack()
    from transformers import AutoModelForCausalLM

    import layerprobe.pruning.measurement as meas

    model = AutoModelForCausalLM.from_pretrained(bench_gpu.build_model(tmp_path / "m", bench_gpu.TINY_MODEL)).eval()
    npy = bench_gpu.write_tokens(tmp_path / "t.npy", 4, 16, bench_gpu.TINY_MODEL["vocab_size"])
    calls = []
    real = meas.score
    monkeypatch.setattr(meas, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    patched = meas.score
    r = bench_gpu.scoring_share(model, npy, 4, 2, torch.device("cpu"))
    assert calls and 0 < r["score_s"] <= r["sweep_s"] + 1e-3 and meas.score is patched  # its timer was taken off again
    monkeypatch.setattr(bench_gpu, "SCORE_FN", ("layerprobe.pruning.measurement", "score_renamed"))
    r = bench_gpu.scoring_share(model, npy, 4, 2, torch.device("cpu"))
    assert r["score_s"] is None and len(r["result"].table) == bench_gpu.TINY_MODEL["num_hidden_layers"] + 1
    table = bench_gpu.Table(out=None)
    monkeypatch.setattr(bench_gpu, "TABLE", table)
    bench_gpu._record_share("share", r)
    assert table.rows[0].status.startswith("skipped: layerprobe.pruning.measurement.score_renamed not found")


# ---- comparisons and formulas -----------------------------------------------------------------------------

def _tiny_analysis(tmp_path):
    folder = bench_gpu.build_model(tmp_path / "m", bench_gpu.TINY_MODEL)
    npy = bench_gpu.write_tokens(tmp_path / "t.npy", 2, 16, bench_gpu.TINY_MODEL["vocab_size"])
    return layerprobe.analyze(str(folder), data=str(npy), batch_size=2, dtype="float32", device="cpu", progress=False)


def test_the_comparison_passes_a_copy_and_flags_a_perturbed_result(tmp_path):
    ref = _tiny_analysis(tmp_path)
    ok, errors = bench_gpu.compare_analyses(ref, ref, 1e-4)
    assert ok and set(errors) == {"angular distance", "Block Influence", "output variance", "loss", "gradient norms"}
    assert all(e == 0 for e in errors.values())

    for column, factor in (("block_influence", 1.05), ("output_variance", 1.001), ("grad_norm", 0.9)):
        bad = _tiny_analysis(tmp_path / column)
        bad.layers.loc[1, column] *= factor
        ok, errors = bench_gpu.compare_analyses(bad, ref, 1e-4)
        assert not ok, column
        # The error is the change over the quantity's own scale, computed here independently.
        col = ref.layers[column].to_numpy()
        expected = abs(col[1] * (factor - 1)) / np.abs(col).max()
        name = {"block_influence": "Block Influence", "output_variance": "output variance"}.get(column, "gradient norms")
        assert errors[name] == pytest.approx(expected, rel=1e-6)

    bad = _tiny_analysis(tmp_path / "loss")
    bad.summary["loss"] += 0.01
    assert not bench_gpu.compare_analyses(bad, ref, 1e-4)[0]
    bad = _tiny_analysis(tmp_path / "nan")
    bad.layers.loc[2, "grad_norm"] = float("nan")  # an offloaded layer's gradient that never landed
    ok, errors = bench_gpu.compare_analyses(bad, ref, 1e-4)
    assert not ok and errors["gradient norms"] == float("inf")


def test_sweep_comparison_reads_loss_kl_and_top1():
    ref = SimpleNamespace(table=pd.DataFrame({"loss": [2.0, 2.5, 3.0], "kl": [0.0, 0.1, 0.4],
                                              "top1_agreement": [1.0, 0.9, 0.5]}))
    assert bench_gpu.compare_sweeps(ref, ref, 1e-5) == (True, {"loss": 0.0, "kl": 0.0, "top1_agreement": 0.0})
    bad = SimpleNamespace(table=ref.table.copy())
    bad.table.loc[1, "kl"] = 0.1 + 4e-5
    ok, errors = bench_gpu.compare_sweeps(bad, ref, 1e-5)
    assert not ok and errors["kl"] == pytest.approx(4e-5 / 0.4)


def test_the_offload_map_sends_the_last_quarter_the_norm_and_the_head_away():
    for layers in (4, 8, 30):
        m = bench_gpu.offload_map(layers, 0, "cpu")
        away = [i for i in range(layers) if m[f"model.layers.{i}"] == "cpu"]
        assert away == list(range(layers - max(1, layers // 4), layers))
        assert m["model.norm"] == m["lm_head"] == "cpu" and m["model.embed_tokens"] == 0
        assert len(m) == layers + 4


def test_scaled_error_and_series():
    assert bench_gpu.scaled_error([1.0, 2.0], [1.0, 2.0]) == 0
    assert bench_gpu.scaled_error([1.0, 2.1], [1.0, 2.0]) == pytest.approx(0.05)
    assert bench_gpu.scaled_error([np.nan, 1.0], [np.nan, 1.0]) == 0  # NaN on both sides: not measured
    assert bench_gpu.scaled_error([np.nan, 1.0], [0.5, 1.0]) == float("inf")
    assert bench_gpu.scaled_error([1.0], [1.0, 2.0]) == float("inf")
    assert bench_gpu.compare_series([(1.0, 2.0)], [(1.0, 2.0)], 0) == (True, 0.0)
    assert not bench_gpu.compare_series([(1.0, 2.0 + 1e-12)], [(1.0, 2.0)], 0)[0]  # bit-identical means exact
    assert not bench_gpu.compare_series([(1.0, 2.0)], [(1.0, 2.0), (3.0, 4.0)], 1e-5)[0]


def test_mfu_flops_and_peak_table():
    # 6·N plus attention 12·L·d·T, e.g. the 130m preset's shape at T = 256.
    assert bench_gpu.train_flops_per_token(100, 12, 768, 256) == 600 + 12 * 12 * 768 * 256
    names = [k for k, _ in bench_gpu.PEAK_BF16_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")  # the first match wins
    assert dict(bench_gpu.PEAK_BF16_TFLOPS)["H100"] == dict(bench_gpu.PEAK_BF16_TFLOPS)["H200"] == 989.0
    assert bench_gpu.peak_tflops(torch.device("cpu"), 123.0) == (123.0, "--peak-tflops")


def test_matmul_params_leave_out_the_input_embedding_only(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    n, _ = bench_gpu._matmul_params(tmp_path)
    total = 0
    for name, p in model.named_parameters():  # a plain loop: everything but the embedding lookup
        if name != "model.embed_tokens.weight":
            total += p.numel()
    assert n == total == sum(p.numel() for p in model.parameters()) - 64 * 16


@pytest.mark.parametrize("args, needle", [(["--device", "tpu"], "--device"), (["--only", "speed,colour"], "--only"),
                                          (["--budget-s", "0"], "--budget-s"),
                                          (["--out", "/no/such/folder/x.md"], "does not exist")])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    proc = run_script(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
