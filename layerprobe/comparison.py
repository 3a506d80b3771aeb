"""`compare`: lay the results of several models side by side in one report.

The folders are read into one `ModelResults` per model (`layerprobe.model_results`).

Headline numbers, one row per model (see `HEADLINE_DEFINITIONS`; the depth formulas live in
`layerprobe.metrics.depth`):
- perplexity: exp(mean next-token cross-entropy) on the data `analyze` used (else the sweep's);
- deep-half share: the share of the total single-layer removal cost that falls on the deeper half;
- removable layers: how many single-layer removals cost less than 10% of the model's own largest Δloss
  (scale-free), and, in the details, how many cost less than `threshold` nats;
- variance growth: least-squares slope of ln(output variance) against normalised depth
  d = ℓ/(L−1), so exp(slope) is the fitted growth factor from the first layer to the last;
- gradient ratio: mean gradient norm of the last ⌈L/4⌉ layers over that of the first ⌈L/4⌉.

Seeds: train-reference --seeds trains a scheme several times, differing only in the seed of the initial
weights. Runs whose settings agree but for the seed form one seed group (`ModelResults.seed_group`); the
headline numbers of a group are its runs' mean with their standard deviation, min–max and n
(`seed_summary`), and a claim of the papers counts as reproduced only when it holds for every combination
of the schemes' seeds (`paper_checks`, `seed_verdict`).

This module computes and saves (`Comparison.save`: headline.csv, headline_seeds.csv when a scheme has
several seeds, per_layer.csv, training.csv and the manifest); `layerprobe.report.compare` draws the figures and the page; `layerprobe.compare` does both.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .defaults import DEPTH_MODES, REMOVABLE_FRACTION, REMOVABLE_THRESHOLD as DEFAULT_THRESHOLD, check_compare_options
from .io import write_csv
from .metrics.loss import perplexity
from .metrics.depth import (
    deep_half_share,
    grad_ratio,
    normalised_depth,
    removable_layers,
    removal_verdicts,
    removable_layers_relative,
    variance_growth,
    variance_growth_factor,
)
from .metrics.gradients import GRAM_HOST_BYTES
from .metrics.intervals import deep_half_share_interval, grad_ratio_interval, variance_growth_interval
from .progress import status
from .model_results import ModelResults, collect, load_results
from .results import package_versions, prepare_result_folder, update_manifest

HEADLINE_DEFINITIONS = {
    "seeds": "training runs of the scheme that differ only in the seed of their initial weights (same data, same "
             "order); each number of the row is their mean ± sample standard deviation (n−1).",
    "perplexity": "exp of the mean next-token cross-entropy on the data `analyze` used (the prune-sweep's "
                  "full-model row when there is no analysis).",
    "final_eval_perplexity": "perplexity on the held-out split at the last evaluation of training.",
    "deep_half_share": "share of the total single-layer removal cost (Δloss, from `prune-sweep --mode layer`) "
                       "that falls on the deeper half of the layers: under ½ when deep layers matter less; "
                       "deep_half_share_lo/_hi: its 95% bootstrap interval over the sweep's samples.",
    "removable_relative": f"number of layers whose removal alone costs less than {REMOVABLE_FRACTION:.0%} of the "
                          "model's own largest single-layer Δloss: comparable across model scales.",
    "removable_layers": "number of layers whose removal alone raises the loss by less than the threshold "
                        "(from `prune-sweep --mode layer`); depends on the model's scale.",
    "removable_sure": "of the removable layers (absolute threshold), those whose whole 95% Δloss interval over "
                      "samples is under the threshold; removable_undecided: those whose interval straddles it.",
    "variance_growth": "least-squares slope of ln(output variance) against normalised depth ℓ/(L−1): "
                       "0 = flat, 1 ≈ ×2.7 from the first layer to the last; variance_growth_lo/_hi: its 95% "
                       "bootstrap interval over the analysis's samples.",
    "variance_growth_factor": "exp(variance growth): the fitted factor by which the residual stream's variance "
                              "grows from the first layer's output to the last's.",
    "grad_ratio": "mean gradient norm of the last ⌈L/4⌉ layers divided by that of the first ⌈L/4⌉ layers: "
                  "< 1 when deep layers get smaller gradients (Pre-LN), > 1 when early ones do (Post-LN); "
                  "grad_ratio_lo/_hi: its 95% bootstrap interval over the analysis's batches (not samples: "
                  "the gradients are kept per batch).",
}


# ----------------------------------------------------------------------------- numbers

def _removable(removal: pd.DataFrame | None, threshold: float, relative: bool = False) -> tuple[int | None, list[int]]:
    if removal is None or removal.empty:
        return None, []
    pick = removable_layers_relative if relative else removable_layers
    layers = pick(removal["layer"], removal["delta_loss"], threshold)
    return len(layers), layers


def _removable_confidence(removal: pd.DataFrame | None, threshold: float) -> tuple[int | None, int | None]:
    """(removable for sure, undecided) at `threshold` from the sweep's Δloss intervals (None without them)."""
    if removal is None or removal.empty or "delta_loss_hi" not in removal:
        return None, None
    v = removal_verdicts(removal["layer"], removal["delta_loss"], removal["delta_loss_lo"], removal["delta_loss_hi"],
                         threshold, 0)
    return len(v["sure"]), len(v["undecided"])


def _deep_half_share(removal: pd.DataFrame | None, num_layers: int) -> float:
    if removal is None or removal.empty or len(removal) != num_layers:
        return float("nan")
    return deep_half_share(removal.sort_values("layer")["delta_loss"].to_numpy())


def _deep_half_share_interval(m: ModelResults, removal: pd.DataFrame | None, num_layers: int) -> tuple[float, float]:
    """Its interval over the sweep's samples (sweep_samples.npz); NaN for results saved without them."""
    ps = m.layer_removal_samples()
    if ps is None or removal is None or len(removal) != num_layers or len(ps["ce"]) != num_layers:
        return float("nan"), float("nan")
    seed = (m.sweep_manifest.get("intervals") or {}).get("seed", m.sweep_manifest.get("seed"))
    return deep_half_share_interval(ps["ce"], ps["tokens"], ps["full_ce"], ps["full_tokens"], seed=int(seed or 0))


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
                ppl = float(last[ppl_col]) if ppl_col and pd.notna(last[ppl_col]) else perplexity(loss)
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
            return loss, float(full["perplexity"].iloc[0]) if "perplexity" in full else perplexity(loss)
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
        removal = m.layer_removal()
        row["deep_half_share"] = _deep_half_share(removal, L)
        row["deep_half_share_lo"], row["deep_half_share_hi"] = _deep_half_share_interval(m, removal, L)
        n_rem, which = _removable(removal, REMOVABLE_FRACTION, relative=True)
        row["removable_relative"] = n_rem
        row["removable_relative_which"] = " ".join(map(str, which))
        n_rem, which = _removable(removal, threshold)
        row["removable_layers"] = n_rem
        row["removable_which"] = " ".join(map(str, which))
        row["removable_sure"], row["removable_undecided"] = _removable_confidence(removal, threshold)
        a = m.analysis
        if a is not None:
            # analyze --metrics without variance: no column, no growth
            g = variance_growth(a.layers["output_variance"], L) if "output_variance" in a.layers else float("nan")
            row["variance_growth"] = g
            # Over the analysis's samples (samples.npz); NaN for results saved without them.
            row["variance_growth_lo"], row["variance_growth_hi"] = variance_growth_interval(
                a.per_sample, L, seed=int(a.manifest.get("seed") or 0))
            row["variance_growth_factor"] = variance_growth_factor(g)
            row["grad_ratio"] = grad_ratio(a.layers["grad_norm"]) if "grad_norm" in a.layers else float("nan")
            # Over batches (samples.npz's grad_gram); NaN without it or with one batch.
            row["grad_ratio_lo"], row["grad_ratio_hi"] = (grad_ratio_interval(
                a.per_sample["grad_gram"], a.per_sample.get("grad_gram_groups", []), L,
                seed=int(a.manifest.get("seed") or 0)) if "grad_gram" in a.per_sample and L else (float("nan"),) * 2)
        else:
            row["variance_growth"] = row["variance_growth_factor"] = row["grad_ratio"] = float("nan")
            row["variance_growth_lo"] = row["variance_growth_hi"] = float("nan")
            row["grad_ratio_lo"] = row["grad_ratio_hi"] = float("nan")
        row["seed"], row["seed_group"] = m.seed, m.seed_group or m.label
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("layers", "trained_steps", "removable_relative", "removable_layers", "removable_sure",
                "removable_undecided", "seed"):  # counts print as 10, not 10.0
        df[col] = df[col].astype("Int64")
    return df


# Headline numbers with a 95% interval (_lo/_hi): how sentences name and print them, what would narrow them,
# and why one may lack it.
INTERVAL_NUMBERS = {
    "deep_half_share": ("deep-half share", ".0%", "more samples (prune-sweep --samples)",
                        "no sweep_samples.npz beside sweep.csv (results from before it, or of another sweep; "
                        "re-run prune-sweep)"),
    "variance_growth": ("variance growth (slope)", ".2f", "more samples (analyze --samples)",
                        "no samples.npz beside layers.csv (results from before it; re-run analyze)"),
    "grad_ratio": ("gradient ratio", ".3g", "more batches (analyze --samples, or a smaller --batch-size)",
                   "no per-batch gradient Gram in samples.npz (results from before it, analysed in one batch, or "
                   f"the Gram would have taken over {GRAM_HOST_BYTES / 2 ** 30:g} GiB of host memory)"),
}


def _bounds(row, col: str) -> tuple[float, float, float] | None:
    """(value, lo, hi) of `col` in a headline row when all three are finite."""
    try:
        v, lo, hi = (float(row[c]) for c in (col, f"{col}_lo", f"{col}_hi"))
    except (KeyError, TypeError, ValueError):
        return None
    return (v, lo, hi) if all(map(math.isfinite, (v, lo, hi))) else None


def _with_interval(v: float, lo: float, hi: float, spec: str) -> str:
    return f"{format(v, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def interval_findings(df: pd.DataFrame) -> list[str]:
    """For each headline number with an interval on two or more models (one row per run): every model's value
    with its 95% interval, and for each pair whether their difference is larger than their intervals (the two
    intervals do not overlap: a conservative test) or not."""
    out = []
    for col, (name, spec, _, _) in INTERVAL_NUMBERS.items():
        have = [(str(r["model"]), b) for _, r in df.iterrows() if (b := _bounds(r, col))]
        if len(have) < 2:
            continue
        have.sort(key=lambda x: x[1][0])
        apart, within = [], []
        for (a, (va, la, ha)), (b, (vb, lb, hb)) in itertools.combinations(have, 2):
            (apart if ha < lb or hb < la else within).append(f"{b} vs {a}")
        text = ", ".join(f"{m} {_with_interval(*b, spec)}" for m, b in have)
        verdict = []
        if apart:
            verdict.append("larger than their intervals (they do not overlap): " + ", ".join(apart))
        if within:
            verdict.append("not larger than their intervals (they overlap): " + ", ".join(within))
        out.append(f"{name.capitalize()} with its 95% interval, lowest first: {text}. Differences "
                   + "; ".join(verdict) + ".")
    return out


def interval_warnings(df: pd.DataFrame) -> list[str]:
    """A line for each headline number of a model whose interval is wider than the number itself."""
    out = []
    for _, r in df.iterrows():
        for col, (name, spec, more, _) in INTERVAL_NUMBERS.items():
            b = _bounds(r, col)
            if b and b[2] - b[1] > abs(b[0]):
                out.append(f"the {name} of {r['model']}, {_with_interval(*b, spec)}: its interval is wider than "
                           f"the value; {more} would pin it down")
    return out


def interval_gaps(df: pd.DataFrame) -> list[str]:
    """One line per headline number that some models have without its interval, naming them and why."""
    out = []
    for col, (name, _, _, why) in INTERVAL_NUMBERS.items():
        if col not in df or f"{col}_lo" not in df:
            continue
        missing = [str(r["model"]) for _, r in df.iterrows()
                   if math.isfinite(float(r[col])) and not _bounds(r, col)]
        if missing:
            out.append(f"no interval on the {name} of {', '.join(missing)}: {why}")
    return out


# Headline numbers that are averaged over a scheme's seeds (`seed_summary`).
SEED_COLUMNS = ("loss", "perplexity", "final_eval_loss", "final_eval_perplexity", "deep_half_share",
                "removable_relative", "removable_layers", "variance_growth", "variance_growth_factor", "grad_ratio")


def _groups(df: pd.DataFrame) -> pd.Series:
    """Each row's seed group (runs that differ only in their seed); each model its own without the column."""
    return df["seed_group"] if "seed_group" in df else df["model"]


def seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per seed group of the headline table `df`: model (the group's label), norm_scheme, layers, seeds
    (n, the runs in the group), seed_list, and for each of SEED_COLUMNS the mean over the group's runs with a
    finite value, `_sd` their sample standard deviation (n−1; NaN for one run), `_min`, `_max` and `_n`."""
    rows = []
    groups = _groups(df)
    for label in dict.fromkeys(groups):
        d = df[groups == label]
        row = {"model": label, "norm_scheme": d["norm_scheme"].iloc[0],
               "layers": d["layers"].iloc[0] if "layers" in d else pd.NA, "seeds": len(d),
               "seed_list": " ".join(str(v) for v in d["seed"].dropna()) if "seed" in d else ""}
        for col in SEED_COLUMNS:
            values = pd.to_numeric(d[col], errors="coerce").astype(float) if col in d else pd.Series(dtype=float)
            values = values[values.map(math.isfinite)]
            n = len(values)
            row[col] = float(values.mean()) if n else float("nan")
            row[f"{col}_sd"] = float(values.std(ddof=1)) if n > 1 else float("nan")
            row[f"{col}_min"] = float(values.min()) if n else float("nan")
            row[f"{col}_max"] = float(values.max()) if n else float("nan")
            row[f"{col}_n"] = n
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["seeds"] = out["seeds"].astype("Int64")
    return out


def _by_scheme(df: pd.DataFrame, col: str) -> dict[str, list[float]]:
    """{norm scheme: its finite values of `col`, one per seed} for the schemes in exactly one seed group."""
    groups = _groups(df)
    schemes: dict[str, set] = {}
    for scheme, group in zip(df["norm_scheme"], groups):
        schemes.setdefault(scheme, set()).add(group)
    out: dict[str, list[float]] = {}
    if col not in df:
        return out
    for scheme, value in zip(df["norm_scheme"], pd.to_numeric(df[col], errors="coerce").astype(float)):
        if len(schemes[scheme]) == 1 and math.isfinite(value):
            out.setdefault(scheme, []).append(float(value))
    return out


def seed_verdict(holds: list[bool]) -> str:
    """The verdict on a claim from whether it holds for each combination of the schemes' seeds: "reproduced"
    when it holds for all (every seed of one scheme beats every seed of the other, i.e. their min–max ranges
    do not overlap), "not reproduced" when it holds for none, else "not decided"."""
    if all(holds):
        return "reproduced"
    return "not decided" if any(holds) else "not reproduced"


def _on_seeds(counts: dict[str, int]) -> str:
    """"on 1 seed", "on 3 seeds each", "on 3 (mix) and 2 (pre) seeds"."""
    n = set(counts.values())
    if len(n) == 1:
        k = n.pop()
        return f"on {k} seed{'s' * (k != 1)}" + (" each" if len(counts) > 1 and k > 1 else "")
    parts = [f"{k} ({s})" for s, k in counts.items()]
    return "on " + ", ".join(parts[:-1]) + " and " + parts[-1] + " seeds"


def _stat(values: list[float], spec: str, prefix: str = "") -> str:
    """One value as is; several as their mean with their min–max range and count."""
    f = lambda v: prefix + format(v, spec)  # noqa: E731
    if len(values) == 1:
        return f(values[0])
    return f"{f(sum(values) / len(values))} (range {f(min(values))} to {f(max(values))} over {len(values)} seeds)"


def paper_checks(df: pd.DataFrame) -> list[dict]:
    """Which of the papers' claims the headline numbers of `df` reproduce, each as {claim, verdict, reproduced,
    seeds, sentence}.

    A claim is checked only when the schemes it names are all in the comparison, each as one model or one seed
    group (`seed_group`: runs that differ only in their seed). With several seeds it is checked for every
    combination of the schemes' seeds (`seed_verdict`): "Reproduced" when it holds for all, "Not reproduced"
    when for none, "Not decided" when for some; each sentence says on how many seeds it rests. The sentences
    are phrased from the numbers; nothing here decides in advance which scheme comes out ahead."""
    checks = []

    def check(claim: str, holds, values: dict[str, list[float]], evidence: str) -> None:
        """`holds(*one value per scheme)`: whether the claim holds for that combination of seeds."""
        verdict = seed_verdict([bool(holds(*combo)) for combo in itertools.product(*values.values())])
        counts = {s: len(v) for s, v in values.items()}
        sentence = f"{verdict.capitalize()}: {claim} ({evidence}; {_on_seeds(counts)})."
        checks.append({"claim": claim, "verdict": verdict, "reproduced": verdict == "reproduced",
                       "seeds": counts, "sentence": sentence})

    var, grad = _by_scheme(df, "variance_growth_factor"), _by_scheme(df, "grad_ratio")
    ppl, share = _by_scheme(df, "perplexity"), _by_scheme(df, "deep_half_share")
    if "pre" in var:
        check("under Pre-LN the output variance grows with depth (Curse of Depth)", lambda v: v > 1,
              {"pre": var["pre"]}, f"fitted growth {_stat(var['pre'], '.3g', '×')} from the first layer to the last")
    if {"pre", "lns"} <= var.keys():
        check("LayerNorm Scaling grows the variance less than Pre-LN (Curse of Depth)", lambda lns, pre: lns < pre,
              {"lns": var["lns"], "pre": var["pre"]},
              f"LNS {_stat(var['lns'], '.3g', '×')}, Pre-LN {_stat(var['pre'], '.3g', '×')}")
    if "pre" in grad:
        check("Pre-LN's deep layers get smaller gradients than its early ones (Mix-LN)", lambda g: g < 1,
              {"pre": grad["pre"]}, f"last/first-quarter gradient ratio {_stat(grad['pre'], '.3g')}")
    if "post" in grad:
        check("Post-LN's early layers get smaller gradients than its deep ones (Mix-LN)", lambda g: g > 1,
              {"post": grad["post"]}, f"last/first-quarter gradient ratio {_stat(grad['post'], '.3g')}")
    positive = {s: v for s, v in grad.items() if all(g > 0 for g in v)}
    if {"pre", "post", "mix"} <= positive.keys():
        # Evenness: |ln ratio|, 0 when the last quarter's gradients equal the first's.
        check("Mix-LN's gradients are the most even across depth of the three (Mix-LN)",
              lambda mix, pre, post: abs(math.log(mix)) < min(abs(math.log(pre)), abs(math.log(post))),
              {s: grad[s] for s in ("mix", "pre", "post")},
              ", ".join(f"{s} {_stat(grad[s], '.3g')}" for s in ("mix", "pre", "post")))
    if {"pre", "lns"} <= positive.keys():
        check("LNS gives deep layers a larger share of the gradient than Pre-LN (Curse of Depth)",
              lambda lns, pre: lns > pre, {"lns": grad["lns"], "pre": grad["pre"]},
              f"gradient ratio LNS {_stat(grad['lns'], '.3g')}, Pre-LN {_stat(grad['pre'], '.3g')}")
    for s, paper in (("mix", "Mix-LN"), ("lns", "Curse of Depth")):
        if {"pre", s} <= share.keys():
            check(f"{s}'s deeper half carries more of the removal cost than Pre-LN's ({paper})",
                  lambda x, pre: x > pre, {s: share[s], "pre": share["pre"]},
                  f"deep-half share {s} {_stat(share[s], '.0%')}, Pre-LN {_stat(share['pre'], '.0%')}")
        if {"pre", s} <= ppl.keys():
            check(f"{s} reaches a lower perplexity than Pre-LN ({paper})", lambda x, pre: x < pre,
                  {s: ppl[s], "pre": ppl["pre"]}, f"{s} {_stat(ppl[s], '.2f')}, Pre-LN {_stat(ppl['pre'], '.2f')}")
    return checks


def per_layer(models: list[ModelResults]) -> pd.DataFrame:
    """Long table: one row per model and layer with every per-layer number compared."""
    frames = []
    for m in models:
        L = m.num_layers
        if not L:
            continue
        df = pd.DataFrame({"layer": range(L)})
        if m.analysis is not None:
            cols = [c for c in ("layer", "angular_distance", "block_influence", "output_variance", "grad_norm",
                                "lens_kl", "lens_top1", "relative_update", "update_cosine", "max_activation",
                                "mean_abs_activation")
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
    notes: list[str] = field(default_factory=list)  # sentences the page adds to its findings (the demo's seeds)

    @property
    def seeds(self) -> pd.DataFrame:
        """The headline numbers per seed group: mean, spread and n over its runs (`seed_summary`)."""
        return seed_summary(self.headline)

    @property
    def seeded(self) -> bool:
        """Whether some scheme was trained on more than one seed: tables then show means ± spread."""
        return bool(len(self.headline)) and bool((self.seeds["seeds"] > 1).any())

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
                        "results": m.kinds, "seed": m.seed, "seed_group": m.seed_group} for m in self.models],
            "threshold_nats": self.threshold,
            "depth_axis": self.depth,
            "figures": [{"file": f["file"], "caption": f["caption"]} for f in self.figures],
            "versions": package_versions(),
            "wall_time_s": round(self.seconds, 3),
        }

    def save(self, out: str | Path) -> Path:
        """Write headline.csv, per_layer.csv (training.csv when runs were given) and the manifest's
        `compare` entry to `out`; returns the folder."""
        out = prepare_result_folder(out)
        self.out = out
        write_csv(out / "headline.csv", self.headline)
        write_csv(out / "per_layer.csv", self.per_layer)
        if self.seeded:
            write_csv(out / "headline_seeds.csv", self.seeds)
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
    notes: list[str] | None = None,
) -> Comparison:
    """Read the results in `folders` (of analyze, prune-sweep, train-reference) and compute the comparison;
    writes nothing (`Comparison.save` does; `layerprobe.compare` also draws the report).

    threshold: nats of loss under which removing one layer counts as harmless. depth: the x axis of the
    per-layer curves, "auto" (normalised depth ℓ/(L−1) when the models' depths differ), "layer" or
    "normalised". command: how the report says it was made (default: the equivalent CLI command). notes:
    sentences the page adds to its findings."""
    started = time.perf_counter()
    folders = check_compare_options(folders, threshold, depth)
    with status("reading results", progress):
        models = collect(folders)
    depths = {m.num_layers for m in models if m.num_layers}
    if depth == "auto":
        depth = "layer" if len(depths) <= 1 else "normalised"
    comp = Comparison(models=models, headline=headline(models, threshold), per_layer=per_layer(models),
                      threshold=float(threshold), depth=depth, inputs=[str(f) for f in folders], command=command,
                      notes=list(notes or []))
    comp.seconds = time.perf_counter() - started
    return comp


__all__ = ["Comparison", "ModelResults", "collect", "compare_results", "headline", "INTERVAL_NUMBERS",
           "interval_findings", "interval_gaps", "interval_warnings", "load_results", "paper_checks",
           "per_layer", "seed_summary", "seed_verdict", "SEED_COLUMNS", "training_dynamics", "DEFAULT_THRESHOLD", "DEPTH_MODES", "HEADLINE_DEFINITIONS"]
