"""Confidence intervals over calibration samples, and how stable a ranking of layers is.

Every per-layer figure is a ratio of sums over samples (sequences): e.g. Block Influence is
1 − Σ_s C_s / Σ_s N_s with C_s the sum of cosines over sample s's tokens and N_s their number. The
passes keep those per-sample partial sums, [samples, ...] (never per token), and the interval is a
percentile bootstrap over samples (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, §13):

    for r = 1 … R:  idx_r = R samples drawn with replacement  (numpy default_rng(seed).integers(0, S, (R, S)))
                    θ_r   = statistic(Σ_{s ∈ idx_r} sums_s)
    interval       = the (1−level)/2 and (1+level)/2 quantiles of θ_1 … θ_R (numpy's linear quantile)

The resampled totals are W @ sums with W[r, s] the number of times sample s was drawn in resample r,
so a resample costs one small matrix product and no model pass. Paired statistics (Δloss: a candidate
minus the full model on the same samples) resample both with the same W.

Ranking stability: Kendall's τ-b between the scores of two disjoint halves of the samples (τ = 1:
same order), and how often the k layers a ranking picks on a bootstrap resample are the very ones it
picks on all samples.

Pure numpy: `analysis`, the pruning sweep and the reports call these on arrays.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000
METHOD = "percentile bootstrap"

Sums = Mapping[str, np.ndarray]  # name -> [S, ...] per-sample partial sums


def resample_counts(samples: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """W [resamples, samples]: how often each sample is drawn in each resample (rows sum to `samples`)."""
    idx = np.random.default_rng(seed).integers(0, samples, size=(resamples, samples))
    flat = (idx + np.arange(resamples)[:, None] * samples).ravel()
    return np.bincount(flat, minlength=resamples * samples).reshape(resamples, samples).astype(float)


def resampled_totals(sums: Sums, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Σ over each resample's samples of every per-sample array: name -> [resamples, ...]."""
    out = {}
    for name, values in sums.items():
        v = np.asarray(values, dtype=float)
        out[name] = (counts @ v.reshape(v.shape[0], -1)).reshape((counts.shape[0],) + v.shape[1:])
    return out


def quantile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the (1−level)/2 and (1+level)/2 quantiles over axis 0, NaN replicates ignored."""
    alpha = (1.0 - level) / 2.0
    reps = np.asarray(replicates, dtype=float)
    # numpy's nanquantile, formed directly: one sort along contiguous rows (nanquantile is ~5x slower
    # on a [1000, L+1, L+1] angular map). NaNs sort last; each column interpolates over its finite count.
    cols = np.sort(reps.reshape(reps.shape[0], -1).T, axis=1)
    valid = np.sum(~np.isnan(cols), axis=1)
    out = []
    for q in (alpha, 1.0 - alpha):
        pos = q * np.maximum(valid - 1, 0)
        below = np.floor(pos).astype(int)
        above = np.minimum(below + 1, np.maximum(valid - 1, 0))
        rows = np.arange(cols.shape[0])
        a, b = cols[rows, below], cols[rows, above]
        with np.errstate(all="ignore"):
            v = a + (b - a) * (pos - below)
        v = np.where(b == a, a, v)  # inf and equal neighbours stay exact
        out.append(np.where(valid > 0, v, np.nan).reshape(reps.shape[1:]))
    return out[0], out[1]


def bootstrap_interval(sums: Sums, statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray], *,
                       level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0,
                       counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap (lo, hi) of `statistic(totals)`, where totals are sums over samples.

    `statistic` maps a dict of totals (each [R, ...]) to [R, ...] values; it must work on any leading
    R. NaN bounds with fewer than two samples (no spread to resample). `counts`: a W shared by
    several statistics (paired, and cheaper).
    """
    S = len(next(iter(sums.values())))
    shape = np.shape(statistic({k: np.asarray(v, dtype=float).sum(0, keepdims=True) for k, v in sums.items()}))[1:]
    if S < 2:
        nan = np.full(shape, np.nan)
        return nan, nan.copy()
    if counts is None:
        counts = resample_counts(S, resamples, seed)
    with np.errstate(all="ignore"):
        reps = np.asarray(statistic(resampled_totals(sums, counts)), dtype=float)
    return quantile_interval(reps, level)


def ratio(num: str, den: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The statistic Σ num / Σ den (broadcast: den may have fewer trailing axes)."""
    def stat(t):
        d = t[den]
        d = d.reshape(d.shape + (1,) * (t[num].ndim - d.ndim))
        with np.errstate(all="ignore"):
            return np.where(d > 0, t[num] / np.where(d > 0, d, 1.0), np.nan)
    return stat


def interval_width_samples(samples: int, half_width: float, margin: float) -> float:
    """Samples at which an interval of `half_width` at `samples` would shrink to `margin` (∝ 1/√n)."""
    if not (margin > 0 and math.isfinite(half_width) and half_width > 0):
        return float("nan")
    return samples * (half_width / margin) ** 2


# -- analyze's per-layer statistics as functions of the per-sample sums (capture.per_sample_sums) ---

def _variance(s1: str, s2: str, n: str):
    """Population variance Σs2/Σn − (Σs1/Σn)² (metrics/variance.py), clamped at 0 as there."""
    def stat(t):
        count = t[n][..., None]
        with np.errstate(all="ignore"):
            mean = t[s1] / count
            return np.maximum(t[s2] / count - mean * mean, 0.0)
    return stat


def derived_sums(per_sample: Sums) -> dict[str, np.ndarray]:
    """`per_sample` with "angular_step": the sums of d(x^ℓ, x^(ℓ+1)), the n = 1 entries of the map
    (resampling those alone, not the whole (L+1)² map, for the per-layer column)."""
    out = dict(per_sample)
    if "angular" in out and "angular_step" not in out:
        out["angular_step"] = np.diagonal(out["angular"], offset=1, axis1=1, axis2=2).copy()
    return out


ANGULAR_MAP = ratio("angular", "angular_tokens")

# layers.csv column -> its statistic, and the per-sample sums it needs
LAYER_STATISTICS = {
    "angular_distance": (ratio("angular_step", "angular_tokens"), ("angular_step", "angular_tokens")),
    "block_influence": (lambda t: 1.0 - ratio("cos", "tokens")(t), ("cos", "tokens")),
    "output_variance": (_variance("out_s1", "out_s2", "out_n"), ("out_s1", "out_s2", "out_n")),
    "update_variance": (_variance("upd_s1", "upd_s2", "out_n"), ("upd_s1", "upd_s2", "out_n")),
    "lens_kl": (ratio("lens_kl", "lens_tokens"), ("lens_kl", "lens_tokens")),
    "lens_top1": (ratio("lens_top1", "lens_tokens"), ("lens_top1", "lens_tokens")),
    "relative_update": (ratio("upd_ratio", "upd_count"), ("upd_ratio", "upd_count")),
    "update_cosine": (ratio("upd_cos", "upd_count"), ("upd_cos", "upd_count")),
}


def variance_growth_interval(per_sample: Sums, num_layers: int, *, level: float = LEVEL,
                             resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """(lo, hi) of the variance growth (metrics/depth.py: least-squares slope of ln output variance against
    ℓ/(L−1)) over samples; NaN without the output sums or when a resample leaves a variance ≤ 0."""
    from .depth import normalised_depth

    needs = ("out_s1", "out_s2", "out_n")
    if not all(n in per_sample for n in needs) or num_layers < 2:
        return float("nan"), float("nan")
    d = normalised_depth(np.arange(num_layers), num_layers)
    dc = d - d.mean()
    var = _variance(*needs)

    def slope(t):
        with np.errstate(all="ignore"):
            y = np.log(np.where(var(t) > 0, var(t), np.nan))
        return ((y - y.mean(-1, keepdims=True)) * dc).sum(-1) / (dc * dc).sum()

    lo, hi = bootstrap_interval({n: per_sample[n] for n in needs}, slope, level=level, resamples=resamples, seed=seed)
    return float(lo), float(hi)


def deep_half_share_interval(ce, tokens, full_ce, full_tokens, *, level: float = LEVEL,
                             resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """(lo, hi) of the deep-half share (metrics/depth.py) over samples, from the sweep's per-sample sums
    (sweep_samples.npz): ce, tokens [L, S] of each single-layer removal ℓ = 0 … L−1, full_ce, full_tokens
    [S] of the full model. Δloss_ℓ is paired (the removal and the full model on the same resampled
    samples), as in sweep.csv's delta_loss_lo/_hi; the same draws as the sweep's with the same seed."""
    from .depth import deep_half_shares

    ce, tokens = np.asarray(ce, dtype=float), np.asarray(tokens, dtype=float)
    if ce.ndim != 2 or ce.shape[0] < 2 or not np.isfinite(ce).all():
        return float("nan"), float("nan")

    def share(t):
        with np.errstate(all="ignore"):
            delta = t["ce"] / t["tokens"] - (t["full_ce"] / t["full_tokens"])[..., None]
        return deep_half_shares(delta)

    sums = {"ce": ce.T, "tokens": tokens.T, "full_ce": np.asarray(full_ce, dtype=float),
            "full_tokens": np.asarray(full_tokens, dtype=float)}
    lo, hi = bootstrap_interval(sums, share, level=level, resamples=resamples, seed=seed)
    return float(lo), float(hi)


def grad_ratio_interval(gram, layers, num_layers: int, *, level: float = LEVEL, resamples: int = RESAMPLES,
                        seed: int = 0) -> tuple[float, float]:
    """(lo, hi) of the gradient ratio (metrics/depth.py) by a percentile bootstrap over batches, not samples.

    `gram` [k, B, B]: ⟨g_b, g_c⟩ of the per-batch gradients over layer `layers[i]`'s parameters
    (metrics/gradients.py BatchGradientGram, samples.npz's grad_gram). A resample draws B batches with
    replacement, counts w; its gradient Σ_b w_b g_b has the norm sqrt(wᵀ M_ℓ w) on layer ℓ, and the ratio
    of the quarters' mean norms is scale-free, so the counts need no normalising. NaN with fewer than two
    batches, or when a layer the ratio reads is missing."""
    from .depth import grad_ratios, quarter

    gram = np.asarray(gram, dtype=float)
    layers = [int(x) for x in layers]
    q = quarter(num_layers)
    needed = {*range(q), *range(num_layers - q, num_layers)}
    if num_layers < 2 or gram.ndim != 3 or gram.shape[1] < 2 or not needed <= set(layers):
        return float("nan"), float("nan")
    counts = resample_counts(gram.shape[1], resamples, seed)
    norms = np.full((resamples, num_layers), np.nan)
    with np.errstate(all="ignore"):
        norms[:, layers] = np.sqrt(np.maximum(np.einsum("rb,kbc,rc->rk", counts, gram, counts), 0.0))
    lo, hi = quantile_interval(grad_ratios(norms), level)
    return float(lo), float(hi)


def layer_intervals(per_sample: Sums, *, level: float = LEVEL, resamples: int = RESAMPLES,
                    seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """column -> (lo, hi) per layer, for every statistic whose sums `per_sample` holds; "angular_map":
    (lo, hi) [L+1, L+1] of the ℓ×n angular-distance matrix. One W for all: the same resamples."""
    if not per_sample:
        return {}
    per_sample = derived_sums(per_sample)
    S = len(next(iter(per_sample.values())))
    counts = resample_counts(S, resamples, seed) if S >= 2 else None
    out = {}
    for column, (stat, needs) in LAYER_STATISTICS.items():
        if all(n in per_sample for n in needs):
            sums = {n: per_sample[n] for n in needs}
            out[column] = bootstrap_interval(sums, stat, level=level, counts=counts)
    if "angular" in per_sample:
        # Only the entries above the diagonal (ℓ < ℓ+n) are reported: half the work of the whole map.
        size = per_sample["angular"].shape[-1]
        upper = np.triu_indices(size, 1)
        sums = {"angular": per_sample["angular"][:, upper[0], upper[1]], "angular_tokens": per_sample["angular_tokens"]}
        lo_hi = bootstrap_interval(sums, ANGULAR_MAP, level=level, counts=counts)
        out["angular_map"] = tuple(_upper_matrix(v, size, upper) for v in lo_hi)
    return out


def _upper_matrix(values: np.ndarray, size: int, upper) -> np.ndarray:
    m = np.full((size, size), np.nan)
    m[upper] = values
    return m


# -- ranking stability --------------------------------------------------------------------------

def kendall_tau(a, b) -> float:
    """Kendall's τ-b of two score vectors (ties counted as in scipy's default); NaN if undefined."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return float("nan")
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    n0 = len(da)
    n1, n2 = (da == 0).sum(), (db == 0).sum()
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def half_split(samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of 0 … samples−1 (a seeded shuffle, split in the middle; odd: one left out)."""
    order = np.random.default_rng(seed).permutation(samples)
    h = samples // 2
    return np.sort(order[:h]), np.sort(order[h:2 * h])


def split_half_tau(sums: Sums, statistic, seed: int = 0) -> float:
    """Kendall τ between `statistic` on one half of the samples and on the other (NaN below 4 samples)."""
    S = len(next(iter(sums.values())))
    if S < 4:
        return float("nan")
    first, second = half_split(S, seed)
    counts = np.zeros((2, S))
    counts[0, first] = 1.0
    counts[1, second] = 1.0
    scores = np.asarray(statistic(resampled_totals(sums, counts)), dtype=float)
    return kendall_tau(scores[0].ravel(), scores[1].ravel())


def chosen_agreement(sums: Sums, statistic, choose: Callable[[np.ndarray], frozenset], *,
                     resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """How stable the set `choose(scores)` is across bootstrap resamples of the samples:
    (share of resamples that choose exactly the set chosen on all samples, mean Jaccard overlap with it).
    NaN with fewer than two samples."""
    S = len(next(iter(sums.values())))
    if S < 2:
        return float("nan"), float("nan")
    full = choose(np.asarray(statistic({k: np.asarray(v, dtype=float).sum(0, keepdims=True)
                                        for k, v in sums.items()}), dtype=float)[0])
    reps = np.asarray(statistic(resampled_totals(sums, resample_counts(S, resamples, seed))), dtype=float)
    same, jac = 0, 0.0
    for r in range(reps.shape[0]):
        pick = choose(reps[r])
        same += pick == full
        union = len(pick | full)
        jac += len(pick & full) / union if union else 1.0
    return same / reps.shape[0], jac / reps.shape[0]


__all__ = ["LAYER_STATISTICS", "deep_half_share_interval", "derived_sums", "grad_ratio_interval", "variance_growth_interval", "LEVEL", "layer_intervals", "METHOD", "RESAMPLES", "bootstrap_interval", "chosen_agreement", "half_split",
           "interval_width_samples", "kendall_tau", "quantile_interval", "ratio", "resample_counts",
           "resampled_totals", "split_half_tau"]
