"""What a prune sweep costs: the planned layer calls (closed forms) against the layer calls the real sweep
counts, host syncs per batch counted with a dispatch mode, the limit that refuses a costly sweep before
the weights load, the angular-guided blocks, greedy's separate search samples, and scoring in groups
smaller than L + 1 giving the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import VOCAB
from typer.testing import CliRunner

from layerprobe.cli import app
from layerprobe.errors import LayerprobeError
from layerprobe.loading import load_model
from layerprobe.memory import HostReadCounter
from layerprobe.pruning import measurement, parse_removed, prune_sweep
from layerprobe.pruning import plan as cost
from layerprobe.pruning.measures import GPU_CHUNK_ELEMENTS, chunk_rows_for

L = 5
SAMPLES, BATCH = 5, 2  # 3 batches, the last of one sample
BATCHES = math.ceil(SAMPLES / BATCH)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tiny_dir):
    return tiny_dir("llama", num_hidden_layers=L, initializer_range=0.25)


@pytest.fixture(scope="module")
def lm(folder):
    return load_model(str(folder), device="cpu")


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ids.npy"
    np.save(path, np.random.default_rng(1).integers(3, VOCAB, size=(8, 12)))
    return path


def sweep(lm, ids_file, samples=SAMPLES, **kw):
    return prune_sweep(lm, data=str(ids_file), samples=samples, batch_size=BATCH, progress=False, **kw)


# -- closed forms against counted layer calls ------------------------------------------------------
def restarts(sets) -> int:
    """Layer calls per batch to run each removal from its first removed layer: counted layer by layer."""
    return sum(sum(1 for i in range(min(s), L) if i not in s) for s in sets)


def test_closed_forms_by_hand():
    for n_layers in (2, 5, 32, 80):
        singles = [{j} for j in range(n_layers)]
        blocks = [set(range(l, l + n)) for n in range(1, n_layers) for l in range(n_layers - n + 1)]
        count = lambda sets: sum(sum(1 for i in range(min(s), n_layers) if i not in s) for s in sets)  # noqa: E731
        assert cost.layer_mode_calls(n_layers) == count(singles)
        assert cost.block_all_calls(n_layers) == count(blocks) == sum(
            cost.block_calls(n_layers, n) for n in range(1, n_layers))
    assert cost.block_all_calls(32) == 5456 and cost.block_all_calls(80) == 85320  # the numbers


@pytest.mark.parametrize("kw, closed_form", [
    (dict(mode="layer"), L + L * (L - 1) // 2),
    (dict(mode="block", block_size="all"), L + (L - 1) * L * (L + 1) // 6),
    (dict(mode="block", block_size="2"), L + (L - 2) * (L - 1) // 2),
    (dict(mode="ranked", by="last", steps=3), L + sum(L - (L - k) - k for k in (1, 2, 3))),
    (dict(remove=[1, 3]), L + (L - 1 - 2)),
])
def test_planned_layer_calls_equal_the_counted_ones(lm, ids_file, kw, closed_form):
    result = sweep(lm, ids_file, **kw)
    calls = result.summary["layer_calls"]
    assert calls == BATCHES * closed_form
    assert result.summary["planned_layer_calls"] == calls
    sets = [parse_removed(r) for r in result.table["removed"][1:]]
    assert calls == BATCHES * (L + restarts(sets))


def test_greedy_layer_calls_follow_the_steps_it_took(lm, ids_file):
    steps = 3
    result = sweep(lm, ids_file, mode="greedy", steps=steps)
    greedy = result.rows("greedy")
    removed = [set(parse_removed(r)) for r in greedy["removed"]]
    # Per batch: the pass with every single layer (step 1); each later step redoes the full pass (L), runs
    # the pruned model from its first removed layer and every remaining layer's removal from its input.
    per_batch = L + L * (L - 1) // 2
    for r in range(1, steps):
        before = removed[r - 1]
        remaining = [j for j in range(L) if j not in before]
        pruned_run = sum(1 for i in range(min(before), L) if i not in before)
        # removing j as well restarts at j, from the pruned model's input there
        tails = sum(sum(1 for i in range(j + 1, L) if i not in before) for j in remaining)
        per_batch += L + pruned_run + tails
        assert cost.greedy_step_calls(L, r, min(before)) == L + pruned_run + tails
    assert result.summary["layer_calls"] == BATCHES * per_batch
    assert result.summary["planned_layer_calls"] >= result.summary["layer_calls"]  # a bound: m = 0
    assert cost.greedy_search_calls(L, steps) + L == (
        L + L * (L - 1) // 2 + sum(cost.greedy_step_calls(L, r, 0) for r in range(1, steps)))


# -- host syncs --------------------------------------------------------------------------------------
@pytest.fixture
def counting():
    return HostReadCounter()


def test_the_counter_sees_reads_inside_inference_mode(counting):
    x = torch.arange(4.0)
    with counting:
        with torch.inference_mode():
            float(x.sum()), int(x.argmax()), bool(x.sum() > 0), x.sum().item(), x.tolist()
        x.sum().item()
    assert counting.count == 6


@pytest.mark.parametrize("kw", [dict(mode="layer"), dict(mode="block", block_size="all"),
                                dict(mode="greedy", steps=3), dict(mode="ranked", by="last", steps=2),
                                dict(remove=[2])])
def test_at_most_two_host_syncs_per_batch(lm, ids_file, counting, kw):
    """Each pass over a batch (the sweep's, and each later greedy step's) reads the host at most twice: the
    model's own forward once (transformers' packed-sequence check in create_causal_mask) and the sums once;
    nothing per candidate or per chunk. (The old scoring read 3 values per candidate per chunk.)"""
    counts = {}
    for samples in (4, 8):  # 2 and 4 batches: what a batch adds, not what a run does once
        counting.count = 0
        with counting:
            sweep(lm, ids_file, samples=samples, **kw)
        counts[samples] = counting.count
    passes = kw.get("steps", 1) if kw.get("mode") == "greedy" else 1  # greedy's step 1 is the sweep's own pass
    per_pass = (counts[8] - counts[4]) / (2 * passes)
    assert 0 < per_pass <= 2, counts


# -- the limit -----------------------------------------------------------------------------------------
def test_a_sweep_over_the_limit_is_refused_before_the_weights_load(folder, ids_file, tmp_path, monkeypatch):
    import layerprobe.loading

    def no_loading(*a, **k):
        raise AssertionError("the weights were loaded before the limit was checked")

    monkeypatch.setattr(layerprobe.loading, "load_model", no_loading)
    args = ["prune-sweep", str(folder), "--data", str(ids_file), "--samples", "5", "--batch-size", "2",
            "--mode", "block", "--device", "cpu", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args + ["--max-layer-calls", "50"])
    planned = BATCHES * (L + cost.block_all_calls(L))
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{planned} layer calls" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    # The default limit lets it run (the loader is the real one again).
    monkeypatch.undo()
    ok = CliRunner().invoke(app, args + ["--max-layer-calls", str(planned), "--quiet"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, args + ["--max-layer-calls", "0"])
    assert bad.exit_code != 0 and "at least 1" in bad.output


def test_the_api_refuses_over_the_limit_unless_yes(lm, ids_file):
    with pytest.raises(LayerprobeError, match="layer calls"):
        sweep(lm, ids_file, mode="block", max_layer_calls=50)
    result = sweep(lm, ids_file, mode="block", max_layer_calls=50, yes=True)
    assert result.summary["layer_calls"] > 50


def test_the_plan_is_printed_with_an_estimate(lm, ids_file, capsys):
    prune_sweep(lm, data=str(ids_file), samples=SAMPLES, batch_size=BATCH, mode="layer", progress=True)
    err = capsys.readouterr().err
    assert f"planned: {BATCHES * (L + L * (L - 1) // 2)} layer calls" in err and "the sweep should take about" in err


# -- angular-guided blocks and greedy's search samples ---------------------------------------------------
def test_block_top_measures_the_blocks_closest_in_angle(lm, ids_file):
    from layerprobe import analyze

    a = analyze(lm, data=str(ids_file), samples=SAMPLES, batch_size=BATCH, grad=False, progress=False)
    top = sweep(lm, ids_file, mode="block", block_size="all", block_top=2, analysis=a)
    every = sweep(lm, ids_file, mode="block", block_size="all")
    got = top.rows("block")
    for n in range(1, L):
        sub = a.angular[a.angular["n"] == n].sort_values(["angular_distance", "layer"])
        expect = sorted(int(x) for x in sub["layer"].iloc[:2])
        assert sorted(int(x) for x in got[got["block_size"] == n]["first_layer"]) == expect
    both = got.merge(every.rows("block"), on="removed", suffixes=("", "_all"))
    assert len(both) == len(got)
    for col in ("loss", "kl", "top1_agreement"):
        np.testing.assert_allclose(both[col], both[f"{col}_all"], rtol=1e-6)
    assert top.summary["layer_calls"] == BATCHES * (L + restarts([parse_removed(r) for r in got["removed"]]))
    assert top.summary["layer_calls"] <= BATCHES * (L + sum(cost.block_top_calls(L, n, 2) for n in range(1, L)))


def test_greedy_searches_on_its_samples_and_measures_on_all(lm, ids_file):
    steps = 2
    search_only = sweep(lm, ids_file, samples=2, mode="greedy", steps=steps)
    split = sweep(lm, ids_file, mode="greedy", steps=steps, search_samples=2)
    assert list(split.rows("greedy")["removed"]) == list(search_only.rows("greedy")["removed"])
    for removed in split.rows("greedy")["removed"]:
        alone = sweep(lm, ids_file, remove=list(parse_removed(removed))).rows("remove").iloc[0]
        row = split.table[split.table["removed"] == removed].iloc[0]
        for col in ("loss", "kl", "top1_agreement", "tokens"):
            assert row[col] == pytest.approx(alone[col], rel=1e-6)
    same = sweep(lm, ids_file, mode="greedy", steps=steps, search_samples=SAMPLES)
    plain = sweep(lm, ids_file, mode="greedy", steps=steps)
    np.testing.assert_allclose(same.table["loss"], plain.table["loss"], rtol=1e-12)
    with pytest.raises(LayerprobeError, match="--mode greedy"):
        sweep(lm, ids_file, mode="layer", search_samples=2)


# -- memory-sized groups and chunks ---------------------------------------------------------------------
def test_groups_smaller_than_l_plus_1_give_the_same_numbers(lm, ids_file, monkeypatch):
    from layerprobe.anatomy import find_anatomy
    from layerprobe.pruning import PrefixRunner

    full = sweep(lm, ids_file, mode="layer,block", block_size="2", chunk_elements=3 * VOCAB)
    runner = PrefixRunner(lm.model, find_anatomy(lm.model))
    blocks = torch.zeros(SAMPLES, 12, dtype=torch.long)
    one_candidate = BATCH * 11 * 32 * 4  # one candidate's rows: batch x predicted positions x hidden 32, fp32
    assert measurement.group_size_for(runner, blocks, BATCH, torch.float32, budget=2 * one_candidate) == 2
    monkeypatch.setattr(measurement, "GROUP_BYTES", one_candidate)
    small = sweep(lm, ids_file, mode="layer,block", block_size="2", chunk_elements=3 * VOCAB)
    for col in ("loss", "kl", "top1_agreement"):
        np.testing.assert_allclose(small.table[col], full.table[col], rtol=1e-6)


def test_chunks_are_sized_by_a_memory_budget():
    assert chunk_rows_for(128_256, GPU_CHUNK_ELEMENTS) == 2092  # ~1 GiB of fp32 logits: a compute-bound head GEMM
    assert chunk_rows_for(256_000, GPU_CHUNK_ELEMENTS) == 1048
    assert chunk_rows_for(128_256) == chunk_rows_for(128_256, device=torch.device("cpu")) == 65  # 32 MiB on the CPU
    assert chunk_rows_for(10, 5) == 1
