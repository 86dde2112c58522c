"""How a training process stops when asked: Ctrl-C (SIGINT, KeyboardInterrupt) or SIGTERM
(errors.Stopped), never in the middle of writing a checkpoint, and ending its run KILLED."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

from ..errors import Stopped

log = logging.getLogger("charseg")
HELD = (signal.SIGINT, signal.SIGTERM)


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises errors.Stopped inside the block, as Ctrl-C raises KeyboardInterrupt. A
    no-op outside the main thread (Python runs signal handlers there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM inside the block and raise KeyboardInterrupt (Ctrl-C) or
    errors.Stopped (SIGTERM) after it, so an interrupted run always leaves its checkpoint
    complete. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in received:
        raise Stopped(signal.SIGTERM)
    if received:
        log.warning("interrupted: checkpoint saved, stopping")
        raise KeyboardInterrupt
