"""`prune_sweep`: remove layers (one, a block, greedily, or by a ranking) and measure the damage.

Every candidate is measured against the full model on the same tokens: loss, Δloss, perplexity,
KL(full ‖ pruned) of the next-token distributions and top-1 agreement. The stages, in order:
options (`options.py`), the shared opening (`..opening`), candidates (`candidates.py`), the
prefix-cached measurement (`measurement.py`), the table and its summary (`table.py`).
"""

from __future__ import annotations

import time
from typing import Iterable

import torch

from ..defaults import check_measure_options
from ..errors import LayerprobeError
from ..distributed import DistEnv, all_reduce_sum, check_processes, current, split_manifest
from ..analysis import interval_manifest
from ..loading import LoadedModel
from ..metrics.intervals import RESAMPLES, resample_counts
from ..opening import Opening, open_model
from ..progress import make_progress, note
from ..results import SWEEP_SECTION, SweepResult
from .candidates import Candidate, build_candidates, ranked_sets, ranking_sets
from .lmeval import add_lm_eval_columns, check_lm_eval
from .measurement import Scorer, greedy, group_size_for, measure_sets, singles
from .measures import chunk_rows_for
from .parallel import Share
from .options import MODES, RANKING_HELP, RANKINGS, SweepOptions, parse_block_sizes, parse_by, parse_modes, resolve_steps
from .plan import Plan, check_layer_call_limit, estimate_seconds
from .prefix import PrefixRunner
from .table import COLUMNS, candidate_row, full_row, row_sample_sums, summarize, sweep_table

SECTION = SWEEP_SECTION

__all__ = ["prune_sweep", "SweepResult", "ranking_sets", "parse_modes", "parse_by", "parse_block_sizes",
           "resolve_steps", "MODES", "RANKINGS", "RANKING_HELP", "COLUMNS", "SECTION"]


def _measure(opening: Opening, opts: SweepOptions, candidates: list[Candidate], *, batch_size: int,
             chunk_rows: int, plan: Plan, say, progress: bool,
             env: DistEnv = DistEnv()) -> tuple[list[dict], list, Scorer, int, float]:
    """Rows for the full model, every candidate and the greedy steps; each row's sums; the scorer (its
    layer-call counts); the tokens scored; the seconds spent. Under torchrun (`env`) this process measures its
    share of the samples (parallel.py) and the rows (and their sums) are every process's."""
    net, anatomy = opening.model, opening.anatomy
    share = Share.of(env, int(opening.blocks.shape[0]))
    blocks = opening.blocks[share.start:share.stop]
    L = anatomy.num_layers
    unique_sets = list(dict.fromkeys(frozenset(c.removed) for c in candidates))
    runner = PrefixRunner(net, anatomy)
    batches = list(torch.split(blocks, batch_size))
    search_apart = opts.greedy and opts.search_samples is not None and opts.search_samples < share.total
    started = time.perf_counter()

    def estimate(seconds: float, calls: int) -> None:
        plan.estimated_s = estimate_seconds(plan, seconds, calls) / env.world_size
        say(f"first batch: {seconds:.1f} s for {calls:,} layer calls; the sweep should take about "
            f"{_duration(plan.estimated_s)}")

    with make_progress(progress) as bar:
        scorer = Scorer(runner, chunk_rows, group_size_for(runner, blocks, batch_size, opening.loaded.dtype),
                        rows_per_sample=int(blocks.shape[1]) - 1)  # per-sample sums: the intervals
        found = []
        if search_apart:  # greedy searches on the first samples; the sets it finds join the sweep's pass
            searching = Share.of(env, opts.search_samples)
            search = list(torch.split(opening.blocks[searching.start:searching.stop], batch_size))
            task = bar.add_task("greedy search: each layer", total=len(search) * L, info="")
            scorer.on_done = lambda: bar.update(task, advance=1)
            first = searching.measured(measure_sets(scorer, search, singles(L), bar=bar, task=task,
                                                    on_first_batch=estimate))
            found = greedy(scorer, first.by_set, search, opts.n_steps, bar, combine=searching.combine)
            unique_sets += [s for s, _, _ in found if s not in unique_sets]
        elif opts.greedy:  # greedy's first step is the layer sweep: measured in the same pass
            unique_sets += [s for s in singles(L) if s not in unique_sets]
        task = bar.add_task("removing layers", total=len(batches) * max(1, len(unique_sets)), info="")
        scorer.on_done = lambda: bar.update(task, advance=1)
        measured = share.measured(measure_sets(scorer, batches, unique_sets, bar=bar, task=task,
                                               on_first_batch=None if search_apart else estimate))
        full, full_loss = measured.full, measured.full.loss
        # One set of resamples for every candidate: their intervals come from the same draws of samples.
        counts = resample_counts(share.total, RESAMPLES, opening.seed) if share.total >= 2 else None
        rows = [full_row(full, counts)]
        row_sums = [full] + [measured.by_set[frozenset(c.removed)] for c in candidates]  # sweep_samples.npz
        rows += [candidate_row(c, sums, full_loss, full, counts) for c, sums in zip(candidates, row_sums[1:])]
        if opts.greedy and not search_apart:
            found = greedy(scorer, measured.by_set, batches, opts.n_steps, bar, combine=share.combine)
        for t, (removed, added, sums) in enumerate(found, 1):
            c = Candidate("greedy", tuple(sorted(removed)), step=t, added_layer=added)
            # a separate search's sums are of its samples only: the row reports the sweep's, on all of them
            row_sums.append(measured.by_set[removed] if search_apart else sums)
            rows.append(candidate_row(c, row_sums[-1], full_loss, full, counts))
    if env.distributed:  # the summary's layer calls: every process's
        counts = [runner.layer_calls, runner.capture_passes, scorer.naive_layer_calls]
        runner.layer_calls, runner.capture_passes, scorer.naive_layer_calls = (
            int(v) for v in all_reduce_sum(env, torch.tensor(counts, dtype=torch.float64)).tolist())
    return rows, row_sums, scorer, measured.full.tokens, time.perf_counter() - started


def _head_device(anatomy) -> torch.device:
    weight = getattr(anatomy.head, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    attn_implementation: str | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    analysis=None,
    lm_eval_tasks: str | Iterable[str] | None = None,
    lm_eval_limit: int | None = None,
    chunk_elements: int | None = None,
    block_top: int | None = None,
    search_samples: int | None = None,
    yes: bool = False,
    max_layer_calls: int | None = None,
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
    `block_top` k: block mode measures only the k blocks of each size closest in angle by analyze's
    angular map (O(k·L²) layer calls instead of O(L³)). `search_samples`: greedy chooses its layers on
    the first that many samples, then its sets are measured on all of them.
    Cost: the planned layer calls are printed before the sweep (`pruning.plan`), the estimated time after
    the first batch; above `max_layer_calls` (default `plan.LAYER_CALLS_NEEDING_YES`) the sweep is
    refused unless `yes`.
    Returns a SweepResult: `.table` has one row per candidate (columns mode, removed, loss,
    delta_loss, perplexity, kl, top1_agreement, ...), the full model's row first. `result.save(folder)`
    writes the data; `layerprobe.report.render_sweep(result, folder)` draws the figures and index.html.
    """
    env = current()
    progress = progress and env.is_main
    check_processes(samples, env.world_size, device_map)
    if env.distributed and lm_eval_tasks:
        raise LayerprobeError("--lm-eval-tasks runs in one process: leave it out under torchrun, or run without it")
    opts = SweepOptions.parse(mode=mode, block_size=block_size, steps=steps, by=by, remove=remove,
                              batch_size=batch_size, lm_eval_tasks=lm_eval_tasks, block_top=block_top,
                              search_samples=search_samples)
    check_layer_call_limit(max_layer_calls)
    if opts.tasks:
        check_lm_eval()
    check_measure_options(data=data, seq_len=seq_len, samples=samples, batch_size=batch_size, dtype=dtype,
                          device=device, device_map=device_map, max_memory=max_memory,
                          attn_implementation=attn_implementation)  # before the model loads
    opening = open_model(model, revision=revision, dtype=dtype, device=device, device_map=device_map,
                         max_memory=max_memory, attn_implementation=attn_implementation,
                         offload_folder=offload_folder,
                         trust_remote_code=trust_remote_code, layers_path=layers_path, progress=progress)
    opening.model.eval()
    anatomy = opening.anatomy
    opts.for_depth(anatomy.num_layers)
    opening.load_blocks(data, seq_len=seq_len, samples=samples, seed=seed, text_column=text_column,
                        progress=progress)
    n_samples = int(opening.blocks.shape[0])
    check_processes(n_samples, env.world_size)
    if env.distributed and opts.greedy and opts.search_samples is not None and opts.search_samples < n_samples:
        check_processes(opts.search_samples, env.world_size)
    # The bound from the options, before analyze runs for the rankings.
    Plan.for_options(opts, anatomy.num_layers, n_samples, batch_size).check(yes=yes, max_layer_calls=max_layer_calls)
    # Rankings first: analyze (if it has to run) shows its own progress.
    ranked, ranking_source, top_blocks, stability = ranked_sets(opts, opening, analysis, samples=samples,
                                                                batch_size=batch_size, progress=progress)
    candidates = build_candidates(opts, anatomy.num_layers, ranked, top_blocks)
    plan = Plan.for_options(opts, anatomy.num_layers, n_samples, batch_size, candidates=candidates)
    note(plan.describe(), progress)
    chunk_rows = chunk_rows_for(opening.vocab_size, chunk_elements, device=_head_device(anatomy))
    rows, row_sums, scorer, n_tokens, sweep_s = _measure(opening, opts, candidates, batch_size=batch_size,
                                                         chunk_rows=chunk_rows, plan=plan,
                                                         say=lambda line: note(line, progress), progress=progress,
                                                         env=env)
    table = sweep_table(rows)
    if opts.tasks:
        table = add_lm_eval_columns(table, opening.model, opening.loaded.tokenizer, opts.tasks, lm_eval_limit,
                                    batch_size, layers_path, progress)
    runner, L = scorer.runner, anatomy.num_layers
    summary = summarize(table, opening.loaded.name, anatomy.model_type, L, n_tokens, samples=len(opening.blocks))
    if stability:
        summary["ranking_stability"] = stability
    summary.update({"layer_calls": runner.layer_calls + runner.capture_passes * L, "planned_layer_calls": plan.total,
                    "naive_layer_calls": scorer.naive_layer_calls, "sweep_time_s": round(sweep_s, 3),
                    "estimated_time_s": None if plan.estimated_s is None else round(plan.estimated_s, 3)})
    manifest = opening.manifest(
        batch_size=batch_size, **split_manifest(env, n_samples), **opts.manifest(), ranking_source=ranking_source,
        remove=list(opts.removal) if opts.removal else None, chunk_rows=chunk_rows,
        lm_eval_tasks=opts.tasks or None, lm_eval_limit=lm_eval_limit if opts.tasks else None,
        layers_path=anatomy.layers_path, tokens_scored=n_tokens,
        intervals=interval_manifest(len(opening.blocks), opening.seed or 0))
    return SweepResult(table=table, summary=summary, manifest=manifest, per_sample=row_sample_sums(rows, row_sums))
