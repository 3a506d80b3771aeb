"""`prune_sweep`: remove layers (one, a block, greedily, or by a ranking) and measure the damage.

Every candidate is measured against the full model on the same tokens: loss, Δloss, perplexity,
KL(full ‖ pruned) of the next-token distributions and top-1 agreement. The work is organised
around prefix caching (see `prefix.py`): per batch, one full pass stores each layer's input and
every candidate restarts from the input of its first removed layer. Greedy steps re-run the
current pruned model once per batch and sweep its remaining layers the same way.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch

from ..anatomy import find_anatomy
from ..data import load_token_blocks
from ..errors import LayerprobeError
from ..loading import LoadedModel, context_length, load_model
from ..progress import make_progress, status
from ..results import check_format, package_versions, read_manifest
from .measures import DEFAULT_CHUNK_ELEMENTS, Sums, chunk_rows_for, next_token_targets, predicted_rows, score
from .prefix import PrefixRunner
from .surgery import check_removal, format_removed

MODES = ("layer", "block", "greedy", "ranked")
RANKINGS = ("angular", "influence", "last", "angular-layer")
RANKING_HELP = {
    "angular": "Gromov et al.: for k layers, the contiguous block [ℓ, ℓ+k) whose input and output are closest in angle",
    "influence": "ShortGPT: the k layers with the lowest Block Influence",
    "last": "the last k layers",
    "angular-layer": "the k layers with the lowest single-layer angular distance d(x^ℓ, x^(ℓ+1))",
}
COLUMNS = ["mode", "removed", "n_removed", "first_layer", "block_size", "by", "step", "added_layer",
           "loss", "delta_loss", "perplexity", "kl", "top1_agreement", "tokens"]
SECTION = "prune-sweep"
GROUP_BYTES = 512 << 20  # final hidden states of the candidates scored together, per batch


# -- options ----------------------------------------------------------------------------------
def _parse_choices(value: str | Iterable[str], allowed, option: str, hint: str) -> list[str]:
    """Comma-separated (or iterable) choices, "all" for every one; returned in `allowed`'s order."""
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise LayerprobeError(f"unknown {option} {', '.join(bad) or repr(value)}; use {hint} "
                              "(several separated by commas) or all")
    return [v for v in allowed if v in items]


def parse_modes(mode: str | Iterable[str] | None, remove=None) -> list[str]:
    if mode is None:
        return [] if remove else ["layer"]
    return _parse_choices(mode, MODES, "--mode", "layer, block, greedy, ranked")


def parse_by(by: str | Iterable[str] | None) -> list[str]:
    if by is None:
        return ["angular", "influence", "last"]
    return _parse_choices(by, RANKINGS, "--by", "angular, influence, last, angular-layer")


def parse_block_sizes(block_size, num_layers: int) -> list[int]:
    """None or 'all' -> every n in 1..L-1; an int, '3', '2,4' or '2-5' -> those."""
    if block_size is None or (isinstance(block_size, str) and block_size.strip().lower() in ("all", "")):
        sizes = list(range(1, num_layers))
    elif isinstance(block_size, int):
        sizes = [block_size]
    elif isinstance(block_size, str):
        from ..cli.common import parse_int_list

        sizes = parse_int_list(block_size, "--block-size")
    else:
        sizes = [int(b) for b in block_size]
    if not sizes:
        raise LayerprobeError("--block-size names no size; give n like 3, a list like 2,4, or all")
    for n in sizes:
        if n < 1:
            raise LayerprobeError(f"--block-size must be at least 1 (got {n})")
        if n >= num_layers:
            raise LayerprobeError(f"--block-size {n} is larger than the model allows: a block of {n} layers leaves "
                                  f"{num_layers - n} of {num_layers}; use at most {num_layers - 1}")
    return sorted(set(sizes))


def resolve_steps(steps: int | None, num_layers: int) -> int:
    if steps is None:
        return max(1, num_layers // 2)
    if steps < 1:
        raise LayerprobeError(f"--steps must be at least 1 (got {steps})")
    if steps >= num_layers:
        raise LayerprobeError(f"--steps {steps} is beyond the depth: this model has {num_layers} layers, so at most "
                              f"{num_layers - 1} can be removed")
    return steps


# -- results ----------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What `prune_sweep` measured: one row per candidate (the full model's row says removed = none)."""

    table: pd.DataFrame
    summary: dict
    manifest: dict = field(default_factory=dict)

    def rows(self, mode: str) -> pd.DataFrame:
        return self.table[self.table["mode"] == mode].reset_index(drop=True)

    def save(self, folder: str | Path, report: bool = True) -> Path:
        from ..io import ensure_writable_dir, write_csv
        from ..results import update_manifest

        folder = ensure_writable_dir(folder)
        write_csv(folder / "sweep.csv", self.table)
        section = dict(self.manifest, summary=self.summary)
        if report:
            from ..report.pruning import write_sweep_figures

            section["figures"] = write_sweep_figures(self, folder)
        update_manifest(folder, SECTION, section)
        if report:
            from ..report.html import write_model_index

            write_model_index(folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SweepResult":
        folder = Path(folder)
        manifest = read_manifest(folder)
        if SECTION not in manifest or not (folder / "sweep.csv").is_file():
            raise LayerprobeError(f"{folder} holds no prune-sweep results (no sweep.csv / manifest.json)")
        check_format(manifest, folder)
        section = dict(manifest[SECTION])
        summary = section.pop("summary", {})
        section.pop("figures", None)
        table = pd.read_csv(folder / "sweep.csv", dtype={"removed": str})
        return cls(table=table, summary=summary, manifest=section)


# -- rankings ---------------------------------------------------------------------------------
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
        values = layers.set_index("layer")[col].astype(float)
        if values.isna().any():
            raise LayerprobeError(f"the analyze results hold no {col} for some layers; re-run analyze")
        order = sorted(range(L), key=lambda i: (values.loc[i], i))
        return [tuple(sorted(order[:k])) for k in range(1, steps + 1)]
    if by == "angular":
        if angular is None or angular.empty:
            raise LayerprobeError("--by angular needs the angular-distance table (angular.csv) from analyze")
        out = []
        for k in range(1, steps + 1):
            sub = angular[angular["n"] == k]
            if sub.empty:
                raise LayerprobeError(f"the angular-distance table has no blocks of {k} layers; re-run analyze")
            best = sub.sort_values(["angular_distance", "layer"]).iloc[0]
            first = int(best["layer"])
            out.append(tuple(range(first, first + k)))
        return out
    raise LayerprobeError(f"unknown ranking {by!r}")


def _analysis_matches(section: dict, name: str, data: str, blocks: torch.Tensor, seed: int,
                      text_column: str | None) -> bool:
    return (section.get("model_name") == name and str(section.get("data")) == str(data)
            and section.get("seq_len") == int(blocks.shape[1]) and section.get("samples") == int(blocks.shape[0])
            and section.get("seed") == seed and section.get("text_column") == text_column)


def _get_analysis(analysis, loaded: LoadedModel, L: int, blocks, *, data, seq_len, samples, batch_size, seed,
                  text_column, layers_path, device_map, progress) -> tuple[Any, str]:
    from ..results import AnalysisResult

    if isinstance(analysis, AnalysisResult):
        if len(analysis.layers) != L:
            raise LayerprobeError(f"the analyze results given describe {len(analysis.layers)} layers, this model has {L}")
        return analysis, "analyze result passed in"
    if analysis is not None:
        folder = Path(analysis)
        manifest = read_manifest(folder) if folder.is_dir() else {}
        section = manifest.get("analyze")
        if (isinstance(section, dict) and (folder / "layers.csv").is_file()
                and _analysis_matches(section, loaded.name, data, blocks, seed, text_column)):
            result = AnalysisResult.load(folder)
            if len(result.layers) == L:
                return result, f"{folder / 'layers.csv'} (analyze on the same tokens)"
    from ..analysis import analyze

    result = analyze(loaded, data=data, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                     grad=False, text_column=text_column, layers_path=layers_path, device_map=device_map,
                     progress=progress)
    return result, "analyze --no-grad on the same tokens"


# -- candidates -------------------------------------------------------------------------------
@dataclass
class Candidate:
    mode: str
    removed: tuple[int, ...]
    first_layer: int | None = None
    block_size: int | None = None
    by: str | None = None
    step: int | None = None
    added_layer: int | None = None


def _row(c: Candidate, sums: Sums, full_loss: float) -> dict:
    loss = sums.loss
    return {
        "mode": c.mode, "removed": format_removed(c.removed), "n_removed": len(c.removed),
        "first_layer": c.first_layer, "block_size": c.block_size, "by": c.by, "step": c.step,
        "added_layer": c.added_layer, "loss": loss, "delta_loss": loss - full_loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"), "kl": sums.mean_kl,
        "top1_agreement": sums.top1_agreement, "tokens": sums.tokens,
    }


class _Scorer:
    """Evaluates sets of removed layers on one batch from a base model's layer inputs."""

    def __init__(self, runner: PrefixRunner, chunk_rows: int, group_size: int, on_done=None):
        self.runner = runner
        self.chunk_rows = chunk_rows
        self.group_size = max(1, group_size)
        self.on_done = on_done
        self.naive_layer_calls = 0  # what one full forward per candidate would have run

    def evaluate(self, base_inputs, base_removed: frozenset, calls, sets: list[frozenset], full_rows, targets,
                 full_sums: Sums | None = None) -> list[Sums]:
        runner = self.runner
        out: list[Sums] = []
        for g in range(0, len(sets), self.group_size):
            rows = []
            for s in sets[g:g + self.group_size]:
                start = min(s - base_removed)
                y = runner.run(base_inputs[start], start, s, calls)
                self.naive_layer_calls += runner.num_layers - len(s)
                rows.append(runner.final_hidden(predicted_rows(y)))
                if self.on_done:
                    self.on_done()
            out.extend(score(runner.logits, full_rows, rows, targets, self.chunk_rows,
                             full_sums if g == 0 else None))
            del rows
        if not sets and full_sums is not None:
            score(runner.logits, full_rows, [], targets, self.chunk_rows, full_sums)
        return out


# -- the sweep --------------------------------------------------------------------------------
def prune_sweep(
    model: str | LoadedModel,
    *,
    mode: str | Iterable[str] | None = None,
    block_size: int | str | Iterable[int] | None = None,
    steps: int | None = None,
    by: str | Iterable[str] | None = None,
    remove: Iterable[int] | None = None,
    data: str = "builtin",
    seq_len: int = 256,
    samples: int | None = 32,
    batch_size: int = 4,
    seed: int = 0,
    text_column: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    analysis=None,
    lm_eval_tasks: str | Iterable[str] | None = None,
    lm_eval_limit: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = True,
) -> SweepResult:
    """Remove layers of a causal LM and measure each removal against the full model on the same tokens.

    mode: "layer" (each single layer; the default), "block" (each contiguous block of
    `block_size` layers; `block_size` None or "all" = every size), "greedy" (`steps` times, remove
    the layer whose removal hurts the loss least, re-measuring after each removal), "ranked"
    (remove the k = 1..`steps` least important layers by each ranking in `by`: angular,
    influence, last, angular-layer); several separated by commas, or "all". `remove` adds one
    candidate of your own (mode "remove"); with `remove` and no `mode`, only it is measured.
    `analysis`: an AnalysisResult or a folder with analyze results for the rankings; when it does
    not match these tokens, analyze runs (without gradients) on them.
    Returns a SweepResult: `.table` has one row per candidate (columns mode, removed, loss,
    delta_loss, perplexity, kl, top1_agreement, ...), the full model's row first.
    """
    started = time.perf_counter()
    remove_list = list(remove) if remove is not None else []
    if remove is not None and not remove_list:
        raise LayerprobeError("--remove names no layer; give 0-based layer indices like 20,21,22")
    modes = parse_modes(mode, remove_list)
    bys = parse_by(by) if "ranked" in modes else []
    if batch_size < 1:
        raise LayerprobeError(f"--batch-size must be at least 1 (got {batch_size})")
    if steps is not None and steps < 1:
        raise LayerprobeError(f"--steps must be at least 1 (got {steps})")
    tasks = _parse_tasks(lm_eval_tasks)
    if tasks:
        from .lmeval import check_lm_eval

        check_lm_eval()

    if isinstance(model, LoadedModel):
        loaded = model
    else:
        with status(f"loading {model}", progress):
            loaded = load_model(str(model), revision=revision, dtype=dtype, device=device, device_map=device_map,
                                trust_remote_code=trust_remote_code)
    net = loaded.model
    net.eval()
    anatomy = find_anatomy(net, layers_path)
    L = anatomy.num_layers
    if L < 2:
        raise LayerprobeError(f"this model has {L} layer; removing any would remove every layer")
    removal = check_removal(remove_list, L) if remove_list else None
    block_sizes = parse_block_sizes(block_size, L) if "block" in modes else []
    n_steps = resolve_steps(steps, L) if ("greedy" in modes or "ranked" in modes) else None

    ctx = context_length(net.config)
    if ctx is not None and seq_len > ctx and not str(data).endswith(".npy"):
        raise LayerprobeError(f"--seq-len {seq_len} is beyond this model's context of {ctx} tokens; lower it")
    vocab = int(getattr(net.config, "vocab_size", 0) or anatomy.head.weight.shape[0])
    with status("preparing data", progress):
        blocks = load_token_blocks(data, loaded.tokenizer, seq_len=seq_len, samples=samples, seed=seed,
                                   text_column=text_column, vocab_size=vocab)
    if ctx is not None and blocks.shape[1] > ctx:
        raise LayerprobeError(f"the data's {blocks.shape[1]} tokens per sample are beyond this model's context of {ctx}")

    # Rankings first: analyze (if it has to run) shows its own progress.
    ranking_source = None
    ranked_sets: dict[str, list[tuple[int, ...]]] = {}
    if bys:
        needs_analysis = any(b != "last" for b in bys)
        result = None
        if needs_analysis:
            result, ranking_source = _get_analysis(
                analysis, loaded, L, blocks, data=data, seq_len=seq_len, samples=samples, batch_size=batch_size,
                seed=seed, text_column=text_column, layers_path=layers_path, device_map=device_map,
                progress=progress)
        for b in bys:
            ranked_sets[b] = ranking_sets(b, L, n_steps, result.layers if result is not None else None,
                                          result.angular if result is not None else None)

    # The candidates measured in the one pass over the data.
    candidates: list[Candidate] = []
    if "layer" in modes:
        candidates += [Candidate("layer", (l,), first_layer=l, block_size=1) for l in range(L)]
    if "block" in modes:
        candidates += [Candidate("block", tuple(range(l, l + n)), first_layer=l, block_size=n)
                       for n in block_sizes for l in range(L - n + 1)]
    if removal is not None:
        candidates.append(Candidate("remove", removal, first_layer=removal[0]))
    for b in bys:
        candidates += [Candidate("ranked", s, by=b, step=k, first_layer=s[0]) for k, s in enumerate(ranked_sets[b], 1)]
    unique_sets = list(dict.fromkeys(frozenset(c.removed) for c in candidates))

    runner = PrefixRunner(net, anatomy)
    in_dev = anatomy.embed.weight.device if anatomy.embed is not None else next(net.parameters()).device
    chunk_rows = chunk_rows_for(vocab, chunk_elements)
    width = int(anatomy.head.weight.shape[1]) if hasattr(anatomy.head, "weight") else int(net.config.hidden_size)
    rows_per_batch = min(batch_size, blocks.shape[0]) * (blocks.shape[1] - 1)
    elem = torch.finfo(loaded.dtype).bits // 8 if loaded.dtype.is_floating_point else 4
    group_size = max(L + 1, GROUP_BYTES // max(1, rows_per_batch * width * elem))
    batches = list(torch.split(blocks, batch_size))
    greedy = "greedy" in modes

    full = Sums()
    set_sums: dict[frozenset, Sums] = defaultdict(Sums)
    stored: list[tuple] = []  # per batch, for greedy: (targets, first layer input, calls, full model's rows)
    sweep_started = time.perf_counter()
    with make_progress(progress) as bar:
        task = bar.add_task("removing layers", total=len(batches) * max(1, len(unique_sets)), info="")
        scorer = _Scorer(runner, chunk_rows, group_size, on_done=lambda: bar.update(task, advance=1))
        for batch in batches:
            ids = batch.to(in_dev)
            scorer.naive_layer_calls += L  # the full model's own pass
            with torch.inference_mode():
                cap = runner.capture(ids)
                targets = next_token_targets(ids)
                full_rows = runner.final_hidden(predicted_rows(cap.output))
                sums = scorer.evaluate(cap.inputs, frozenset(), cap.calls, unique_sets, full_rows, targets,
                                       full_sums=full)
            for s, part in zip(unique_sets, sums):
                set_sums[s].add(part)
            if greedy:
                stored.append((targets, cap.inputs[0], cap.calls, full_rows))
            del cap
            if not unique_sets:
                bar.update(task, advance=1)
            bar.update(task, info=f"full loss {full.loss:.3f}")

        full_loss = full.loss
        rows = [{"mode": "full", "removed": "none", "n_removed": 0, "first_layer": None, "block_size": None,
                 "by": None, "step": None, "added_layer": None, "loss": full_loss, "delta_loss": 0.0,
                 "perplexity": math.exp(full_loss) if full_loss < 700 else float("inf"), "kl": 0.0,
                 "top1_agreement": 1.0, "tokens": full.tokens}]
        rows += [_row(c, set_sums[frozenset(c.removed)], full_loss) for c in candidates]

        if greedy:
            rows += _greedy(runner, stored, L, n_steps, scorer, set_sums, full_loss, bar)
    sweep_s = time.perf_counter() - sweep_started

    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("first_layer", "block_size", "step", "added_layer"):
        table[col] = table[col].astype("Int64")
    if tasks:
        from .lmeval import add_lm_eval_columns

        table = add_lm_eval_columns(table, net, loaded.tokenizer, tasks, lm_eval_limit, batch_size, layers_path,
                                    progress)

    n_tokens = full.tokens
    summary = _summary(table, loaded, anatomy, L, n_tokens)
    summary.update({
        "layer_calls": runner.layer_calls + runner.capture_passes * L,
        "naive_layer_calls": scorer.naive_layer_calls,
        "sweep_time_s": round(sweep_s, 3),
    })
    manifest = {
        "model": loaded.spec, "model_name": loaded.name, "source": loaded.source, "revision": loaded.revision,
        "dtype": str(loaded.dtype).replace("torch.", ""), "device": str(loaded.device), "device_map": device_map,
        "data": str(data), "text_column": text_column, "seq_len": int(blocks.shape[1]),
        "samples": int(blocks.shape[0]), "batch_size": batch_size, "seed": seed,
        "modes": modes, "block_sizes": block_sizes or None, "steps": n_steps, "by": bys or None,
        "rankings": {b: RANKING_HELP[b] for b in bys} or None, "ranking_source": ranking_source,
        "remove": list(removal) if removal else None, "chunk_rows": chunk_rows,
        "lm_eval_tasks": tasks or None, "lm_eval_limit": lm_eval_limit if tasks else None,
        "layers_path": anatomy.layers_path, "versions": package_versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return SweepResult(table=table, summary=summary, manifest=manifest)


def _greedy(runner: PrefixRunner, stored, L: int, steps: int, scorer: _Scorer, known: dict, full_loss: float,
            bar) -> list[dict]:
    """SLEB-style: remove the least harmful layer, re-measure every remaining one, repeat."""
    removed: frozenset = frozenset()
    rows = []
    reuse_first = all(frozenset({j}) in known for j in range(L))
    total = sum((L - t + 1) for t in range(1 if not reuse_first else 2, steps + 1)) * len(stored)
    task = bar.add_task("greedy removal", total=max(total, 1), info="")
    scorer.on_done = lambda: bar.update(task, advance=1)
    for t in range(1, steps + 1):
        remaining = [j for j in range(L) if j not in removed]
        sets = [removed | {j} for j in remaining]
        if t == 1 and reuse_first:
            step_sums = {s: known[s] for s in sets}
        else:
            step_sums = {s: Sums() for s in sets}
            for targets, first_input, calls, full_rows in stored:
                with torch.inference_mode():
                    inputs: dict[int, torch.Tensor] = {}
                    runner.run(first_input, 0, removed, calls, record=inputs)
                    parts = scorer.evaluate(inputs, removed, calls, sets, full_rows, targets)
                for s, part in zip(sets, parts):
                    step_sums[s].add(part)
                del inputs
        best = min(remaining, key=lambda j: (step_sums[removed | {j}].loss, j))
        removed = removed | {best}
        c = Candidate("greedy", tuple(sorted(removed)), step=t, added_layer=best)
        rows.append(_row(c, step_sums[removed], full_loss))
        bar.update(task, info=f"step {t}: removed {format_removed(removed)}")
    return rows


def _parse_tasks(tasks) -> list[str]:
    if tasks is None:
        return []
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    return items


def _summary(table: pd.DataFrame, loaded: LoadedModel, anatomy, L: int, n_tokens: int) -> dict:
    full = table.iloc[0]
    s: dict[str, Any] = {
        "model": loaded.name, "model_type": anatomy.model_type, "num_layers": L,
        "tokens_scored": n_tokens, "full_loss": float(full["loss"]), "full_perplexity": float(full["perplexity"]),
    }
    layer = table[table["mode"] == "layer"]
    if len(layer):
        best, worst = layer.loc[layer["delta_loss"].idxmin()], layer.loc[layer["delta_loss"].idxmax()]
        s.update({"least_harmful_layer": int(best["first_layer"]), "least_harmful_delta_loss": float(best["delta_loss"]),
                  "most_harmful_layer": int(worst["first_layer"]), "most_harmful_delta_loss": float(worst["delta_loss"]),
                  "layers_with_delta_loss_below_0.01": int((layer["delta_loss"] < 0.01).sum())})
    block = table[table["mode"] == "block"]
    if len(block):
        n = int(block["block_size"].max())
        b = block[block["block_size"] == n]
        best = b.loc[b["delta_loss"].idxmin()]
        s.update({f"best_block_of_{n}": best["removed"], f"best_block_of_{n}_delta_loss": float(best["delta_loss"])})
    greedy = table[table["mode"] == "greedy"]
    if len(greedy):
        last = greedy.iloc[-1]
        s.update({"greedy_removed": last["removed"], "greedy_perplexity": float(last["perplexity"])})
    ranked = table[table["mode"] == "ranked"]
    for by, g in ranked.groupby("by", sort=False):
        last = g.iloc[-1]
        s[f"ranked_{by}_perplexity_at_{int(last['n_removed'])}"] = float(last["perplexity"])
    rem = table[table["mode"] == "remove"]
    if len(rem):
        r = rem.iloc[0]
        s.update({"removed": r["removed"], "removed_delta_loss": float(r["delta_loss"]), "removed_kl": float(r["kl"])})
    return s
