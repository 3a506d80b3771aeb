"""The fault battery's misleading messages (issue 10, item 7), each now one line that names the problem and
the fix, and bad data refused before any folder is made."""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli

QUICK = ["--samples", "2", "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


def _custom_code_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]},
                  tokenizer_class="CustomTokenizer")
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    (dst / "tokenization_custom.py").write_text("raise SystemExit('custom code ran')\n")
    return dst


def test_tokenizer_needing_custom_code_points_to_the_flag(tiny_dir, tmp_path):
    model = _custom_code_tokenizer(tiny_dir("llama", tokenizer=True), tmp_path / "model")
    out = tmp_path / "out"
    result, text = run_cli("analyze", model, *QUICK, "--out", out)
    assert result.exit_code == 2
    assert_one_line_error(result, text, "tokenizer", "needs its own code", "--trust-remote-code")
    assert "has none" not in text and "custom code ran" not in text
    assert not out.exists()


def test_token_ids_need_no_tokenizer_even_when_it_cannot_load(tiny_dir, tmp_path):
    """The tokenizer's problem is reported only when text needs it: .npy token ids still work."""
    model = _custom_code_tokenizer(tiny_dir("llama", tokenizer=True), tmp_path / "model")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(3, 60, size=(2, 16)))
    result, text = run_cli("analyze", model, "--data", ids, *QUICK, "--out", tmp_path / "out")
    assert result.exit_code == 0, text


def test_pickled_npy_is_not_loaded(tiny_dir, tmp_path):
    data = tmp_path / "objects.npy"
    np.save(data, np.array([{"a": 1}, [1, 2]], dtype=object), allow_pickle=True)
    result, text = run_cli("analyze", tiny_dir("llama"), "--data", data, *QUICK, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert_one_line_error(result, text, str(data), "not a 2-D integer array")
    assert "allow_pickle" not in text
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path):
    from layerprobe.loading import builtin_model_path

    source = builtin_model_path("smollm2")
    for name, size in (("half.gguf", source.stat().st_size // 2), ("head.gguf", 1000)):
        with source.open("rb") as f:
            (tmp_path / name).write_bytes(f.read(size))
        result, text = run_cli("analyze", tmp_path / name, *QUICK, "--out", tmp_path / "out")
        assert result.exit_code == 2
        assert_one_line_error(result, text, name, "corrupt", "truncated")
        assert "reshape" not in text.split("(")[0]  # the reason may quote it; the message leads with ours
    assert not (tmp_path / "out").exists()


def test_parquet_reader_is_a_core_dependency():
    """`pip install -e .[gguf]` (scripts/setup.sh without --dev) must be able to read .parquet data."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = [d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]]
    assert "pyarrow" in core
    assert 'pip install -q -e ".[gguf]"' in (REPO / "scripts" / "setup.sh").read_text()


def test_parquet_data_end_to_end(tiny_dir, tmp_path):
    import pandas as pd

    data = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["the quick brown fox jumps over the lazy dog " * 8] * 4}).to_parquet(data)
    result, text = run_cli("analyze", tiny_dir("llama", tokenizer=True), "--data", data, "--text-column", "body",
                           *QUICK, "--out", tmp_path / "out")
    assert result.exit_code == 0, text


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import pandas as pd

    data = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["x"]}).to_parquet(data)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    import layerprobe.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result, text = run_cli("analyze", "smollm2", "--data", data, *QUICK, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert_one_line_error(result, text, ".parquet needs pyarrow", "pip install pyarrow")
    assert not (tmp_path / "out").exists()
    from layerprobe.data import read_documents
    from layerprobe.errors import LayerprobeError

    with pytest.raises(LayerprobeError, match="pip install pyarrow"):
        read_documents(str(data))
