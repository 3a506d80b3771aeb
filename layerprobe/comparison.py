"""`compare`: lay the results of several models side by side in one report.

A result folder holds any of: `analyze` results (layers.csv, angular.csv), a `prune-sweep`
(sweep.csv), both recorded in its manifest.json, or a `train-reference` run (metrics.jsonl next
to the checkpoint). When an analysed model *is* a train-reference run that was also given, the
two folders become one entry, so `layerprobe compare runs/* reports/*` pairs each model's
training curves with its analysis.

Headline numbers, one row per model (see `HEADLINE_DEFINITIONS`; the depth formulas live in
`layerprobe.metrics.depth`):
- perplexity: exp(mean next-token cross-entropy) on the data `analyze` used (else the sweep's);
- removable layers: how many single-layer removals raise the loss by less than `threshold` nats;
- variance growth: least-squares slope of ln(output variance) against normalised depth
  d = ℓ/(L−1), so exp(slope) is the fitted growth factor from the first layer to the last;
- gradient ratio: mean gradient norm of the last ⌈L/4⌉ layers over that of the first ⌈L/4⌉.

This module computes and saves (`Comparison.save`: headline.csv, per_layer.csv, training.csv and the
manifest); `layerprobe.report.compare` draws the figures and the page; `layerprobe.compare` does both.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .defaults import DEPTH_MODES, REMOVABLE_THRESHOLD as DEFAULT_THRESHOLD, check_compare_options
from .errors import LayerprobeError
from .io import ensure_writable_dir, write_csv
from .metrics.depth import grad_ratio, normalised_depth, removable_layers, variance_growth, variance_growth_factor
from .progress import status
from .pruning import SweepResult
from .results import AnalysisResult, check_format, package_versions, read_manifest, update_manifest
from .training import checkpoint as ckpt

METRICS_FILE = "metrics.jsonl"
SWEEP_FILE = "sweep.csv"
SWEEP_COLUMNS = {"mode", "removed", "loss", "delta_loss"}

HEADLINE_DEFINITIONS = {
    "perplexity": "exp of the mean next-token cross-entropy on the data `analyze` used (the prune-sweep's "
                  "full-model row when there is no analysis).",
    "final_eval_perplexity": "perplexity on the held-out split at the last evaluation of training.",
    "removable_layers": "number of layers whose removal alone raises the loss by less than the threshold "
                        "(from `prune-sweep --mode layer`).",
    "variance_growth": "least-squares slope of ln(output variance) against normalised depth ℓ/(L−1): "
                       "0 = flat, 1 ≈ ×2.7 from the first layer to the last.",
    "variance_growth_factor": "exp(variance growth): the fitted factor by which the residual stream's variance "
                              "grows from the first layer's output to the last's.",
    "grad_ratio": "mean gradient norm of the last ⌈L/4⌉ layers divided by that of the first ⌈L/4⌉ layers: "
                  "< 1 when deep layers get smaller gradients (Pre-LN), > 1 when early ones do (Post-LN).",
}


@dataclass
class ModelResults:
    """Everything found about one model, from one or more folders."""

    name: str
    folders: list[Path]
    analysis: AnalysisResult | None = None
    sweep: pd.DataFrame | None = None  # sweep.csv
    sweep_manifest: dict = field(default_factory=dict)
    training: pd.DataFrame | None = None  # one row per logged step
    training_layers: pd.DataFrame | None = None  # long: step, layer, metric columns
    train_manifest: dict = field(default_factory=dict)
    label: str = ""  # unique name shown in figures and tables

    @property
    def folder(self) -> Path:
        return self.folders[0]

    @property
    def norm_scheme(self) -> str:
        if self.analysis is not None:
            s = self.analysis.summary.get("norm_scheme")
            if s:
                return str(s)
        for source in (self.train_manifest, self.sweep_manifest.get("summary", {}), self.sweep_manifest):
            s = source.get("norm_scheme") if isinstance(source, dict) else None
            if s:
                return str(s)
        return "unknown"

    @property
    def num_layers(self) -> int | None:
        if self.analysis is not None:
            return int(self.analysis.summary.get("num_layers") or len(self.analysis.layers))
        n = self.train_manifest.get("num_layers")
        if n:
            return int(n)
        if self.training_layers is not None and len(self.training_layers):
            return int(self.training_layers["layer"].max()) + 1
        sweep = self.layer_removal()
        if sweep is not None and len(sweep):
            return int(sweep["layer"].max()) + 1
        return None

    def layer_removal(self) -> pd.DataFrame | None:
        """Single-layer removals from the sweep: layer, delta_loss (and the other sweep columns)."""
        if self.sweep is None:
            return None
        df = self.sweep[self.sweep["mode"].astype(str) == "layer"].copy()
        removed = df["removed"].astype(str).str.strip()
        df = df[removed.str.fullmatch(r"\d+")]
        if df.empty:
            return None
        df["layer"] = df["removed"].astype(str).str.strip().astype(int)
        return df.sort_values("layer").drop_duplicates("layer", keep="last").reset_index(drop=True)

    @property
    def kinds(self) -> list[str]:
        out = []
        if self.analysis is not None:
            out.append("analyze")
        if self.sweep is not None:
            out.append("prune-sweep")
        if self.training is not None:
            out.append("train-reference")
        return out


# ----------------------------------------------------------------------------- loading

def _read_sweep(folder: Path, manifest: dict):
    if "prune-sweep" not in manifest and not (folder / SWEEP_FILE).is_file():
        return None
    if not (folder / SWEEP_FILE).is_file():
        raise LayerprobeError(f"{folder} has a prune-sweep entry in manifest.json but no {SWEEP_FILE}; re-run prune-sweep")
    if "prune-sweep" not in manifest:
        raise LayerprobeError(f"{folder} has {SWEEP_FILE} but no prune-sweep entry in manifest.json; re-run prune-sweep")
    try:
        sweep = SweepResult.load(folder)
    except (OSError, ValueError) as e:
        raise LayerprobeError(f"{folder / SWEEP_FILE} is not a readable prune-sweep table ({e}); re-run prune-sweep") from None
    missing = SWEEP_COLUMNS - set(sweep.table.columns)
    if missing:
        raise LayerprobeError(f"{folder / SWEEP_FILE} lacks the column(s) {', '.join(sorted(missing))}: it comes from "
                              "another layerprobe version; re-run prune-sweep")
    return sweep


# Per-layer lists that train-reference logs at each evaluation -> column names used here.
TRAINING_LAYER_KEYS = {"layer_grad_norm": "grad_norm", "layer_output_var": "output_variance"}


def _flatten_layer_lists(records: list[dict]) -> pd.DataFrame:
    """Per-layer lists logged during training -> long table step, layer, grad_norm, output_variance."""
    rows: dict[tuple[int, int], dict] = {}
    for rec in records:
        step = rec.get("step")
        if step is None:
            continue
        for key, name in TRAINING_LAYER_KEYS.items():
            value = rec.get(key)
            if not isinstance(value, list):
                continue
            for layer, v in enumerate(value):
                rows.setdefault((int(step), layer), {"step": int(step), "layer": layer})[name] = (
                    float("nan") if v is None else float(v))
    if not rows:
        return pd.DataFrame(columns=["step", "layer"])
    return pd.DataFrame(list(rows.values())).sort_values(["step", "layer"]).reset_index(drop=True)


def _read_training(folder: Path):
    """A train-reference run folder: metrics.jsonl, run.json, config.json."""
    if not (folder / METRICS_FILE).is_file():
        return None
    records = [r for r in ckpt.read_metrics(folder) if isinstance(r, dict)]
    run = ckpt.read_run(folder) or {}
    if "format_version" in run:
        check_format(run, folder)
    steps = [r for r in records if "step" in r]
    if not steps:
        raise LayerprobeError(f"{folder / METRICS_FILE} holds no training steps; the run logged nothing yet")
    if not any("loss" in r for r in steps):
        raise LayerprobeError(f"{folder / METRICS_FILE} has no 'loss' entries: it comes from another layerprobe "
                              "version; re-run train-reference")
    scalars = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in steps]
    training = pd.DataFrame(scalars)
    # Several records may share a step (a resumed run, an eval logged apart): keep one row per step.
    training = training.groupby("step", as_index=False, sort=True).last()
    layers = _flatten_layer_lists(steps)
    meta: dict = {"status": run.get("status"), "diverged_at": run.get("diverged_at"),
                  "total_steps": run.get("total_steps"), "preset": run.get("preset"),
                  "norm_scheme": run.get("scheme")}
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
            meta.update(norm_scheme=cfg.get("norm_scheme") or meta["norm_scheme"],
                        num_layers=cfg.get("num_hidden_layers"), hidden_size=cfg.get("hidden_size"),
                        post_ln_layers=cfg.get("post_ln_layers"))
        except (OSError, json.JSONDecodeError):
            pass
    return training, layers, {k: v for k, v in meta.items() if v is not None}


def load_results(folder: str | Path) -> ModelResults:
    """Read whatever layerprobe results `folder` holds; a clear error if it holds none."""
    folder = Path(folder)
    if not folder.exists():
        raise LayerprobeError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise LayerprobeError(f"{folder} is a file; give the folder that analyze, prune-sweep or train-reference wrote")
    manifest = read_manifest(folder)
    if manifest:
        if "compare" in manifest and not any(k in manifest for k in ("analyze", "prune-sweep")):
            raise LayerprobeError(f"{folder} is a comparison report, not results: give the folders it was made from")
        check_format(manifest, folder)
    training = _read_training(folder)
    analysis = None
    if "analyze" in manifest or (folder / "layers.csv").is_file():
        if not manifest:
            raise LayerprobeError(f"{folder} has layers.csv but no manifest.json; re-run analyze")
        analysis = AnalysisResult.load(folder)
    sweep = _read_sweep(folder, manifest)
    if analysis is None and sweep is None and training is None:
        raise LayerprobeError(
            f"{folder} holds no layerprobe results: expected analyze or prune-sweep results (manifest.json with "
            f"layers.csv or {SWEEP_FILE}) or a train-reference run ({METRICS_FILE})")
    name = None
    if analysis is not None:
        name = analysis.summary.get("model") or analysis.manifest.get("model_name")
    if not name and sweep is not None:
        name = sweep.summary.get("model") or sweep.manifest.get("model_name")
    res = ModelResults(name=str(name or folder.resolve().name), folders=[folder], analysis=analysis)
    if sweep is not None:
        res.sweep, res.sweep_manifest = sweep.table, dict(sweep.manifest, summary=sweep.summary)
    if training is not None:
        res.training, res.training_layers, res.train_manifest = training
    return res


def _model_paths(res: ModelResults) -> list[Path]:
    """Where the analysed / swept model may live, if it was loaded from a local folder. A relative spec is
    relative to the folder the command ran in, which is unknown here: try the current folder and every
    folder above the results (results usually sit below the folder the command ran in)."""
    out = []
    for section in ((res.analysis.manifest if res.analysis else {}), res.sweep_manifest):
        spec = section.get("model") if isinstance(section, dict) else None
        if not spec or "://" in str(spec):
            continue
        spec = Path(str(spec)).expanduser()
        bases = [Path.cwd()] if spec.is_absolute() else [Path.cwd(), *res.folder.resolve().parents]
        out += [(base / spec).resolve() for base in bases]
    return out


def _merge(a: ModelResults, b: ModelResults) -> ModelResults:
    for attr in ("analysis", "sweep", "training", "training_layers"):
        if getattr(a, attr) is None and getattr(b, attr) is not None:
            setattr(a, attr, getattr(b, attr))
    a.sweep_manifest = a.sweep_manifest or b.sweep_manifest
    a.train_manifest = {**b.train_manifest, **a.train_manifest}
    a.folders += [f for f in b.folders if f not in a.folders]
    if a.analysis is not None:
        a.name = a.analysis.summary.get("model") or a.name
    return a


def collect(folders) -> list[ModelResults]:
    """Load every folder and pair results that belong to the same model."""
    folders = [Path(f) for f in (folders or [])]
    if not folders:
        raise LayerprobeError("give at least one result folder (written by analyze, prune-sweep or train-reference)")
    loaded: list[ModelResults] = []
    seen: set[Path] = set()
    for f in folders:
        key = f.resolve()
        if key in seen:
            continue
        seen.add(key)
        loaded.append(load_results(f))
    # A folder analysed from a train-reference run joins that run's entry.
    by_folder = {r.folder.resolve(): r for r in loaded}
    absorbed: set[int] = set()
    for r in loaded:
        if r.training is not None:
            continue  # a run is the entry others join
        target = next((by_folder[p] for p in _model_paths(r) if p in by_folder and by_folder[p].training is not None
                       and by_folder[p] is not r), None)
        if target is not None:
            absorbed.add(id(r))
            _merge(target, r)
    merged = [r for r in loaded if id(r) not in absorbed]
    _unique_labels(merged)
    return merged


def _unique_labels(models: list[ModelResults]) -> None:
    """Each model's name, or where names clash, the name and the shortest tail of its folder that tells
    the clashing models apart: "pre (runs/a/pre)", "pre (runs/b/pre)"."""
    groups: dict[str, list[ModelResults]] = {}
    for m in models:
        groups.setdefault(m.name, []).append(m)
    for name, group in groups.items():
        if len(group) == 1:
            group[0].label = name
            continue
        parts = [m.folder.resolve().parts for m in group]
        for k in range(1, max(len(p) for p in parts) + 1):
            tails = ["/".join(p[-k:]) for p in parts]
            if len(set(tails)) == len(tails):
                break
        for m, tail in zip(group, tails):
            m.label = f"{name} ({tail})"
    seen: dict[str, int] = {}
    for m in models:  # the same folder cannot be given twice, but stay safe
        seen[m.label] = seen.get(m.label, 0) + 1
        if seen[m.label] > 1:
            m.label = f"{m.label} #{seen[m.label]}"


# ----------------------------------------------------------------------------- numbers

def _removable(removal: pd.DataFrame | None, threshold: float) -> tuple[float, list[int]]:
    if removal is None or removal.empty:
        return float("nan"), []
    layers = removable_layers(removal["layer"], removal["delta_loss"], threshold)
    return float(len(layers)), layers


def _final_eval(training: pd.DataFrame | None) -> tuple[float, float, int | None]:
    if training is None:
        return float("nan"), float("nan"), None
    for loss_col in ("eval_loss", "val_loss"):
        if loss_col in training.columns:
            ev = training.dropna(subset=[loss_col])
            if len(ev):
                last = ev.iloc[-1]
                ppl_col = next((c for c in ("eval_ppl", "eval_perplexity", "val_ppl") if c in ev.columns), None)
                loss = float(last[loss_col])
                ppl = float(last[ppl_col]) if ppl_col and pd.notna(last[ppl_col]) else math.exp(min(loss, 700))
                return loss, ppl, int(last["step"])
    return float("nan"), float("nan"), None


def _model_loss(m: ModelResults) -> tuple[float, float]:
    """(loss, perplexity) of the full model: from the analysis, else the sweep's row with nothing removed."""
    if m.analysis is not None:
        return float(m.analysis.summary.get("loss", "nan")), float(m.analysis.summary.get("perplexity", "nan"))
    if m.sweep is not None:
        full = m.sweep[m.sweep["removed"].astype(str).str.lower() == "none"]
        if len(full):
            loss = float(full["loss"].iloc[0])
            return loss, float(full["perplexity"].iloc[0]) if "perplexity" in full else math.exp(min(loss, 700))
    return float("nan"), float("nan")


def headline(models: list[ModelResults], threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """One row per model: the numbers `HEADLINE_DEFINITIONS` defines (NaN where the results lack them)."""
    rows = []
    for m in models:
        L = m.num_layers
        row = {"model": m.label, "norm_scheme": m.norm_scheme, "layers": L}
        row["loss"], row["perplexity"] = _model_loss(m)
        eval_loss, eval_ppl, _ = _final_eval(m.training)
        row["final_eval_loss"], row["final_eval_perplexity"], row["trained_steps"] = eval_loss, eval_ppl, (
            int(m.training["step"].max()) if m.training is not None else None)
        n_rem, which = _removable(m.layer_removal(), threshold)
        row["removable_layers"] = n_rem
        row["removable_which"] = " ".join(map(str, which)) if which else ""
        a = m.analysis
        if a is not None:
            g = variance_growth(a.layers["output_variance"], L)
            row["variance_growth"] = g
            row["variance_growth_factor"] = variance_growth_factor(g)
            row["grad_ratio"] = grad_ratio(a.layers["grad_norm"]) if "grad_norm" in a.layers else float("nan")
        else:
            row["variance_growth"] = row["variance_growth_factor"] = row["grad_ratio"] = float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def per_layer(models: list[ModelResults]) -> pd.DataFrame:
    """Long table: one row per model and layer with every per-layer number compared."""
    frames = []
    for m in models:
        L = m.num_layers
        if not L:
            continue
        df = pd.DataFrame({"layer": range(L)})
        if m.analysis is not None:
            cols = [c for c in ("layer", "angular_distance", "block_influence", "output_variance", "grad_norm")
                    if c in m.analysis.layers.columns]
            df = df.merge(m.analysis.layers[cols], on="layer", how="left")
        removal = m.layer_removal()
        if removal is not None:
            df = df.merge(removal[["layer", "delta_loss"]], on="layer", how="left")
        df.insert(0, "norm_scheme", m.norm_scheme)
        df.insert(0, "model", m.label)
        df.insert(3, "depth", normalised_depth(df["layer"], L))
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def training_dynamics(m: ModelResults) -> pd.DataFrame | None:
    """Variance growth and gradient ratio at every logged step of a training run (None without per-layer logs)."""
    tl = m.training_layers
    if tl is None or tl.empty:
        return None
    rows = []
    for step, d in tl.groupby("step"):
        d = d.sort_values("layer")
        row = {"step": int(step)}
        if "output_variance" in d and d["output_variance"].notna().all():
            row["variance_growth"] = variance_growth(d["output_variance"].to_numpy(), len(d))
        if "grad_norm" in d and d["grad_norm"].notna().all():
            row["grad_ratio"] = grad_ratio(d["grad_norm"].to_numpy())
        rows.append(row)
    out = pd.DataFrame(rows)
    return out if len(out.columns) > 1 else None


# ----------------------------------------------------------------------------- the comparison

@dataclass
class Comparison:
    models: list[ModelResults]
    headline: pd.DataFrame
    per_layer: pd.DataFrame
    threshold: float
    depth: str  # "layer" or "normalised": the x axis of the per-layer figures
    inputs: list[str] = field(default_factory=list)  # the folders as given
    command: str | None = None  # how the comparison was made (default: the equivalent CLI command)
    out: Path | None = None  # the folder it was saved to
    figures: list[dict] = field(default_factory=list)  # [{file, caption, section}] once a report drew them
    seconds: float = 0.0  # wall time of compare (of the whole demo when the demo made it)

    @property
    def html(self) -> Path | None:
        return self.out / "index.html" if self.out else None

    @property
    def made_with(self) -> str:
        return self.command or "layerprobe compare " + " ".join(self.inputs)

    def training_table(self) -> pd.DataFrame | None:
        """Every run's logged scalars, one row per model and step (None when no run was given)."""
        frames = [m.training.assign(model=m.label, norm_scheme=m.norm_scheme) for m in self.models
                  if m.training is not None]
        return pd.concat(frames, ignore_index=True) if frames else None

    def manifest_entry(self) -> dict:
        return {
            "inputs": self.inputs,
            "command": self.made_with,
            "models": [{"label": m.label, "norm_scheme": m.norm_scheme, "folders": [str(f) for f in m.folders],
                        "results": m.kinds} for m in self.models],
            "threshold_nats": self.threshold,
            "depth_axis": self.depth,
            "figures": [{"file": f["file"], "caption": f["caption"]} for f in self.figures],
            "versions": package_versions(),
            "wall_time_s": round(self.seconds, 3),
        }

    def save(self, out: str | Path) -> Path:
        """Write headline.csv, per_layer.csv (training.csv when runs were given) and the manifest's
        `compare` entry to `out`; returns the folder."""
        out = ensure_writable_dir(out)
        self.out = out
        write_csv(out / "headline.csv", self.headline)
        write_csv(out / "per_layer.csv", self.per_layer)
        training = self.training_table()
        if training is not None:
            write_csv(out / "training.csv", training)
        update_manifest(out, "compare", self.manifest_entry())
        return out

    def _repr_html_(self) -> str:  # notebooks show the headline table
        return self.headline.to_html(index=False, na_rep="—", float_format=lambda v: f"{v:.4g}")


def compare_results(
    folders,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    depth: str = "auto",
    progress: bool = True,
    command: str | None = None,
) -> Comparison:
    """Read the results in `folders` (of analyze, prune-sweep, train-reference) and compute the comparison;
    writes nothing (`Comparison.save` does; `layerprobe.compare` also draws the report).

    threshold: nats of loss under which removing one layer counts as harmless. depth: the x axis of the
    per-layer curves, "auto" (normalised depth ℓ/(L−1) when the models' depths differ), "layer" or
    "normalised". command: how the report says it was made (default: the equivalent CLI command)."""
    started = time.perf_counter()
    folders = check_compare_options(folders, threshold, depth)
    with status("reading results", progress):
        models = collect(folders)
    depths = {m.num_layers for m in models if m.num_layers}
    if depth == "auto":
        depth = "layer" if len(depths) <= 1 else "normalised"
    comp = Comparison(models=models, headline=headline(models, threshold), per_layer=per_layer(models),
                      threshold=float(threshold), depth=depth, inputs=[str(f) for f in folders], command=command)
    comp.seconds = time.perf_counter() - started
    return comp


__all__ = ["Comparison", "ModelResults", "collect", "compare_results", "headline", "load_results",
           "per_layer", "training_dynamics", "DEFAULT_THRESHOLD", "DEPTH_MODES", "HEADLINE_DEFINITIONS"]
