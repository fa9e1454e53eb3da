"""KServe path: the sink's replicas pair a request and its response wherever each arrives, and write it once.

The logger's two events of one request can reach two sink replicas (the Service balances per
connection). Paired in one replica's memory, each half would wait alone and the request would be
written as a false error row. The pairing is in the database (`sink_pairs`): the event that
completes a pair claims it in the transaction that writes its rows, and a request left alone is
claimed once by whichever replica's sweep comes first. Two replicas here are two processes on one
database: this test's app and a sink started as its own process, as a second pod would be.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
import sqlalchemy as sa

from releasegate import k8s, storage
from releasegate.serving.kserve_sink import create_app
from tests.unit.mlflow_store import migrated_mlflow_db, store  # noqa: F401  (fixtures)
from tests.waiting import wait_until

# Long enough that no half of the burst below is still on its way when the window ends (the halves are
# shuffled over the whole burst); short enough for a test.
PENDING = 5.0
K8S = k8s.K8sSettings(namespace="models")
PREDICTOR = {
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/models/sa/releasegate-sink;"
    "URI=spiffe://cluster.local/ns/models/sa/default"
}
REQUEST = {
    "inputs": [
        {"name": "tenure", "shape": [2], "datatype": "FP64", "data": [3.0, 40.0]},
        {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["north", "south"]},
    ]
}
RESPONSE = {"outputs": [{"name": "predict", "shape": [2, 1], "datatype": "INT64", "data": [1, 0]}]}


def _post(client, kind: str, request_id: str, when: float):
    headers = {
        **PREDICTOR,
        "ce-specversion": "1.0",
        "ce-id": request_id,
        "ce-type": f"org.kubeflow.serving.inference.{kind}",
        "ce-time": datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z"),
        "content-type": "application/json",
    }
    body = json.dumps(REQUEST if kind == "request" else RESPONSE)
    response = client.post("/events?model=churn&version=2", headers=headers, content=body)
    assert response.status_code == 202, response.text
    return response


def _rows(settings) -> list[tuple[str, str, str | None]]:
    with storage.engine(settings.db_url).connect() as conn:
        rows = conn.execute(
            sa.select(storage.predictions.c.request_id, storage.predictions.c.status, storage.predictions.c.outputs)
        ).all()
    return [tuple(r) for r in rows]


def _labels(settings) -> list[tuple[str, float | None]]:
    with storage.engine(settings.db_url).connect() as conn:
        found = conn.execute(sa.select(storage.feedback.c.ground_truth, storage.feedback.c.business_value)).all()
    return [tuple(r) for r in found]


def _states(settings) -> dict[str, str]:
    with storage.engine(settings.db_url).connect() as conn:
        return dict(conn.execute(sa.select(storage.sink_pairs.c.request_id, storage.sink_pairs.c.state)).all())


@pytest.fixture
def second_replica(settings, tmp_path):
    """A second sink, in its own process, on the same database."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RELEASEGATE_K8S_NAMESPACE": "models", "RELEASEGATE_K8S_SINK_PENDING_SECONDS": str(PENDING)}
    log = open(tmp_path / "replica.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "releasegate.serving.kserve_sink", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "replica.log").read_text()
        try:
            return client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, what="the second sink replica")
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
        log.close()


def test_two_sink_replicas_pair_a_request_and_its_response_into_one_ok_row(settings, second_replica):
    from starlette.testclient import TestClient

    replica_b = second_replica
    with TestClient(create_app(settings, k8s_settings=K8S, pending_seconds=PENDING, sweep_seconds=0.1)) as replica_a:
        t0 = time.time()
        _post(replica_a, "request", "split-1", t0)  # the request at one replica ...
        _post(replica_b, "response", "split-1", t0 + 0.004)  # ... its response at the other
        _post(replica_b, "response", "split-2", t0 + 0.006)  # and the other way round, response first
        _post(replica_a, "request", "split-2", t0)
        # Many requests at once, each half to a replica drawn at random, sent concurrently.
        draw = random.Random(7)
        halves = [(kind, f"burst-{i}") for i in range(150) for kind in ("request", "response")]
        draw.shuffle(halves)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda h: _post(draw.choice([replica_a, replica_b]), h[0], h[1], t0), halves))

        expected = {"split-1", "split-2"} | {f"burst-{i}" for i in range(150)}
        wait_until(lambda: {r[0] for r in _rows(settings)} >= expected, timeout=60, what="every pair written")
        # Past the pending window both replicas' sweeps have run: a split pair never turns into an error row.
        time.sleep(1.5 * PENDING)
        rows = _rows(settings)
    assert sorted(rows) == sorted((rid, "ok", out) for rid in expected for out in ("1", "0"))
    assert set(_states(settings).values()) == {"paired"}


def test_a_request_alone_is_written_once_and_late_or_repeated_events_write_nothing(settings, second_replica):
    from starlette.testclient import TestClient

    replica_b = second_replica
    with TestClient(create_app(settings, k8s_settings=K8S, pending_seconds=PENDING, sweep_seconds=0.1)) as replica_a:
        t0 = time.time()
        _post(replica_a, "request", "answered", t0)
        _post(replica_b, "response", "answered", t0 + 0.01)
        _post(replica_a, "request", "unanswered", t0)  # no response: KServe logs none for a non-200 answer
        wait_until(lambda: _states(settings).get("unanswered") == "expired", timeout=30, what="the sweep's claim")
        # The agent resends, or an answer arrives after the window: the claimed pairs take no second row.
        _post(replica_b, "request", "answered", t0)
        _post(replica_a, "response", "answered", t0 + 0.01)
        _post(replica_b, "response", "unanswered", t0 + 5)
        time.sleep(1.5 * PENDING)  # both replicas' sweeps run several times over
        rows = _rows(settings)
        late = replica_a.get("/metrics").text
    assert sorted(rows) == [
        ("answered", "ok", "0"),
        ("answered", "ok", "1"),
        ("unanswered", "error", None),
        ("unanswered", "error", None),
    ]
    assert _states(settings) == {"answered": "paired", "unanswered": "expired"}
    assert 'releasegate_sink_events_total{outcome="late"}' in late


def test_the_sink_logs_inputs_in_the_form_the_models_classification_allows(store):
    """KServe path, same policy as the gateway's: the registered model's tag (a real MLflow store) decides; a
    dropped column never reaches the log, an encrypted one only as ciphertext, text is pseudonymised; the
    request's label is stored encrypted and its business value dropped, as the tag's feedback classes say."""
    from starlette.testclient import TestClient

    from releasegate import registry
    from releasegate.contract import CLASSIFICATION_TAG
    from releasegate.privacy import Protector, open_truths

    registry.client(store).create_registered_model(
        "churn",
        tags={
            CLASSIFICATION_TAG: '{"columns": {"tenure": "encrypt", "region": "drop"}, '
            '"feedback": {"ground_truth": "encrypt", "business_value": "drop"}}'
        },
    )
    with TestClient(create_app(store, k8s_settings=K8S, pending_seconds=PENDING, sweep_seconds=0.1)) as sink:
        t0 = time.time()
        _post(sink, "request", "classified", t0)
        _post(sink, "response", "classified", t0 + 0.01)
        wait_until(lambda: len(_rows(store)) == 2, timeout=60, what="the pair written")
        feedback = {
            "x-forwarded-client-cert": PREDICTOR["x-forwarded-client-cert"].replace("default", "releasegate-feedback")
        }
        label = {"request_id": "classified", "ground_truth": [1, 0], "business_value": 12.0}
        assert sink.post("/feedback", json=[label], headers=feedback).json() == {"accepted": 1}
        wait_until(lambda: _labels(store), timeout=60, what="the label written")
    with storage.engine(store.db_url).connect() as conn:
        logged = [json.loads(v) for v in conn.execute(sa.select(storage.predictions.c.inputs)).scalars()]
    [(truth, value)] = _labels(store)
    assert truth.startswith('"e:k1:') and value is None
    assert json.loads(open_truths([truth], Protector.of(store))[0]) == [1, 0]
    protector = Protector.of(store)
    assert [set(row) for row in logged] == [{"tenure"}, {"tenure"}]  # region: dropped
    assert [protector.decrypt(row["tenure"]) for row in logged] == [3.0, 40.0]
