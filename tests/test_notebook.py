"""notebooks/quickstart.ipynb runs top to bottom (in a temporary folder), so it cannot rot."""

from __future__ import annotations

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
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

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
