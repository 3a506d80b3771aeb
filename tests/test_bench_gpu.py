"""bench/bench_gpu.py (issue 13): its CPU dry run completes with every correctness check passing, and its
comparison flags a result that is off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import layerprobe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_gpu.py"
sys.path.insert(0, str(REPO / "bench"))

import bench_gpu  # noqa: E402


def run_script(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(text: str) -> dict[str, list[str]]:
    """check -> [section, result, target, status] for each row of the Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] in ("correctness", "speed", "scale"):
            rows[cells[1]] = [cells[0], *cells[2:]]
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_dry_run_records_every_path_and_the_correctness_checks_pass(tmp_path):
    out = tmp_path / "gpu.md"
    proc = run_script("--dry-run", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert out.read_text() in proc.stdout  # the same table, on stdout and in the file
    text = out.read_text()
    assert f"torch {torch.__version__}" in text and "CUDA none" in text
    rows = table_rows(text)

    def row(*needles):
        found = [v for k, v in rows.items() if all(n in k for n in needles)]
        assert len(found) == 1, (needles, list(rows))
        return found[0]

    for needles in (("analyze fp32",), ("analyze bf16",), ("prune-sweep", "cached vs naive"), ("killed", "resumed")):
        section, result, target, status = row(*needles)
        assert section == "correctness" and status == "pass", (needles, result)
    assert "bit-identical" in row("killed", "resumed")[1]
    for name in ("angular distance", "Block Influence", "output variance", "loss", "gradient norms"):
        assert name in row("analyze bf16")[1]
    for needles in (("analyze / bare forward+backward",), ("analyze --no-grad / bare forward",),
                    ("prune-sweep cached / naive",), ("train-reference micro", "eager")):
        section, result, _, status = row(*needles)
        assert section == "speed" and status.startswith("measured") and any(ch.isdigit() for ch in result), needles
    assert "LlamaForCausalLM twin" in row("train-reference micro")[1]
    for needles in (("torchrun", "DDP", "gloo"), ("torchrun", "--fsdp", "gloo")):
        assert row(*needles)[3] == "pass", needles
    assert row("--device-map auto")[3] == "skipped: no GPU"


def _tiny_analysis(tmp_path):
    folder = bench_gpu.build_model(tmp_path / "m", bench_gpu.TINY_MODEL)
    npy = bench_gpu.write_tokens(tmp_path / "t.npy", 2, 16, bench_gpu.TINY_MODEL["vocab_size"])
    return layerprobe.analyze(str(folder), data=str(npy), batch_size=2, dtype="float32", device="cpu", progress=False)


def test_the_comparison_passes_a_copy_and_flags_a_perturbed_result(tmp_path):
    ref = _tiny_analysis(tmp_path)
    ok, errors = bench_gpu.compare_analyses(ref, ref, 1e-4)
    assert ok and set(errors) == {"angular distance", "Block Influence", "output variance", "loss", "gradient norms"}
    assert all(e == 0 for e in errors.values())

    for column, factor in (("block_influence", 1.05), ("output_variance", 1.001), ("grad_norm", 0.9)):
        bad = _tiny_analysis(tmp_path / column)
        bad.layers.loc[1, column] *= factor
        ok, errors = bench_gpu.compare_analyses(bad, ref, 1e-4)
        assert not ok, column
        # The error is the change over the quantity's own scale, computed here independently.
        col = ref.layers[column].to_numpy()
        expected = abs(col[1] * (factor - 1)) / np.abs(col).max()
        name = {"block_influence": "Block Influence", "output_variance": "output variance"}.get(column, "gradient norms")
        assert errors[name] == pytest.approx(expected, rel=1e-6)

    bad = _tiny_analysis(tmp_path / "loss")
    bad.summary["loss"] += 0.01
    assert not bench_gpu.compare_analyses(bad, ref, 1e-4)[0]


def test_scaled_error_and_series():
    assert bench_gpu.scaled_error([1.0, 2.0], [1.0, 2.0]) == 0
    assert bench_gpu.scaled_error([1.0, 2.1], [1.0, 2.0]) == pytest.approx(0.05)
    assert bench_gpu.scaled_error([np.nan, 1.0], [np.nan, 1.0]) == 0  # NaN on both sides: not measured
    assert bench_gpu.scaled_error([np.nan, 1.0], [0.5, 1.0]) == float("inf")
    assert bench_gpu.scaled_error([1.0], [1.0, 2.0]) == float("inf")
    assert bench_gpu.compare_series([(1.0, 2.0)], [(1.0, 2.0)], 0) == (True, 0.0)
    assert not bench_gpu.compare_series([(1.0, 2.0 + 1e-12)], [(1.0, 2.0)], 0)[0]  # bit-identical means exact
    assert not bench_gpu.compare_series([(1.0, 2.0)], [(1.0, 2.0), (3.0, 4.0)], 1e-5)[0]


def test_mfu_flops_and_peak_table():
    # 6·N plus attention 12·L·d·T, e.g. the 130m preset's shape at T = 256.
    assert bench_gpu.train_flops_per_token(100, 12, 768, 256) == 600 + 12 * 12 * 768 * 256
    names = [k for k, _ in bench_gpu.PEAK_BF16_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")  # the first match wins
    assert dict(bench_gpu.PEAK_BF16_TFLOPS)["H100"] == dict(bench_gpu.PEAK_BF16_TFLOPS)["H200"] == 989.0
    assert bench_gpu.peak_tflops(torch.device("cpu"), 123.0) == (123.0, "--peak-tflops")


def test_matmul_params_leave_out_the_input_embedding_only(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    n, _ = bench_gpu._matmul_params(tmp_path)
    total = 0
    for name, p in model.named_parameters():  # a plain loop: everything but the embedding lookup
        if name != "model.embed_tokens.weight":
            total += p.numel()
    assert n == total == sum(p.numel() for p in model.parameters()) - 64 * 16


@pytest.mark.parametrize("args, needle", [(["--device", "tpu"], "--device"), (["--only", "speed,colour"], "--only"),
                                          (["--out", "/no/such/folder/x.md"], "does not exist")])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    proc = run_script(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
