"""Preparation: a data spec and a tokenizer become DIR/tokens.bin (token ids) + DIR/index.json.

Layout of a prepared folder:
  tokens.bin    the token ids of every document, each followed by the separator (EOS), uint16 when the
                tokenizer has at most 65,536 ids, else uint32, native little-endian
  index.json    format version, source, tokenizer fingerprint, dtype, counts; written LAST, so a folder
                without it is never taken for a complete one
  tokenizer/    the tokenizer used (save_pretrained), so training reads the very same ids
While running: tokens.bin.partial and progress.json (pieces and tokens written so far).

Interrupted preparations RESUME: the partial file is cut back to the token count progress.json
recorded after its last fully written chunk, and the reader skips the pieces already written. The
reader's order is fixed, so the result equals a preparation done in one go (tested).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LayerprobeError
from ..io import ensure_writable_dir, write_json
from .readers import BUILTIN, INDEX_NAME, fingerprint_key, is_prepared_dir, iter_pieces, parse_hf_spec, source_bytes, source_fingerprint
from .store import FORMAT, FORMAT_VERSION, TOKENS_NAME, TokenStore, read_index
from .vocab import SAMPLE_BYTES, embedding_size, fingerprint, load_hf_tokenizer, parse_tokenizer_spec, separator, train_bpe_on_sample

PARTIAL_NAME, STATE_NAME, TOKENIZER_DIR = "tokens.bin.partial", "progress.json", "tokenizer"
CHUNK_BYTES = 4 << 20  # text per encode_batch call: enough pieces for every core, bounded memory
CHARS_PER_TOKEN_LOW = 2.0  # disk estimate: English BPE gives ~4 characters per token; assume half


@dataclass
class Prepared:
    path: Path
    index: dict
    reused: bool  # True when an existing complete folder was used as it is


def cache_root() -> Path:
    """Where prepared data is cached: $LAYERPROBE_CACHE/tokens, else ~/.cache/layerprobe/tokens."""
    base = os.environ.get("LAYERPROBE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "layerprobe") / "tokens"


def preparation_key(spec: str, tokenizer_spec: str, text_column: str | None, tok_fingerprint: str | None,
                    max_tokens: int | None = None) -> str:
    what = {"format_version": FORMAT_VERSION, "source": source_fingerprint(spec, text_column),
            "tokenizer": tokenizer_spec if tok_fingerprint is None else tok_fingerprint}
    if max_tokens is not None:  # only then: uncapped preparations keep the keys they always had
        what["max_tokens"] = int(max_tokens)
    return fingerprint_key(what)


def _disk_estimate(spec: str, itemsize: int) -> int | None:
    b = source_bytes(spec)
    if b is None:
        return None
    gz = str(spec).endswith(".gz") or (Path(spec).is_dir() and any(Path(spec).rglob("*.gz")))
    text = b * (4 if gz else 1)  # gzip shrinks text about 3-4x
    return int(text / CHARS_PER_TOKEN_LOW * itemsize)


def _chunked(pieces, chunk_bytes: int, skip: int):
    """Groups of pieces of about chunk_bytes of text, after skipping `skip` pieces (resume)."""
    group, size = [], 0
    for i, p in enumerate(pieces):
        if i < skip:
            continue
        n = len(p.text.encode("utf-8"))
        group.append(p)
        size += n
        if size >= chunk_bytes:
            yield group, size
            group, size = [], 0
    if group:
        yield group, size


def _prefetch(gen, depth: int = 2):
    """Run a generator in a thread, `depth` items ahead: reading overlaps the tokenizer's Rust threads."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        """Hand `item` over unless the consumer has gone (then False): never block for ever on a full queue."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in gen:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens; the fast tokenizer encodes the batch on all cores."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        enc = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [e.ids for e in enc(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _write_chunk(f, arr: np.ndarray) -> None:
    f.write(arr.tobytes())
    f.flush()
    os.fsync(f.fileno())


def _resolve_out(spec: str, tokenizer_spec: str, text_column: str | None, out, tok_fp: str | None,
                 max_tokens: int | None) -> tuple[Path, str]:
    key = preparation_key(spec, tokenizer_spec, text_column, tok_fp, max_tokens)
    if out is None:
        return cache_root() / key, key
    return Path(out).expanduser(), key


def _check_out(path: Path, key: str) -> str:
    """'complete' (same preparation already there), 'resume', or 'fresh'; an error for a folder holding something else."""
    if not path.exists():
        return "fresh"
    if not path.is_dir():
        raise LayerprobeError(f"--out {path} is a file; give a folder")
    if (path / INDEX_NAME).is_file():
        index = read_index(path)
        if index.get("key") == key:
            return "complete"
        raise LayerprobeError(
            f"--out {path} already holds prepared data of {index['source']['spec']!r} with tokenizer "
            f"{index['tokenizer']['name']!r}; choose another --out or delete that folder"
        )
    ours = {PARTIAL_NAME, STATE_NAME, TOKENIZER_DIR, TOKENS_NAME}
    others = [p.name for p in path.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if others:
        raise LayerprobeError(f"--out {path} is not empty (it holds {', '.join(sorted(others)[:3])}); give a new or empty folder")
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "fresh"
    return "resume" if state.get("key") == key else "fresh"


def validate_spec(spec: str) -> str:
    """The kind of a data spec (hf, builtin, prepared, folder, file); an error naming what is accepted otherwise."""
    if spec.startswith("hf:"):
        parse_hf_spec(spec)
        return "hf"
    if spec == BUILTIN:
        return "builtin"
    if is_prepared_dir(spec):
        return "prepared"
    source_bytes(spec)  # raises for a missing path, an unsupported file, an empty folder
    return "folder" if Path(spec).expanduser().is_dir() else "file"


def prepare_data(spec: str, tokenizer: str | None = None, out: str | os.PathLike | None = None, *,
                 text_column: str | None = None, max_tokens: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                 progress: bool = True, on_status=None) -> Prepared:
    """Tokenize a data spec once into a prepared folder (`out`, or the cache); reuse it when already there.

    `tokenizer`: 'bpe' / 'bpe:N' (a byte-level BPE of N ids trained on the first SAMPLE_BYTES of the
    data; the default), a tokenizer folder, or a hub id. `max_tokens`: stop reading once the file holds
    this many tokens (the last document cut there): a streamed hf: dataset such as C4 is read only as far
    as a run needs. A spec that is already a prepared folder is checked against the tokenizer, when one is
    named, and returned as it is.
    """
    spec = str(spec)
    if max_tokens is not None and (isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 1):
        raise LayerprobeError(f"--max-tokens must be a positive whole number of tokens (got {max_tokens!r})")
    kind = validate_spec(spec)
    tok_name, bpe_vocab = parse_tokenizer_spec(tokenizer or "bpe")
    if kind == "prepared":
        if max_tokens is not None:
            raise LayerprobeError(f"{spec} is already prepared: --max-tokens applies to text; prepare the source again")
        store = TokenStore(spec, tokenizer=tokenizer)  # validates the index, the size and the tokenizer
        return Prepared(store.path, store.index, reused=True)
    tok_spec = f"bpe:{bpe_vocab}" if tok_name == "bpe" else str(tokenizer)
    # A named tokenizer is keyed by its fingerprint; a BPE by its size (it is a pure function of the data).
    hf_tok = None if tok_name == "bpe" else load_hf_tokenizer(tokenizer)
    path, key = _resolve_out(spec, tok_spec, text_column, out, fingerprint(hf_tok) if hf_tok is not None else None,
                             max_tokens)
    # One preparation of a folder at a time: parallel runs on the same data (the demo's workers, two jobs
    # sharing the cache) wait here, then find it complete and reuse it.
    with _preparation_lock(path):
        return _prepare_into(path, key, spec, kind, tok_spec, hf_tok, bpe_vocab, text_column=text_column,
                             max_tokens=max_tokens, chunk_bytes=chunk_bytes, progress=progress, on_status=on_status)


@contextlib.contextmanager
def _preparation_lock(path: Path):
    """An exclusive advisory lock (flock) for preparing `path`, kept beside the cache, so it is released
    when its holder ends however it ends (a SIGKILL included)."""
    import fcntl
    import hashlib

    locks = cache_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(str(path.expanduser().resolve()).encode("utf-8")).hexdigest()[:20]
    with open(locks / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_into(path: Path, key: str, spec: str, kind: str, tok_spec: str, hf_tok, bpe_vocab: int, *,
                  text_column, max_tokens: int | None, chunk_bytes: int, progress: bool, on_status) -> Prepared:
    state_kind = _check_out(path, key)
    if state_kind == "complete":
        store = TokenStore(path)
        return Prepared(store.path, store.index, reused=True)
    say = on_status or (lambda msg: None)

    # Disk space first (before training a tokenizer or creating the folder), where the size is estimable.
    itemsize = 2 if (bpe_vocab if hf_tok is None else len(hf_tok)) <= 1 << 16 else 4
    need = _disk_estimate(spec, itemsize)
    if max_tokens is not None:  # the cap bounds the file, also where the source's size is unknown (hf:)
        need = min(need, max_tokens * itemsize) if need is not None else max_tokens * itemsize
    if state_kind != "resume":
        _check_free_space(spec, path, need)
    tok, state_kind = _tokenizer_for(spec, text_column, path, hf_tok, bpe_vocab, state_kind, say)
    dtype = np.dtype(np.uint16) if len(tok) <= 1 << 16 else np.dtype(np.uint32)

    ensure_writable_dir(path)  # created only now: bad input above leaves nothing behind
    state = _start_state(path, key, tok, dtype, state_kind, say)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # encode_batch on every core
    t0 = time.perf_counter()
    _tokenize_into(path, spec, text_column, tok, dtype, state, max_tokens=max_tokens, chunk_bytes=chunk_bytes,
                   need=need, progress=progress)
    if state["tokens"] == 0:
        raise LayerprobeError(f"the data {spec!r} holds no text to tokenize")
    index = _index(spec, kind, text_column, key, tok_spec, tok, dtype, state, max_tokens=max_tokens,
                   seconds=time.perf_counter() - t0)
    os.replace(path / PARTIAL_NAME, path / TOKENS_NAME)
    write_json(path / INDEX_NAME, index)  # last: from here the folder is complete
    (path / STATE_NAME).unlink(missing_ok=True)
    return Prepared(path, index, reused=False)


def _check_free_space(spec: str, path: Path, need: int | None) -> None:
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need is not None and need > free:
        raise LayerprobeError(
            f"preparing {spec} needs about {need / 1e6:,.0f} MB in {path} (at ~{CHARS_PER_TOKEN_LOW:g} characters per "
            f"token) and only {free / 1e6:,.0f} MB are free: free space there or choose another --out / LAYERPROBE_CACHE"
        )


def _tokenizer_for(spec, text_column, path: Path, hf_tok, bpe_vocab: int, state_kind: str, say):
    """The named tokenizer; else the BPE an interrupted run of this preparation saved; else a new BPE (which
    makes the preparation start afresh). Returns (tokenizer, state kind)."""
    tok_dir = path / TOKENIZER_DIR
    if hf_tok is not None:
        return hf_tok, state_kind
    if state_kind == "resume" and tok_dir.is_dir():
        return load_hf_tokenizer(str(tok_dir)), state_kind
    say(f"training a byte-level BPE of {bpe_vocab} ids on the first {SAMPLE_BYTES >> 20} MB of {spec}")
    return train_bpe_on_sample(iter_pieces(spec, text_column), bpe_vocab), "fresh"


def _start_state(path: Path, key: str, tok, dtype: np.dtype, state_kind: str, say) -> dict:
    """The progress record to continue from: the interrupted run's if its partial file holds what it says,
    else a fresh one (the tokenizer saved beside it, stale files removed)."""
    partial, state_path, tok_dir = path / PARTIAL_NAME, path / STATE_NAME, path / TOKENIZER_DIR
    fresh = {"key": key, "pieces": 0, "tokens": 0, "documents": 0, "text_bytes": 0, "max_id": -1, "capped": False}
    state = fresh
    if state_kind == "resume":
        state = {"capped": False, **json.loads(state_path.read_text(encoding="utf-8"))}
        if not partial.exists() and (path / TOKENS_NAME).exists():
            os.replace(path / TOKENS_NAME, partial)  # stopped between the final rename and the index
        if not partial.exists() or partial.stat().st_size < state["tokens"] * dtype.itemsize:
            state_kind, state = "fresh", {**state, **fresh}
    if state_kind == "fresh":
        shutil.rmtree(tok_dir, ignore_errors=True)
        tok.save_pretrained(str(tok_dir))
        partial.unlink(missing_ok=True)
        (path / TOKENS_NAME).unlink(missing_ok=True)
    else:
        say(f"resuming an interrupted preparation at {state['tokens']:,} tokens ({state['pieces']:,} pieces)")
    return state


def _flatten(group, ids, sep_id: int | None) -> tuple[np.ndarray, list[int]]:
    """One chunk's token ids end to end, the separator after each document's last piece; and where each
    document ends in them (the offset after its last token)."""
    flat: list[int] = []
    ends = []
    for p, row in zip(group, ids):
        flat.extend(row)
        if p.last:
            if sep_id is not None:
                flat.append(sep_id)
            ends.append(len(flat))
    return np.asarray(flat, dtype=np.int64), ends


def _tokenize_into(path: Path, spec, text_column, tok, dtype: np.dtype, state: dict, *, max_tokens: int | None,
                   chunk_bytes: int, need: int | None, progress: bool) -> None:
    """Encode the pieces not yet in the partial file, chunk by chunk, appending ids and recording `state` after
    each chunk (so an interruption resumes there); stop at `max_tokens`. A full disk removes the partial file
    and says so."""
    from ..progress import make_progress

    partial, state_path = path / PARTIAL_NAME, path / STATE_NAME
    sep_id, _ = separator(tok)
    total_b = source_bytes(spec)
    t0, done_b0 = time.perf_counter(), state["text_bytes"]
    try:
        with open(partial, "r+b" if partial.exists() else "wb") as f, make_progress(progress) as bar:
            f.truncate(state["tokens"] * dtype.itemsize)  # drop a chunk written after the last recorded state
            f.seek(0, os.SEEK_END)
            # Against the cap where there is one (a stream's size is unknown), else against the source's bytes.
            by_tokens = max_tokens is not None
            total = max_tokens / 1e6 if by_tokens else (max(1, round(total_b / 1e6)) if total_b else None)
            done = state["tokens"] if by_tokens else state["text_bytes"]
            task = bar.add_task(f"tokenizing ({'M tokens' if by_tokens else 'MB'})", total=total, completed=done / 1e6,
                                info="")
            pieces = [] if state["capped"] else iter_pieces(spec, text_column)  # resumed after the last chunk
            for group, nbytes in _prefetch(_chunked(pieces, chunk_bytes, state["pieces"])):
                arr, ends = _flatten(group, encode_texts(tok, [p.text for p in group]), sep_id)
                docs = len(ends)
                if max_tokens is not None and state["tokens"] + arr.size >= max_tokens:
                    keep = max_tokens - state["tokens"]
                    arr, docs, state["capped"] = arr[:keep], sum(e <= keep for e in ends), True
                if arr.size:
                    mx = int(arr.max())
                    if mx >= 1 << (8 * dtype.itemsize):
                        raise LayerprobeError(f"the tokenizer produced id {mx}, beyond its {len(tok)} ids; it cannot be stored as {dtype}")
                    state["max_id"] = max(state["max_id"], mx)
                _write_chunk(f, arr.astype(dtype))
                state["pieces"] += len(group)
                state["tokens"] += int(arr.size)
                state["documents"] += docs
                state["text_bytes"] += nbytes
                write_json(state_path, state)
                secs = max(time.perf_counter() - t0, 1e-9)
                bar.update(task, completed=(state["tokens"] if by_tokens else state["text_bytes"]) / 1e6,
                           info=f"{(state['text_bytes'] - done_b0) / 1e6 / secs:.1f} MB/s · {state['tokens']:,} tokens")
                if state["capped"]:
                    break  # the reader thread stops with the generator
            if total:
                bar.update(task, completed=total)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        written = partial.stat().st_size if partial.exists() else 0
        partial.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
        est = f"about {need / 1e6:,.0f} MB in all" if need else "more than that"
        raise LayerprobeError(
            f"the disk holding {path} filled up after {written / 1e6:,.1f} MB of token ids ({est} needed); "
            "the partial file was removed: free space there or choose another --out / LAYERPROBE_CACHE"
        ) from None


def _index(spec, kind, text_column, key, tok_spec, tok, dtype: np.dtype, state: dict, *, max_tokens: int | None,
           seconds: float) -> dict:
    """index.json: what the token file holds and how it was made (the tokenizer's fingerprint included)."""
    sep_id, sep_desc = separator(tok)
    files = {k: v for k, v in source_fingerprint(spec, text_column).items() if k == "files"}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": {"spec": spec, "kind": kind, "text_column": text_column, **files,
                   # capped: the source held more text than max_tokens; it was read only that far
                   "max_tokens": max_tokens, "capped": bool(state.get("capped"))},
        "tokenizer": {"name": tok_spec, "class": type(tok).__name__, "fingerprint": fingerprint(tok), "vocab_len": len(tok),
                      "eos_id": sep_id, "separator": sep_desc, "max_id": state["max_id"],
                      "embedding_size": embedding_size(len(tok), state["max_id"])},
        "dtype": dtype.name,
        "documents": state["documents"],
        "tokens": state["tokens"],
        "bytes": state["tokens"] * dtype.itemsize,
        "text_bytes": state["text_bytes"],
        "seconds": round(seconds, 3),
    }
