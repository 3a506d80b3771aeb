"""Stopping a run cleanly: Ctrl-C or a scheduler's SIGTERM asks for a checkpoint and a stop."""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """Ctrl-C (or SIGTERM from a scheduler) asks the loop to save and stop after the current step;
    a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        # Handlers can only be installed from the main thread (a notebook's worker thread keeps Python's).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False
