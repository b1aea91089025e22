"""Stopping a long run from outside: Ctrl-C, or SIGTERM as a batch scheduler sends it before it kills a job.

Inside :func:`graceful_interrupts` the first SIGINT or SIGTERM raises ``KeyboardInterrupt`` in the main thread,
as Python's default SIGINT does, so the run stops where it is, the last finished round's checkpoint is
written out (the runner waits for it) and the command prints its one line with the ``--resume`` command.
A second signal does not wait for anything: the process ends at once with status 130 (the previous
checkpoint stays whole, since checkpoints are replaced atomically).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _second(signum, frame) -> None:
    os.write(2, b"\ninterrupted again: stopping at once (the last checkpoint written stays whole)\n")
    os._exit(130)


def _first(signum, frame) -> None:
    for sig in SIGNALS:
        signal.signal(sig, _second)
    raise KeyboardInterrupt


@contextlib.contextmanager
def graceful_interrupts():
    """The handlers above for the duration of the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _first)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        sys.stderr.flush()
