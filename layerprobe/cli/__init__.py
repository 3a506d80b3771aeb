"""The `layerprobe` command: a thin layer over the Python API, one module per command.

Each command module imports the library inside its command function, so `--help` and option errors
answer without loading torch, transformers, pandas or matplotlib.
"""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="layerprobe",
    help="Which layers of a language model actually contribute, and why.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: wraps at any width instead of cutting option names, and skips rich's help renderer
    # (a third of --help's start-up).
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """Which layers of a language model actually contribute, and why."""
    # Ours are the progress bars on screen; transformers' and huggingface_hub's tqdm bars would interleave
    # with them. Both read these settings when they are imported, which has not happened yet in a command
    # run from the shell; the GGUF reader's bar is plain tqdm.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "transformers" in sys.modules:  # the CLI run inside a process that has imported it (tests, notebooks)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


# Each command lives in its own module; importing it registers it on `app`.
from . import analyze  # noqa: E402,F401
from . import prune  # noqa: E402,F401
from . import train  # noqa: E402,F401
from . import compare, demo  # noqa: E402,F401
from . import prepare  # noqa: E402,F401


def main() -> None:
    app()
