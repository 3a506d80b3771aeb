"""The sweep's measurement: every candidate scored on every batch from the full model's cached layer inputs.

Per batch, one full pass stores each layer's input (`PrefixRunner.capture`) and every candidate
restarts from the input of its first removed layer. Greedy steps redo that full pass per batch
(nothing is kept from batch to batch, so memory does not grow with the samples), run the current
pruned model from its first removed layer and sweep its remaining layers the same way (SLEB-style).

The sums stay on the device: `score` returns them as a tensor and they are read once per batch
(once per greedy step), so the host never waits on the GPU per candidate or per chunk.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .measures import Sums, next_token_targets, predicted_rows, read_sums, score
from .prefix import PrefixRunner
from .surgery import format_removed

GROUP_BYTES = 512 << 20  # final hidden states of the candidates scored together, per batch (CPU)
GROUP_SHARE_OF_FREE = 4  # on a GPU: a quarter of the free memory, at least GROUP_BYTES when it is there


def group_size_for(runner: PrefixRunner, blocks: torch.Tensor, batch_size: int, dtype: torch.dtype,
                   budget: int | None = None) -> int:
    """How many candidates' final hidden rows fit in the byte budget for one batch (at least 1).

    Every group recomputes the full model's log-probabilities, so a group is as large as memory allows:
    `budget` bytes, by default GROUP_BYTES, or on a GPU the larger of that and a quarter of its free
    memory, capped by the free memory itself. When memory is short the group falls below L + 1.
    """
    anatomy = runner.anatomy
    width = (int(anatomy.head.weight.shape[1]) if hasattr(anatomy.head, "weight")
             else int(runner.model.config.hidden_size))
    rows_per_batch = min(batch_size, blocks.shape[0]) * (blocks.shape[1] - 1)
    elem = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    if budget is None:
        budget = GROUP_BYTES
        device = getattr(getattr(anatomy.head, "weight", None), "device", torch.device("cpu"))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(max(GROUP_BYTES, free // GROUP_SHARE_OF_FREE), free // 2)
    return max(1, budget // max(1, rows_per_batch * width * elem))


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
                 with_full: bool = False) -> torch.Tensor:
        """[len(sets) (+1 first, the full model's, `with_full`), 3] sums on the device, not read; per sample
        ([sets (+1), samples, 3]) when the scorer has `rows_per_sample`."""
        runner = self.runner
        parts: list[torch.Tensor] = []
        for g in range(0, len(sets), self.group_size):
            rows = []
            for s in sets[g:g + self.group_size]:
                start = min(s - base_removed)
                y = runner.run(base_inputs[start], start, s, calls)
                self.naive_layer_calls += runner.num_layers - len(s)
                rows.append(runner.final_hidden(predicted_rows(y)))
                if self.on_done:
                    self.on_done()
            parts.append(score(runner.logits, full_rows, rows, targets, self.chunk_rows, with_full and g == 0,
                               self.rows_per_sample))
            del rows
        if not sets:
            parts.append(score(runner.logits, full_rows, [], targets, self.chunk_rows, with_full,
                               self.rows_per_sample))
        return torch.cat([p.to(parts[0].device) for p in parts])


@dataclass
class Measured:
    """Sums per removal set over all batches, and the full model's."""

    full: Sums = field(default_factory=Sums)
    by_set: dict[frozenset, Sums] = field(default_factory=lambda: defaultdict(Sums))


def measure_sets(scorer: Scorer, batches: list[torch.Tensor], sets: list[frozenset], *, bar, task,
                 on_first_batch=None) -> Measured:
    """One full pass per batch, then every set in `sets` from the cached inputs. `on_first_batch(seconds,
    layer calls)` is told what the first batch cost (for the time estimate)."""
    runner = scorer.runner
    in_dev = runner.anatomy.input_device
    out = Measured()
    for b, batch in enumerate(batches):
        started, calls_before = time.perf_counter(), runner.layer_calls + runner.capture_passes * runner.num_layers
        ids = batch.to(in_dev)
        scorer.naive_layer_calls += runner.num_layers  # the full model's own pass
        with torch.inference_mode():
            cap = runner.capture(ids)
            targets = next_token_targets(ids)
            full_rows = runner.final_hidden(predicted_rows(cap.output))
            sums = scorer.evaluate(cap.inputs, frozenset(), cap.calls, sets, full_rows, targets, with_full=True)
        del cap
        read = read_sums(sums, int(targets.shape[0]), scorer.rows_per_sample)  # the batch's one host sync
        out.full.add(read[0])
        for s, one in zip(sets, read[1:]):
            out.by_set[s].add(one)
        if not sets:
            bar.update(task, advance=1)
        bar.update(task, info=f"full loss {out.full.loss:.3f}")
        if b == 0 and on_first_batch is not None:
            on_first_batch(time.perf_counter() - started,
                           runner.layer_calls + runner.capture_passes * runner.num_layers - calls_before)
    return out


def _greedy_step_sums(scorer: Scorer, batches: list[torch.Tensor], removed: frozenset,
                      sets: list[frozenset], combine=None) -> dict[frozenset, Sums]:
    """Sums for each set in `sets` (all extending `removed`) over every batch, read once.

    Each batch's full pass is redone here rather than kept from the first pass: the layers before the
    first removed one are the full model's, so the pruned model starts from the input stored there."""
    runner = scorer.runner
    in_dev = runner.anatomy.input_device
    first = min(removed)
    total, tokens = None, 0
    for batch in batches:
        ids = batch.to(in_dev)
        with torch.inference_mode():
            cap = runner.capture(ids)
            targets = next_token_targets(ids)
            full_rows = runner.final_hidden(predicted_rows(cap.output))
            inputs: dict[int, torch.Tensor] = dict(enumerate(cap.inputs[:first]))
            runner.run(cap.inputs[first], first, removed, cap.calls, record=inputs)
            part = scorer.evaluate(inputs, removed, cap.calls, sets, full_rows, targets)
            if part.dim() == 3:  # per sample: the batches' samples side by side
                total = part if total is None else torch.cat([total, part.to(total.device)], dim=1)
            else:
                total = part if total is None else total.add_(part)
        tokens += int(targets.shape[0])
        del cap, inputs
    read = read_sums(total, tokens, scorer.rows_per_sample)  # one host sync per step
    step = dict(zip(sets, read))
    return combine(step) if combine is not None else step


def singles(num_layers: int) -> list[frozenset]:
    """Greedy's first step: each single layer, measured in the sweep's own pass."""
    return [frozenset({j}) for j in range(num_layers)]


def greedy(scorer: Scorer, first_step: dict[frozenset, Sums], batches: list[torch.Tensor], steps: int,
           bar, combine=None) -> list[tuple[frozenset, int, Sums]]:
    """SLEB-style: remove the least harmful layer, re-measure every remaining one, repeat.

    `first_step` holds every single layer's sums on `batches` (the sweep's pass measured them).
    Returns per step (layers removed so far, the layer added, their sums on `batches`). `combine`: each step's
    sums over this process's batches -> over every process's (torchrun), so every process chooses alike.
    """
    L = scorer.runner.num_layers
    removed: frozenset = frozenset()
    out = []
    total = sum(L - t + 1 for t in range(2, steps + 1)) * len(batches)
    task = bar.add_task("greedy removal", total=max(total, 1), info="")
    scorer.on_done = lambda: bar.update(task, advance=1)
    for t in range(1, steps + 1):
        remaining = [j for j in range(L) if j not in removed]
        sets = [removed | {j} for j in remaining]
        if t == 1:
            step_sums = {s: first_step[s] for s in sets}
        else:
            step_sums = _greedy_step_sums(scorer, batches, removed, sets, combine)
        best = min(remaining, key=lambda j: (step_sums[removed | {j}].loss, j))
        removed = removed | {best}
        out.append((removed, best, step_sums[removed]))
        bar.update(task, info=f"step {t}: removed {format_removed(removed)}")
    return out
