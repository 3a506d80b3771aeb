"""The CLI answers at once: --help and option errors import none of the heavy libraries.

Each check runs `python -m layerprobe ...` in a fresh process that, when the command is done, prints
which heavy modules it imported; no timings here (bench/bench_cli.py measures them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "matplotlib", "pandas")

# Runs the CLI as `python -m layerprobe` does, then reports sys.modules at exit (the CLI exits via SystemExit).
PROBE = """
import atexit, json, runpy, sys
heavy = {heavy!r}
atexit.register(lambda: print("HEAVY=" + json.dumps([m for m in heavy if m in sys.modules])))
sys.argv = ["layerprobe", *{args!r}]
runpy.run_module("layerprobe", run_name="__main__")
"""


def run_fresh(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "COLUMNS": "100"}
    code = PROBE.format(heavy=HEAVY, args=list(args))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    line = next(line for line in out.stdout.splitlines()[::-1] if line.startswith("HEAVY="))
    return out, json.loads(line[len("HEAVY="):])


@pytest.mark.parametrize("args", [
    ["--help"],
    ["analyze", "--help"],
    ["prune-sweep", "--help"],
    ["train-reference", "--help"],
    ["compare", "--help"],
    ["demo", "--help"],
    ["prepare-data", "--help"],
])
def test_help_imports_no_heavy_library(args):
    out, heavy = run_fresh(*args)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout
    assert heavy == [], f"`layerprobe {' '.join(args)}` imported {heavy}"


@pytest.mark.parametrize("args, needle", [
    (["compare", "some-folder", "--depth", "sideways"], "--depth"),
    (["compare", "--out", "x"], "give at least one result folder"),
    (["compare", "some-folder", "--threshold", "nan"], "--threshold"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--steps", "0"], "--steps"),
    (["compare", "some-folder", "--threshold", "many"], "Invalid value"),  # a type error, from the parser
    (["no-such-command"], "No such command"),
])
def test_option_errors_come_before_heavy_imports(args, needle, tmp_path):
    out, heavy = run_fresh(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert needle in out.stderr
    assert heavy == [], f"`layerprobe {' '.join(args)}` imported {heavy} before refusing the option"


def test_import_layerprobe_is_light():
    """`import layerprobe` alone loads none of them either; the public names load on first use."""
    code = ("import sys, layerprobe; heavy = [m for m in %r if m in sys.modules]; "
            "print(heavy, layerprobe.__version__, sorted(layerprobe.__all__))" % (HEAVY,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[] "), out.stdout
    for name in ("analyze", "load", "load_model", "compare", "prune_sweep", "save_pruned", "demo", "AnalysisResult",
                 "SweepResult", "Comparison", "LayerprobeError", "__version__"):
        assert name in out.stdout, name


def test_public_names_resolve():
    import layerprobe
    from layerprobe.comparison import Comparison
    from layerprobe.demo_pipeline import demo

    assert layerprobe.Comparison is Comparison
    assert layerprobe.demo is demo and callable(layerprobe.demo)
    assert callable(layerprobe.compare) and callable(layerprobe.analyze) and callable(layerprobe.prune_sweep)
    with pytest.raises(AttributeError):
        layerprobe.no_such_name  # noqa: B018


def test_a_dependency_below_its_floor_is_one_line_at_import():
    """An environment with an older transformers than pyproject.toml declares: `import layerprobe` says which
    package to upgrade and how, in one line (exit 2 when nothing catches it), before any forward can fail."""
    from layerprobe import _requirements

    assert _requirements.too_old(["transformers>=999.0", "rich>=1", "not-installed-anywhere>=1"]) == \
        [f"transformers>=999.0 (installed: {__import__('transformers').__version__})"]
    code = ("import layerprobe._requirements as r; r._declared = lambda: ['transformers>=999.0', 'torch>=0.1']; "
            "r.check()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: layerprobe needs transformers>=999.0 (installed: ")
    assert "pip install -U 'transformers>=999.0'" in out.stderr and "torch" not in out.stderr


def test_declared_floors_are_the_tested_oldest_versions():
    """Every `>=` floor in pyproject.toml is a version the suite ran with: pinned in constraints/oldest.txt."""
    from layerprobe import _requirements

    pins = dict(line.split("==") for line in (REPO / "constraints" / "oldest.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = _requirements.floors(declared)
    assert {"torch", "transformers", "gguf", "accelerate"} <= set(floors)
    for name, floor in floors.items():
        assert pins.get(name) == floor, (name, floor, pins.get(name))
