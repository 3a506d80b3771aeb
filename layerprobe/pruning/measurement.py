"""The sweep's measurement: every candidate scored on every batch from the full model's cached layer inputs.

Per batch, one full pass stores each layer's input (`PrefixRunner.capture`) and every candidate
restarts from the input of its first removed layer. Greedy steps re-run the current pruned model
once per batch and sweep its remaining layers the same way (SLEB-style).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .measures import Sums, next_token_targets, predicted_rows, score
from .prefix import PrefixRunner
from .surgery import format_removed

GROUP_BYTES = 512 << 20  # final hidden states of the candidates scored together, per batch


def group_size_for(runner: PrefixRunner, blocks: torch.Tensor, batch_size: int, dtype: torch.dtype) -> int:
    """How many candidates' final hidden rows fit in GROUP_BYTES for one batch (at least L + 1)."""
    anatomy = runner.anatomy
    width = (int(anatomy.head.weight.shape[1]) if hasattr(anatomy.head, "weight")
             else int(runner.model.config.hidden_size))
    rows_per_batch = min(batch_size, blocks.shape[0]) * (blocks.shape[1] - 1)
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return max(runner.num_layers + 1, GROUP_BYTES // max(1, rows_per_batch * width * elem))


class Scorer:
    """Evaluates sets of removed layers on one batch from a base model's layer inputs."""

    def __init__(self, runner: PrefixRunner, chunk_rows: int, group_size: int, on_done=None,
                 rows_per_sample: int | None = None):
        self.runner = runner
        self.rows_per_sample = rows_per_sample  # the sums are also kept per sample (intervals)
        self.chunk_rows = chunk_rows
        self.group_size = max(1, group_size)
        self.on_done = on_done
        self.naive_layer_calls = 0  # what one full forward per candidate would have run

    def evaluate(self, base_inputs, base_removed: frozenset, calls, sets: list[frozenset], full_rows, targets,
                 full_sums: Sums | None = None) -> list[Sums]:
        runner = self.runner
        out: list[Sums] = []
        for g in range(0, len(sets), self.group_size):
            rows = []
            for s in sets[g:g + self.group_size]:
                start = min(s - base_removed)
                y = runner.run(base_inputs[start], start, s, calls)
                self.naive_layer_calls += runner.num_layers - len(s)
                rows.append(runner.final_hidden(predicted_rows(y)))
                if self.on_done:
                    self.on_done()
            out.extend(score(runner.logits, full_rows, rows, targets, self.chunk_rows,
                             full_sums if g == 0 else None, self.rows_per_sample))
            del rows
        if not sets and full_sums is not None:
            score(runner.logits, full_rows, [], targets, self.chunk_rows, full_sums, self.rows_per_sample)
        return out


@dataclass
class Measured:
    """Sums per removal set over all batches, the full model's, and what greedy needs to go on."""

    full: Sums = field(default_factory=Sums)
    by_set: dict[frozenset, Sums] = field(default_factory=lambda: defaultdict(Sums))
    stored: list[tuple] = field(default_factory=list)  # per batch: (targets, first layer input, calls, full rows)


def measure_sets(scorer: Scorer, batches: list[torch.Tensor], sets: list[frozenset], *, keep_for_greedy: bool,
                 bar, task) -> Measured:
    """One full pass per batch, then every set in `sets` from the cached inputs."""
    runner = scorer.runner
    in_dev = runner.anatomy.input_device
    out = Measured()
    for batch in batches:
        ids = batch.to(in_dev)
        scorer.naive_layer_calls += runner.num_layers  # the full model's own pass
        with torch.inference_mode():
            cap = runner.capture(ids)
            targets = next_token_targets(ids)
            full_rows = runner.final_hidden(predicted_rows(cap.output))
            sums = scorer.evaluate(cap.inputs, frozenset(), cap.calls, sets, full_rows, targets, full_sums=out.full)
        for s, part in zip(sets, sums):
            out.by_set[s].add(part)
        if keep_for_greedy:
            out.stored.append((targets, cap.inputs[0], cap.calls, full_rows))
        del cap
        if not sets:
            bar.update(task, advance=1)
        bar.update(task, info=f"full loss {out.full.loss:.3f}")
    return out


def _greedy_step_sums(scorer: Scorer, stored, removed: frozenset, sets: list[frozenset]) -> dict[frozenset, Sums]:
    """Sums for each set in `sets` (all extending `removed`) over every stored batch."""
    runner = scorer.runner
    step_sums = {s: Sums() for s in sets}
    for targets, first_input, calls, full_rows in stored:
        with torch.inference_mode():
            inputs: dict[int, torch.Tensor] = {}
            runner.run(first_input, 0, removed, calls, record=inputs)
            parts = scorer.evaluate(inputs, removed, calls, sets, full_rows, targets)
        for s, part in zip(sets, parts):
            step_sums[s].add(part)
        del inputs
    return step_sums


def greedy(scorer: Scorer, measured: Measured, steps: int, bar) -> list[tuple[frozenset, int, Sums]]:
    """SLEB-style: remove the least harmful layer, re-measure every remaining one, repeat.

    Returns per step (layers removed so far, the layer added, their sums).
    """
    L = scorer.runner.num_layers
    known, stored = measured.by_set, measured.stored
    removed: frozenset = frozenset()
    out = []
    reuse_first = all(frozenset({j}) in known for j in range(L))  # step 1 is the layer sweep
    total = sum((L - t + 1) for t in range(1 if not reuse_first else 2, steps + 1)) * len(stored)
    task = bar.add_task("greedy removal", total=max(total, 1), info="")
    scorer.on_done = lambda: bar.update(task, advance=1)
    for t in range(1, steps + 1):
        remaining = [j for j in range(L) if j not in removed]
        sets = [removed | {j} for j in remaining]
        if t == 1 and reuse_first:
            step_sums = {s: known[s] for s in sets}
        else:
            step_sums = _greedy_step_sums(scorer, stored, removed, sets)
        best = min(remaining, key=lambda j: (step_sums[removed | {j}].loss, j))
        removed = removed | {best}
        out.append((removed, best, step_sums[removed]))
        bar.update(task, info=f"step {t}: removed {format_removed(removed)}")
    return out
