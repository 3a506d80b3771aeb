"""The sweep's candidates: which sets of layers to remove, including those the rankings pick."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..analysis import analyze
from ..metrics.intervals import ANGULAR_MAP, LAYER_STATISTICS, chosen_agreement, derived_sums, split_half_tau
from ..errors import LayerprobeError
from ..opening import Opening
from ..results import ANALYZE_SECTION, AnalysisResult, read_manifest
from .options import SweepOptions


@dataclass
class Candidate:
    mode: str
    removed: tuple[int, ...]
    first_layer: int | None = None
    block_size: int | None = None
    by: str | None = None
    step: int | None = None
    added_layer: int | None = None


def ranking_sets(by: str, num_layers: int, steps: int, layers: pd.DataFrame | None,
                 angular: pd.DataFrame | None) -> list[tuple[int, ...]]:
    """S_1..S_steps: the layers removed when removing k = 1..steps layers by ranking `by`."""
    L = num_layers
    if by == "last":
        return [tuple(range(L - k, L)) for k in range(1, steps + 1)]
    if layers is None or len(layers) != L:
        raise LayerprobeError(f"--by {by} needs per-layer measures of all {L} layers from analyze")
    if by in ("influence", "angular-layer"):
        col = "block_influence" if by == "influence" else "angular_distance"
        if col not in layers:
            raise LayerprobeError(f"the analyze results hold no {col} (analyze --metrics left it out); re-run analyze")
        values = layers.set_index("layer")[col].astype(float)
        if values.isna().any():
            raise LayerprobeError(f"the analyze results hold no {col} for some layers; re-run analyze")
        order = sorted(range(L), key=lambda i: (values.loc[i], i))
        return [tuple(sorted(order[:k])) for k in range(1, steps + 1)]
    if by == "angular":
        return _angular_blocks(angular, steps)
    raise LayerprobeError(f"unknown ranking {by!r}")


def _angular_blocks(angular: pd.DataFrame | None, steps: int) -> list[tuple[int, ...]]:
    """For k = 1..steps, the block of k layers whose input and output are closest in angle (Gromov et al.)."""
    if angular is None or angular.empty:
        raise LayerprobeError("--by angular needs the angular-distance table (angular.csv) from analyze")
    out = []
    for k in range(1, steps + 1):
        sub = angular[angular["n"] == k]
        if sub.empty:
            raise LayerprobeError(f"the angular-distance table has no blocks of {k} layers; re-run analyze")
        first = int(sub.sort_values(["angular_distance", "layer"]).iloc[0]["layer"])
        out.append(tuple(range(first, first + k)))
    return out


def angular_top_blocks(angular: pd.DataFrame | None, sizes: list[int], k: int) -> dict[int, list[int]]:
    """Per block size n, the first layers of the k blocks of n layers closest in angle (ties: lower layer)."""
    if angular is None or angular.empty:
        raise LayerprobeError("--block-top needs the angular-distance table (angular.csv) from analyze")
    out = {}
    for n in sizes:
        sub = angular[angular["n"] == n].dropna(subset=["angular_distance"])
        if sub.empty:
            raise LayerprobeError(f"the angular-distance table has no blocks of {n} layers; re-run analyze")
        out[n] = [int(x) for x in sub.sort_values(["angular_distance", "layer"])["layer"].iloc[:k]]
    return out


def _analysis_matches(section: dict, opening: Opening) -> bool:
    """Whether saved analyze results were measured on the very tokens this sweep uses."""
    blocks = opening.blocks
    return (section.get("model_name") == opening.loaded.name and str(section.get("data")) == opening.data
            and section.get("seq_len") == int(blocks.shape[1]) and section.get("samples") == int(blocks.shape[0])
            and section.get("seed") == opening.seed and section.get("text_column") == opening.text_column)


def _saved_analysis(folder: Path, opening: Opening) -> AnalysisResult | None:
    manifest = read_manifest(folder) if folder.is_dir() else {}
    section = manifest.get(ANALYZE_SECTION)
    if (isinstance(section, dict) and (folder / "layers.csv").is_file() and _analysis_matches(section, opening)):
        result = AnalysisResult.load(folder)
        if len(result.layers) == opening.anatomy.num_layers:
            return result
    return None


def get_analysis(analysis, opening: Opening, *, samples, batch_size: int, progress: bool) -> tuple[AnalysisResult, str]:
    """The analyze results the rankings read, and where they came from.

    An AnalysisResult passed in is used as is; a folder is used when it was measured on these
    tokens; otherwise analyze runs here, without gradients, on the same tokens.
    """
    L = opening.anatomy.num_layers
    if isinstance(analysis, AnalysisResult):
        if len(analysis.layers) != L:
            raise LayerprobeError(f"the analyze results given describe {len(analysis.layers)} layers, this model has {L}")
        return analysis, "analyze result passed in"
    if analysis is not None:
        folder = Path(analysis)
        result = _saved_analysis(folder, opening)
        if result is not None:
            return result, f"{folder / 'layers.csv'} (analyze on the same tokens)"
    result = analyze(opening.loaded, data=opening.data, seq_len=opening.seq_len, samples=samples,
                     batch_size=batch_size, seed=opening.seed, grad=False, text_column=opening.text_column,
                     layers_path=opening.anatomy.layers_path, device_map=opening.device_map, progress=progress)
    return result, "analyze --no-grad on the same tokens"


def ranked_sets(opts: SweepOptions, opening: Opening, analysis, *, samples, batch_size: int,
                progress: bool) -> tuple[dict[str, list[tuple[int, ...]]], str | None, dict[int, list[int]] | None, dict]:
    """Per ranking in `opts.bys`, the sets S_1..S_steps; where the analyze results came from; with
    `opts.block_top`, the first layers of the blocks block mode measures, per size; how stable each ranking
    is over the samples (`ranking_stability`)."""
    L = opening.anatomy.num_layers
    result, source = None, None
    if any(b != "last" for b in opts.bys) or opts.block_top is not None:
        result, source = get_analysis(analysis, opening, samples=samples, batch_size=batch_size, progress=progress)
    sets = {b: ranking_sets(b, L, opts.n_steps, result.layers if result is not None else None,
                            result.angular if result is not None else None) for b in opts.bys}
    top = (angular_top_blocks(result.angular, opts.block_sizes, opts.block_top)
           if opts.block_top is not None else None)
    stability = ranking_stability(opts.bys, result.per_sample if result is not None else {}, opts.n_steps,
                                  seed=opening.seed or 0)
    return sets, source, top, stability


def _ranking_score(by: str, k: int):
    """(statistic over the per-sample sums, the sums it needs, choose: scores -> the k layers removed)
    for ranking `by`: the same order `ranking_sets` takes, on resampled sums."""
    if by in ("influence", "angular-layer"):
        stat, needs = LAYER_STATISTICS["block_influence" if by == "influence" else "angular_distance"]
        return stat, needs, lambda v: frozenset(int(i) for i in np.lexsort((np.arange(len(v)), v))[:k])

    def block_starts(t):  # d(x^ℓ, x^(ℓ+k)) for every start ℓ
        return np.diagonal(ANGULAR_MAP(t), offset=k, axis1=-2, axis2=-1)

    def choose(v):
        first = int(np.lexsort((np.arange(len(v)), v))[0])
        return frozenset(range(first, first + k))

    return block_starts, ("angular", "angular_tokens"), choose


def ranking_stability(bys, per_sample: dict, steps: int, seed: int = 0) -> dict[str, dict]:
    """Per ranking (not "last", which reads no data): Kendall τ between its scores on two disjoint halves
    of the samples, and across bootstrap resamples how often it picks the very k = `steps` layers it picks
    on all samples (share identical, mean Jaccard overlap). {} without per-sample sums."""
    out = {}
    per_sample = derived_sums(per_sample)
    for by in bys:
        if by == "last" or not per_sample:
            continue
        stat, needs, choose = _ranking_score(by, steps)
        if not all(n in per_sample for n in needs):
            continue
        sums = {n: per_sample[n] for n in needs}
        same, jaccard = chosen_agreement(sums, stat, choose, seed=seed)
        out[by] = {"k": steps, "split_half_tau": split_half_tau(sums, stat, seed=seed),
                   "chosen_identical": same, "chosen_jaccard": jaccard}
    return out


def build_candidates(opts: SweepOptions, num_layers: int, ranked: dict[str, list[tuple[int, ...]]],
                     top_blocks: dict[int, list[int]] | None = None) -> list[Candidate]:
    """Every candidate measured in the one pass over the data (greedy ones are found later, step by step).
    `top_blocks`: per block size, the only first layers block mode measures (`--block-top`)."""
    L = num_layers
    out: list[Candidate] = []
    if "layer" in opts.modes:
        out += [Candidate("layer", (l,), first_layer=l, block_size=1) for l in range(L)]
    if "block" in opts.modes:
        out += [Candidate("block", tuple(range(l, l + n)), first_layer=l, block_size=n)
                for n in opts.block_sizes
                for l in (range(L - n + 1) if top_blocks is None else sorted(top_blocks[n]))]
    if opts.removal is not None:
        out.append(Candidate("remove", opts.removal, first_layer=opts.removal[0]))
    for b in opts.bys:
        out += [Candidate("ranked", s, by=b, step=k, first_layer=s[0]) for k, s in enumerate(ranked[b], 1)]
    return out
