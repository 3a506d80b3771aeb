"""Render saved results: figures, the manifest's record of them, and the model's index.html.

This is the layer above computation: `analyze` and `prune_sweep` return data, `.save` writes it,
and these functions draw it. The CLI commands and `demo` call them after computing.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..errors import LayerprobeError
from ..results import ANALYZE_SECTION, SWEEP_SECTION, AnalysisResult, SweepResult, read_manifest, update_manifest
from .analysis import write_analysis_figures
from .html import write_model_index
from .pruning import write_sweep_figures


@contextmanager
def drawing(folder: Path, data: str):
    """Draw after the data is saved: a failure while drawing becomes one line that says the data is kept."""
    try:
        yield
    except (LayerprobeError, MemoryError):
        raise
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LayerprobeError(f"drawing the figures in {folder} failed ({type(e).__name__}: {reason}); the data is "
                              f"saved there ({data}, manifest.json)") from e


def _record_figures(folder: Path, section: str, figures: list[dict]) -> None:
    """Add the figures' {file, caption} list to the command's manifest section (after its data)."""
    update_manifest(folder, section, dict(read_manifest(folder)[section], figures=figures))


def render_analysis(result: AnalysisResult, folder: str | Path) -> Path:
    """Everything `layerprobe analyze` writes: the data (`result.save`), the PNGs and index.html.

    Returns the folder. The figures are listed under "figures" in the manifest's "analyze" section.
    """
    folder = result.save(folder)
    with drawing(folder, "layers.csv, angular.csv, sublayers.csv"):
        _record_figures(folder, ANALYZE_SECTION, write_analysis_figures(result, folder))
        write_model_index(folder)
    return folder


def render_sweep(result: SweepResult, folder: str | Path) -> Path:
    """Everything `layerprobe prune-sweep` writes: the data (`result.save`), the PNGs and index.html.

    Returns the folder. The figures are listed under "figures" in the manifest's "prune-sweep" section.
    """
    folder = result.save(folder)
    with drawing(folder, "sweep.csv"):
        _record_figures(folder, SWEEP_SECTION, write_sweep_figures(result, folder))
        write_model_index(folder)
    return folder
