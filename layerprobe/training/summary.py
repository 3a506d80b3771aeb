"""What a training run reports: one `RunResult` per scheme, gathered in a `TrainingSummary`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunResult:
    scheme: str
    path: str
    status: str  # completed, diverged, interrupted
    steps_done: int
    total_steps: int
    final_loss: float | None = None
    final_eval_loss: float | None = None
    final_eval_ppl: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    diverged_at: int | None = None
    diverged_reason: str | None = None
    resumed_from: int | None = None
    checkpoint_step: int | None = None  # the step of the checkpoint in last/ (and the top-level model)
    seconds: float = 0.0
    tokens_per_s: float | None = None
    layer_output_var: list[float] | None = None  # the last evaluation's per-layer output variance

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingSummary:
    out: str
    runs: list[RunResult] = field(default_factory=list)
    interrupted: bool = False
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"out": self.out, "interrupted": self.interrupted, "settings": self.settings,
                "runs": [r.as_dict() for r in self.runs]}
