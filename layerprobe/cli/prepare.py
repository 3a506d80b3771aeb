"""`layerprobe prepare-data`: tokenize a corpus once into a memory-mapped token file for training."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import QuietOpt, TextColumnOpt, console, err_console, user_errors


@app.command("prepare-data")
@user_errors
def prepare_data_command(
    spec: str = typer.Argument(..., help="file (.txt .jsonl .jsonl.gz .json.gz .csv .parquet) | folder of them | hf:NAME[:CONFIG[:SPLIT]]"),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer folder or hub id (t5-base: the papers'), or bpe[:N] (the default): a byte-level BPE of N ids (default 32000) trained on the first 32 MB. For a prepared folder: the tokenizer it must have been made with."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: the cache, $LAYERPROBE_CACHE or ~/.cache/layerprobe/tokens/<key>)."),
    text_column: TextColumnOpt = None,
    max_tokens: Optional[str] = typer.Option(None, help="Stop once this many tokens are written (e.g. 2.2B, 500M; the last document is cut there): read a streamed hf: dataset only as far as you need."),
    quiet: QuietOpt = False,
) -> None:
    """Tokenize SPEC into OUT/tokens.bin + OUT/index.json; an interrupted run resumes where it stopped."""
    from ..corpus import parse_token_count, prepare_data

    cap = parse_token_count(max_tokens, "--max-tokens") if max_tokens is not None else None
    say = (lambda m: None) if quiet else (lambda m: err_console.print(m, highlight=False))
    res = prepare_data(spec, tokenizer, out, text_column=text_column, max_tokens=cap, progress=not quiet, on_status=say)
    ix = res.index
    tok = ix["tokenizer"]
    verb = "already prepared" if res.reused else f"prepared in {ix.get('seconds', 0):.1f} s"
    console.print(f"{res.path}: {verb}", highlight=False)
    console.print(
        f"  {ix['documents']:,} documents, {ix['tokens']:,} tokens ({ix['dtype']}, {ix['bytes'] / 1e6:,.1f} MB) "
        f"from {ix['text_bytes'] / 1e6:,.1f} MB of text"
        + (f"; stopped at --max-tokens {ix['source']['max_tokens']:,}" if ix["source"].get("capped") else ""),
        highlight=False)
    console.print(
        f"  tokenizer {tok['name']} ({tok['vocab_len']:,} ids, largest id seen {tok['max_id']:,}); documents end with "
        f"{tok['separator']}; a model needs an embedding of {tok['embedding_size']:,} rows", highlight=False)
