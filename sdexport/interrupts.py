"""SIGINT and SIGTERM: one behaviour for both, and an exit status that cannot be lost.

The handler records the signal and raises ``Interrupted`` (a ``KeyboardInterrupt``, so that
libraries treat it as one and every ``with`` block unwinds: temporary files go, locks are
released). An exception raised inside a ``__del__`` or a callback from C is swallowed by
Python; the recorded signal is not: ``Transaction.commit`` refuses to commit after it, and
the CLI exits 128 + signal (130 for Ctrl-C, 143 for SIGTERM) even if the command body went on
to return normally. A signal that arrives after a transaction's commit point cannot undo it: the
transaction notes itself (``committed``) and the CLI's line says what was written whole.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_received: int | None = None
_committed: list[str] = []  # what this command has committed (Transaction.commit), for the interrupt's line
_process_ends_with_command = False  # set by the CLI's entry point (cli.main), not where the CLI runs in-process


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


_deferring = 0  # depth of ``deferred`` sections on the main thread
_held: int | None = None  # a signal that arrived inside one, raised when the outermost ends


def _handler(signum, frame):
    global _held
    record(signum)
    if _deferring:
        _held = signum
        return
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
    global _received, _held
    _received = _held = None
    _committed.clear()
    sys.unraisablehook = _unraisable
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def process_ends_with_command() -> None:
    """The CLI's entry point says this process ends when its command does (``done`` may then ignore signals);
    tests that call the CLI in their own process keep their signal handling."""
    global _process_ends_with_command
    _process_ends_with_command = True


def done() -> None:
    """The command has decided how it ends (its result, its error line or its interrupt line is printed next). In
    the sdexport process SIGINT and SIGTERM are ignored from here on: after the command the process needs about a
    second to shut down (interpreter and library teardown once torch and ONNX Runtime are loaded), and there Python
    runs no signal handler and then restores the default action, so a Ctrl-C after the result line killed the
    process without a word (exit status 130 by signal, the export whole). Now the exit status is the command's."""
    if _process_ends_with_command and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def received() -> int | None:
    """The signal number received so far in this process, if any."""
    return _received


def committed(what: str) -> None:
    """Note that ``what`` (e.g. "sdexport export had written OUT") is committed: an interrupt after this point
    leaves it complete, and the CLI says so instead of 'nothing partial was left'."""
    _committed.append(what)


def committed_so_far() -> list[str]:
    return list(_committed)


def check() -> None:
    """Raise ``Interrupted`` if a signal arrived, even if its exception was swallowed somewhere (inside a
    ``deferred`` section: when it ends)."""
    if _received is not None and not _deferring:
        raise Interrupted(_received)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM back for a short critical section (committing a transaction); a signal that
    arrives meanwhile is delivered (``Interrupted``) when the outermost section ends. The handler holds
    it: blocking the signal in this thread alone does not, since the kernel then hands a signal sent to
    the process to another thread (torch's, ONNX Runtime's) and Python runs the handler here all the same."""
    global _deferring, _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        held = None if _deferring else _held
        if not _deferring:
            _held = None
    if held is not None:  # (after an exception, the recorded signal still sets the exit status)
        raise Interrupted(held)
