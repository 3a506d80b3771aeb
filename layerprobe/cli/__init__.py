"""The `layerprobe` command: a thin layer over the Python API, one module per command."""

from __future__ import annotations

import os

import typer

app = typer.Typer(
    name="layerprobe",
    help="Which layers of a language model actually contribute, and why.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Which layers of a language model actually contribute, and why."""
    from transformers.utils import logging as hf_logging

    # Ours are the progress bars on screen; transformers' tqdm bars would interleave with them.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's bar is plain tqdm


# Each command lives in its own module; importing it registers it on `app`.
from . import analyze  # noqa: E402,F401
from . import prune  # noqa: E402,F401
from . import train  # noqa: E402,F401
from . import compare, demo  # noqa: E402,F401
from . import prepare  # noqa: E402,F401


def main() -> None:
    app()
