"""The sweep under torchrun: each process measures a contiguous share of the samples, and the candidates'
sums are combined over processes with one packed collective (`..distributed.all_reduce_packed`).

Samples, not candidates, are split: every candidate's rows are then sums over the same samples as in one
process (per-sample sums gathered in global order, so the bootstrap intervals are the same), the prefix cache
of a batch is shared by every candidate as before, and greedy's steps, which depend on the previous step's
choice, need no candidate schedule: each step's sums are combined and every process makes the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..distributed import DistEnv, all_reduce_packed, sample_shares
from .measurement import Measured
from .measures import Sums


@dataclass
class Share:
    """This process's samples [start, stop) of `total`, and how its sums join the other processes'."""

    env: DistEnv
    start: int
    stop: int
    total: int

    @classmethod
    def of(cls, env: DistEnv, total: int) -> "Share":
        start, stop = sample_shares(total, env.world_size)[env.rank]
        return cls(env, start, stop, total)

    def combine(self, sums: dict) -> dict:
        """key -> Sums over this share, as key -> Sums over every process's samples (the same keys, in the
        same order, on every process: the same code built them)."""
        if not self.env.distributed:
            return sums
        keys = list(sums)
        with_rows = all(sums[k].samples for k in keys)
        summed, _, rows = all_reduce_packed(
            self.env, summed=[[(s.ce, s.kl, s.top1, s.tokens) for s in sums.values()]],
            rows=[np.concatenate(sums[k].samples) for k in keys] if with_rows else [],
            start=self.start, total=self.total)
        out = {}
        for i, (k, (ce, kl, top1, tokens)) in enumerate(zip(keys, summed[0].reshape(-1, 4).tolist())):
            out[k] = Sums(ce=ce, kl=kl, top1=int(round(top1)), tokens=int(round(tokens)),
                          samples=[rows[i]] if with_rows else [])
        return out

    def measured(self, m: Measured) -> Measured:
        """The full model's and every set's sums over all the samples (one collective)."""
        if not self.env.distributed:
            return m
        combined = self.combine({None: m.full, **m.by_set})
        out = Measured(full=combined.pop(None))
        out.by_set.update(combined)
        return out
