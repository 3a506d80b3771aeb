"""Helpers for the reference-training tests: CLI runners, metrics readers, a driver that kills itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cli_helpers import assert_one_line_error, run_cli  # noqa: F401  (re-exported for the training tests)

REPO = Path(__file__).resolve().parents[1]
# Seconds-long runs: 4 layers of width 32, 8 sequences of 32 tokens per step.
MICRO = ["--preset", "micro", "--device", "cpu", "--quiet"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def env_single_thread() -> dict:
    # One thread per process: the same float reduction order in every run, and polite on a shared machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# Runs the real CLI in a child process; after the metrics of step KILL_AFTER_STEP are written, the process
# SIGKILLs itself: no cleanup, no final checkpoint, exactly like a crash or `kill -9`.
KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import layerprobe.training.trainer as trainer

    kill_at = int(os.environ["KILL_AFTER_STEP"])

    def after_step(run_dir, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer._after_step = after_step
    from layerprobe.cli import app
    app(sys.argv[1:], prog_name="layerprobe")
""")


def run_layerprobe(args, *, kill_after_step: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = env_single_thread()
    if kill_after_step is None:
        cmd = [sys.executable, "-m", "layerprobe", *map(str, args)]
    else:
        env["KILL_AFTER_STEP"] = str(kill_after_step)
        cmd = [sys.executable, "-c", KILL_DRIVER, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def comparable(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in records]
