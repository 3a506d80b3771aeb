"""A failure on the main process reaches every process: no rank waits at a barrier for one that has failed.

Two real gloo processes (torch.multiprocessing, no torchrun: its agent would kill the waiting rank and hide
a hang). The process group's timeout is short, so a rank left waiting fails with a timeout, not the error.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WAIT_LIMIT_S = 20  # the process group's timeout: what a waiting rank would sit through


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fail: bool, out: str) -> None:
    from layerprobe.errors import LayerprobeError  # imported before the group starts: import times differ by rank
    from layerprobe.training.distributed import DistEnv, main_first

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=WAIT_LIMIT_S))
    dist.barrier()  # both ranks start the clock together

    env = DistEnv(rank=rank, world_size=world)
    calls = []

    def work():
        calls.append(rank)
        if fail:
            raise OSError(28, "No space left on device")
        return "done"

    start = time.monotonic()
    try:
        outcome = ("returned", main_first(env, work))
    except LayerprobeError as e:
        outcome = ("LayerprobeError", str(e))
    except OSError as e:
        outcome = ("OSError", str(e))
    except Exception as e:  # a timeout at the collective: what the old barrier gave
        outcome = (type(e).__name__, str(e)[:200])
    Path(out, f"rank{rank}.json").write_text(json.dumps([*outcome, time.monotonic() - start, calls]))
    dist.destroy_process_group()


def _run(fail: bool, tmp_path) -> dict:
    # Results come back as files: a multiprocessing Manager listens on a socket under TMPDIR, and AF_UNIX paths
    # are limited to 108 bytes, so a long TMPDIR would fail the harness rather than the code under test.
    mp.spawn(_worker, args=(2, _free_port(), fail, str(tmp_path)), nprocs=2, join=True)
    return {rank: tuple(json.loads((tmp_path / f"rank{rank}.json").read_text())) for rank in range(2)}


@pytest.mark.slow
def test_a_failure_on_the_main_process_is_raised_on_every_process_at_once(tmp_path):
    results = _run(fail=True, tmp_path=tmp_path)
    kind0, text0, _, calls0 = results[0]
    kind1, text1, waited1, calls1 = results[1]
    assert (kind0, calls0) == ("OSError", [0])  # the main process raises its own error, unchanged
    assert "No space left on device" in text0
    assert kind1 == "LayerprobeError" and calls1 == []  # the work ran on the main process only
    assert text1 == "stopped because the main process (rank 0) failed: [Errno 28] No space left on device"
    assert waited1 < WAIT_LIMIT_S / 2  # told at once, not after the group's timeout


@pytest.mark.slow
def test_main_first_returns_the_result_on_the_main_process_only(tmp_path):
    results = _run(fail=False, tmp_path=tmp_path)
    assert results[0][:2] == ("returned", "done") and results[0][3] == [0]
    assert results[1][:2] == ("returned", None) and results[1][3] == []


# -- data preparation outlasting the process group's timeout ---------------------------------------------
PREP_SLEEP_S = 8  # longer than SHORT_TIMEOUT_S: a rank waiting in a collective meanwhile would time out
SHORT_TIMEOUT_S = 3


def _prep_worker(rank: int, world: int, port: int, text: str, cache: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAYERPROBE_CACHE=cache)
    import layerprobe.corpus.prepare as prep
    from layerprobe.training.data import _prepare
    from layerprobe.training.distributed import DistEnv, any_process

    real = prep._prepare_into

    def slow(path, key, *a, **k):  # whoever takes the lock first prepares slowly; the others must wait on it
        if not (path / "index.json").exists():
            time.sleep(PREP_SLEEP_S)
        return real(path, key, *a, **k)

    prep._prepare_into = slow
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=SHORT_TIMEOUT_S))
    dist.barrier()
    start = time.monotonic()
    try:
        store = _prepare(text, "bpe:300", text_column=None, env=DistEnv(rank=rank, world_size=world),
                         progress=False, say=None)
        agreed = any_process(DistEnv(rank=rank, world_size=world), True)  # a collective after the preparation
        outcome = ("ok", str(store.path), int(store.n_tokens), agreed, time.monotonic() - start)
    except Exception as e:
        outcome = (type(e).__name__, str(e)[:200])
    Path(results, f"prep{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_preparation_longer_than_the_group_timeout_does_not_stop_the_other_ranks(tmp_path):
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "depth", "layer", "norm", "token", "model", "sweep"]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(40)), encoding="utf-8")
    mp.spawn(_prep_worker, args=(2, _free_port(), str(text), str(tmp_path / "cache"), str(tmp_path)), nprocs=2,
             join=True)  # results come back as files (see _run)
    results = {rank: json.loads((tmp_path / f"prep{rank}.json").read_text()) for rank in range(2)}
    assert results[0][0] == results[1][0] == "ok", dict(results)
    assert results[0][1] == results[1][1] and results[0][2] == results[1][2] > 0  # one prepared folder, shared
    assert min(results[0][4], results[1][4]) >= PREP_SLEEP_S > SHORT_TIMEOUT_S  # someone waited past the timeout


class _Exited(Exception):
    def __init__(self, code):
        self.code = code


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["train-reference", "--no-such-option"], 2),  # a usage error keeps its exit code
])
def test_under_torchrun_the_command_ends_the_process_with_its_exit_code(monkeypatch, capsys, argv, code):
    # Under torchrun the CLI ends with os._exit: no interpreter finalization races gloo's worker threads.
    import sys

    from layerprobe import cli

    def fake_exit(c):
        raise _Exited(c)

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["layerprobe", *argv])
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(_Exited) as exited:
        cli.main()
    assert exited.value.code == code
    if code:
        assert "No such option: --no-such-option" in capsys.readouterr().err
