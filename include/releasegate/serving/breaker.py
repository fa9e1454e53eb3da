"""A candidate's circuit breaker: after repeated failures the gateway stops calling it for a while.

Without it a hanging candidate made every canary request routed to it wait the full candidate
timeout. Closed, every call goes through and failures (errors, timeouts, a full queue) are counted
over a sliding window; `failures` of them within `window` seconds open it. Open, calls are skipped
(the champion answers; the gateway logs each skipped call as the candidate's failure) until
`cooldown` seconds have passed; then one trial call goes through, and its outcome closes the
breaker or opens it for another cool-down.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Breaker:
    """The state of one model version's circuit; `allow()` runs on every candidate call, so it is a compare."""

    __slots__ = ("_cooldown", "_failures", "_limit", "_on_change", "_open_until", "_trial", "_window", "opened")

    def __init__(
        self,
        failures: int,
        window: float,
        cooldown: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._limit = failures
        self._window = window
        self._cooldown = cooldown
        self._failures: deque[float] = deque()  # monotonic times of the recent failures (closed only)
        self._open_until = 0.0  # 0: closed
        self._trial = False  # half-open: the one trial call is under way
        self._on_change = on_change  # told True when the circuit opens, False when it closes
        self.opened = 0  # how many times it opened

    @property
    def is_open(self) -> bool:
        return self._open_until != 0.0

    def allow(self, now: float | None = None) -> bool:
        """May a call go through now? After a cool-down, True once: the trial, whose outcome decides."""
        if self._open_until == 0.0:
            return True
        now = now if now is not None else time.monotonic()
        if now < self._open_until:
            return False
        self._trial = True
        # Skip the others meanwhile; a trial whose outcome never comes (its request cancelled) is replaced
        # by another after a cool-down.
        self._open_until = now + self._cooldown
        return True

    def record(self, ok: bool, now: float | None = None) -> None:
        """A call's outcome (a call that `allow()` let through)."""
        if self._open_until == 0.0:
            if ok:
                return
            now = now if now is not None else time.monotonic()
            failures = self._failures
            failures.append(now)
            while failures[0] < now - self._window:
                failures.popleft()
            if len(failures) >= self._limit:
                self._open(now)
            return
        if not self._trial:  # a call from before the circuit opened, ending late: the trial decides
            return
        self._trial = False
        if ok:
            self._open_until = 0.0
            self._failures.clear()
            if self._on_change is not None:
                self._on_change(False)
        else:
            self._open(now if now is not None else time.monotonic())

    def _open(self, now: float) -> None:
        was_open = self._open_until != 0.0
        self._open_until = now + self._cooldown
        self._failures.clear()
        self.opened += 1
        if not was_open and self._on_change is not None:
            self._on_change(True)

    def describe(self) -> str:
        """Why calls are skipped, for the log row's `error`."""
        return (
            f"circuit open after {self._limit} failures within {self._window:g}s; "
            f"calls skipped for {self._cooldown:g}s, then one trial call"
        )
