"""`layerprobe analyze MODEL`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import console, err_console, user_errors


@app.command("analyze")
@user_errors
def analyze_command(
    model: str = typer.Argument(..., help="Hub id, local folder, .gguf file, a train-reference run, or 'smollm2'."),
    data: str = typer.Option("builtin", help="builtin | file (.txt .jsonl .csv .parquet .npy) | folder | hf:NAME[:CONFIG[:SPLIT]]"),
    seq_len: int = typer.Option(256, help="Tokens per sample."),
    samples: int = typer.Option(32, help="Number of samples (blocks of --seq-len tokens)."),
    batch_size: int = typer.Option(4, help="Samples per forward pass."),
    seed: int = typer.Option(0, help="Seed for the choice of blocks."),
    tokens: str = typer.Option("last", help="Angular distance on the 'last' token of each sample or on 'all' tokens."),
    grad: bool = typer.Option(True, "--grad/--no-grad", help="--no-grad skips the backward pass (no gradient norms)."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text in .jsonl/.csv/.parquet/hf data."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on GPU)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
    device_map: Optional[str] = typer.Option(None, help="'auto' spreads a model larger than one GPU (accelerate)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repository's own code."),
    layers_path: Optional[str] = typer.Option(None, help="Dotted path of the layer list, e.g. transformer.h."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default reports/<model-name>/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Measure every layer in one pass: angular distance (ℓ×n), Block Influence, output variance, gradient norms."""
    from ..analysis import analyze
    from ..io import ensure_writable_dir
    from ..loading import load_model
    from ..progress import status
    from ..report.analysis import summary_table

    if out is not None:
        ensure_writable_dir(out)  # fail before the expensive part
    with status(f"loading {model}", not quiet):
        loaded = load_model(model, revision=revision, dtype=dtype, device=device, device_map=device_map,
                            trust_remote_code=trust_remote_code)
    out = ensure_writable_dir(out or Path("reports") / loaded.name)
    result = analyze(loaded, data=data, seq_len=seq_len, samples=samples, batch_size=batch_size, seed=seed,
                     tokens=tokens, grad=grad, text_column=text_column, layers_path=layers_path,
                     device_map=device_map, progress=not quiet)
    with status("writing tables, figures and index.html", not quiet):
        result.save(out)
    console.print(summary_table(result))
    err_console.print(f"wrote {out}/ (layers.csv, angular.csv, sublayers.csv, manifest.json, PNGs, index.html)",
                      highlight=False)
