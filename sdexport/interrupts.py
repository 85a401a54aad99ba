"""SIGINT and SIGTERM: one behaviour for both, and an exit status that cannot be lost.

The handler records the signal and raises ``Interrupted`` (a ``KeyboardInterrupt``, so that
libraries treat it as one and every ``with`` block unwinds: temporary files go, locks are
released). An exception raised inside a ``__del__`` or a callback from C is swallowed by
Python; the recorded signal is not: ``Transaction.commit`` refuses to commit after it, and
the CLI exits 128 + signal (130 for Ctrl-C, 143 for SIGTERM) even if the command body went on
to return normally.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_received: int | None = None


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def record(signum: int) -> None:
    """Note a signal without raising (for handlers that must not raise, e.g. inside a C++ callback)."""
    global _received
    _received = signum


def _handler(signum, frame):
    record(signum)
    raise Interrupted(signum)


def _unraisable(unraisable) -> None:
    """An interrupt raised inside a ``__del__`` or a callback is recorded (``record``), and the command ends
    with its exit status: Python's report of it ("Exception ignored in ... Traceback") is noise to the user."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(unraisable)


def install() -> None:
    """Route SIGINT and SIGTERM to ``Interrupted`` (main thread only, as Python requires); a command
    starts with no signal recorded."""
    global _received
    _received = None
    sys.unraisablehook = _unraisable
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def received() -> int | None:
    """The signal number received so far in this process, if any."""
    return _received


def check() -> None:
    """Raise ``Interrupted`` if a signal arrived, even if its exception was swallowed somewhere."""
    if _received is not None:
        raise Interrupted(_received)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM back for a short critical section (applying a committed transaction);
    a signal that arrives meanwhile is delivered when the section ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
