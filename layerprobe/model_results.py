"""The results of one model, gathered from the folders that analyze, prune-sweep and train-reference wrote.

A result folder holds any of: `analyze` results (layers.csv, angular.csv), a `prune-sweep`
(sweep.csv), both recorded in its manifest.json, or a `train-reference` run (metrics.jsonl next
to the checkpoint). When an analysed model *is* a train-reference run that was also given, the
two folders become one entry (`collect`), so `layerprobe compare runs/* reports/*` pairs each
model's training curves with its analysis.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import LayerprobeError
from .monitor import MANIFEST_FILE as MONITOR_FILE  # written by LayerMonitor next to its metrics.jsonl
from .pruning import SweepResult
from .results import AnalysisResult, check_format, read_manifest
from .training import checkpoint as ckpt

METRICS_FILE = "metrics.jsonl"
SWEEP_FILE = "sweep.csv"
SWEEP_COLUMNS = {"mode", "removed", "loss", "delta_loss"}


@dataclass
class ModelResults:
    """Everything found about one model, from one or more folders."""

    name: str
    folders: list[Path]
    analysis: AnalysisResult | None = None
    sweep: pd.DataFrame | None = None  # sweep.csv
    sweep_manifest: dict = field(default_factory=dict)
    sweep_samples: dict = field(default_factory=dict)  # sweep_samples.npz: per-sample sums per row of sweep.csv
    training: pd.DataFrame | None = None  # one row per logged step
    training_layers: pd.DataFrame | None = None  # long: step, layer, metric columns
    train_manifest: dict = field(default_factory=dict)
    label: str = ""  # unique name shown in figures and tables
    seed_group: str = ""  # the label its seed group goes by: runs that differ only in their seed share it

    @property
    def seed(self) -> int | None:
        """The seed of the run's initial weights (None when no train-reference run was given)."""
        s = self.train_manifest.get("seed")
        return int(s) if s is not None else None

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

    def layer_removal_samples(self) -> dict | None:
        """The per-sample sums behind `layer_removal`: ce, tokens [L, S] of the single-layer removals in layer
        order, full_ce, full_tokens [S] of the full model. None when the sweep saved none (results from
        before sweep_samples.npz) or the file does not belong to the sweep.csv beside it."""
        ps, sweep = self.sweep_samples, self.sweep
        if sweep is None or not ps or "removed" not in ps or len(ps["removed"]) != len(sweep):
            return None
        removed = sweep["removed"].astype(str).str.strip().to_numpy()
        mode = sweep["mode"].astype(str).to_numpy()
        if [str(r).strip() for r in ps["removed"]] != list(removed):
            return None
        full = [i for i, m in enumerate(mode) if m == "full"]
        rows = {int(r): i for i, (m, r) in enumerate(zip(mode, removed)) if m == "layer" and r.isdigit()}
        if not full or not rows:
            return None
        pick = [rows[k] for k in sorted(rows)]
        return {"ce": ps["ce"][pick], "tokens": ps["tokens"][pick], "full_ce": ps["ce"][full[0]],
                "full_tokens": ps["tokens"][full[0]]}

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


# Per-layer lists that train-reference logs at each evaluation, and that the monitor (layerprobe.monitor)
# logs at its steps and probes -> column names used here (analyze's layers.csv names where they exist).
TRAINING_LAYER_KEYS = {"layer_grad_norm": "grad_norm", "layer_output_var": "output_variance",
                       **{f"layer_{c}": c for c in (
                           "grad_norm_attention", "grad_norm_mlp", "grad_norm_norm", "weight_update",
                           "angular_distance", "block_influence", "update_variance", "lens_kl", "lens_top1",
                           "relative_update", "update_cosine", "max_activation", "mean_abs_activation")}}


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
    monitored = (folder / MONITOR_FILE).is_file()
    if not monitored and not any("loss" in r for r in steps):
        raise LayerprobeError(f"{folder / METRICS_FILE} has no 'loss' entries: it comes from another layerprobe "
                              "version; re-run train-reference")
    scalars = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in steps]
    training = pd.DataFrame(scalars)
    # Several records may share a step (a resumed run, an eval logged apart): keep one row per step.
    training = training.groupby("step", as_index=False, sort=True).last()
    layers = _flatten_layer_lists(steps)
    identity = run.get("identity") if isinstance(run.get("identity"), dict) else {}
    meta: dict = {"status": run.get("status"), "diverged_at": run.get("diverged_at"),
                  "total_steps": run.get("total_steps"), "preset": run.get("preset"),
                  "norm_scheme": run.get("scheme"), "seed": (identity.get("train") or {}).get("seed"),
                  "seed_key": seed_key(identity)}
    if monitored:
        try:
            mon = json.loads((folder / MONITOR_FILE).read_text(encoding="utf-8")).get("monitor", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            mon = {}
        if isinstance(mon, dict):
            meta.update(norm_scheme=mon.get("norm_scheme") or meta["norm_scheme"], num_layers=mon.get("num_layers"))
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


def seed_key(identity: dict) -> str | None:
    """What runs of one scheme that differ only in their seeds share: the run's identity (model and training
    settings, data included) without the weights' seed and the batch order's seed. None without an identity."""
    if not identity or not isinstance(identity.get("train"), dict):
        return None
    train = {k: v for k, v in identity["train"].items() if k not in ("seed", "data_seed")}
    return json.dumps({"model": identity.get("model"), "train": train}, sort_keys=True, default=str)


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
        res.sweep_samples = sweep.per_sample
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
    if a.sweep is None and b.sweep is not None:
        a.sweep_samples = b.sweep_samples
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
    _seed_groups(merged)
    return merged


def _seed_groups(models: list[ModelResults]) -> None:
    """Give runs of the same settings that differ only in their seeds (`seed_key`) one `seed_group`: their
    common name without the "-seed<k>" that train-reference --seeds appends, else "<scheme> seeds". Every
    other model is a group of its own, under its label."""
    groups: dict[str, list[ModelResults]] = {}
    for m in models:
        key = m.train_manifest.get("seed_key")
        if key is not None and m.seed is not None:
            groups.setdefault(key, []).append(m)
    for m in models:
        m.seed_group = m.label
    taken = {m.label for m in models}
    for group in groups.values():
        seeds = [m.seed for m in group]
        if len(group) < 2 or len(set(seeds)) < len(seeds):  # one run, or copies of one seed: not a spread
            continue
        bases = {re.sub(r"-seed\d+$", "", m.name) for m in group}
        label = bases.pop() if len(bases) == 1 else f"{group[0].norm_scheme} seeds"
        if label in taken - {m.label for m in group}:
            label = f"{label} ({len(group)} seeds)"
        taken.add(label)
        for m in group:
            m.seed_group = label


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


__all__ = ["ModelResults", "collect", "load_results", "seed_key", "METRICS_FILE", "SWEEP_FILE"]
