"""`layerprobe analyze MODEL`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..defaults import METRICS
from . import app
from .common import (
    AttnImplementationOpt, BatchSizeOpt, DataOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, LayersPathOpt, MaxMemoryOpt,
    ModelArg, OffloadFolderOpt, OutOpt, QuietOpt, RevisionOpt, SamplesOpt, SeedOpt, SeqLenOpt, TextColumnOpt,
    TrustRemoteCodeOpt,
    check_processes_early, console, data_parallel, err_console, user_errors,
)


@app.command("analyze")
@user_errors
def analyze_command(
    model: ModelArg,
    data: DataOpt = "builtin",
    seq_len: SeqLenOpt = 256,
    samples: SamplesOpt = 32,
    batch_size: BatchSizeOpt = 4,
    seed: SeedOpt = 0,
    tokens: str = typer.Option("last", help="Angular distance on the 'last' token of each sample or on 'all' tokens."),
    grad: bool = typer.Option(True, "--grad/--no-grad", help="--no-grad skips the backward pass (no gradient norms)."),
    metrics: Optional[str] = typer.Option(None, help="Only these statistics, comma-separated, e.g. angular,influence "
                                          f"({', '.join(METRICS)}; default: all). Fewer cost less: without "
                                          "gradients no backward pass, without loss and gradients no head."),
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
    """Measure every layer in one pass: angular distance (ℓ×n), Block Influence, output variance, gradient norms."""
    from ..defaults import check_measure_options, check_metrics, takes_gradients
    from ..io import check_output_dir
    from ..results import check_manifest

    # Every check that needs no model, before the library and the model load and before any folder is made.
    check_measure_options(data=data, seq_len=seq_len, samples=samples, batch_size=batch_size, tokens=tokens,
                          dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                          attn_implementation=attn_implementation)
    check_processes_early(samples, device_map)
    selected = check_metrics(metrics, grad)
    if out is not None:
        check_manifest(check_output_dir(out))
    from ..analysis import analyze, check_fits_before_loading
    from ..opening import open_model
    from ..distributed import main_first
    from ..progress import status
    from ..report import render_analysis, summary_table

    with data_parallel(device, samples, device_map) as env:
        quiet = quiet or not env.is_main  # one progress display: the main process's
        # On one GPU, a run that will not fit is refused from the config alone, before any weight is read;
        # with gradients, a device map that offloads a layer likewise (open_model).
        check_fits_before_loading(model, data=data, seq_len=seq_len, samples=samples, batch_size=batch_size,
                                  tokens=tokens, grad=takes_gradients(selected, grad), metrics=selected,
                                  revision=revision, dtype=dtype, device=device, device_map=device_map,
                                  attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                                  layers_path=layers_path, progress=not quiet)
        loaded = open_model(model, revision=revision, dtype=dtype, device=device, device_map=device_map,
                            max_memory=max_memory, attn_implementation=attn_implementation,
                            offload_folder=offload_folder, trust_remote_code=trust_remote_code,
                            layers_path=layers_path,
                            grad=takes_gradients(selected, grad),
                            progress=not quiet).loaded
        if out is None:
            out = Path("reports") / loaded.name
            check_manifest(check_output_dir(out))
        result = analyze(loaded, data=data, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                         tokens=tokens, grad=grad, text_column=text_column, layers_path=layers_path,
                         device_map=device_map, progress=not quiet, metrics=metrics)

        def write() -> None:
            with status("writing tables, figures and index.html", not quiet):
                render_analysis(result, out)
            console.print(summary_table(result))
            tables = "layers.csv, " + ("angular.csv, " if len(result.angular) else "") + "sublayers.csv"
            err_console.print(f"wrote {out}/ ({tables}, manifest.json, PNGs, index.html)", highlight=False)

        # The main process writes; if that fails, the others say so rather than wait in a collective.
        main_first(env, write)
