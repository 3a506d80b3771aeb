"""The monitor under torch.distributed: 2 gloo CPU processes give the rows of 1 process.

DDP: each process takes half of every batch; DDP averages the gradients, so they (and the weights after the
step) are those of the whole batch in one process. FSDP2: each process holds shards; the squared sums are
packed into one all-reduce. Only rank 0 writes. Real processes (torch.multiprocessing, as
test_distributed_errors.py does), so these are slow tests.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiny_models import random_ids

STEPS, ACCUM, BATCH = 4, 2, 4  # BATCH rows per micro-batch over all processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(folder, out, rank: int, world: int, wrap: str) -> None:
    from transformers import AutoModelForCausalLM

    from layerprobe.monitor import LayerMonitor

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.train()
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = LayerMonitor(model, out=out, every=1, probe=random_ids(3, 10, seed=7), probe_every=2)
    share = BATCH // world
    for step in range(STEPS):
        for m in range(ACCUM):
            ids = random_ids(BATCH, 10, seed=1000 + step * ACCUM + m)[rank * share:(rank + 1) * share]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / ACCUM
            sync = m == ACCUM - 1
            if wrap == "ddp" and not sync:
                with model.no_sync():
                    loss.backward()
            else:
                if wrap == "fsdp":
                    model.set_requires_gradient_sync(sync)
                loss.backward()
        monitor.after_backward(max_norm=0.5)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        monitor.after_step()
        opt.zero_grad()
    monitor.close()


def _worker(rank: int, world: int, port: int, folder, out, wrap: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        _train(folder, out, rank, world, wrap)
    finally:
        dist.destroy_process_group()


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_two_processes_give_the_rows_of_one(tiny_dir, tmp_path, wrap):
    folder = tiny_dir("llama")
    _train(folder, tmp_path / "one", 0, 1, "none")
    mp.spawn(_worker, args=(2, _free_port(), folder, tmp_path / "two", wrap), nprocs=2, join=True)
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")  # rank 1 wrote nothing: one row per step
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    # Not bit for bit: the halves' gradients are summed in another order, and Adam carries the rounding on.
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(np.asarray(b[key], dtype=float), np.asarray(a[key], dtype=float),
                                       rtol=1e-4, atol=1e-6, err_msg=f"step {a['step']} {key}")
