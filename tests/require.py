"""Something a test needs that is not on this machine: a skip that says so locally, a failure under CI."""

from __future__ import annotations

import os

import pytest


def require(problem: str | None) -> None:
    """Stop the test when `problem` names what is missing; CI (the `CI` variable set) must have everything."""
    if problem:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(problem)
