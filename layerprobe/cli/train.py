"""`layerprobe train-reference`: train the models the papers compare, one per norm scheme."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import console, err_console, user_errors


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def summary_table(summary):
    from rich import box
    from rich.text import Text

    from ..metrics.loss import perplexity  # here, not at the top: `layerprobe --help` must not import torch
    from rich.table import Table

    from ..metrics.loss import perplexity  # imports torch: only once there is a table to print

    # Narrow enough for an 80-column terminal; every number is also in OUT/summary.json.
    table = Table(title=f"train-reference → {summary.out}", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1), pad_edge=False, collapse_padding=True)
    seeded = any(Path(r.path).name != r.scheme for r in summary.runs)  # --seeds: OUT/<scheme>-seed<k>
    for col in ("run" if seeded else "scheme", "status", "steps", "eval ppl", "best@step", "out var ℓ0→last", "tok/s"):
        table.add_column(col, justify="left" if col in ("run", "scheme", "status") else "right", no_wrap=True)
    for r in summary.runs:
        status = {"diverged": Text(f"diverged@{r.diverged_at}", style="red"),
                  "interrupted": Text("stopped", style="yellow"), "completed": "done"}.get(r.status, r.status)
        best = "—" if r.best_eval_loss is None else f"{perplexity(r.best_eval_loss):.1f}@{r.best_step}"
        var = r.layer_output_var
        growth = "—" if not var else f"{var[0]:.2g}→{var[-1]:.2g}"
        table.add_row(Path(r.path).name if seeded else r.scheme, status, f"{r.steps_done}/{r.total_steps}", _fmt(r.final_eval_ppl, ".1f"), best,
                      growth, _fmt(r.tokens_per_s, ",.0f"))
    return table


@app.command("train-reference")
@user_errors
def train_reference_command(
    norm: Optional[str] = typer.Option(None, help="Comma list of norm schemes: pre, post, mix, lns, deepnorm, sandwich, dyt, hybrid, hybrid_star (any case). Default: pre,post,mix,lns (or the recipe's)."),
    preset: Optional[str] = typer.Option(None, help="micro | tiny (CPU, the default) | 71m | 130m | 250m | 350m | 1b (the papers' sizes)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: the recipe's, else the preset's)."),
    tokens: Optional[str] = typer.Option(None, help="Token budget instead of --steps, e.g. 1.1B or 500M: steps = ceil(tokens / (batch x seq))."),
    recipe: Optional[str] = typer.Option(None, help="A paper's settings in one name: mixln-71m, mixln-130m, mixln-250m, mixln-1b, lns-130m, lns-250m, lns-350m, lns-1b. Flags given explicitly override it."),
    data: str = typer.Option("builtin", help="builtin | file (.txt .jsonl[.gz] .json.gz .csv .parquet, or token ids .npy) | folder | a folder made by prepare-data | hf:NAME[:CONFIG[:SPLIT]]. Text is tokenized once into the cache ($LAYERPROBE_CACHE) and read from a memory-mapped file."),
    eval_data: Optional[str] = typer.Option(None, help="A separate held-out set (any --data spec; tokenized with the training data's tokenizer). Default: the last blocks of --data, never trained on."),
    out: Path = typer.Option(Path("runs"), help="Output folder; each scheme trains in OUT/<scheme>/."),
    layers: Optional[int] = typer.Option(None, help="Override the preset's number of layers."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", "--width", help="Override the width."),
    ffn_size: Optional[str] = typer.Option(None, help="Override the FFN width: a number, or 'aligned' for the preset's rounded up to a multiple of 64 (1b: 5461 -> 5504; a different model from the paper's, recorded in run.json). Default ≈ 8/3 × width when --width changes."),
    heads: Optional[int] = typer.Option(None, help="Override the number of attention heads."),
    kv_heads: Optional[int] = typer.Option(None, help="Key/value heads (grouped-query attention); default = --heads."),
    seq_len: Optional[int] = typer.Option(None, help="Override the sequence length."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch: sequences per optimizer step, over all processes."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass and process; the rest is gradient accumulation (default: the largest divisor of the per-process batch with at most 16,384 tokens)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: the preset's)."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Fraction of the steps spent in linear warmup (default 0.1)."),
    min_lr_ratio: Optional[float] = typer.Option(None, help="The cosine decays to this fraction of the peak (default 0.1)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay on matrices (default 0 = Adam, as in the papers)."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this value (default 1.0; 0: no clipping, as in the papers)."),
    post_ln_ratio: float = typer.Option(0.25, "--post-ln-ratio", "--alpha", help="Mix-LN's α: the first ⌊αL⌋ layers are Post-LN."),
    post_ln_layers: Optional[int] = typer.Option(None, help="Mix-LN: an explicit number of Post-LN layers (overrides α)."),
    scaled_init: bool = typer.Option(False, "--scaled-init/--no-scaled-init", help="Residual output projections get std σ/√(2L)."),
    norm_type: str = typer.Option("rmsnorm", help="rmsnorm | layernorm."),
    vocab_size: Optional[int] = typer.Option(None, help="Without --tokenizer: the size of the byte-level BPE trained on the first 32 MB of the data (default: the preset's). With --tokenizer: the embedding rows (default: the tokenizer's ids rounded up to 64, at least the largest id + 1)."),
    tokenizer: Optional[str] = typer.Option(None, help="A tokenizer folder or hub id (t5-base: the papers'), or bpe[:N]. Default: a BPE trained on the data, or a prepared folder's own."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text in .jsonl/.csv/.parquet/hf data."),
    eval_every: Optional[int] = typer.Option(None, help="Held-out loss, per-layer gradient norms and output variance every K steps."),
    eval_samples: Optional[int] = typer.Option(None, help="Held-out blocks (default 64, or the recipe's 10M tokens; cut from --data: at most 5% of it)."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every K steps (default: --eval-every)."),
    seed: int = typer.Option(0, help="Seed of the initial weights (the same for every scheme)."),
    seeds: Optional[str] = typer.Option(None, help="Train each scheme once per seed of its initial weights: a count N (seeds --seed … --seed+N−1) or a comma list (0,1,2), each run in OUT/<scheme>-seed<k>/, all on the same data in the same order (--data-seed). Default: one run per scheme in OUT/<scheme>/."),
    data_seed: Optional[int] = typer.Option(None, help="Seed of the batch order (default: --seed; with --seeds, the same for every seed)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: Optional[str] = typer.Option(None, help="auto (the default: bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's; 1 is fastest for tiny models on a busy machine)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (GPU)."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard weights, gradients and optimizer state (FSDP2) under torchrun."),
    resume: bool = typer.Option(False, "--resume", help="Continue the runs in OUT from their last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace runs in OUT that were made with other settings."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train one LLaMA-style model per norm scheme with identical data order and seed; save HF checkpoints."""
    from ..training import TrainSettings, train_reference

    settings = TrainSettings(
        norm=norm, preset=preset, steps=steps, tokens=tokens, recipe=recipe, data=data, eval_data=eval_data,
        text_column=text_column, out=str(out), layers=layers,
        hidden_size=hidden_size, ffn_size=ffn_size, heads=heads, kv_heads=kv_heads, seq_len=seq_len,
        batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr, warmup_ratio=warmup_ratio,
        min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip, post_ln_ratio=post_ln_ratio,
        post_ln_layers=post_ln_layers, scaled_init=scaled_init, norm_type=norm_type, vocab_size=vocab_size,
        tokenizer=tokenizer, eval_every=eval_every, eval_samples=eval_samples, save_every=save_every, seed=seed,
        seeds=seeds, data_seed=data_seed, device=device, dtype=dtype, threads=threads, compile=compile, fsdp=fsdp, resume=resume,
        overwrite=overwrite, progress=not quiet,
    )
    say = None if quiet else (lambda line: err_console.print(line, highlight=False, markup=False))
    summary = train_reference(settings, on_status=say)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return  # one process reports
    console.print(summary_table(summary))
    for r in summary.runs:
        if r.status == "diverged":
            kept = (f"the checkpoint of step {r.checkpoint_step} is kept in {r.path}"
                    if r.checkpoint_step else "no checkpoint had been saved yet")
            err_console.print(f"{Path(r.path).name}: diverged at step {r.diverged_at} ({r.diverged_reason}); {kept}",
                              highlight=False, soft_wrap=True)
    if summary.interrupted:
        stopped = summary.runs[-1]
        err_console.print(f"interrupted: {Path(stopped.path).name} saved at step {stopped.steps_done}; "
                          f"continue with the same command and --resume", highlight=False)
        raise typer.Exit(130)
    folder = "<scheme>-seed<k>" if summary.settings.get("seeds") else "<scheme>"
    err_console.print(f"wrote {summary.out}/{folder}/ (HF checkpoint, last/, best/, metrics.jsonl, run.json) "
                      f"and {summary.out}/summary.json", highlight=False)
