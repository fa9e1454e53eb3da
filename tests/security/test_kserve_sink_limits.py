"""KServe path: the sink bounds what one caller can make it hold: a body's size (413) and the events waiting for
the database (503 past a byte budget), each refusal counted."""

from __future__ import annotations

import json

from releasegate import k8s, storage
from releasegate.serving.kserve_sink import create_app
from tests.security.test_kserve_sink_outage import PREDICTOR, database_down, metric, post_request
from tests.waiting import wait_until

K8S = k8s.K8sSettings(namespace="models", sink_max_body_bytes=1024, sink_queue_bytes=4096)
FEEDBACK = {
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/models/sa/releasegate-sink;"
    "URI=spiffe://cluster.local/ns/models/sa/releasegate-feedback"
}
EVENT = {
    "ce-specversion": "1.0",
    "ce-id": "big",
    "ce-type": "org.kubeflow.serving.inference.request",
    "content-type": "application/json",
}


def test_an_oversized_body_is_refused_with_413(settings):
    from starlette.testclient import TestClient

    big = json.dumps({"inputs": [{"name": "x", "shape": [300], "datatype": "FP64", "data": [1.5] * 300}]}).encode()
    assert len(big) > K8S.sink_max_body_bytes
    with TestClient(create_app(settings, k8s_settings=K8S)) as client:
        url = "/events?model=churn&version=2"
        declared = client.post(url, headers={**PREDICTOR, **EVENT}, content=big)
        # No Content-Length (chunked): refused once the bytes read pass the limit.
        streamed = client.post(url, headers={**PREDICTOR, **EVENT}, content=iter([big[:600], big[600:]]))
        labels = [{"request_id": f"r{i}", "ground_truth": 1} for i in range(100)]
        feedback = client.post("/feedback", headers=FEEDBACK, content=json.dumps(labels))
        assert [r.status_code for r in (declared, streamed, feedback)] == [413, 413, 413]
        assert "at most 1024" in declared.json()["error"] and "passed 1024 bytes" in streamed.json()["error"]
        assert post_request(client, "small") == 202  # an ordinary event still goes through
        assert metric(client, 'releasegate_sink_refused_requests_total{endpoint="/events",reason="too_large"}') == 2
        assert metric(client, 'releasegate_sink_refused_requests_total{endpoint="/feedback",reason="too_large"}') == 1


def test_the_events_waiting_for_the_database_are_bounded(settings):
    from starlette.testclient import TestClient

    engine = storage.engine(settings.db_url)
    with TestClient(create_app(settings, k8s_settings=K8S)) as client:
        with database_down(engine):
            answers = [post_request(client, f"r{i}") for i in range(100)]
            taken = answers.count(202)
            # Taken until the byte budget is spent, then 503 (and counted) instead of growing without end.
            assert 0 < taken < 100 and set(answers[taken:]) == {503}
            assert (
                metric(client, 'releasegate_sink_refused_requests_total{endpoint="/events",reason="overloaded"}')
                == 100 - taken
            )
        wait_until(lambda: client.app.state.sink.queued() == 0, timeout=60, what="the held events paired")
        assert post_request(client, "after") == 202
