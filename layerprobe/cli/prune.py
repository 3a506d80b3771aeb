"""`layerprobe prune-sweep MODEL`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import (
    AttnImplementationOpt, BatchSizeOpt, DataOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, LayersPathOpt, MaxMemoryOpt,
    ModelArg, OffloadFolderOpt, OutOpt, QuietOpt, RevisionOpt, SamplesOpt, SeedOpt, SeqLenOpt, TextColumnOpt,
    TrustRemoteCodeOpt,
    console, data_parallel, err_console, user_errors,
)


@app.command("prune-sweep")
@user_errors
def prune_sweep_command(
    model: ModelArg,
    mode: Optional[str] = typer.Option(None, help="layer (default) | block | greedy | ranked | all; several separated by commas."),
    block_size: Optional[str] = typer.Option(None, help="Block mode: n, a list 2,4 or range 2-5, or all (default: every n, for the ℓ×n map)."),
    steps: Optional[int] = typer.Option(None, help="Greedy / ranked: how many layers to remove, one at a time (default: half the depth)."),
    by: Optional[str] = typer.Option(None, help="Ranked mode: angular | influence | last | angular-layer, several separated by commas (default angular,influence,last)."),
    remove: Optional[str] = typer.Option(None, help="Measure the removal of these 0-based layers, e.g. 20,21,22 or 20-22 (with --save-pruned: the layers to drop)."),
    save_pruned: Optional[Path] = typer.Option(None, help="Write the model without the --remove layers to this folder (from_pretrained loads it)."),
    lm_eval_tasks: Optional[str] = typer.Option(None, help="Also score every candidate on these lm-evaluation-harness tasks (needs lm-eval and its data)."),
    lm_eval_limit: Optional[int] = typer.Option(100, help="Examples per lm-eval task."),
    block_top: Optional[int] = typer.Option(None, help="Block mode: measure only the k blocks of each size closest in angle by analyze's angular map (O(k·L²) layer calls instead of O(L³))."),
    search_samples: Optional[int] = typer.Option(None, help="Greedy: choose the layers on the first N samples; the chosen sets are then measured on all of them."),
    yes: bool = typer.Option(False, "--yes", help="Run a sweep over the layer-call limit (the plan is printed before it starts)."),
    max_layer_calls: Optional[int] = typer.Option(None, help="Refuse a sweep planned above this many layer calls (default 30,000; --yes runs any)."),
    data: DataOpt = "builtin",
    seq_len: SeqLenOpt = 256,
    samples: SamplesOpt = 32,
    batch_size: BatchSizeOpt = 4,
    seed: SeedOpt = 0,
    text_column: TextColumnOpt = None,
    revision: RevisionOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    attn_implementation: AttnImplementationOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    layers_path: LayersPathOpt = None,
    out: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Remove each layer, each block, greedily or by a ranking; loss, perplexity, KL and top-1 agreement against the full model."""
    from ..analysis import check_fits_before_loading
    from ..errors import LayerprobeError
    from ..io import check_output_dir
    from ..loading import load_model
    from ..distributed import main_first
    from ..progress import status
    from ..pruning import prune_sweep, save_pruned as save_pruned_model
    from ..pruning.save import saved_config_changes
    from ..report import render_sweep, sweep_tables
    from ..results import check_manifest

    removal = _check_before_loading(remove, save_pruned, out, mode=mode, block_size=block_size, steps=steps,
                                    by=by, batch_size=batch_size, lm_eval_tasks=lm_eval_tasks, block_top=block_top,
                                    search_samples=search_samples,
                                    measure=dict(data=data, seq_len=seq_len, samples=samples, dtype=dtype,
                                                 device=device, device_map=device_map, max_memory=max_memory,
                                                 attn_implementation=attn_implementation),
                                    cost=dict(model=model, revision=revision, trust_remote_code=trust_remote_code,
                                              yes=yes, max_layer_calls=max_layer_calls))
    with data_parallel(device, samples, device_map) as env:
        quiet = quiet or not env.is_main  # one progress display: the main process's
        # On one GPU, weights that will not fit are refused from the config alone, before any is read.
        check_fits_before_loading(model, revision=revision, dtype=dtype, device=device, device_map=device_map,
                                  attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                                  layers_path=layers_path, grad=False, command="prune-sweep")
        with status(f"loading {model}", not quiet):
            loaded = load_model(model, revision=revision, dtype=dtype, device=device, device_map=device_map,
                                max_memory=max_memory, attn_implementation=attn_implementation,
                                offload_folder=offload_folder, trust_remote_code=trust_remote_code)
        if out is None:
            out = Path("reports") / loaded.name
            check_manifest(check_output_dir(out))
        result = prune_sweep(loaded, mode=mode, block_size=block_size, steps=steps, by=by, remove=removal, data=data,
                             seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed, text_column=text_column,
                             device_map=device_map, layers_path=layers_path, analysis=out, lm_eval_tasks=lm_eval_tasks,
                             lm_eval_limit=lm_eval_limit, block_top=block_top, search_samples=search_samples, yes=yes,
                             max_layer_calls=max_layer_calls, progress=not quiet)

        def write() -> None:
            if save_pruned is not None:
                try:
                    with status(f"saving the pruned model to {save_pruned} and reloading it to check", not quiet):
                        folder = save_pruned_model(loaded, removal, save_pruned, layers_path=layers_path)
                except (LayerprobeError, OSError) as e:
                    # The sweep's measurements are worth keeping whatever happened to the model's copy.
                    result.save(out)
                    problem = e.problem if isinstance(e, LayerprobeError) else f"{e.strerror or e}"
                    raise LayerprobeError(f"saving the pruned model to {save_pruned} failed ({problem}); the sweep's "
                                          f"results are saved in {out}/sweep.csv") from None
                result.manifest["saved_pruned"] = str(folder)
            with status("writing sweep.csv, figures and index.html", not quiet):
                render_sweep(result, out)
            for table in sweep_tables(result):
                console.print(table)
            err_console.print(f"wrote {out}/ (sweep.csv, manifest.json, PNGs, index.html)", highlight=False)
            if save_pruned is not None:
                err_console.print(f"wrote {save_pruned}/ ({result.summary['num_layers'] - len(set(removal))} layers; "
                                  "load it with from_pretrained or layerprobe)", highlight=False)
                rewritten = saved_config_changes(save_pruned)
                if rewritten:
                    err_console.print(f"config rewritten for the kept layers: {', '.join(rewritten)}", highlight=False)

        # The main process writes; if that fails, the others say so rather than wait in a collective.
        main_first(env, write)


def _check_before_loading(remove: str | None, save_pruned: Path | None, out: Path | None, measure: dict,
                          cost: dict, **options) -> list[int] | None:
    """Every check that needs no model, so bad input fails before the expensive part and before a folder is
    made; the --remove layers."""
    from ..defaults import check_measure_options
    from ..errors import LayerprobeError
    from ..io import check_output_dir
    from ..pruning import SweepOptions, check_target, parse_int_list
    from .common import check_processes_early
    from ..results import check_manifest

    check_measure_options(batch_size=options["batch_size"], **measure)
    check_processes_early(measure["samples"], measure["device_map"])

    removal = parse_int_list(remove, "--remove") if remove is not None else None
    if remove is not None and not removal:
        raise LayerprobeError("--remove names no layer; give 0-based layer indices like 20,21,22")
    if save_pruned is not None and not removal:
        raise LayerprobeError("--save-pruned needs --remove: the layers to drop, e.g. --remove 20,21,22")
    opts = SweepOptions.parse(remove=removal, **options)
    _check_cost(opts, measure["samples"], options["batch_size"], **cost)
    if save_pruned is not None:
        check_target(save_pruned.expanduser())
    if out is not None:
        check_manifest(check_output_dir(out))
    return removal


def _check_cost(opts, samples: int | None, batch_size: int, *, model: str, revision, trust_remote_code: bool,
                yes: bool, max_layer_calls: int | None) -> None:
    """The layer-call limit from the model's config alone, before its weights load (a sweep over all samples
    of a file, or a config that names no depth, is checked after loading)."""
    from ..anatomy import num_layers_of
    from ..loading import read_config
    from ..pruning.plan import Plan, check_layer_call_limit

    check_layer_call_limit(max_layer_calls)
    if yes or samples is None:
        return
    L = num_layers_of(read_config(model, revision=revision, trust_remote_code=trust_remote_code))
    if L is None or L < 2:
        return
    opts.for_depth(L)
    Plan.for_options(opts, L, samples, batch_size).check(yes=yes, max_layer_calls=max_layer_calls)
