"""While ptrace state is half changed (``injector.tracer.signals_deferred``), a stopping
signal waits for the section's end even when another thread of the process takes it: numpy's
OpenBLAS pool is such a thread, and Python then runs the handler in the main thread anyway,
which once let an interrupted apply leave its target with an injected ip (kill tests of
tests/test_survive.py, about one in twenty)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from injector.tracer import signal_deferred, signals_deferred


def _sender(sig: signal.Signals) -> Iterator[threading.Event]:
    """A thread started before the section (so it does not block the signals) that sends
    ``sig`` to the process when the event is set."""
    go = threading.Event()

    def send() -> None:
        if go.wait(5):
            os.kill(os.getpid(), sig)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        yield go
    finally:
        go.set()
        thread.join(5)


@pytest.fixture
def other_thread() -> Iterator[threading.Event]:
    yield from _sender(signal.SIGHUP)


@pytest.fixture
def other_thread_int() -> Iterator[threading.Event]:
    yield from _sender(signal.SIGINT)


def test_a_handler_that_asks_runs_after_the_section(other_thread: threading.Event) -> None:
    seen: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if signal_deferred(signum):
            return
        seen.append(signum)

    old = signal.signal(signal.SIGHUP, handler)
    try:
        with signals_deferred():
            other_thread.set()
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:  # bytecodes run: Python checks its signals
                pass
            assert seen == []
        assert seen == [signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, old)


def test_without_the_section_the_handler_runs_at_once(other_thread: threading.Event) -> None:
    """The check above can fail: outside a section the same signal is handled at once."""
    seen: list[int] = []
    old = signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
    try:
        other_thread.set()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            pass
        assert seen == [signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, old)


def test_keyboard_interrupt_waits_for_the_section(other_thread_int: threading.Event) -> None:
    """Python's own SIGINT handler (the Python API's case) is held back too, and the
    KeyboardInterrupt comes once the section is over."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    reached = False
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        other_thread_int.set()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            pass
        reached = True
    assert reached
