"""The token store: a prepared folder opened read-only as a memmap, served as fixed-length blocks by index.

Block i of length L is tokens[i*L : (i+1)*L]; blocks never overlap and the incomplete tail is dropped.
Memory does not grow with the corpus: only the rows asked for are read, and the batch order
(`step_rows`) is computed per step from (seed, step) by a keyed Feistel permutation of the block
indices, so nothing of size n_blocks is ever materialised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LayerprobeError
from .readers import INDEX_NAME
from .vocab import embedding_size, fingerprint, load_hf_tokenizer, parse_tokenizer_spec

# The files of a prepared folder, owned here (the reader); prepare.py writes them.
FORMAT = "layerprobe-tokens"
FORMAT_VERSION = 1
TOKENS_NAME = "tokens.bin"


def read_index(path: str | os.PathLike) -> dict:
    p = Path(path).expanduser() / INDEX_NAME
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LayerprobeError(f"cannot read {p}: {e}; prepare the data again with prepare-data") from None
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise LayerprobeError(f"{p} is not a layerprobe token index of format version {FORMAT_VERSION}; prepare the data again")
    return index


def check_tokenizer_matches(index: dict, tokenizer_spec: str | None, tokenizer=None, where: str = "") -> None:
    """A prepared folder must have been made with the tokenizer asked for: name both when not."""
    if tokenizer_spec is None and tokenizer is None:
        return
    have = index["tokenizer"]
    asked = tokenizer_spec or type(tokenizer).__name__
    if tokenizer is not None:
        same = fingerprint(tokenizer) == have["fingerprint"]
    else:
        name, n = parse_tokenizer_spec(tokenizer_spec)
        same = have["name"] == (f"bpe:{n}" if name == "bpe" else tokenizer_spec)
        if not same and name != "bpe":
            try:  # a folder and a hub id can name the same tokenizer: compare what they hold
                same = fingerprint(load_hf_tokenizer(tokenizer_spec)) == have["fingerprint"]
            except LayerprobeError:
                same = False
    if not same:
        raise LayerprobeError(
            f"the prepared data {where or ''} was made with tokenizer {have['name']!r} (fingerprint {have['fingerprint']}), "
            f"not {asked!r}: prepare it again with --tokenizer {asked}, or ask for {have['name']!r}"
        )


class TokenStore:
    """A prepared folder (prepare_data / `layerprobe prepare-data`), validated and opened read-only."""

    def __init__(self, path: str | os.PathLike, *, tokenizer: str | None = None, tokenizer_obj=None):
        self.path = Path(path).expanduser()
        if not (self.path / INDEX_NAME).is_file():
            raise LayerprobeError(f"{self.path} is not a prepared data folder (no {INDEX_NAME}); make one with prepare-data")
        self.index = read_index(self.path)
        check_tokenizer_matches(self.index, tokenizer, tokenizer_obj, where=str(self.path))
        self.dtype = np.dtype(self.index["dtype"])
        self.n_tokens = int(self.index["tokens"])
        f = self.path / TOKENS_NAME
        expected = self.n_tokens * self.dtype.itemsize
        size = f.stat().st_size if f.is_file() else None
        if size != expected or self.index.get("bytes") != expected:
            what = "is missing" if size is None else f"has {size:,} bytes"
            raise LayerprobeError(
                f"{f} {what}, but its index says {self.n_tokens:,} tokens of {self.dtype} = {expected:,} bytes: "
                "the file is truncated or does not belong to this index; prepare the data again"
            )
        self.tokens = np.memmap(f, dtype=self.dtype, mode="r", shape=(self.n_tokens,)) if self.n_tokens else np.zeros(0, self.dtype)
        # Training reads rows with pread, not through the mapping: every page read through a mapping stays in
        # the process's resident set (file-backed and reclaimable, but counted), so a long run would seem
        # to hold the whole corpus; pread leaves it in the page cache only.
        self._fd = os.open(f, os.O_RDONLY) if hasattr(os, "pread") else None

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def __getstate__(self):  # a store sent to another process opens its own file
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = os.open(self.path / TOKENS_NAME, os.O_RDONLY) if hasattr(os, "pread") else None

    # vocabulary
    @property
    def vocab_len(self) -> int:
        return int(self.index["tokenizer"]["vocab_len"])

    @property
    def max_id(self) -> int:
        return int(self.index["tokenizer"]["max_id"])

    @property
    def eos_id(self) -> int | None:
        return self.index["tokenizer"]["eos_id"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def embedding_size(self, multiple: int = 64) -> int:
        return embedding_size(self.vocab_len, self.max_id, multiple)

    def __len__(self) -> int:
        return self.n_tokens

    def num_blocks(self, seq_len: int) -> int:
        return self.n_tokens // seq_len

    def block(self, i: int, seq_len: int) -> torch.Tensor:
        return self.blocks([i], seq_len)[0]

    def blocks(self, indices, seq_len: int) -> torch.Tensor:
        """[len(indices), seq_len] int64 token ids of the given blocks, read from the memmap."""
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64).reshape(-1)
        n = self.num_blocks(seq_len)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"block index out of range [0, {n}) for seq_len {seq_len}")
        out = np.empty((idx.size, seq_len), dtype=np.int64)
        size = self.dtype.itemsize * seq_len
        for r, i in enumerate(idx):  # one contiguous read per row
            if self._fd is not None:
                data = os.pread(self._fd, size, int(i) * size)
                if len(data) != size:
                    raise LayerprobeError(f"{self.path / TOKENS_NAME} became shorter while training; prepare the data again")
                out[r] = np.frombuffer(data, dtype=self.dtype)
            else:
                out[r] = self.tokens[i * seq_len:(i + 1) * seq_len]
        return torch.from_numpy(out)


@dataclass
class BlockView:
    """Blocks [start, start + count) of a store, indexed like a [count, seq_len] tensor: view[rows]."""

    store: TokenStore
    seq_len: int
    start: int
    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = range(*rows.indices(self.count))
        if isinstance(rows, int):
            return self[[rows]][0]
        idx = np.asarray(rows.cpu() if torch.is_tensor(rows) else rows, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            raise IndexError(f"row out of range [0, {self.count})")
        return self.store.blocks(idx + self.start, self.seq_len)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.seq_len)


@dataclass
class Split:
    train: BlockView
    eval: BlockView


def split_store(store: TokenStore, seq_len: int, *, batch_size: int, eval_blocks: int,
                eval_store: TokenStore | None = None, name: str | None = None) -> Split:
    """Training and held-out blocks: the held-out ones are the LAST `eval_blocks` blocks of the store (never
    trained on), or the first `eval_blocks` of a separate eval store. Errors say how many tokens were found and needed;
    `name`: how they call the data (the spec the user gave), default the folder."""
    if seq_len < 2:
        raise LayerprobeError(f"--seq-len must be at least 2 (got {seq_len})")
    n = store.num_blocks(seq_len)
    if eval_store is not None:
        if eval_store.index["tokenizer"]["fingerprint"] != store.index["tokenizer"]["fingerprint"]:
            raise LayerprobeError(
                f"the eval data {eval_store.path} was made with tokenizer {eval_store.index['tokenizer']['name']!r}, the training "
                f"data {store.path} with {store.index['tokenizer']['name']!r}: prepare both with the same --tokenizer"
            )
        m = eval_store.num_blocks(seq_len)
        if m < max(eval_blocks, 1):
            raise LayerprobeError(
                f"the eval data {eval_store.path} holds {eval_store.n_tokens:,} tokens ({m} blocks of {seq_len}); "
                f"{eval_blocks} held-out blocks need {eval_blocks * seq_len:,} tokens: give more eval text or fewer eval blocks"
            )
        train_n, ev = n, BlockView(eval_store, seq_len, 0, eval_blocks)
        need_train = batch_size
    else:
        train_n = n - eval_blocks
        ev = BlockView(store, seq_len, max(train_n, 0), eval_blocks)
        need_train = batch_size
    if train_n < need_train or eval_blocks < 1:
        need = (need_train + (0 if eval_store is not None else max(eval_blocks, 1))) * seq_len
        raise LayerprobeError(
            f"the data {name or store.path} holds {store.n_tokens:,} tokens ({n:,} blocks of {seq_len}); one batch of {batch_size} "
            f"blocks{'' if eval_store is not None else f' plus {max(eval_blocks, 1)} held-out'} needs {need:,} tokens: "
            "give more text, or lower the batch size / sequence length / held-out blocks"
        )
    return Split(train=BlockView(store, seq_len, 0, train_n), eval=ev)


# ---- batch order ---------------------------------------------------------------------------------------------------

def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed bijective scramble of uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def permute(idx: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 4) -> np.ndarray:
    """A seeded permutation of range(n) evaluated at `idx` without building it.

    A balanced Feistel network on the smallest even number of bits covering n, with splitmix64 round
    functions keyed by (seed, epoch, round), walked until it lands inside [0, n) ("cycle walking": since
    the domain is < 4n, about 4 walks at most on average). Bijective on [0, n) by construction."""
    idx = np.asarray(idx, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(idx, dtype=np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = bits // 2
    mask = np.uint64((1 << half) - 1)
    base = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03) % (1 << 64)
    keys = [_mix(np.array([(base + r + 1) % (1 << 64)], dtype=np.uint64))[0] for r in range(rounds)]

    def feistel(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            with np.errstate(over="ignore"):
                left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(idx)
    bad = out >= np.uint64(n)
    while bad.any():
        out[bad] = feistel(out[bad])
        bad = out >= np.uint64(n)
    return out.astype(np.int64)


def step_rows(step: int, *, n_blocks: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Block indices (into the training blocks) that rank `rank` of `world_size` reads at optimizer step `step`.

    The global batch of step s is positions [s*B, (s+1)*B) of an endless sequence of epochs, each a seeded
    permutation of the n training blocks; it is a pure function of (seed, s). Rank r takes the r-th of w
    equal contiguous slices, so ranks are disjoint and together make the global batch."""
    if batch_size % world_size:
        raise LayerprobeError(f"the global batch {batch_size} does not split evenly over {world_size} processes")
    if n_blocks < 1:
        raise LayerprobeError("no training blocks")
    per = batch_size // world_size
    pos = np.arange(step * batch_size + rank * per, step * batch_size + (rank + 1) * per, dtype=np.int64)
    epochs, offs = pos // n_blocks, pos % n_blocks
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        m = epochs == e
        out[m] = permute(offs[m], n_blocks, seed, int(e))
    return torch.from_numpy(out)
