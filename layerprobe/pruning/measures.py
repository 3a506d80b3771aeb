"""Chunked next-token measures of pruned models against the full model.

For every candidate: cross-entropy (loss, `metrics.loss.cross_entropy_rows`: the same definition
`analyze` reports), KL(full ‖ pruned) of the next-token distributions and
top-1 agreement, summed over the predicted positions. Rows (batch × position) are processed in
chunks, so batch × seq × vocab logits are never held at once; the full model's log-probabilities
are computed once per chunk and shared by every candidate of the group.

KL per row is Σ_v p(v) (log p(v) − log q(v)), formed element by element in the candidate's own
logit buffer. (The shortcut Σ p log p − p·z + lse(z) cancels large terms: on SmolLM2 it was off
by 5e-4 relative in float32, this form by 1e-7.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..metrics import cross_entropy_rows

# Logits per scoring chunk. On a GPU ~1 GiB of fp32 logits (~2,000 rows at a 128k vocabulary), so the head
# GEMM is compute-bound and the head matrix is read once per 2,000 rows, not per 65; on the CPU 32 MiB, which
# measured faster there (caches; bench/bench_prune.py --scoring: 3.7 s vs 4.5 s of CPU at 128k).
GPU_CHUNK_ELEMENTS = 1 << 28
CPU_CHUNK_ELEMENTS = 1 << 23
DEFAULT_CHUNK_ELEMENTS = CPU_CHUNK_ELEMENTS  # the budget `chunk_rows_for` takes where no device is named
LIVE_CHUNKS = 3  # chunk-sized fp32 buffers alive at once in `score`: log p, p and one candidate's logits


def chunk_rows_for(vocab: int, chunk_elements: int | None = None, device: torch.device | None = None) -> int:
    """Rows per scoring chunk: `chunk_elements` logits (default: by the device, above); on a GPU never more
    than a quarter of its free memory holds (the chunk's live buffers, twice over)."""
    on_gpu = device is not None and device.type == "cuda"
    elements = chunk_elements or (GPU_CHUNK_ELEMENTS if on_gpu else CPU_CHUNK_ELEMENTS)
    if on_gpu:
        free, _ = torch.cuda.mem_get_info(device)
        elements = min(elements, free // (4 * LIVE_CHUNKS * 4))
    return max(1, elements // max(int(vocab), 1))


@dataclass
class Sums:
    """Running sums over predicted tokens for one candidate (float64)."""

    ce: float = 0.0
    kl: float = 0.0
    top1: int = 0
    tokens: int = 0
    # The same sums per sample, in data order: [samples, 4] blocks of (ce, kl, top1, tokens), one per
    # batch (what the intervals resample, metrics/intervals.py). Empty when `score` was not told the rows per sample.
    samples: list = field(default_factory=list)

    @classmethod
    def from_row(cls, row, tokens: int) -> "Sums":
        """From one row (ce, kl, top1) of `score`'s result, read on the host."""
        ce, kl, top1 = row
        return cls(ce=ce, kl=kl, top1=int(round(top1)), tokens=tokens)

    @classmethod
    def from_samples(cls, block: np.ndarray, rows_per_sample: int) -> "Sums":
        """From one candidate's [samples, 3] per-sample (ce, kl, top1) sums of `score`, read on the host."""
        ce, kl, top1 = block.sum(axis=0)
        per = np.concatenate([block, np.full((block.shape[0], 1), float(rows_per_sample))], axis=1)
        return cls(ce=float(ce), kl=float(kl), top1=int(round(top1)), tokens=rows_per_sample * block.shape[0],
                   samples=[per])

    def add(self, other: "Sums") -> None:
        self.ce += other.ce
        self.kl += other.kl
        self.top1 += other.top1
        self.tokens += other.tokens
        self.samples.extend(other.samples)

    def per_sample(self) -> dict[str, np.ndarray]:
        """name -> [samples] float64: ce, kl, top1, tokens per sample."""
        if not self.samples:
            return {}
        block = np.concatenate(self.samples)
        return {name: block[:, i] for i, name in enumerate(("ce", "kl", "top1", "tokens"))}

    @property
    def loss(self) -> float:
        return self.ce / self.tokens if self.tokens else float("nan")

    @property
    def mean_kl(self) -> float:
        return self.kl / self.tokens if self.tokens else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.top1 / self.tokens if self.tokens else float("nan")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    # by storage object, not address: a fake tensor (memory.py's faked runs) has none
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def predicted_rows(hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, H] hidden states -> [B·(T−1), H] rows that predict tokens 1..T−1."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    return input_ids[:, 1:].reshape(-1)


def score(
    logits_fn,
    full_rows: torch.Tensor,
    candidate_rows: list[torch.Tensor],
    targets: torch.Tensor,
    chunk_rows: int,
    with_full: bool = False,
    rows_per_sample: int | None = None,
) -> torch.Tensor:
    """Sums of CE, KL(full ‖ candidate) and top-1 agreement for each candidate's final hidden rows.

    `logits_fn` maps [rows, H] final hidden states (after the final norm) to logits;
    `full_rows` are the full model's. Returns a float64 tensor [candidates, 3] (ce, kl, top1) on the
    logits' device, never read here: the caller reads a whole batch's sums at once (one host sync).
    With `with_full`, a first row holds the full model's (ce, 0, tokens). With `rows_per_sample` (the rows
    are samples of that many consecutive rows), the sums are per sample: [candidates, samples, 3].
    """
    n = targets.shape[0]
    n_samples = n // rows_per_sample if rows_per_sample else None
    sums = None

    def fold(values: torch.Tensor, ids) -> torch.Tensor:
        """[rows, 3] per-row values -> [3] summed, or [samples, 3] summed per sample."""
        if ids is None:
            return values.sum(dim=0)
        return torch.zeros(n_samples, 3, dtype=torch.float64, device=values.device).index_add_(0, ids, values)

    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        logits = logits_fn(full_rows[s:e]).float()
        if _shares_memory(logits, full_rows):
            logits = logits.clone()
        tgt = targets[s:e].to(logits.device)
        ids = torch.arange(s, e, device=logits.device) // rows_per_sample if rows_per_sample else None
        lse_f = torch.logsumexp(logits, dim=-1)
        top_f = logits.argmax(dim=-1)
        parts = []
        if with_full:
            ce = cross_entropy_rows(logits, tgt, lse_f).double()
            parts.append(fold(torch.stack([ce, torch.zeros_like(ce), torch.ones_like(ce)], dim=1), ids))
        logp_f = logits.sub_(lse_f[:, None])  # in place: the full logits are not needed any more
        p_f = logp_f.exp()
        del logits
        for rows in candidate_rows:
            z = logits_fn(rows[s:e]).float()
            if _shares_memory(z, rows):  # an identity logits_fn: never write into the caller's rows
                z = z.clone()
            lse = torch.logsumexp(z, dim=-1)
            ce = cross_entropy_rows(z, tgt, lse).double()
            agree = (z.argmax(dim=-1) == top_f).double()
            z.sub_(lse[:, None])  # log q
            torch.sub(logp_f, z, out=z)  # log p − log q
            kl = z.mul_(p_f).sum(dim=-1).double()
            parts.append(fold(torch.stack([ce, kl, agree], dim=1), ids))
            del z
        chunk = torch.stack(parts) if parts else None
        if chunk is not None:
            sums = chunk if sums is None else sums.add_(chunk)
    if sums is None:  # no rows, or no candidate and no full model
        device = full_rows.device
        shape = (len(candidate_rows) + int(with_full),) + ((n_samples,) if n_samples is not None else ()) + (3,)
        sums = torch.zeros(shape, dtype=torch.float64, device=device)
    return sums


def read_sums(sums: torch.Tensor, tokens: int, rows_per_sample: int | None = None) -> list[Sums]:
    """`score`'s sums, read on the host at once (the one host sync), as Sums: per sample where they are."""
    values = np.asarray(sums.tolist(), dtype=np.float64)  # one read, whatever the device
    if values.ndim == 3:
        return [Sums.from_samples(block, rows_per_sample) for block in values]
    return [Sums.from_row(row, tokens) for row in values.tolist()]
