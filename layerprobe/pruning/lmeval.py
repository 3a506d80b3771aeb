"""Downstream accuracy of each candidate through lm-evaluation-harness (optional).

Runs only when `lm_eval` is installed and its task data can be fetched or is cached. Each row
of the sweep (the full model and every candidate) is evaluated on the model pruned in place
(no copy of the weights), with `limit` examples per task.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from ..anatomy import execution_device
from ..errors import LayerprobeError, first_line
from ..progress import make_progress
from .surgery import parse_removed, pruned


NOT_SCORES = ("alias", "sample_len", "samples")


@contextmanager
def _quiet_bars():
    """lm-eval and datasets draw their own tqdm bars; ours is the one on screen."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def check_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise LayerprobeError("--lm-eval-tasks needs lm-evaluation-harness: pip install lm-eval "
                              "(its task data must be downloadable or already cached)")


def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Task names, and the folders to include for tasks given as local YAML files (offline tasks)."""
    names, include = [], []
    for t in tasks:
        path = Path(t).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise LayerprobeError(f"no such lm-eval task file: {t}")
            import yaml

            try:
                config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise LayerprobeError(f"{t} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(config, dict) or not config.get("task"):
                raise LayerprobeError(f"{t} has no 'task:' name; it is not an lm-eval task file")
            names.append(str(config["task"]))
            if str(path.parent.resolve()) not in include:
                include.append(str(path.parent.resolve()))
        else:
            names.append(t)
    return names, include


def evaluate(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, float]:
    """{'task:metric': value} for one model, stderr entries left out.

    `tasks` are lm-eval task names or paths of local task YAML files.
    """
    check_lm_eval()
    if tokenizer is None:
        raise LayerprobeError("--lm-eval-tasks needs the model's tokenizer, and this model has none")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.api.task"):
        logging.getLogger(name).setLevel(logging.ERROR)
    names, include = resolve_tasks(tasks)
    embed = model.get_input_embeddings()
    device = str(execution_device(embed) or next(model.parameters()).device)  # not `meta` when offloaded
    try:
        with _quiet_bars():
            manager = TaskManager(include_path=include or None)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
            results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                                              log_samples=False)
    except LayerprobeError:
        raise
    except Exception as e:
        first = first_line(e)
        raise LayerprobeError(f"lm-evaluation-harness failed on {', '.join(tasks)} ({first}); check the task "
                              "names and that their data can be downloaded or is cached") from None
    out: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if ("stderr" in name or name in NOT_SCORES or not isinstance(value, (int, float))
                    or isinstance(value, bool)):
                continue
            out[f"lm_eval:{task}:{name}"] = float(value)
    return out


def add_lm_eval_columns(table: pd.DataFrame, model, tokenizer, tasks: list[str], limit: int | None,
                        batch_size: int, layers_path: str | None, progress: bool = True) -> pd.DataFrame:
    """One evaluation per distinct set of removed layers; its scores go on every row with that set."""
    scores: dict[str, dict[str, float]] = {}
    distinct = list(dict.fromkeys(table["removed"].astype(str)))
    with make_progress(progress) as bar:
        task = bar.add_task("lm-eval", total=len(distinct), info=", ".join(tasks))
        for removed in distinct:
            layers = parse_removed(removed)
            if layers:
                with pruned(model, layers, layers_path):
                    scores[removed] = evaluate(model, tokenizer, tasks, limit, batch_size)
            else:
                scores[removed] = evaluate(model, tokenizer, tasks, limit, batch_size)
            bar.update(task, advance=1)
    columns = sorted({k for s in scores.values() for k in s})
    table = table.copy()
    for col in columns:
        table[col] = [scores[str(r)].get(col, float("nan")) for r in table["removed"]]
    return table
