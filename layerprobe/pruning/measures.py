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

DEFAULT_CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M floats = 32 MiB in float32


def chunk_rows_for(vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(int(vocab), 1))


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
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
    full_sums: Sums | None = None,
    rows_per_sample: int | None = None,
) -> list[Sums]:
    """Sums of CE, KL(full ‖ candidate) and top-1 agreement for each candidate's final hidden rows.

    `logits_fn` maps [rows, H] final hidden states (after the final norm) to logits;
    `full_rows` are the full model's. `full_sums`, when given, receives the full model's CE.
    `rows_per_sample`: the rows are samples of this many consecutive rows; the sums are then also
    kept per sample (`Sums.samples`), on the device until the end of the batch.
    """
    out = [Sums() for _ in candidate_rows]
    n = targets.shape[0]
    per = None
    if rows_per_sample:
        B = n // rows_per_sample
        per = [torch.zeros(B, 4, dtype=torch.float64, device=full_rows.device) for _ in range(len(candidate_rows) + 1)]
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        logits = logits_fn(full_rows[s:e]).float()
        if _shares_memory(logits, full_rows):
            logits = logits.clone()
        tgt = targets[s:e].to(logits.device)
        lse_f = torch.logsumexp(logits, dim=-1)
        top_f = logits.argmax(dim=-1)
        ids = torch.arange(s, e, device=logits.device) // rows_per_sample if per else None
        if full_sums is not None:
            ce = cross_entropy_rows(logits, tgt, lse_f)
            full_sums.ce += float(ce.sum(dtype=torch.float64))
            full_sums.tokens += e - s
            full_sums.top1 += e - s
            if per:
                _per_sample_add(per[-1], ids, ce, torch.zeros_like(ce), torch.ones_like(ce))
        logp_f = logits.sub_(lse_f[:, None])  # in place: the full logits are not needed any more
        p_f = logp_f.exp()
        del logits
        for c, rows in enumerate(candidate_rows):
            z = logits_fn(rows[s:e]).float()
            if _shares_memory(z, rows):  # an identity logits_fn: never write into the caller's rows
                z = z.clone()
            lse = torch.logsumexp(z, dim=-1)
            ce = cross_entropy_rows(z, tgt, lse)
            agree = z.argmax(dim=-1) == top_f
            z.sub_(lse[:, None])  # log q
            torch.sub(logp_f, z, out=z)  # log p − log q
            kl = z.mul_(p_f).sum(dim=-1)
            acc = out[c]
            acc.ce += float(ce.sum(dtype=torch.float64))
            acc.kl += float(kl.sum(dtype=torch.float64))
            acc.top1 += int(agree.sum())
            acc.tokens += e - s
            if per:
                _per_sample_add(per[c], ids, ce, kl, agree)
            del z
    if per:
        for acc, block in zip(out, per):
            acc.samples.append(block.cpu().numpy())
        if full_sums is not None:
            full_sums.samples.append(per[-1].cpu().numpy())
    return out


def _per_sample_add(block: torch.Tensor, ids: torch.Tensor, ce, kl, agree) -> None:
    """Fold a chunk's rows into [B, 4] per-sample (ce, kl, top1, tokens) sums."""
    rows = torch.stack([ce.double(), kl.double(), agree.double(), torch.ones_like(ce, dtype=torch.float64)], dim=1)
    block.index_add_(0, ids.to(block.device), rows.to(block.device))
