"""Training data: packed token blocks, a held-out split, and a batch order that is a pure function of the step.

Because the rows of step s depend only on (data seed, s), every scheme sees the same batches in the
same order, a resumed run picks up exactly where it stopped, and a data-parallel run splits the
same global batch that a single process would use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..data import load_npy, pack, read_documents, tokenize_documents
from ..errors import LayerprobeError


@dataclass
class TokenData:
    train: torch.Tensor  # [n_train, seq_len] int64
    eval: torch.Tensor  # [n_eval, seq_len] int64
    total_tokens: int


def read_training_text(spec: str, text_column: str | None, needed_chars: int) -> list[str]:
    if spec.startswith("hf:"):
        from ..data import _hf_documents

        return _hf_documents(spec, text_column, needed_chars)
    return read_documents(spec, text_column)


def split_blocks(ids_or_blocks: torch.Tensor, seq_len: int, *, eval_samples: int, batch_size: int,
                 seed: int, spec: str) -> TokenData:
    """Pack, shuffle once with the data seed, and hold out the first `eval_samples` blocks for evaluation."""
    blocks = ids_or_blocks if ids_or_blocks.dim() == 2 else pack(ids_or_blocks, seq_len)
    total = blocks.numel() if ids_or_blocks.dim() == 2 else ids_or_blocks.numel()
    need = batch_size + 1
    if len(blocks) < need:
        raise LayerprobeError(
            f"the data {spec!r} gives {len(blocks)} blocks of {seq_len} tokens ({total} tokens); one batch of "
            f"{batch_size} plus one held-out block needs {need}: give more text or lower --batch-size / --seq-len"
        )
    # Keep at least one full batch for training; evaluation takes what is asked, up to 5% of the blocks.
    n_eval = max(1, min(eval_samples, len(blocks) // 20, len(blocks) - batch_size))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return TokenData(train=blocks[order[n_eval:]].contiguous(), eval=blocks[order[:n_eval]].contiguous(),
                     total_tokens=int(total))


def prepare_token_data(spec: str, tokenizer, *, seq_len: int, batch_size: int, eval_samples: int, seed: int,
                       text_column: str | None = None, vocab_size: int | None = None,
                       needed_chars: int = 50_000_000, docs: list[str] | None = None) -> TokenData:
    """Train and held-out blocks for a data spec (`docs`: its documents, when already read)."""
    spec = str(spec)
    if spec.endswith(".npy"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LayerprobeError(f"no such data file: {spec}")
        arr = load_npy(path, vocab_size, None)
        if arr.shape[1] < seq_len:
            raise LayerprobeError(f"{path} holds rows of {arr.shape[1]} tokens, shorter than --seq-len {seq_len}")
        return split_blocks(arr[:, :seq_len], seq_len, eval_samples=eval_samples, batch_size=batch_size,
                            seed=seed, spec=spec)
    if docs is None:
        docs = read_training_text(spec, text_column, needed_chars)
    ids = tokenize_documents(docs, tokenizer) if docs else torch.empty(0, dtype=torch.long)
    return split_blocks(ids, seq_len, eval_samples=eval_samples, batch_size=batch_size, seed=seed, spec=spec)


class BatchOrder:
    """Rows of the training blocks for each step: epochs of seeded permutations, consumed in order."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_blocks, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def rows(self, step: int) -> torch.Tensor:
        """Block indices of the global batch of optimizer step `step` (0-based)."""
        start = step * self.batch_size
        out = []
        for i in range(start, start + self.batch_size):
            out.append(self._permutation(i // self.n)[i % self.n])
        return torch.stack(out)


@runtime_checkable
class BatchSource(Protocol):
    """Where the run loop gets its token blocks: one global batch per optimizer step, split over processes.

    `batch(step, rank, world_size)` returns this process's rows of step `step` (0-based), an int64 tensor
    [batch_size // world_size, seq_len] on the CPU. It must be a pure function of (data seed, step, rank,
    world_size), and the ranks' rows laid end to end must be the global batch a single process would get:
    that is what makes a resumed run, a reordered scheme list and a DDP run train on the same data.
    A source reading memory-mapped token files implements the same method.
    """

    batch_size: int  # global: sequences per optimizer step, over all processes

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor: ...


class BlockBatches:
    """A `BatchSource` over token blocks held in memory, in the order of `BatchOrder`."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        self.blocks, self.batch_size = blocks, batch_size
        self.order = BatchOrder(len(blocks), batch_size, seed)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if self.batch_size % world_size:
            raise ValueError(f"batch size {self.batch_size} is not divisible by {world_size} processes")
        per_rank = self.batch_size // world_size
        return self.blocks[self.order.rows(step)[rank * per_rank:(rank + 1) * per_rank]]
