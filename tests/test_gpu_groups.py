"""One replica per group of GPUs under torchrun: which GPUs each process plans its device map over, the
max_memory that confines accelerate's planner to them, the refusals, and that load_model plans with it.
No GPU here: torch.cuda's device count and free memory are monkeypatched, the plan stops before weights."""

from __future__ import annotations

import pytest
import torch

from layerprobe.distributed import check_processes, group_max_memory, gpu_group
from layerprobe.errors import LayerprobeError
from tiny_models import make_tiny

GiB = 1 << 30


@pytest.mark.parametrize("gpus,procs", [(8, 1), (8, 2), (8, 4), (8, 8), (6, 3), (4, 2)])
def test_groups_split_the_node_into_equal_contiguous_disjoint_parts(gpus, procs):
    groups = [gpu_group(r, procs, gpus) for r in range(procs)]
    per = gpus // procs
    expected = []
    for r in range(procs):  # plain loop: process r owns GPUs r*per ... r*per + per - 1
        expected.append([r * per + i for i in range(per)])
    assert groups == expected
    assert sorted(g for group in groups for g in group) == list(range(gpus))


def test_gpus_not_a_multiple_of_the_processes_refused_with_what_works():
    with pytest.raises(LayerprobeError, match=r"^--device-map auto with 4 processes per node and 6 GPUs: .*"
                                              r"--nproc-per-node 1 or 2 or 3 or 6$"):
        gpu_group(0, 4, 6)
    with pytest.raises(LayerprobeError, match="--nproc-per-node 1 or 2$"):
        gpu_group(1, 4, 2)  # more processes than GPUs


def test_balanced_low_0_only_with_one_process_per_node():
    assert gpu_group(0, 1, 4, "balanced_low_0") == [0, 1, 2, 3]
    with pytest.raises(LayerprobeError, match="balanced_low_0 with 2 processes per node.*use balanced or sequential"):
        gpu_group(1, 2, 4, "balanced_low_0")


def test_max_memory_keeps_only_the_group_and_the_users_cpu_disk():
    free = {g: (10 + g) * GiB for g in range(8)}
    got = group_max_memory(1, 2, 8, {"cpu": 100 * GiB, "disk": 500 * GiB}, free)
    assert got == {4: 14 * GiB, 5: 15 * GiB, 6: 16 * GiB, 7: 17 * GiB, "cpu": 100 * GiB, "disk": 500 * GiB}
    # a budget the user gives for one of the group's GPUs wins over what is free on it
    got = group_max_memory(1, 2, 8, {5: 3 * GiB, "cpu": GiB}, free)
    assert got == {4: 14 * GiB, 5: 3 * GiB, 6: 16 * GiB, 7: 17 * GiB, "cpu": GiB}


def test_max_memory_without_user_budget_shares_the_host():
    free = {0: 40 * GiB, 1: 41 * GiB, 2: 42 * GiB, 3: 43 * GiB, "cpu": 400 * GiB}
    got = group_max_memory(1, 2, 4, None, free)
    assert got == {2: 42 * GiB, 3: 43 * GiB, "cpu": int(400 * GiB * 0.9 / 2)}
    # one GPU per process: the balanced planner's 90% of a lone GPU, none under sequential
    assert group_max_memory(3, 4, 4, None, free)[3] == int(43 * GiB * 0.9)
    assert group_max_memory(3, 4, 4, None, free, "sequential")[3] == 43 * GiB


def test_max_memory_naming_another_groups_gpu_refused():
    with pytest.raises(LayerprobeError, match=r"^--max-memory names GPU 0, but with 2 processes per node process 1 "
                                              r"plans its replica over GPUs 4-7 only; .*"):
        group_max_memory(1, 2, 8, {0: GiB, 5: GiB, "cpu": GiB}, {})
    with pytest.raises(LayerprobeError, match="over GPU 1 only"):
        group_max_memory(1, 2, 2, {0: GiB}, {})
    with pytest.raises(LayerprobeError, match="6 GPUs"):  # the split is checked first
        group_max_memory(0, 4, 6, {"cpu": GiB}, {})


def test_check_processes_accepts_groups_and_refuses_uneven_ones():
    check_processes(8, 2, "auto", gpus=4, local_world_size=2)
    check_processes(8, 4, "sequential", gpus=2, local_world_size=2)  # two nodes of 2 processes and 2 GPUs
    with pytest.raises(LayerprobeError, match="and 3 GPUs: .* 3 do not split into 2 equal groups; use --nproc-per-node 1 or 3"):
        check_processes(8, 2, "auto", gpus=3, local_world_size=2)


def _as_rank(monkeypatch, local_rank, local_world, gpus, free):
    monkeypatch.setenv("WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    asked = []

    def mem_get_info(index):
        asked.append(index)
        return free, 80 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


class _Planned(Exception):
    pass


def _plan(folder, **kwargs):
    from layerprobe.loading import load_model

    seen = {}

    def check_plan(meta, plan):
        seen["plan"] = plan
        seen["layer_bytes"] = sum(p.numel() * 4 for p in meta.model.layers[0].parameters())
        raise _Planned  # stop before any weight is read: there is no GPU to put them on

    with pytest.raises(_Planned):
        load_model(str(folder), dtype="float32", device="cpu", load_tokenizer=False, check_plan=check_plan,
                   **kwargs)
    return seen


def test_load_model_plans_over_the_process_group_only(monkeypatch, tmp_path):
    folder = make_tiny("llama", tmp_path / "m", num_hidden_layers=6)
    layer = _plan(folder, device_map="sequential", max_memory="cpu=1GiB")["layer_bytes"]
    # GPUs 2 and 3 (process 1 of 2 over 4 GPUs) each hold about two layers; the rest goes to the CPU
    asked = _as_rank(monkeypatch, 1, 2, 4, int(2.5 * layer))
    seen = _plan(folder, device_map="sequential", max_memory="cpu=1GiB")
    assert sorted(set(asked)) == [2, 3]  # only the group's GPUs are measured
    places = {str(v) for v in seen["plan"].values()}
    assert places <= {"2", "3", "cpu"} and {"2", "3"} <= places, seen["plan"]
    layers = {k: str(v) for k, v in seen["plan"].items() if k.startswith("model.layers.")}
    assert "0" not in places and "1" not in places and layers


def test_load_model_refuses_another_groups_gpu_before_planning(monkeypatch, tmp_path):
    folder = make_tiny("llama", tmp_path / "m")
    _as_rank(monkeypatch, 1, 2, 4, GiB)
    with pytest.raises(LayerprobeError, match="names GPU 0, .* process 1 plans its replica over GPUs 2-3 only"):
        _plan(folder, device_map="auto", max_memory="0=1GiB,cpu=1GiB")
