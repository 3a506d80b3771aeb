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
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app()
        return
    # Under torchrun the process ends here, without the interpreter's finalization. gloo's worker threads can
    # still be freeing the last collectives' tensors when the command returns; that needs the GIL, which a
    # finalizing Python 3.11 answers by ending the thread, and the C++ runtime then aborts the process
    # ("terminate called without an active exception", exit -6) after a run that succeeded.
    # `destroy_process_group` does not join those threads while DDP or FSDP still hold the group.
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
