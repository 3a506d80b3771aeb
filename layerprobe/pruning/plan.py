"""What a sweep will cost, in layer calls, before it runs: closed forms per mode, and the threshold above
which a sweep must be asked for explicitly.

One layer call is one decoder layer run on one batch. Per batch the full pass costs L; a candidate
that removes the set S restarts at min S and runs the kept layers after it, L − min S − |S| calls
(`set_calls`). Summed over a mode's candidates that gives the closed forms:

- layer mode: Σ_ℓ (L − 1 − ℓ) = L(L − 1)/2
- blocks of n: Σ_ℓ (L − n − ℓ) = (L − n)(L − n + 1)/2; every n = 1..L−1: (L − 1)L(L + 1)/6
- the k blocks of each n with the smallest angular distance (`block_top`): at most
  Σ_n Σ_{i<k} (L − n − i) = O(k·L²)
- ranked, k = 1..steps layers: at most Σ_k (L − k) (exact once the rankings have picked the sets)
- greedy search: step 1 is the layer sweep, L(L − 1)/2; step t > 1 (r = t − 1 layers removed, the
  first at m) redoes the full pass (L), runs the pruned model from m (L − m − r) and each remaining
  layer's removal ((L − r)(L − r − 1)/2): at most, with m = 0, L + (L − r) + (L − r)(L − r − 1)/2.

Sets shared by several modes (block size 1 and layer mode, say) are measured once, which the exact
count (`Plan.for_sets`) knows and the closed forms do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import LayerprobeError

# Above this a sweep needs --yes or a --max-layer-calls that allows it: block-all or greedy of a 32-layer
# model at the default 32 samples (~44k) is over it, a layer sweep of an 80-layer one (~26k) is not.
LAYER_CALLS_NEEDING_YES = 30_000


def check_layer_call_limit(max_layer_calls: int | None) -> None:
    if max_layer_calls is not None and max_layer_calls < 1:
        raise LayerprobeError(f"--max-layer-calls must be at least 1 (got {max_layer_calls})")


def set_calls(num_layers: int, removed) -> int:
    """Layer calls per batch to measure one removal from the full pass's cached inputs."""
    return num_layers - min(removed) - len(set(removed))


def layer_mode_calls(L: int) -> int:
    return L * (L - 1) // 2


def block_calls(L: int, n: int) -> int:
    return (L - n) * (L - n + 1) // 2


def block_all_calls(L: int) -> int:
    return (L - 1) * L * (L + 1) // 6


def block_top_calls(L: int, n: int, k: int) -> int:
    """At most: the k blocks of n whose restarts cost most (the first k)."""
    return sum(L - n - i for i in range(min(k, L - n + 1)))


def ranked_calls(L: int, steps: int) -> int:
    """At most, per ranking: S_k removes k layers starting at 0 or later."""
    return sum(L - k for k in range(1, steps + 1))


def greedy_step_calls(L: int, removed_count: int, first_removed: int = 0) -> int:
    """Step with `removed_count` ≥ 1 layers already removed, the first of them at `first_removed`."""
    r = removed_count
    return L + (L - first_removed - r) + (L - r) * (L - r - 1) // 2


def greedy_search_calls(L: int, steps: int) -> int:
    """At most, per search batch, beyond the full pass: the layer sweep and steps 2..steps."""
    return layer_mode_calls(L) + sum(greedy_step_calls(L, r) for r in range(1, steps))


@dataclass
class Plan:
    """Layer calls a sweep will make: per batch by part, and the number of batches each part runs on."""

    num_layers: int
    batches: int
    parts: dict[str, int] = field(default_factory=dict)  # name -> layer calls per batch of the sweep's pass
    search_batches: int = 0  # greedy's search batches (the first ones); 0 without greedy
    search_per_batch: int = 0  # greedy's search calls per search batch, beyond what the pass measures
    exact: bool = True  # False while rankings or greedy choices are bounded, not known
    estimated_s: float | None = None  # the sweep's time, estimated from its first batch

    @property
    def total(self) -> int:
        return self.batches * sum(self.parts.values()) + self.search_batches * self.search_per_batch

    @classmethod
    def for_options(cls, opts, num_layers: int, samples: int, batch_size: int, candidates=None) -> "Plan":
        """From the options alone (rankings, --block-top and greedy choices bounded), or exact for the
        candidates once they are built (`candidates.build_candidates`); greedy's choices stay bounded."""
        L = num_layers
        batches = math.ceil(samples / batch_size)
        plan = cls(num_layers=L, batches=batches, parts={"full pass": L})
        sets: dict[frozenset, str] = {}  # each set once, named by the first mode that asks for it
        if candidates is not None:
            for c in candidates:
                sets.setdefault(frozenset(c.removed), c.mode)
        else:
            if "layer" in opts.modes:
                sets.update({frozenset({j}): "layer" for j in range(L)})
            for n in opts.block_sizes if "block" in opts.modes else []:
                firsts = range(L - n + 1) if opts.block_top is None else range(min(opts.block_top, L - n + 1))
                for first in firsts:
                    sets.setdefault(frozenset(range(first, first + n)), "block")
            if opts.removal is not None:
                sets.setdefault(frozenset(opts.removal), "remove")
            plan.exact = opts.block_top is None and not opts.bys
        if opts.greedy and (opts.search_samples is None or opts.search_samples >= samples):
            for j in range(L):  # greedy's first step is the layer sweep, measured in the same pass
                sets.setdefault(frozenset({j}), "greedy step 1")
        for s, name in sets.items():
            plan.parts[name] = plan.parts.get(name, 0) + set_calls(L, s)
        if opts.bys and candidates is None:
            plan.parts["ranked"] = len(opts.bys) * ranked_calls(L, opts.n_steps)
        if opts.greedy:
            search = opts.search_samples if opts.search_samples is not None else samples
            plan.search_batches = math.ceil(min(search, samples) / batch_size)
            plan.search_per_batch = sum(greedy_step_calls(L, r) for r in range(1, opts.n_steps))
            if opts.search_samples is not None and opts.search_samples < samples:
                # A separate search: its own full pass and layer sweep; the found sets then join the pass.
                plan.search_per_batch += L + layer_mode_calls(L)
                plan.parts["greedy"] = sum(L - k for k in range(1, opts.n_steps + 1))
            plan.exact = False
        return plan

    def describe(self) -> str:
        parts = ", ".join(f"{name} {calls:,}" for name, calls in self.parts.items() if calls)
        text = (f"planned: {'' if self.exact else 'at most '}{self.total:,} layer calls ({self.batches} batches "
                f"× [{parts}]")
        if self.search_batches:
            text += f" + greedy search {self.search_batches} batches × {self.search_per_batch:,}"
        return text + f"; L = {self.num_layers})"

    def check(self, *, yes: bool, max_layer_calls: int | None) -> None:
        """Refuse a sweep above the threshold unless it was asked for (one line, before any work)."""
        limit = LAYER_CALLS_NEEDING_YES if max_layer_calls is None else max_layer_calls
        if yes or self.total <= limit:
            return
        how = ("raise --max-layer-calls" if max_layer_calls is not None
               else f"pass --yes or --max-layer-calls {self.total}")
        raise LayerprobeError(
            f"this sweep needs {'up to ' if not self.exact else ''}{self.total:,} layer calls ({self.batches} "
            f"batches, L = {self.num_layers}), over the limit of {limit:,}; {how} to run it, or ask for less "
            "(fewer samples, block sizes or steps, --block-top, --search-samples)")


def estimate_seconds(plan: Plan, first_batch_seconds: float, first_batch_calls: int) -> float:
    """The sweep's time from the first batch's: seconds per layer call × the planned calls."""
    return plan.total * first_batch_seconds / max(1, first_batch_calls)
