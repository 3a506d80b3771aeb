"""`analyze` and `prune-sweep` under torchrun: 2 gloo CPU processes write what 1 process writes on the same
samples (every column at 1e-6 in fp32, the per-sample sums of samples.npz in the same order), rank 0 alone
writes, the manifest says how the samples were split; and the refusals that come before any weight loads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cli_helpers import assert_one_line_error, run_cli
from fixtures_reference import REPO, env_single_thread
from layerprobe.distributed import check_processes, sample_shares, split_manifest, DistEnv
from layerprobe.errors import LayerprobeError
from tiny_models import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLES = 5  # odd: the shares are unequal (3 + 2), and one batch of 2 in the first share is partial


def torchrun(args, nproc=2):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         "-m", "layerprobe", *map(str, args)],
        env=env_single_thread(), cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_same_table(one, two, name):
    a, b = pd.read_csv(one / name), pd.read_csv(two / name)
    assert list(a.columns) == list(b.columns) and len(a) == len(b), name
    for col in a.columns:
        if a[col].dtype.kind in "fi" and b[col].dtype.kind in "fi":
            np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), rtol=1e-6, atol=1e-9,
                                       equal_nan=True, err_msg=f"{name}:{col}")
        else:
            assert a[col].fillna("").astype(str).tolist() == b[col].fillna("").astype(str).tolist(), f"{name}:{col}"


def section(folder, name):
    return json.loads((folder / "manifest.json").read_text())[name]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("dp") / "llama", tokenizer=True)


def one_and_two_processes(args, tmp_path):
    """The command on SAMPLES samples in this process (OUT one/) and under torchrun with 2 (OUT two/)."""
    args = [*args, "--samples", SAMPLES, "--seq-len", 24, "--batch-size", 2, "-q"]
    result, text = run_cli(*args, "--out", tmp_path / "one")
    assert result.exit_code == 0, text
    proc = torchrun([*args, "--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return tmp_path / "one", tmp_path / "two", proc


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--tokens", "all", "--no-grad"], ["--metrics", "angular,gradients"]],
                         ids=["grad-last", "nograd-all", "metrics-subset"])
def test_analyze_two_processes_write_what_one_writes(llama, tmp_path, extra):
    one, two, proc = one_and_two_processes(["analyze", llama, *extra], tmp_path)
    for name in ("layers.csv", "angular.csv", "sublayers.csv"):
        assert_same_table(one, two, name)
    # The per-sample sums the intervals resample, gathered in the one-process sample order.
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    # The per-batch gradient Gram (compare's gradient-ratio interval) is a one-process record: not kept here.
    gram = {"grad_gram", "grad_gram_groups"}
    assert not gram & set(b.files)
    assert sorted(set(a.files) - gram) == sorted(b.files)
    for key in b.files:
        assert a[key].shape == b[key].shape and a[key].shape[0] == SAMPLES, key
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-9, err_msg=key)
    m1, m2 = section(one, "analyze"), section(two, "analyze")
    assert m1["world_size"] == 1 and m1["split"] is None
    assert m2["world_size"] == 2 and m2["split"] == "samples" and m2["sample_shares"] == [[0, 3], [3, 5]]
    assert m2["samples"] == SAMPLES
    # One process printed: the summary table and the `wrote` line once.
    assert proc.stderr.count("wrote ") == 1


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--mode", "all", "--steps", 2],
                                   ["--mode", "greedy", "--steps", 2, "--search-samples", 3]],
                         ids=["all-modes", "greedy-search"])
def test_prune_sweep_two_processes_write_what_one_writes(llama, tmp_path, extra):
    one, two, proc = one_and_two_processes(["prune-sweep", llama, *extra], tmp_path)
    assert_same_table(one, two, "sweep.csv")
    table = pd.read_csv(two / "sweep.csv")
    assert (table["mode"] == "greedy").sum() == 2  # the second step's choice came from the combined sums
    m1, m2 = section(one, "prune-sweep"), section(two, "prune-sweep")
    assert m1["world_size"] == 1 and m2["world_size"] == 2 and m2["sample_shares"] == [[0, 3], [3, 5]]
    assert m1["samples"] == m2["samples"] == SAMPLES
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_shares_are_contiguous_in_data_order_and_cover_every_sample():
    for n in range(1, 12):
        for world in range(1, n + 1):
            shares = sample_shares(n, world)
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            sizes = [stop - start for start, stop in shares]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert split_manifest(DistEnv(), 7) == {"world_size": 1, "split": None, "sample_shares": None}
    assert split_manifest(DistEnv(rank=1, world_size=3), 7)["sample_shares"] == [[0, 3], [3, 5], [5, 7]]


def test_refusals_before_loading():
    check_processes(2, 2)  # one sample each is enough
    check_processes(None, 4)  # all samples of a file: checked after they load
    check_processes(8, 2, "auto", gpus=0)  # a map on the CPU: nothing shared between processes
    check_processes(8, 2, {"": 0}, gpus=2)  # a map of the caller's own, per process
    with pytest.raises(LayerprobeError, match="2 processes share 1 samples"):
        check_processes(1, 2)
    check_processes(8, 2, "auto", gpus=4)  # one replica per group of 2 GPUs (tests/test_gpu_groups.py)
    with pytest.raises(LayerprobeError, match="2 processes per node and 3 GPUs"):
        check_processes(8, 2, "auto", gpus=3)


def test_cli_refuses_more_processes_than_samples_before_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it; the refusal comes before any process group
    for command in ("analyze", "prune-sweep"):
        result, text = run_cli(command, tmp_path / "no-such-model", "--samples", 3, "--out", tmp_path / "out")
        assert_one_line_error(result, text, "4 processes share 3 samples", "--nproc-per-node")
        assert not (tmp_path / "out").exists()


@pytest.fixture()
def two_fake_processes(monkeypatch):
    """The packed collective without processes: each 'process' packs its vector (recorded; the stub hands it
    back unchanged), then, once both are recorded, the stub returns their sum, as an all-reduce would."""
    import layerprobe.distributed as distributed

    recorded, phase = {}, {"sum": False}

    def all_reduce_sum(env, values):
        if phase["sum"]:
            return sum(recorded.values())
        recorded[env.rank] = values.clone()
        return values

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    return [DistEnv(rank=r, world_size=2) for r in range(2)], phase


def test_packed_collective_sums_maxes_and_places_rows_in_order(two_fake_processes):
    from layerprobe.distributed import all_reduce_packed

    envs, phase = two_fake_processes
    rows = [np.arange(6.0).reshape(3, 2), -np.arange(4.0).reshape(2, 2)]
    state = [dict(summed=[1.5, [2, 3]], maxed=[[-4.0, 7.0]], rows=[rows[0]], start=0, total=5),
             dict(summed=[0.25, [10, 20]], maxed=[[-1.0, 5.0]], rows=[rows[1]], start=3, total=5)]
    for env, s in zip(envs, state):
        all_reduce_packed(env, **s)
    phase["sum"] = True
    summed, maxed, placed = all_reduce_packed(envs[1], **state[1])
    assert summed[0].tolist() == [1.75] and summed[1].tolist() == [12, 23]
    assert maxed[0].tolist() == [-1.0, 7.0]  # the largest per element, negative values too
    np.testing.assert_array_equal(placed[0], np.concatenate(rows))


def test_captures_of_two_shares_combine_to_the_capture_of_all_samples(two_fake_processes, llama):
    import torch

    from layerprobe.anatomy import find_anatomy
    from layerprobe.capture import LayerCapture
    from layerprobe.loading import load_model
    from tiny_models import random_ids

    envs, phase = two_fake_processes
    model = load_model(str(llama), dtype="float32", device="cpu").model
    anatomy = find_anatomy(model)
    ids = random_ids(SAMPLES, 12, seed=3)

    def measure(blocks):
        capture = LayerCapture(anatomy, tokens="all")
        with torch.inference_mode(), capture:
            for batch in torch.split(blocks, 2):
                model(input_ids=batch, use_cache=False)
                capture.end_batch()
        return capture

    whole = measure(ids)
    shares = sample_shares(SAMPLES, 2)
    for env, (start, stop) in zip(envs, shares):
        measure(ids[start:stop]).all_reduce(env, start, SAMPLES, extra=[float(env.rank + 1)])
    phase["sum"] = True
    start, stop = shares[1]
    combined = measure(ids[start:stop])
    assert combined.all_reduce(envs[1], start, SAMPLES, extra=[2.0]) == [3.0]
    for column, values in whole.per_layer().items():
        np.testing.assert_allclose(combined.per_layer()[column], values, rtol=1e-6, err_msg=column)
    np.testing.assert_allclose(combined.angular_mean().numpy(), whole.angular_mean().numpy(), rtol=1e-6)
    assert combined.sublayer_updates(torch.float32).keys() == whole.sublayer_updates(torch.float32).keys()
    for key, value in whole.sublayer_updates(torch.float32).items():
        np.testing.assert_allclose(combined.sublayer_updates(torch.float32)[key], value, rtol=1e-6)
    a, b = whole.per_sample_sums(), combined.per_sample_sums()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-12, err_msg=key)
