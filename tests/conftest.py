"""Shared test fixtures. Every network test uses 127.0.0.1, OS-chosen ports and a deadline."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from meshollama import logs

logs.setup("warning")

# A last-resort bound on every test, on top of each one's own deadline: a loop that
# spins under trio's MockClock never lets a virtual deadline fire, and CI would wait
# its 90 minutes instead of failing one test.
TEST_LIMIT = float(os.environ.get("MESHOLLAMA_TEST_LIMIT", "600"))


class TestRanTooLong(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield  # no SIGALRM here (another OS, or pytest not on the main thread): each test's own deadline only
        return

    def expired(signum, frame):
        raise TestRanTooLong(f"{item.nodeid} ran over {TEST_LIMIT:.0f} s (tests/conftest.py TEST_LIMIT)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def anyio_backend():
    return "trio"
