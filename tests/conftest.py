"""Fixtures for the whole suite."""

import signal

import pytest


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """Recipes run in the test process install SIGINT/SIGTERM handlers of their own; pytest's come
    back after each test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
