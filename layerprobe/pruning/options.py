"""The sweep's options: parsed and checked before the model loads, resolved once its depth is known."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..errors import LayerprobeError
from .surgery import check_removal

MODES = ("layer", "block", "greedy", "ranked")
RANKINGS = ("angular", "influence", "last", "angular-layer")
RANKING_HELP = {
    "angular": "Gromov et al.: for k layers, the contiguous block [ℓ, ℓ+k) whose input and output are closest in angle",
    "influence": "ShortGPT: the k layers with the lowest Block Influence",
    "last": "the last k layers",
    "angular-layer": "the k layers with the lowest single-layer angular distance d(x^ℓ, x^(ℓ+1))",
}
DEFAULT_RANKINGS = ["angular", "influence", "last"]


def parse_int_list(text: str | None, what: str) -> list[int]:
    """'20,21,22' or '20-22' -> [20, 21, 22]; `what` names the option in the error."""
    if not text:
        return []
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise LayerprobeError(f"{what} must be integers like 3,4,5 or 3-5 (got {text!r})") from None
    return out


def _parse_choices(value: str | Iterable[str], allowed, option: str, hint: str) -> list[str]:
    """Comma-separated (or iterable) choices, "all" for every one; returned in `allowed`'s order."""
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if items == ["all"]:
        return list(allowed)
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise LayerprobeError(f"unknown {option} {', '.join(bad) or repr(value)}; use {hint} "
                              "(several separated by commas) or all")
    return [v for v in allowed if v in items]


def parse_modes(mode: str | Iterable[str] | None, remove=None) -> list[str]:
    if mode is None:
        return [] if remove else ["layer"]
    return _parse_choices(mode, MODES, "--mode", "layer, block, greedy, ranked")


def parse_by(by: str | Iterable[str] | None) -> list[str]:
    if by is None:
        return list(DEFAULT_RANKINGS)
    return _parse_choices(by, RANKINGS, "--by", "angular, influence, last, angular-layer")


def parse_block_sizes(block_size, num_layers: int) -> list[int]:
    """None or 'all' -> every n in 1..L-1; an int, '3', '2,4' or '2-5' -> those."""
    if block_size is None or (isinstance(block_size, str) and block_size.strip().lower() in ("all", "")):
        sizes = list(range(1, num_layers))
    elif isinstance(block_size, int):
        sizes = [block_size]
    elif isinstance(block_size, str):
        sizes = parse_int_list(block_size, "--block-size")
    else:
        sizes = [int(b) for b in block_size]
    if not sizes:
        raise LayerprobeError("--block-size names no size; give n like 3, a list like 2,4, or all")
    for n in sizes:
        if n < 1:
            raise LayerprobeError(f"--block-size must be at least 1 (got {n})")
        if n >= num_layers:
            raise LayerprobeError(f"--block-size {n} is larger than the model allows: a block of {n} layers leaves "
                                  f"{num_layers - n} of {num_layers}; use at most {num_layers - 1}")
    return sorted(set(sizes))


def resolve_steps(steps: int | None, num_layers: int) -> int:
    if steps is None:
        return max(1, num_layers // 2)
    if steps < 1:
        raise LayerprobeError(f"--steps must be at least 1 (got {steps})")
    if steps >= num_layers:
        raise LayerprobeError(f"--steps {steps} is beyond the depth: this model has {num_layers} layers, so at most "
                              f"{num_layers - 1} can be removed")
    return steps


def parse_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    if tasks is None:
        return []
    return [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]


@dataclass
class SweepOptions:
    """What to remove. `parse` checks what needs no model; `for_depth` what needs the layer count."""

    modes: list[str]
    bys: list[str]
    remove: list[int]
    tasks: list[str]
    block_size: int | str | Iterable[int] | None = None
    steps: int | None = None
    block_top: int | None = None  # block mode: only the k blocks per size closest in angle (analyze's map)
    search_samples: int | None = None  # greedy: samples its search steps read (default: all)
    # Known once the depth is:
    removal: tuple[int, ...] | None = None
    block_sizes: list[int] = field(default_factory=list)
    n_steps: int | None = None

    @classmethod
    def parse(cls, *, mode, block_size, steps, by, remove, batch_size: int, lm_eval_tasks, block_top=None,
              search_samples=None) -> "SweepOptions":
        remove_list = list(remove) if remove is not None else []
        if remove is not None and not remove_list:
            raise LayerprobeError("--remove names no layer; give 0-based layer indices like 20,21,22")
        modes = parse_modes(mode, remove_list)
        bys = parse_by(by) if "ranked" in modes else []
        if batch_size < 1:
            raise LayerprobeError(f"--batch-size must be at least 1 (got {batch_size})")
        if steps is not None and steps < 1:
            raise LayerprobeError(f"--steps must be at least 1 (got {steps})")
        if block_top is not None and (block_top < 1 or "block" not in modes):
            raise LayerprobeError(f"--block-top must be at least 1 (got {block_top})" if block_top < 1
                                  else "--block-top picks blocks for block mode; add --mode block")
        if search_samples is not None and (search_samples < 1 or "greedy" not in modes):
            raise LayerprobeError(f"--search-samples must be at least 1 (got {search_samples})" if search_samples < 1
                                  else "--search-samples sets greedy's search; add --mode greedy")
        return cls(modes=modes, bys=bys, remove=remove_list, tasks=parse_tasks(lm_eval_tasks),
                   block_size=block_size, steps=steps, block_top=block_top, search_samples=search_samples)

    def for_depth(self, num_layers: int) -> None:
        L = num_layers
        if L < 2:
            raise LayerprobeError(f"this model has {L} layer; removing any would remove every layer")
        self.removal = check_removal(self.remove, L) if self.remove else None
        self.block_sizes = parse_block_sizes(self.block_size, L) if "block" in self.modes else []
        self.n_steps = resolve_steps(self.steps, L) if ("greedy" in self.modes or "ranked" in self.modes) else None

    @property
    def greedy(self) -> bool:
        return "greedy" in self.modes

    def manifest(self) -> dict:
        return {"modes": self.modes, "block_sizes": self.block_sizes or None, "steps": self.n_steps,
                "block_top": self.block_top, "search_samples": self.search_samples,
                "by": self.bys or None, "rankings": {b: RANKING_HELP[b] for b in self.bys} or None}
