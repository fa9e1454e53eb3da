"""The gateway's prediction log, written by a child process: rows arrive, outages are held, nothing is lost silently.

Real parts: a real child process (`python -m releasegate.serving.logprocess`) writing to a real SQLite file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from releasegate import storage
from releasegate.serving.logprocess import ProcessLogWriter
from releasegate.serving.metrics import Metrics
from releasegate.serving.payloads import Rows


def _entry(i: int, value=1.5):
    base = {
        "request_id": f"r{i}",
        "time": time.time(),
        "model": "m",
        "version": "1",
        "arm": "champion",
        "mode": "single",
        "release_id": None,
        "routing_key_hash": "0" * 16,
        "sample_bucket": i % 1000,
        "served": True,
        "fallback": False,
        "latency_ms": 0.4,
        "status": "ok",
        "error": None,
    }
    return base, Rows({"x": [value], "plan": ["basic"]}, 1), [i % 2]


def _sample(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _rows(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT request_id, inputs, outputs, served FROM predictions ORDER BY id").fetchall()


def _wait(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "log.db"
    storage.engine(f"sqlite:///{path}")  # creates and migrates the tables
    yield path
    storage.dispose_all()


def test_entries_are_written_by_the_child_and_counted_here(db):
    metrics = Metrics()
    writer = ProcessLogWriter(f"sqlite:///{db}", "predictions", metrics, flush_interval=0.05).start()
    assert all(writer.put(_entry(i), rows=1) for i in range(300))
    _wait(lambda: len(_rows(db)) == 300)
    writer.close()
    rows = _rows(db)
    assert [r[0] for r in rows] == [f"r{i}" for i in range(300)]
    assert json.loads(rows[7][1]) == {"x": 1.5, "plan": "basic"} and json.loads(rows[7][2]) == 1 and rows[7][3] == 1
    assert _sample(metrics, "releasegate_gateway_log_written_rows_total", table="predictions") == 300
    assert _sample(metrics, "releasegate_gateway_log_lag_seconds", table="predictions") == 0
    assert not writer.put(_entry(300))  # closed: refused and counted
    assert _sample(metrics, "releasegate_gateway_log_dropped_rows_total", table="predictions", reason="closed") == 1


def test_a_locked_database_is_waited_out_and_its_lag_reported(db):
    metrics = Metrics()
    writer = ProcessLogWriter(f"sqlite:///{db}", "predictions", metrics, flush_interval=0.05).start()
    holder = sqlite3.connect(db, timeout=5, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        # put() never waits for the database: the 50 return while the lock is still held (a put that waited
        # would wait for the ROLLBACK below). A thread, so that a put that waited fails the test, not hangs it.
        puts = threading.Thread(target=lambda: taken.extend(writer.put(_entry(i)) for i in range(50)))
        taken: list[bool] = []
        puts.start()
        puts.join(30)
        assert not puts.is_alive(), "put() waited for the database"
        assert taken == [True] * 50
        _wait(lambda: _sample(metrics, "releasegate_gateway_log_lag_seconds", table="predictions") > 0.5)
        assert _sample(metrics, "releasegate_gateway_log_written_rows_total", table="predictions") == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _wait(lambda: len(_rows(db)) == 50)
    writer.close()
    assert _sample(metrics, "releasegate_gateway_log_written_rows_total", table="predictions") == 50


def test_a_writer_process_that_dies_is_replaced_and_nothing_is_lost_silently(db):
    metrics = Metrics()
    writer = ProcessLogWriter(f"sqlite:///{db}", "predictions", metrics, flush_interval=0.05).start()
    first = writer._proc
    first.kill()
    first.wait()
    time.sleep(1.2)  # past the restart back-off
    for i in range(20):
        writer.put(_entry(i))
    _wait(lambda: len(_rows(db)) == 20)
    assert writer._proc.pid != first.pid
    writer.close()
    written = _sample(metrics, "releasegate_gateway_log_written_rows_total", table="predictions")
    lost = _sample(metrics, "releasegate_gateway_log_dropped_rows_total", table="predictions", reason="writer_down")
    assert written == 20 and lost == 0


def test_a_value_orjson_cannot_encode_is_still_logged(db):
    """An integer beyond 64 bits (a column without a signature takes anything): the batch falls back to json."""
    metrics = Metrics()
    writer = ProcessLogWriter(f"sqlite:///{db}", "predictions", metrics, flush_interval=0.05).start()
    writer.put(_entry(0, value=2**70))
    writer.put(_entry(1))
    _wait(lambda: len(_rows(db)) == 2)
    writer.close()
    assert json.loads(_rows(db)[0][1])["x"] == pytest.approx(2**70)
