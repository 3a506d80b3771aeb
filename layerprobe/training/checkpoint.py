"""Run folders and atomic checkpoints.

A run folder `OUT/<scheme>/` holds:

    config.json, model.safetensors, tokenizer files   the last checkpoint, as a Hugging Face model
    last/                                             the same, plus trainer_state.pt to resume from
    best/                                             the checkpoint with the lowest held-out loss
    metrics.jsonl, run.json                           per-step metrics; the run's settings and status

Each checkpoint is written whole under a temporary name and renamed into place; the top-level model
files are hard links to `last/`'s, each replaced by one rename, so a crash at any moment leaves a
loadable model and a consistent resume state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import LayerprobeError, first_line
from ..io import JsonLinesAppender, temp_sibling, write_json

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


def recover(run_dir: Path) -> None:
    """Finish or undo a swap that a crash interrupted; drop half-written temporaries."""
    if not run_dir.is_dir():
        return
    for name in ("last", "best"):
        final, old = run_dir / name, run_dir / f".{name}.old"
        if old.exists():
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
    for tmp in run_dir.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _swap_in(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: Path, name: str, model, tokenizer, *, state: dict | None = None,
                    state_dict: dict | None = None) -> Path:
    """Write `run_dir/name` (a loadable Hugging Face folder, plus the trainer state when given) atomically."""
    final = run_dir / name
    tmp = temp_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        _swap_in(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def publish_top_level(run_dir: Path, source: Path) -> None:
    """Make `run_dir` itself the model of `source` (hard links, each put in place with one rename)."""
    for f in sorted(source.iterdir()):
        if not f.is_file() or f.name == STATE_FILE:
            continue
        tmp = temp_sibling(run_dir / f.name)
        tmp.unlink(missing_ok=True)
        try:
            os.link(f, tmp)
        except OSError:  # file systems without hard links: copy
            shutil.copy2(f, tmp)
        os.replace(tmp, run_dir / f.name)


WEIGHTS_FILE = "model.safetensors"


def _damage(path: Path, check) -> str | None:
    """Why `path` cannot be read (`check` opens it), or None when it can."""
    if not path.is_file():
        return "missing"
    try:
        check(path)
    except Exception as e:  # each reader has its own error types; any of them means the same here
        text = first_line(e)
        return text[:160]
    return None


def _open_weights(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt"):  # reads the header and checks that the file covers every tensor it lists
        pass


def damaged_checkpoint_error(run_dir: Path, path: Path, reason: str, unchanged: bool = True) -> LayerprobeError:
    """One line for a resume state that cannot be read: which file, and the way out."""
    best = run_dir / "best"
    way = "start the run again with {overwrite}"
    if _damage(best / WEIGHTS_FILE, _open_weights) is None:
        record = read_run(run_dir) or {}
        at = f" (step {record['best_step']})" if record.get("best_step") else ""
        way += (f"; {best}{at} is intact and loads as a model (analyze it, or train from scratch), but holds no "
                "optimizer state to continue from")
    kept = "; nothing was changed" if unchanged else ""
    return LayerprobeError(f"cannot resume {run_dir}: {path} is damaged ({reason}){kept}", advice=way)


def check_resumable(run_dir: Path) -> None:
    """Refuse, before anything is written, a last/ checkpoint cut short (a full disk, a partial copy).

    Cheap checks that need no memory: the trainer state's zip directory (it sits at the end of the file, so a
    truncated file has none) and the weights' safetensors header against the file's size. A file garbled in
    the middle is caught when it is read (`load_state`, before the run record changes).
    """
    import zipfile

    last = run_dir / "last"
    for path, check in ((last / STATE_FILE, lambda p: zipfile.ZipFile(p).close()), (last / WEIGHTS_FILE, _open_weights)):
        reason = _damage(path, check)
        if reason is not None and not (reason == "missing" and not last.exists()):
            raise damaged_checkpoint_error(run_dir, path, reason)


def load_state(run_dir: Path) -> dict | None:
    path = run_dir / "last" / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = first_line(e)
        raise damaged_checkpoint_error(run_dir, path, text[:160]) from None


def read_run(run_dir: Path) -> dict | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_run(run_dir: Path, record: dict) -> None:
    write_json(run_dir / RUN_FILE, record)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete line of metrics.jsonl (a line cut short by a crash is skipped)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep the metrics of steps up to the checkpoint being resumed; later lines are redone."""
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    from ..io import write_text

    write_text(run_dir / METRICS_FILE, text)


class MetricsLog(JsonLinesAppender):
    """metrics.jsonl of a run, one flushed JSON line per record so a crash loses no logged step. Only the main
    process writes (`enabled`); on the others it is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        super().__init__(run_dir / METRICS_FILE if enabled else None)
