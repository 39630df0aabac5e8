"""A watchdog for calls that must not hang: the fault-matrix tests assert that a call returns,
never how fast (a timed assertion would be flaky on a busy machine)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def returns(call: Callable[[], T], what: str = "the call", watchdog: float = 30.0) -> T:
    """`call()`, run in a thread where a hang cannot take the test run down; fails the test if
    it has not returned after `watchdog` seconds, re-raises what it raised."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as e:  # re-raised below, in the test's thread
            err.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(watchdog)
    assert not t.is_alive(), f"{what} did not return within {watchdog} s (hung)"
    if err:
        raise err[0]
    return out[0]
