"""Rich progress bars on stderr, shared by every long-running command.

A worker process of the demo draws nothing itself: `relay_to(queue, label)` makes its bars and spinners
send their events to the parent, whose `RelayDisplay` shows them in the one progress display.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)
_relay: tuple | None = None  # (queue, label) in a worker process whose parent draws its progress
_ids = itertools.count()


def relay_to(queue, label: str) -> None:
    """In a worker process: send every later progress bar's and spinner's events to `queue`, labelled."""
    global _relay
    _relay = (queue, label)


class _RelayedProgress:
    """The part of rich's Progress our code uses, sending events to the parent instead of drawing."""

    def __init__(self, queue, label: str):
        self.queue, self.label, self.tasks = queue, label, []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for key in self.tasks:
            self.queue.put(("done", key, {}))

    def add_task(self, description: str, total=None, completed=0, **fields) -> int:
        key = (self.label, next(_ids))
        self.tasks.append(key)
        self.queue.put(("add", key, {"description": description if description.startswith(self.label)
                                     else f"{self.label} · {description}", "total": total,
                                     "completed": completed, "info": fields.get("info", "")}))
        return key

    def update(self, task, **changes) -> None:
        self.queue.put(("update", task, changes))

    def advance(self, task, advance: float = 1) -> None:
        self.queue.put(("update", task, {"advance": advance}))


class RelayDisplay:
    """In the parent: a thread that draws the events workers send (see `relay_to`) on `progress`."""

    def __init__(self, queue, progress: Progress):
        self.queue, self.progress, self.tasks = queue, progress, {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RelayDisplay":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        while (event := self.queue.get()) is not None:
            kind, key, fields = event
            if kind == "add":
                self.tasks[key] = self.progress.add_task(**fields)
            elif kind == "update" and key in self.tasks:
                self.progress.update(self.tasks[key], **fields)
            elif kind == "done" and key in self.tasks:
                self.progress.remove_task(self.tasks.pop(key))


def make_progress(enabled: bool = True, transient: bool = False):
    if enabled and _relay is not None:
        return _RelayedProgress(*_relay)
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
    if _relay is not None:
        with _RelayedProgress(*_relay) as relayed:
            relayed.add_task(message)
            yield
        return
    with _console.status(Text(message)):  # literal: the message may hold a user's path like "m[/]x"
        yield


def note(message: str, enabled: bool = True) -> None:
    """One plain line on stderr where the bars are drawn (a worker whose bars are relayed prints nothing)."""
    if enabled and _relay is None:
        _console.print(message, highlight=False, markup=False)
