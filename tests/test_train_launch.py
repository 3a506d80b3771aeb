"""The training launch's shape choices: `--ffn-size aligned` (a different model from the paper's, recorded as
such) and the default micro-batch from a tokens-per-micro-batch budget."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from layerprobe.cli import app
from layerprobe.errors import LayerprobeError
from layerprobe.reference import get_preset
from layerprobe.training.distributed import DistEnv
from layerprobe.training.settings import (
    MICRO_BATCH_TOKENS, TrainSettings, model_config, resolve_plan, run_identity, shape_departures,
)


def plan(world=1, **kw):
    return resolve_plan(TrainSettings(**kw), DistEnv(world_size=world))


def largest_divisor_within(n: int, limit: int) -> int:
    best = 1
    for d in range(1, n + 1):
        if n % d == 0 and d <= limit:
            best = d
    return best


@pytest.mark.parametrize("preset, world, batch, seq", [
    ("71m", 1, None, None), ("130m", 1, None, None), ("1b", 8, None, None), ("tiny", 1, None, None),
    ("micro", 1, None, None), ("71m", 1, 96, None), ("71m", 2, 96, 1000), ("71m", 1, 7, 4096),
])
def test_default_micro_batch_holds_at_most_the_token_budget(preset, world, batch, seq):
    p = plan(world, preset=preset, batch_size=batch, seq_len=seq)
    per_rank = p.batch_size // world
    assert p.micro_batch_size == largest_divisor_within(per_rank, max(1, MICRO_BATCH_TOKENS // p.seq_len))
    assert p.micro_batch_size * p.accum == per_rank
    assert p.micro_batch_size * p.seq_len <= MICRO_BATCH_TOKENS or p.micro_batch_size == 1


def test_the_budget_against_the_presets():
    assert plan(preset="71m").micro_batch_size == 64 and plan(preset="71m").accum == 8  # was 512 x 1
    assert plan(preset="tiny").micro_batch_size == 16  # the CPU presets keep their whole batch
    assert plan(preset="71m", micro_batch_size=128).micro_batch_size == 128  # an explicit one wins


def test_aligned_ffn_is_a_different_model_from_the_papers():
    p = plan(preset="1b", ffn_size="aligned")
    assert p.settings.ffn_size == 5504 and 5504 % 64 == 0 and get_preset("1b").intermediate_size == 5461
    config = model_config(p, "pre", 32000, None)
    assert config.intermediate_size == 5504
    assert shape_departures("1b", config) == ["intermediate_size 5504 (preset 5461)"]
    paper = model_config(plan(preset="1b"), "pre", 32000, None)
    assert shape_departures("1b", paper) == []
    assert run_identity(p, config, None)["model"] != run_identity(plan(preset="1b"), paper, None)["model"]
    assert any("a different model from the paper's" in line for line in p.describe())
    assert plan(preset="1b", ffn_size="5504").settings.ffn_size == 5504
    assert plan(preset="130m", ffn_size="aligned").settings.ffn_size == 2048  # already aligned: unchanged
    for bad in ("wide", "55.5", 0):
        with pytest.raises(LayerprobeError, match="--ffn-size"):
            plan(preset="1b", ffn_size=bad)


def test_cli_records_the_aligned_ffn_in_run_json(tmp_path):
    args = ["train-reference", "--preset", "micro", "--device", "cpu", "--quiet", "--norm", "pre", "--steps", "2",
            "--eval-every", "2", "--ffn-size", "aligned", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "pre" / "run.json").read_text())
    assert run["differs_from_preset"] == ["intermediate_size 128 (preset 88)"]
    assert run["identity"]["model"]["intermediate_size"] == 128
    bad = CliRunner().invoke(app, args[:-2] + ["--ffn-size", "wide", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and bad.output.startswith("error: --ffn-size") and len(bad.output.strip().splitlines()) == 1
