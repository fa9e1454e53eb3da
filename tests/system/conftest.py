"""The `system_stack` fixture: the whole stack as separate processes on loopback, on PostgreSQL (tests/system/stack.py)."""

from __future__ import annotations

import os

import pytest

from tests.require import require
from tests.system.stack import PG_ADMIN_URL_DEFAULT, PG_ADMIN_URL_ENV, Stack, postgres_problem


@pytest.fixture(scope="session")
def system_stack(tmp_path_factory) -> Stack:
    """PostgreSQL databases, Airflow (api-server, scheduler, dag-processor, triggerer), MLflow, gateway, traffic.

    One per session: it takes about 3 minutes to start on 2 busy cores, so the system test modules share it.
    """
    admin_url = os.environ.get(PG_ADMIN_URL_ENV, PG_ADMIN_URL_DEFAULT)
    problem = postgres_problem(admin_url)
    if problem:
        # A laptop without PostgreSQL skips; CI must run them, so there the same reason fails.
        require(problem)
    stack = Stack(tmp_path_factory.mktemp("system"), admin_url)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
