"""The package's layering, checked by import-linter against the contract in pyproject.toml:
cli > convenience calls (demo, api) > report > computation > model plumbing > metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_layers_contract_holds():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extras")
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout, out.stdout[-4000:]
