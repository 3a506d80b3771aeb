"""notebooks/quickstart.ipynb runs top to bottom (in a temporary folder), so it cannot rot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_notebook_executes(tmp_path):
    """Run as people do, `jupyter nbconvert --to notebook --execute`, on a copy in a temporary folder (the
    kernel starts in the notebook's folder, where the notebook writes its work)."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert")
    pytest.importorskip("ipykernel")
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                           "--ExecutePreprocessor.timeout=300", "--ExecutePreprocessor.kernel_name=python3",
                           "--output", "executed.ipynb", NOTEBOOK.name],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]  # on an error nbconvert prints the cell and its traceback
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)

    # No noise: nothing on stderr (tqdm's "IProgress not found" warning, transformers' progress bars, ...).
    stderr = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and o.get("name") == "stderr"]
    assert not stderr, stderr
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "pre  completed" in text and "lns  completed" in text
    # The headline table (a DataFrame) and the figure were displayed.
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("removable_layers" in h and "lns" in h and "pre" in h for h in html)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    report = tmp_path / "quickstart" / "compare" / "index.html"
    assert report.is_file() and "data:image/png;base64," in report.read_text(encoding="utf-8")
    for scheme in ("pre", "lns"):
        assert (tmp_path / "quickstart" / "results" / scheme / "sweep.csv").is_file()
