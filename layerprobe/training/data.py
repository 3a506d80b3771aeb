"""Training data: token blocks read by index, a held-out split that never enters training, and a batch
order that is a pure function of the step.

One path for every data spec. Text (a file, a folder, `builtin`, `hf:`) is tokenized once into a prepared
folder (layerprobe.corpus: a memory-mapped tokens.bin, cached by (data, tokenizer)); a prepared folder is
used as it is; a `.npy` of token ids is memory-mapped. Training then reads only the rows of each step,
so memory does not grow with the corpus. Blocks held in memory (a [n, seq_len] tensor) are served by the
same `BlockBatches`, which is what makes "memmap equals in-memory, loss for loss" a test and not a hope.

Because the rows of step s depend only on (data seed, s) (`layerprobe.corpus.step_rows`), every scheme
sees the same batches in the same order, a resumed run picks up exactly where it stopped, and a
data-parallel run splits the same global batch that a single process would use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from ..corpus import (
    TokenStore,
    check_embedding,
    embedding_size,
    is_prepared_dir,
    parse_tokenizer_spec,
    prepare_data,
    read_index,
    split_store,
    step_rows,
    validate_spec,
)
from ..corpus.store import BlockView
from ..errors import LayerprobeError


@runtime_checkable
class Blocks(Protocol):
    """Token blocks indexed like a [n, seq_len] tensor: `blocks[rows]` gives an integer tensor [len(rows), seq_len].
    A torch tensor, a `BlockView` of a prepared folder and `ArrayBlocks` (a .npy) all qualify."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows): ...


class ArrayBlocks:
    """Rows of a 2-D integer array (a memory-mapped .npy), cut to seq_len, read only when asked for."""

    def __init__(self, array: np.ndarray, seq_len: int, start: int = 0, count: int | None = None):
        self.array, self.seq_len, self.start = array, seq_len, start
        self.count = len(array) - start if count is None else count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.count))
        idx = np.asarray(rows.cpu() if torch.is_tensor(rows) else rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            raise IndexError(f"row out of range [0, {self.count})")
        return torch.from_numpy(np.asarray(self.array[idx + self.start, : self.seq_len], dtype=np.int64))


def materialize(blocks: Blocks) -> torch.Tensor:
    """All rows of a (small) block set as one int64 tensor: the held-out blocks, never the training ones."""
    return blocks[slice(0, len(blocks))].long() if len(blocks) else torch.empty(0, 0, dtype=torch.long)


@dataclass
class TokenData:
    """The training blocks (read by index, never materialised), the held-out blocks (a small tensor) and
    what the model needs to read them: the tokenizer (None for token-id files) and its embedding rows."""

    train: Blocks  # [n_train, seq_len]
    eval: torch.Tensor  # [n_eval, seq_len] int64
    total_tokens: int
    tokenizer: object | None = None
    embedding_rows: int | None = None
    embedding_rule: str = ""
    prepared: Path | None = None  # the prepared folder the training blocks come from
    eval_source: str = ""  # where the held-out blocks come from, in words
    notes: list[str] = field(default_factory=list)

    def describe(self, seq_len: int) -> list[str]:
        lines = [f"data: {self.total_tokens:,} tokens" + (f" in {self.prepared}" if self.prepared else "")
                 + f", {len(self.train):,} training blocks of {seq_len}",
                 f"  held out: {len(self.eval):,} blocks, {self.eval_source}"]
        if self.embedding_rows is not None:
            lines.append(f"  embedding: {self.embedding_rows:,} rows ({self.embedding_rule})")
        return lines + self.notes


def held_out_count(n_blocks: int, eval_samples: int, batch_size: int) -> int:
    """Held-out blocks cut from the training data: what is asked, at most 5% of the blocks, keeping one batch."""
    return max(1, min(eval_samples, n_blocks // 20, n_blocks - batch_size))


def streamed_tokens(spec: str, train_blocks: int | None, eval_samples: int, seq_len: int,
                    eval_spec: str | None = None) -> int | None:
    """How far a streamed (hf:) training spec is read: the run's training blocks plus the held-out tail cut
    from it (none with a separate `eval_spec`), and at least 20 held-out's worth, so that `held_out_count`'s
    5% rule leaves the held-out set whole. None for other specs (read whole) or an unknown run length."""
    if train_blocks is None or not str(spec).startswith("hf:"):
        return None
    tail = 0 if eval_spec is not None else eval_samples
    return max(train_blocks + tail, 20 * tail) * seq_len


def check_data_spec(spec: str, flag: str = "--data") -> str:
    """The kind of a data spec (npy, hf, builtin, prepared, folder, file), checked without reading it."""
    spec = str(spec)
    if spec.endswith(".npy"):
        if not Path(spec).expanduser().is_file():
            raise LayerprobeError(f"no such {flag} file: {spec}")
        return "npy"
    try:
        return validate_spec(spec)
    except LayerprobeError as e:
        raise LayerprobeError(f"{flag}: {e}") from None


def tokenizer_spec_for(data: str, tokenizer: str | None, bpe_vocab: int) -> str | None:
    """What to tokenize `data` with: the named tokenizer; none for token ids or a prepared folder (it has its own);
    else a byte-level BPE of `bpe_vocab` ids trained on the first 32 MB of the data."""
    if tokenizer:
        parse_tokenizer_spec(tokenizer)  # a bad bpe:N is an error before any work
        return tokenizer
    if str(data).endswith(".npy") or is_prepared_dir(data):
        return None
    return f"bpe:{bpe_vocab}"


def _npy(path: str, seq_len: int, vocab_size: int | None) -> np.ndarray:
    """A .npy of token ids, memory-mapped and checked (shape, type, id range: a streaming pass, no copy)."""
    p = Path(path).expanduser()
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise LayerprobeError(f"could not read {p} as a .npy array: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise LayerprobeError(f"{p} must hold a 2-D integer array (samples x tokens); it holds {arr.ndim}-D {arr.dtype}")
    if arr.shape[1] < seq_len:
        raise LayerprobeError(f"{p} holds rows of {arr.shape[1]} tokens, shorter than --seq-len {seq_len}")
    if arr.size and vocab_size is not None and (arr.min() < 0 or arr.max() >= vocab_size):
        raise LayerprobeError(f"{p} holds token ids from {arr.min()} to {arr.max()}, outside this model's vocabulary "
                              f"[0, {vocab_size})")
    return arr


def _prepare(spec: str, tokenizer: str | None, *, text_column, env, progress, say, max_tokens=None) -> TokenStore:
    """Prepare `spec` once and open it. Every process calls `prepare_data`, which works behind a file lock:
    the first to take it prepares, the others wait on the lock (not in a collective, whose timeout a long
    tokenization would outlast) and then find the folder complete, or prepare it themselves if that one failed."""
    main = env is None or env.is_main
    prepared = prepare_data(spec, tokenizer, text_column=text_column, max_tokens=max_tokens,
                            progress=progress and main, on_status=say if main else None)
    if say and not prepared.reused and main:
        capped = " (read only as far as this run needs)" if prepared.index["source"].get("capped") else ""
        say(f"prepared {spec} into {prepared.path} ({prepared.index['tokens']:,} tokens){capped}")
    return TokenStore(prepared.path)


def load_token_data(spec: str, tokenizer: str | None, *, seq_len: int, batch_size: int, eval_samples: int,
                    vocab_size: int | None = None, embedding: int | None = None, text_column: str | None = None,
                    eval_spec: str | None = None, train_blocks: int | None = None, env=None, progress: bool = False,
                    say: Callable[[str], None] | None = None) -> TokenData:
    """Training and held-out blocks of a data spec, read from disk by index.

    `tokenizer`: a tokenizer spec (folder, hub id, bpe[:N]) or None (token ids, or a prepared folder's own).
    `vocab_size`: for token-id files, the ids' bound. `embedding`: the model's embedding rows when given
    explicitly (checked against the largest id in the data); else len(tokenizer) rounded up to 64 and at
    least the largest id + 1 (`layerprobe.corpus.embedding_size`). `eval_spec`: a separate held-out set
    (any spec, tokenized with the training data's tokenizer), else the last blocks of the data.
    `train_blocks`: the blocks the run will read; a streamed hf: spec is then tokenized only as far as those
    and the held-out blocks need, not to the end of the dataset (C4's train split is ~150B tokens).
    """
    spec = str(spec)
    if spec.endswith(".npy"):
        arr = _npy(spec, seq_len, vocab_size)
        if eval_spec is not None:
            ev_arr = _npy(str(eval_spec), seq_len, vocab_size)
            n_eval = min(eval_samples, len(ev_arr))
            train, ev = ArrayBlocks(arr, seq_len), ArrayBlocks(ev_arr, seq_len, 0, n_eval)
            where = f"the first {n_eval} rows of {eval_spec}"
        else:
            n_eval = held_out_count(len(arr), eval_samples, batch_size)
            train, ev = ArrayBlocks(arr, seq_len, 0, len(arr) - n_eval), ArrayBlocks(arr, seq_len, len(arr) - n_eval)
            where = f"the last {n_eval} rows of {spec}, never trained on"
        if len(train) < batch_size or n_eval < 1:
            raise LayerprobeError(
                f"the data {spec!r} gives {len(arr)} blocks of {seq_len} tokens ({len(arr) * seq_len} tokens); one batch "
                f"of {batch_size} plus one held-out block needs {(batch_size + 1) * seq_len}: give more data or lower "
                "--batch-size / --seq-len")
        rows = embedding or vocab_size
        return TokenData(train=train, eval=materialize(ev), total_tokens=len(arr) * seq_len, tokenizer=None,
                         embedding_rows=rows, embedding_rule="--vocab-size: token ids need no tokenizer",
                         eval_source=where)

    store = _prepare(spec, tokenizer, text_column=text_column, env=env, progress=progress, say=say,
                     max_tokens=streamed_tokens(spec, train_blocks, eval_samples, seq_len, eval_spec))
    eval_store = None
    if eval_spec is not None:
        # The held-out text is tokenized with the very tokenizer of the training data (a trained BPE included).
        eval_store = _prepare(str(eval_spec), str(store.tokenizer_dir), text_column=text_column, env=env,
                              progress=progress, say=say,  # a streamed held-out set: its first blocks only
                              max_tokens=eval_samples * seq_len if str(eval_spec).startswith("hf:") else None)
        n_eval = min(eval_samples, eval_store.num_blocks(seq_len)) or 1
        where = f"the first {n_eval} blocks of --eval-data {eval_spec} ({eval_store.path})"
    else:
        n_eval = held_out_count(store.num_blocks(seq_len), eval_samples, batch_size)
        where = f"the last {n_eval} blocks of the data, never trained on"
    split = split_store(store, seq_len, batch_size=batch_size, eval_blocks=n_eval, eval_store=eval_store,
                        name=repr(spec) + ("" if spec == str(store.path) else f" (prepared in {store.path})"))
    max_id = max(store.max_id, eval_store.max_id if eval_store is not None else -1)
    if embedding is not None:
        check_embedding(embedding, max_id, f"the data {spec!r}")
        rows, rule = embedding, f"as given; the largest id in the data is {max_id:,}"
    else:
        rows = embedding_size(store.vocab_len, max_id)
        rule = (f"the tokenizer's {store.vocab_len:,} ids rounded up to a multiple of 64, at least the largest id "
                f"{max_id:,} + 1")
    from ..corpus.vocab import load_tokenizer

    tok = load_tokenizer(str(store.tokenizer_dir))
    return TokenData(train=split.train, eval=materialize(split.eval), total_tokens=store.n_tokens, tokenizer=tok,
                     embedding_rows=rows, embedding_rule=rule, prepared=store.path, eval_source=where)


def prepare_token_data(spec: str, tokenizer, *, seq_len: int, batch_size: int, eval_samples: int, seed: int = 0,
                       text_column: str | None = None, vocab_size: int | None = None,
                       needed_chars: int | None = None, docs: list[str] | None = None,
                       train_blocks: int | None = None) -> TokenData:
    """Train and held-out blocks of a data spec as a run split them, for a tokenizer object (e.g. the one a run
    saved) or None for token ids. The split does not depend on `seed` (it orders batches only); `needed_chars`
    and `docs` are accepted for compatibility and unused: data is prepared once and read by index.
    `train_blocks`: the run's steps × batch, which fixes how far a streamed hf: spec was read."""
    tok_spec = None
    if tokenizer is not None and not str(spec).endswith(".npy") and not is_prepared_dir(spec):
        cap = streamed_tokens(str(spec), train_blocks, eval_samples, seq_len)
        tok_spec = _prepared_tokenizer_spec(str(spec), tokenizer, text_column, cap)
    return load_token_data(spec, tok_spec, seq_len=seq_len, batch_size=batch_size, eval_samples=eval_samples,
                           vocab_size=vocab_size, text_column=text_column, train_blocks=train_blocks)


def _prepared_tokenizer_spec(spec: str, tokenizer, text_column: str | None, max_tokens: int | None = None) -> str:
    """The tokenizer spec under which `spec` was prepared with this tokenizer object: a trained BPE's cache
    entry when it holds this very tokenizer (no second preparation), else the tokenizer's own folder or name."""
    from ..corpus.prepare import cache_root, preparation_key
    from ..corpus.vocab import fingerprint

    fp = fingerprint(tokenizer)
    bpe = f"bpe:{len(tokenizer)}"
    folder = cache_root() / preparation_key(spec, bpe, text_column, None, max_tokens)
    if is_prepared_dir(folder):
        try:
            if read_index(folder)["tokenizer"]["fingerprint"] == fp:
                return bpe
        except LayerprobeError:
            pass
    name = getattr(tokenizer, "name_or_path", "") or ""
    if not name:
        raise LayerprobeError(f"cannot tell which tokenizer prepared {spec!r}: give a tokenizer loaded from a folder")
    return name


class BlockBatches:
    """The `BatchSource` of training: the rows `step_rows` picks for each step, read from any `Blocks` (a
    prepared folder's memmap, a .npy, or a tensor in memory: the same rows either way)."""

    def __init__(self, blocks: Blocks, batch_size: int, seed: int):
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed

    def rows(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Indices into the training blocks that `rank` reads at optimizer step `step` (0-based)."""
        if self.batch_size % world_size:
            raise ValueError(f"batch size {self.batch_size} is not divisible by {world_size} processes")
        return step_rows(step, n_blocks=len(self.blocks), batch_size=self.batch_size, seed=self.seed,
                         rank=rank, world_size=world_size)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        return self.blocks[self.rows(step, rank, world_size)].long()


@runtime_checkable
class BatchSource(Protocol):
    """Where the run loop gets its token blocks: one global batch per optimizer step, split over processes.

    `batch(step, rank, world_size)` returns this process's rows of step `step` (0-based), an int64 tensor
    [batch_size // world_size, seq_len] on the CPU. It must be a pure function of (data seed, step, rank,
    world_size), and the ranks' rows laid end to end must be the global batch a single process would get:
    that is what makes a resumed run, a reordered scheme list and a DDP run train on the same data.
    """

    batch_size: int  # global: sequences per optimizer step, over all processes

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor: ...


__all__ = ["ArrayBlocks", "BatchSource", "BlockBatches", "BlockView", "Blocks", "TokenData", "check_data_spec",
           "held_out_count", "load_token_data", "materialize", "prepare_token_data", "tokenizer_spec_for"]
