"""KServe path: a database outage does not stop the sink's sweep, and no event it took is lost or doubled.

The sweep turns requests that got no response within the pending window into error rows. It used
to die on its first database error, silently: from then on no unanswered request was ever written,
and a candidate whose errors the logger cannot report (KServe logs no non-200 answer) looked clean.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import sqlalchemy as sa

from releasegate import k8s, storage
from releasegate.serving.kserve_sink import create_app
from tests.waiting import wait_until

K8S = k8s.K8sSettings(namespace="models")
PREDICTOR = {
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/models/sa/releasegate-sink;"
    "URI=spiffe://cluster.local/ns/models/sa/default"
}
REQUEST = {"inputs": [{"name": "tenure", "shape": [1], "datatype": "FP64", "data": [3.0]}]}


def post_request(client, request_id: str) -> int:
    headers = {
        **PREDICTOR,
        "ce-specversion": "1.0",
        "ce-id": request_id,
        "ce-type": "org.kubeflow.serving.inference.request",
        "ce-time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "content-type": "application/json",
    }
    return client.post("/events?model=churn&version=2", headers=headers, content=json.dumps(REQUEST)).status_code


@contextmanager
def database_down(engine: sa.Engine) -> Iterator[None]:
    """Every statement on `engine` fails as it would with the database gone (a DBAPI OperationalError)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("unable to open database file")

    sa.event.listen(engine, "before_cursor_execute", refuse)
    try:
        yield
    finally:
        sa.event.remove(engine, "before_cursor_execute", refuse)


def metric(client, line: str) -> float:
    for row in client.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def error_rows(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(
            conn.execute(
                sa.select(storage.predictions.c.request_id).where(storage.predictions.c.status == "error")
            ).scalars()
        )


def test_a_database_outage_during_the_sweep_does_not_kill_it(settings):
    from starlette.testclient import TestClient

    engine = storage.engine(settings.db_url)
    with TestClient(create_app(settings, k8s_settings=K8S, pending_seconds=0.3, sweep_seconds=0.05)) as client:
        assert post_request(client, "before-outage") == 202
        wait_until(lambda: client.app.state.sink.queued() == 0, what="the request recorded")
        with database_down(engine):
            assert post_request(client, "during-outage") == 202  # taken: it waits for the database
            wait_until(
                lambda: metric(client, 'releasegate_sink_db_errors_total{task="sweep"}') >= 3,
                timeout=30,
                what="sweeps failing",
            )
            assert metric(client, 'releasegate_sink_db_errors_total{task="pair"}') >= 1
        # Back: the same sweep writes both unanswered requests, once each.
        wait_until(
            lambda: error_rows(engine) == ["before-outage", "during-outage"], timeout=60, what="the sweep recovered"
        )
        time.sleep(0.5)  # several more sweeps
        assert error_rows(engine) == ["before-outage", "during-outage"]
        # Still alive for what comes next.
        assert post_request(client, "after-outage") == 202
        wait_until(lambda: "after-outage" in error_rows(engine), timeout=30, what="the next unanswered request")
