"""Waiting on a condition with a deadline, never a fixed sleep: a loaded machine only makes the wait longer."""

from __future__ import annotations

import subprocess
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


def gateway_ready(url: str, proc: subprocess.Popen, log: Callable[[], str], timeout: float = 60.0) -> None:
    """Until the gateway at `url` answers /readyz with 200; AssertionError with its log if it exits or takes longer."""
    import httpx

    def ready() -> bool:
        assert proc.poll() is None, log()
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=timeout, every=0.2, what="the gateway's /readyz")
    except AssertionError as err:
        raise AssertionError(f"gateway did not start: {err}\n{log()}") from None
