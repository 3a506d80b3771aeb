"""Result folders: tables as CSV, one manifest.json with a section per command.

A folder can hold the results of several commands for one model (`analyze` and `prune-sweep`
write side by side, and the model's index.html shows both), so the manifest is merged, not
overwritten. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import __version__
from .errors import LayerprobeError
from .io import ensure_writable_dir, write_csv, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

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


@dataclass
class AnalysisResult:
    """What `analyze` measured. Layer index is 0-based, as in the model's module list."""

    layers: pd.DataFrame  # one row per layer
    angular: pd.DataFrame  # long format: layer, n, angular_distance
    sublayers: pd.DataFrame  # layer, module, kind, params, grad_norm
    summary: dict  # loss, perplexity, norm scheme, ...
    manifest: dict = field(default_factory=dict)  # how it was made

    def angular_matrix(self):
        """The angular distances as a [layer, n] pivot table (NaN where l + n > L)."""
        return self.angular.pivot(index="layer", columns="n", values="angular_distance")

    def save(self, folder: str | Path, report: bool = True) -> Path:
        folder = ensure_writable_dir(folder)
        write_csv(folder / "layers.csv", self.layers)
        write_csv(folder / "angular.csv", self.angular)
        write_csv(folder / "sublayers.csv", self.sublayers)
        section = dict(self.manifest, summary=self.summary)
        if report:
            from .report.analysis import write_analysis_figures

            section["figures"] = write_analysis_figures(self, folder)
        update_manifest(folder, "analyze", section)
        if report:
            from .report.html import write_model_index

            write_model_index(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AnalysisResult":
        folder = Path(folder)
        manifest = read_manifest(folder)
        if "analyze" not in manifest or not (folder / "layers.csv").is_file():
            raise LayerprobeError(f"{folder} holds no analyze results (no layers.csv / manifest.json)")
        check_format(manifest, folder)
        section = dict(manifest["analyze"])
        summary = section.pop("summary", {})
        section.pop("figures", None)
        sub = folder / "sublayers.csv"
        return cls(
            layers=pd.read_csv(folder / "layers.csv"),
            angular=pd.read_csv(folder / "angular.csv"),
            sublayers=pd.read_csv(sub) if sub.is_file() else pd.DataFrame(),
            summary=summary,
            manifest=section,
        )


def save(result, folder: str | Path) -> Path:
    return result.save(folder)


def load(folder: str | Path) -> AnalysisResult:
    return AnalysisResult.load(folder)
