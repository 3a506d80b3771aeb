"""Streaming readers: a data spec becomes a sequence of text pieces, never one whole file in memory.

A document is yielded as one or more pieces; `Piece.last` marks the end of a document, where the
tokenizer's EOS is written. Rows of .jsonl/.json.gz/.csv/.parquet/hf: data are one piece each; a text
file is one document cut into pieces of about PIECE_CHARS at a line end followed by a non-space
character, where byte-level pre-tokenizers split anyway, so the cut does not change the token ids.
The order is fixed (files sorted by path, rows in file order), so the same spec always gives the same
stream: preparation can resume by skipping the pieces it has already written.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..data import TEXT_SUFFIXES
from ..errors import LayerprobeError, first_line

PIECE_CHARS = 1 << 18  # 256K characters: pieces small enough for the tokenizer's threads to share
TABLE_SUFFIXES = (".csv", ".parquet")
GZ_TEXT_SUFFIXES = tuple(s + ".gz" for s in TEXT_SUFFIXES)
ALL_SUFFIXES = TEXT_SUFFIXES + GZ_TEXT_SUFFIXES + (".jsonl", ".jsonl.gz", ".json.gz") + TABLE_SUFFIXES
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class Piece:
    text: str
    last: bool  # the document ends after this piece


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(ALL_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def is_prepared_dir(path: str | os.PathLike) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / INDEX_NAME).is_file()


def source_files(spec: str) -> list[Path]:
    """The files a file or folder spec reads, in reading order; a clear error for anything else."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise LayerprobeError(
            f"no such data file or folder: {spec} (give a file ({', '.join(ALL_SUFFIXES)}), a folder of them, "
            "a folder made by prepare-data, or hf:NAME[:CONFIG[:SPLIT]])"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in ALL_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise LayerprobeError(f"data folder {path} holds no data files ({', '.join(ALL_SUFFIXES)})")
        return files
    if _suffix(path) not in ALL_SUFFIXES:
        raise LayerprobeError(
            f"unsupported data file {path.name}: use {', '.join(ALL_SUFFIXES)}, a folder, a prepared folder or hf:NAME"
        )
    return [path]


BUILTIN = "builtin"  # the small offline corpus (layerprobe.data.builtin_documents): text shipped with Python


def _builtin_identity() -> str:
    """The builtin corpus changes with the Python version that ships it."""
    import sys

    return f"python-{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"


def source_fingerprint(spec: str, text_column: str | None = None) -> dict:
    """What identifies the data of a spec for the cache: its files' paths, sizes and mtimes (or the hf: name)."""
    if spec.startswith("hf:"):
        return {"spec": spec, "text_column": text_column, "files": []}
    if spec == BUILTIN:
        return {"spec": spec, "text_column": None, "files": [], "version": _builtin_identity()}
    files = source_files(spec)
    root = Path(spec).expanduser().resolve()
    rows = []
    for f in files:
        st = f.stat()
        rows.append([str(f.resolve().relative_to(root)) if root.is_dir() else f.name, st.st_size, st.st_mtime_ns])
    return {"spec": str(root), "text_column": text_column, "files": rows}


def fingerprint_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def source_bytes(spec: str) -> int | None:
    """Bytes on disk of a file spec (None for hf: and builtin): the progress bar's total and the disk-space estimate."""
    if spec.startswith("hf:") or spec == BUILTIN:
        return None
    return sum(f.stat().st_size for f in source_files(spec))


def _text_pieces(f: io.TextIOBase) -> Iterator[Piece]:
    buf: list[str] = []
    size = 0
    pending: Piece | None = None
    for line in f:
        # Cut before a line that starts with a non-space character, once the piece is big enough.
        if size >= PIECE_CHARS and line[:1] and not line[:1].isspace():
            if pending is not None:
                yield pending
            pending = Piece("".join(buf), False)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    tail = "".join(buf)
    if pending is not None:
        if tail:
            yield pending
            yield Piece(tail, True)
        else:
            yield Piece(pending.text, True)
    elif tail.strip():
        yield Piece(tail, True)


def _column(row: dict, column: str | None, where: str) -> str:
    col = column or "text"
    if col not in row:
        cols = ", ".join(map(str, row.keys()))
        raise LayerprobeError(f"{where} has no column {col!r} (columns: {cols}); name one with --text-column")
    return row[col]


def _jsonl_pieces(path: Path, column: str | None) -> Iterator[Piece]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LayerprobeError(f"{path} line {i} is not valid JSON (one JSON object per line expected)") from None
            text = _column(row, column, str(path)) if isinstance(row, dict) else row
            if text not in (None, "") and str(text).strip():
                yield Piece(str(text), True)


def _csv_pieces(path: Path, column: str | None) -> Iterator[Piece]:
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = _column(row, column, str(path))
            if text and text.strip():
                yield Piece(text, True)


def _parquet_pieces(path: Path, column: str | None) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LayerprobeError(".parquet data needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    col = column or "text"
    if col not in names:
        raise LayerprobeError(f"{path} has no column {col!r} (columns: {', '.join(names)}); name one with --text-column")
    for g in range(pf.num_row_groups):  # one row group in memory at a time
        for text in pf.read_row_group(g, columns=[col]).column(0).to_pylist():
            if text and str(text).strip():
                yield Piece(str(text), True)


def _file_pieces(path: Path, column: str | None) -> Iterator[Piece]:
    s = _suffix(path)
    if s in TEXT_SUFFIXES:
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            yield from _text_pieces(f)
    elif s in GZ_TEXT_SUFFIXES:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            yield from _text_pieces(f)
    elif s in (".jsonl", ".jsonl.gz", ".json.gz"):
        yield from _jsonl_pieces(path, column)
    elif s == ".csv":
        yield from _csv_pieces(path, column)
    elif s == ".parquet":
        yield from _parquet_pieces(path, column)
    else:  # source_files() lets nothing else through
        raise LayerprobeError(f"unsupported data file {path.name}")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if not parts[0]:
        raise LayerprobeError(f"hf: data needs a dataset name, as in hf:allenai/c4:en:train (got {spec!r})")
    config = (parts[1] or None) if len(parts) > 1 else None
    split = (parts[2] or "train") if len(parts) > 2 else "train"
    return parts[0], config, split


def _hf_pieces(spec: str, column: str | None) -> Iterator[Piece]:
    name, config, split = parse_hf_spec(spec)
    if importlib.util.find_spec("datasets") is None:
        raise LayerprobeError("hf: data needs the datasets package: pip install datasets")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)  # rows arrive as they download
    except Exception as e:
        first = first_line(e)
        raise LayerprobeError(f"could not open dataset {name!r} (config {config}, split {split}) from the hub: {first}") from None
    for row in ds:
        text = _column(row, column, f"dataset {name}")
        if text and str(text).strip():
            yield Piece(str(text), True)


def iter_pieces(spec: str, text_column: str | None = None) -> Iterator[Piece]:
    """The text of a data spec as a stream of pieces, in a fixed order."""
    spec = str(spec)
    if spec.startswith("hf:"):
        yield from _hf_pieces(spec, text_column)
        return
    if spec == BUILTIN:  # a few MB of documentation: small enough to build as a list
        from ..data import builtin_documents

        yield from (Piece(d, True) for d in builtin_documents())
        return
    for f in source_files(spec):
        try:
            yield from _file_pieces(f, text_column)
        except LayerprobeError:
            raise
        except (OSError, UnicodeError, ValueError, EOFError) as e:
            raise LayerprobeError(f"could not read data file {f}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def iter_documents(spec: str, text_column: str | None = None) -> Iterator[str]:
    """Whole documents (pieces joined): for samples and tests, where one document fits in memory."""
    buf: list[str] = []
    for p in iter_pieces(spec, text_column):
        buf.append(p.text)
        if p.last:
            yield "".join(buf)
            buf = []
