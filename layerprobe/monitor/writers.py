"""Where the monitor's rows go: metrics.jsonl always (when there is a run folder), TensorBoard and
Weights & Biases when asked for and installed, never required."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from ..errors import LayerprobeError
from ..io import JsonLinesAppender


def json_lines(path: Path) -> JsonLinesAppender:
    """The monitor's metrics.jsonl (io.JsonLinesAppender), or one line saying the folder cannot take it."""
    try:
        return JsonLinesAppender(path)
    except OSError as e:
        raise LayerprobeError(f"cannot append to {path}: {e.strerror or e}; choose another out=") from None


def scalars(row: dict) -> dict[str, float]:
    """A row as flat scalar names: `grad_norm`, `layer_grad_norm/03`, ... (the angular matrix is left out)."""
    out = {}
    for key, value in row.items():
        if key in ("step", "angular_matrix"):
            continue
        if isinstance(value, list):
            width = len(str(len(value) - 1))
            for i, v in enumerate(value):
                if v is not None and math.isfinite(v):
                    out[f"{key}/{i:0{width}d}"] = float(v)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardWriter:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self._writer.add_scalar(f"layerprobe/{name}", value, row["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    def __init__(self):
        import wandb

        self._wandb = wandb

    def write(self, row: dict) -> None:
        self._wandb.log({f"layerprobe/{k}": v for k, v in scalars(row).items()}, step=row["step"])

    def close(self) -> None:
        pass


def check_writers(out: Path | None, *, tensorboard: bool, wandb: bool) -> None:
    """Refuse an optional writer that cannot work, before anything is written."""
    if tensorboard:
        if importlib.util.find_spec("tensorboard") is None:
            raise LayerprobeError("tensorboard=True needs the tensorboard package: pip install tensorboard")
        if out is None:
            raise LayerprobeError("tensorboard=True writes under the run folder: give out=")
    if wandb:
        if importlib.util.find_spec("wandb") is None:
            raise LayerprobeError("wandb=True needs the wandb package: pip install wandb")
        import wandb as wb

        if wb.run is None:
            raise LayerprobeError("wandb=True logs to the active Weights & Biases run: call wandb.init() first")


def open_writers(out: Path | None, *, tensorboard: bool, wandb: bool) -> list:
    """The optional writers asked for (`check_writers` first)."""
    check_writers(out, tensorboard=tensorboard, wandb=wandb)
    writers = []
    if tensorboard:
        writers.append(TensorBoardWriter(out / "tensorboard"))
    if wandb:
        writers.append(WandbWriter())
    return writers
