"""Ctrl-C and SIGTERM as an exception the job can report: `Interrupted`, a KeyboardInterrupt that knows its signal.

    with raising():          # in the main thread: SIGINT and SIGTERM raise Interrupted there
        run_the_job()

Kubernetes and `ray job stop` end a job with SIGTERM, whose default action kills the process at once: nothing
is said, no MLflow run is closed. Under `raising()` it unwinds like Ctrl-C instead: `finally` blocks run, the
tracker marks the run KILLED, and the CLI prints one line and exits 128 + the signal's number (130, 143).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The job was stopped by `signum`; the message says what was kept, and how to go on."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message or f"interrupted by {signal.Signals(self.signum).name}")


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread for the block; elsewhere (signal handlers can only
    be set there) the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
