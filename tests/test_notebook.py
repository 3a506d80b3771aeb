"""notebooks/quickstart.ipynb and notebooks/monitor.ipynb run top to bottom (in a temporary folder), so they
cannot rot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
MONITOR_NOTEBOOK = REPO / "notebooks" / "monitor.ipynb"


@pytest.mark.parametrize("notebook", [NOTEBOOK, MONITOR_NOTEBOOK], ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(notebook):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def _execute(notebook: Path, tmp_path: Path):
    """Run as people do, `jupyter nbconvert --to notebook --execute`, on a copy in a temporary folder (the
    kernel starts in the notebook's folder, where the notebook writes its work); the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert")
    pytest.importorskip("ipykernel")
    shutil.copy(notebook, tmp_path / notebook.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                           "--ExecutePreprocessor.timeout=300", "--ExecutePreprocessor.kernel_name=python3",
                           "--output", "executed.ipynb", notebook.name],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]  # on an error nbconvert prints the cell and its traceback
    return nbformat.read(tmp_path / "executed.ipynb", as_version=4)


def test_quickstart_notebook_executes(tmp_path):
    nb = _execute(NOTEBOOK, tmp_path)

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


def test_monitor_notebook_executes(tmp_path):
    """The monitor notebook: a plain loop and a Trainer run write the rows compare reads, without noise."""
    nb = _execute(MONITOR_NOTEBOOK, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.get("name") == "stderr"]
    text = "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "[5, 10, 15, 20] recorded; [10, 20] probed" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    rows = [json.loads(line) for line in (tmp_path / "monitor" / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert [r["step"] for r in rows if "probe_loss" in r] == [20, 40]
    assert all(len(r["layer_grad_norm"]) == len(r["layer_weight_update"]) == 4 for r in rows)
    assert (tmp_path / "monitor" / "compare" / "index.html").is_file()
    assert (tmp_path / "monitor" / "compare" / "compare_training_grad_norm.png").is_file()
