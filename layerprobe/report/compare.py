"""The comparison report (`layerprobe compare`): figures, then the page that embeds them.

`render_comparison` draws into a folder the comparison was saved to (`Comparison.save` writes the
tables); the pieces live in `compare_figures` (PNGs), `compare_table` (headline columns and the
terminal table) and `compare_page` (the HTML).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..comparison import Comparison
from ..io import write_text
from ..results import update_manifest
from .compare_figures import write_figures
from .compare_page import render_html
from .compare_table import headline_table


def render_comparison(comp: Comparison, out: str | Path | None = None, *, title: str | None = None) -> Path:
    """Draw every figure `comp` has data for and write the self-contained index.html to `out` (default: the
    folder `comp` was saved to); records the figures in the manifest. Returns the page's path."""
    started = time.perf_counter()
    out = Path(out) if out is not None else comp.out
    if out is None:
        raise ValueError("render_comparison needs a folder: pass out= or save the comparison first")
    comp.out = out
    comp.figures = write_figures(comp, out)
    title = title or "layerprobe — " + " vs ".join(m.label for m in comp.models)
    write_text(out / "index.html", render_html(comp, out, title))
    comp.seconds += time.perf_counter() - started
    update_manifest(out, "compare", comp.manifest_entry())
    return out / "index.html"


__all__ = ["headline_table", "render_comparison"]
