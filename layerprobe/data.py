"""Data specs to fixed-length token blocks: deterministic, offline by default.

Specs: `builtin` (text that ships with Python), a .txt/.jsonl/.csv/.parquet file, a folder of
text files, a pre-tokenized 2-D integer `.npy` (used exactly as given), or `hf:NAME[:CONFIG[:SPLIT]]`.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .defaults import TEXT_SUFFIXES, check_parquet_reader
from .errors import LayerprobeError

# Pure-Python stdlib modules whose documentation joins pydoc's topics in the builtin corpus.
# A fixed list, walked in a fixed order, so the corpus is the same on every run of one Python.
BUILTIN_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "email", "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pdb", "platform", "plistlib", "pprint", "queue", "random",
    "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "turtle", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)


def _module_docs(module_name: str) -> str:
    try:
        mod = importlib.import_module(module_name)
    except Exception:  # a module missing from a trimmed Python just shrinks the corpus
        return ""
    parts = [inspect.getdoc(mod) or ""]
    with warnings.catch_warnings():  # deprecated aliases (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
        for name in sorted(vars(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(f"{name}\n{doc}")
    return "\n\n".join(p for p in parts if p)


def builtin_documents() -> list[str]:
    """The offline corpus: pydoc's language-reference topics, then stdlib module documentation."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    docs += [d for d in (_module_docs(m) for m in BUILTIN_MODULES) if d]
    return [d for d in docs if d]


def _read_table_texts(rows: list[dict], column: str | None, where: str) -> list[str]:
    if not rows:
        return []
    col = column or ("text" if "text" in rows[0] else None)
    if col is None or col not in rows[0]:
        cols = ", ".join(map(str, rows[0].keys()))
        raise LayerprobeError(f"{where} has no column {col or 'text'!r} (columns: {cols}); name one with --text-column")
    return [str(r[col]) for r in rows if r.get(col) not in (None, "")]


def read_documents(spec: str, text_column: str | None = None) -> list[str]:
    """Read the documents of a text data spec (not .npy, not hf:)."""
    if spec == "builtin":
        return builtin_documents()
    path = Path(spec).expanduser()
    if not path.exists():
        raise LayerprobeError(f"no such data file or folder: {spec} (use 'builtin', a file, a folder or hf:NAME)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise LayerprobeError(f"data folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return [t for t in (f.read_text(encoding="utf-8", errors="replace") for f in files) if t.strip()]
    suffix = path.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            return [text] if text.strip() else []
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:
                            raise LayerprobeError(f"{path} line {i} is not valid JSON") from None
            rows = [r if isinstance(r, dict) else {"text": r} for r in rows]
            return _read_table_texts(rows, text_column, str(path))
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return _read_table_texts(list(csv.DictReader(f)), text_column, str(path))
        if suffix == ".parquet":
            check_parquet_reader()
            import pandas as pd

            df = pd.read_parquet(path)
            return _read_table_texts(df.to_dict("records"), text_column, str(path))
    except LayerprobeError:
        raise
    except Exception as e:
        raise LayerprobeError(f"could not read data file {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    raise LayerprobeError(
        f"unsupported data file {path.name}: use .txt, .jsonl, .csv, .parquet, .npy, a folder, 'builtin' or hf:NAME"
    )


def _hf_documents(spec: str, text_column: str | None, needed_chars: int) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise LayerprobeError("hf: data needs the datasets package: pip install datasets")
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        docs, total = [], 0
        for row in ds:
            col = text_column or "text"
            if col not in row:
                raise LayerprobeError(f"dataset {name} has no column {col!r} (columns: {', '.join(row)}); use --text-column")
            text = str(row[col])
            if text.strip():
                docs.append(text)
                total += len(text)
            if total >= needed_chars:
                break
        return docs
    except LayerprobeError:
        raise
    except Exception as e:
        raise LayerprobeError(f"could not load dataset {name!r} from the hub ({str(e).splitlines()[0] if str(e) else e!r}); "
                              "use a local file or 'builtin'") from None


def tokenize_documents(docs: list[str], tokenizer) -> torch.Tensor:
    """One long stream of token ids, documents separated by EOS when the tokenizer has one."""
    if tokenizer is None:
        raise LayerprobeError("text data needs a tokenizer, and this model has none; give token ids as a .npy file")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    for doc_ids in enc:
        ids.extend(doc_ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into [n, seq_len] blocks, dropping the incomplete tail."""
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def load_npy(path: Path, vocab_size: int | None, samples: int | None) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)  # never unpickle: a .npy of objects can run code when loaded
    except ValueError as e:
        if "pickle" in str(e):  # numpy's advice here would be to load it unsafely; ours is to fix the file
            raise LayerprobeError(f"{path} is not a 2-D integer array (it holds Python objects); save token ids "
                                  "with numpy as a 2-D integer array (samples x tokens)") from None
        raise LayerprobeError(f"could not read {path} as a .npy array: {str(e).splitlines()[0] if str(e) else e!r}") from None
    except Exception as e:
        raise LayerprobeError(f"could not read {path} as a .npy array: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise LayerprobeError(f"{path} must hold a 2-D integer array (samples x tokens); it holds {arr.ndim}-D {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] < 2:
        raise LayerprobeError(f"{path} holds {arr.shape[0]} samples of {arr.shape[1]} tokens; need at least 1 sample of 2 tokens")
    if vocab_size is not None and (arr.min() < 0 or arr.max() >= vocab_size):
        raise LayerprobeError(
            f"{path} holds token ids from {arr.min()} to {arr.max()}, outside this model's vocabulary [0, {vocab_size})"
        )
    blocks = torch.from_numpy(arr.astype(np.int64))
    return blocks[:samples] if samples else blocks


def load_token_blocks(
    spec: str,
    tokenizer,
    *,
    seq_len: int = 256,
    samples: int | None = 32,
    seed: int = 0,
    text_column: str | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """[samples, seq_len] token ids for a data spec; the same spec, seed and tokenizer give the same blocks."""
    if seq_len < 2:
        raise LayerprobeError(f"--seq-len must be at least 2 (got {seq_len})")
    if samples is not None and samples < 1:
        raise LayerprobeError(f"--samples must be at least 1 (got {samples})")
    spec = str(spec)
    if spec.endswith(".npy"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LayerprobeError(f"no such data file: {spec}")
        return load_npy(path, vocab_size, samples)
    if spec.startswith("hf:"):
        needed = (samples or 1024) * seq_len * 8
        docs = _hf_documents(spec, text_column, needed)
    else:
        docs = read_documents(spec, text_column)
    ids = tokenize_documents(docs, tokenizer) if docs else torch.empty(0, dtype=torch.long)
    blocks = pack(ids, seq_len)
    wanted = samples if samples is not None else max(len(blocks), 1)
    if len(blocks) < wanted:
        raise LayerprobeError(
            f"the data {spec!r} has {ids.numel()} tokens; {wanted} samples of {seq_len} tokens need "
            f"{wanted * seq_len}: give more text or lower --samples / --seq-len"
        )
    if samples is None or samples == len(blocks):
        return blocks
    # A seeded choice of blocks from the whole corpus, kept in corpus order.
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(blocks), generator=gen)[:samples].sort().values
    return blocks[pick]
