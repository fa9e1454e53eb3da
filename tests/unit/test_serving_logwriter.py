"""The prediction log writer during a database outage: bounded buffer, nothing lost silently."""

from __future__ import annotations

import logging
import re
import sqlite3
import time

import pytest
import sqlalchemy as sa

from releasegate import storage
from releasegate.serving.logwriter import LogWriter
from releasegate.serving.metrics import Metrics
from tests.waiting import wait_until


def _row(i: int) -> dict:
    return {"request_id": f"r{i}", "time": time.time(), "ground_truth": "1", "business_value": None}


def _count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(storage.feedback)).scalar_one()


def _sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def locked_db(tmp_path):
    """A migrated SQLite database, an engine that gives up on a lock after 0.1 s, and a way to lock it."""
    path = tmp_path / "log.db"
    storage.engine(f"sqlite:///{path}")  # creates and migrates the tables
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1, "check_same_thread": False})
    holder = sqlite3.connect(path, timeout=5, isolation_level=None)
    yield engine, holder
    holder.close()
    engine.dispose()
    storage.dispose_all()


def test_outage_is_buffered_up_to_the_bound_and_every_lost_row_is_counted_and_reported(locked_db, caplog):
    engine, holder = locked_db
    metrics = Metrics()
    writer = LogWriter(engine, storage.feedback, metrics, flush_interval=0.05, batch_rows=5, max_buffer=10).start()
    caplog.set_level(logging.WARNING, logger="releasegate.serving.logwriter")
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the database: every write is refused
    time.sleep(0.1)
    started = time.perf_counter()
    accepted = [writer.put(_row(i)) for i in range(40)]
    assert time.perf_counter() - started < 0.05, "put() must never wait for the database"
    # The writer has taken its first batch and is retrying it: the oldest row held waits on.
    wait_until(
        lambda: _sample(metrics, "releasegate_gateway_log_lag_seconds", table="feedback") > 0.3,
        timeout=30,
        what="the log's lag past 0.3 s",
    )
    accepted += [writer.put(_row(40 + i)) for i in range(10)]
    kept = sum(accepted)
    assert 10 <= kept <= 20  # the queue's bound plus at most the one batch the writer holds
    dropped = _sample(metrics, "releasegate_gateway_log_dropped_rows_total", table="feedback", reason="buffer_full")
    assert dropped == 50 - kept
    assert "refuses writes" in caplog.text

    holder.execute("COMMIT")  # the database is back: everything held is written
    deadline = time.time() + 10
    while _count(engine) < kept and time.time() < deadline:
        time.sleep(0.05)
    assert _count(engine) == kept
    assert _sample(metrics, "releasegate_gateway_log_written_rows_total", table="feedback") == kept
    writer.close()
    assert "takes writes again" in caplog.text
    reported = sum(int(n) for n in re.findall(r"(\d+) \(buffer_full\)", caplog.text))
    assert reported == dropped  # every dropped row appears in a log line, not only in the metric


def test_shutdown_during_an_outage_counts_what_it_could_not_write(locked_db, caplog):
    engine, holder = locked_db
    metrics = Metrics()
    writer = LogWriter(engine, storage.feedback, metrics, flush_interval=0.05, batch_rows=5, max_buffer=100).start()
    holder.execute("BEGIN EXCLUSIVE")
    for i in range(30):
        assert writer.put(_row(i))
    started = time.monotonic()
    writer.close(timeout=0.5)
    assert time.monotonic() - started < 5
    assert (
        _sample(metrics, "releasegate_gateway_log_dropped_rows_total", table="feedback", reason="db_unavailable") == 30
    )
    assert "30 rows not written" in caplog.text
    assert not writer.put(_row(99))  # closed: refused and counted
    assert _sample(metrics, "releasegate_gateway_log_dropped_rows_total", table="feedback", reason="closed") == 1
    holder.execute("COMMIT")
    assert _count(engine) == 0


def test_a_row_the_database_refuses_is_counted_as_dropped_and_leaves_no_lag(tmp_path):
    """Nothing waits once a refused row is counted as dropped: the lag gauge is back to 0 (it kept growing until
    the next write, which alerts on the log's lag would have read as a stuck writer)."""
    path = tmp_path / "log.db"
    engine = storage.engine(f"sqlite:///{path}")
    metrics = Metrics()
    writer = LogWriter(engine, storage.feedback, metrics, flush_interval=0.05).start()
    try:
        assert writer.put(_row(1) | {"request_id": None})  # NOT NULL: refused by the database itself
        wait_until(
            lambda: _sample(metrics, "releasegate_gateway_log_dropped_rows_total", table="feedback", reason="db_error"),
            timeout=30,
            what="the refused row counted as dropped",
        )
        wait_until(
            lambda: (
                _sample(metrics, "releasegate_gateway_log_lag_seconds", table="feedback") == 0 and writer.queued() == 0
            ),
            timeout=30,
            what="no lag once nothing waits",
        )
        time.sleep(0.3)  # a gauge that grew again would show it by now
        assert _sample(metrics, "releasegate_gateway_log_lag_seconds", table="feedback") == 0
    finally:
        writer.close()
        storage.dispose_all()
