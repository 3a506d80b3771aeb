"""Rich progress bars on stderr, shared by every long-running command."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def make_progress(enabled: bool = True, transient: bool = False) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_console,
        disable=not enabled,
        transient=transient,
    )


@contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner for work with no countable steps (loading a model, tokenizing)."""
    if not enabled:
        yield
        return
    with _console.status(Text(message)):  # literal: the message may hold a user's path like "m[/]x"
        yield
