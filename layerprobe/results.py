"""Result folders: tables as CSV, one manifest.json with a section per command.

A folder can hold the results of several commands for one model (`analyze` and `prune-sweep`
write side by side, and the model's index.html shows both), so the manifest is merged, not
overwritten. Every file is written to a temporary name and renamed.

Results save and load data only. Figures and pages are drawn above them, by `layerprobe.report`
(`render_analysis`, `render_sweep`), which records the figures it wrote in the same manifest
section; the CLI commands call it after computing.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ._version import __version__
from .errors import LayerprobeError
from .io import atomic_path, ensure_writable_dir, remove_stale_temps, write_csv, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLE_SUMS = "samples.npz"  # analyze's per-sample partial sums: what the intervals and rankings resample
SWEEP_SAMPLE_SUMS = "sweep_samples.npz"  # prune-sweep's per-sample sums per row of sweep.csv (compare resamples them)


ANALYZE_SECTION = "analyze"
SWEEP_SECTION = "prune-sweep"


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "layerprobe": __version__}
    for name in ("torch", "transformers", "numpy", "pandas", "accelerate", "gguf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LayerprobeError(f"{path} is not a readable layerprobe manifest ({e}); re-run the command") from None


def check_manifest(folder: str | Path, option: str = "--out") -> None:
    """Refuse, before anything is written, a folder whose manifest.json cannot be merged into.

    Writing the tables first and failing on the manifest after would leave new tables beside an old,
    unreadable record: a mixed folder that every re-run fails on the same way.
    """
    path = Path(folder).expanduser() / MANIFEST
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LayerprobeError(f"{path} is damaged ({reason}), so new results cannot be recorded beside it; delete it "
                              f"(the folder's other results are then unlisted) or choose another {option}") from None
    if not isinstance(manifest, dict):
        raise LayerprobeError(f"{path} is not a layerprobe manifest (not a JSON object); delete it or choose "
                              f"another {option}")


def prepare_result_folder(folder: str | Path) -> Path:
    """The folder, created, with any temporaries of killed runs removed and its manifest checked: the
    first step of every save, before a file is written."""
    check_manifest(folder)
    folder = ensure_writable_dir(folder)
    remove_stale_temps(folder)
    return folder


# The exact floats that were written: pandas before 3.0 parses CSV floats with a faster, inexact default;
# 3.0 made round-trip parsing the default (and deprecates asking for it).
_EXACT_FLOATS = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def read_table(folder: str | Path, name: str, **kwargs) -> pd.DataFrame:
    """`folder/name` as a DataFrame, or one line naming the folder and the file that cannot be read."""
    path = Path(folder) / name
    try:
        return pd.read_csv(path, **_EXACT_FLOATS, **kwargs)
    except FileNotFoundError:
        raise LayerprobeError(f"{folder} lacks {name}; re-run the command that wrote it") from None
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LayerprobeError(f"{folder}: {name} cannot be read ({reason}); re-run the command that wrote it") from None


def update_manifest(folder: str | Path, section: str, data: dict) -> dict:
    """Merge `data` under `section` into the folder's manifest.json (atomically)."""
    manifest = read_manifest(folder)
    manifest["format_version"] = FORMAT_VERSION
    manifest["layerprobe_version"] = __version__
    manifest[section] = data
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def check_format(manifest: dict, folder: str | Path) -> None:
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LayerprobeError(
            f"{folder} holds results in format {version!r} from layerprobe {manifest.get('layerprobe_version', '?')}; "
            f"this layerprobe reads format {FORMAT_VERSION}: re-run the command that made them"
        )


def _read_section(folder: Path, section: str, table: str) -> tuple[dict, dict]:
    """(summary, the rest of the section) of one command's results in `folder`, checked: the section and its
    main table are there and the format version is one this version reads. The figures list is the report's."""
    manifest = read_manifest(folder)
    if section not in manifest or not (folder / table).is_file():
        raise LayerprobeError(f"{folder} holds no {section} results (no {table} / manifest.json)")
    check_format(manifest, folder)
    rest = dict(manifest[section])
    summary = rest.pop("summary", {})
    rest.pop("figures", None)
    return summary, rest


@dataclass
class AnalysisResult:
    """What `analyze` measured. Layer index is 0-based, as in the model's module list."""

    layers: pd.DataFrame  # one row per layer
    angular: pd.DataFrame  # long format: layer, n, angular_distance
    sublayers: pd.DataFrame  # layer, module, kind, params, grad_norm
    summary: dict  # loss, perplexity, norm scheme, ...
    manifest: dict = field(default_factory=dict)  # how it was made
    per_sample: dict = field(default_factory=dict)  # name -> [samples, ...] partial sums (capture.per_sample_sums)

    def angular_matrix(self):
        """The angular distances as a [layer, n] pivot table (NaN where l + n > L)."""
        return self.angular.pivot(index="layer", columns="n", values="angular_distance")

    def save(self, folder: str | Path) -> Path:
        """Write layers.csv, angular.csv, sublayers.csv and the manifest's "analyze" section.

        Data only: `layerprobe.report.render_analysis(result, folder)` adds the figures and index.html.
        """
        folder = prepare_result_folder(folder)
        write_csv(folder / "layers.csv", self.layers)
        if len(self.angular):
            write_csv(folder / "angular.csv", self.angular)
        else:  # --metrics without angular: no map (and none left from an earlier run to be read as this one's)
            (folder / "angular.csv").unlink(missing_ok=True)
        write_csv(folder / "sublayers.csv", self.sublayers)
        _write_sample_sums(folder / SAMPLE_SUMS, self.per_sample)
        update_manifest(folder, ANALYZE_SECTION, dict(self.manifest, summary=self.summary))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AnalysisResult":
        folder = Path(folder)
        summary, section = _read_section(folder, ANALYZE_SECTION, "layers.csv")
        sub = folder / "sublayers.csv"
        return cls(
            layers=read_table(folder, "layers.csv"),
            angular=(read_table(folder, "angular.csv") if (folder / "angular.csv").is_file()
                     else pd.DataFrame(columns=["layer", "n", "angular_distance"])),  # --metrics without angular
            sublayers=read_table(folder, "sublayers.csv") if sub.is_file() else pd.DataFrame(),
            summary=summary,
            manifest=section,
            per_sample=_read_sample_sums(folder),
        )


def _write_sample_sums(path: Path, arrays: dict) -> None:
    """`arrays` as an .npz (to a temporary name, then renamed); when empty, an older file there is removed
    (it would be read as this result's)."""
    if not arrays:
        path.unlink(missing_ok=True)
        return
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _read_sample_sums(folder: Path, name: str = SAMPLE_SUMS) -> dict:
    """samples.npz (or `name`) as a dict, or {} when absent or unreadable (its intervals are then not shown)."""
    path = folder / name
    if not path.is_file():
        return {}
    import numpy as np

    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return {}


@dataclass
class SweepResult:
    """What `prune_sweep` measured: one row per candidate (the full model's row says removed = none)."""

    table: pd.DataFrame
    summary: dict
    manifest: dict = field(default_factory=dict)
    # name -> [rows of `table`, samples] per-sample sums (pruning.table.row_sample_sums); {} for old results
    per_sample: dict = field(default_factory=dict)

    def rows(self, mode: str) -> pd.DataFrame:
        return self.table[self.table["mode"] == mode].reset_index(drop=True)

    def save(self, folder: str | Path) -> Path:
        """Write sweep.csv, sweep_samples.npz (the per-sample sums) and the manifest's "prune-sweep" section.

        Data only: `layerprobe.report.render_sweep(result, folder)` adds the figures and index.html.
        """
        folder = prepare_result_folder(folder)
        write_csv(folder / "sweep.csv", self.table)
        _write_sample_sums(folder / SWEEP_SAMPLE_SUMS, self.per_sample)
        update_manifest(folder, SWEEP_SECTION, dict(self.manifest, summary=self.summary))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SweepResult":
        folder = Path(folder)
        summary, section = _read_section(folder, SWEEP_SECTION, "sweep.csv")
        table = read_table(folder, "sweep.csv", dtype={"removed": str})
        return cls(table=table, summary=summary, manifest=section,
                   per_sample=_read_sample_sums(folder, SWEEP_SAMPLE_SUMS))


def save(result, folder: str | Path) -> Path:
    """Save `result`'s data (see `AnalysisResult.save`); `layerprobe.report` draws it."""
    return result.save(folder)


def load(folder: str | Path) -> AnalysisResult:
    return AnalysisResult.load(folder)
