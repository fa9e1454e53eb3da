"""Waiting on a condition with a deadline, never a fixed sleep: a loaded machine only makes the wait longer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, timeout: float = 60.0, every: float = 0.1, what: str = "condition") -> T:
    """The first truthy value of `condition()`, polled every `every` seconds; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s (last: {value!r})")
        time.sleep(every)
