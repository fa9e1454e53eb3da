"""A hanging model holds neither the caller nor the gateway: a circuit breaker for the candidate, a timeout for the
champion, a bounded queue per version, and a limit on the requests in flight."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa

from releasegate import storage
from tests.integration.test_gateway import ADMIN, MODEL, rows
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def hang(security_gateway):
    """While this fixture is active, the `hanging` version hangs on every call (up to 20 s)."""
    security_gateway.hang.touch()
    yield
    security_gateway.hang.unlink(missing_ok=True)
    # Until every call that hung has returned: else the next test's `hang` could close the gate again on a call
    # still hanging from this one, and its version's next batch would wait behind it.
    wait_until(
        lambda: _hanging_calls(security_gateway, "ended") == _hanging_calls(security_gateway),
        timeout=30,
        what="the hanging calls to return",
    )


def _hanging_calls(gw, kind: str = "calls") -> int:
    """How many calls of the hanging version began to hang (`calls`), or returned after hanging (`ended`)."""
    counted = gw.hang.with_name(f"{gw.hang.name}.{kind}")
    return len(counted.read_text().splitlines()) if counted.exists() else 0


def _post(gw, request_id: str, timeout: float = 30) -> tuple[httpx.Response, float]:
    """The answer, and how long it took from the request's sending. The client is made before the clock starts: making
    one loads the CA bundle (~70 ms of CPU here, under the GIL), and seven made at once on a busy CI machine once took
    1.65 s, longer than the timeout a refusal is shown to come before."""
    with httpx.Client(base_url=gw.url, timeout=timeout, headers={"authorization": f"Bearer {ADMIN}"}) as client:
        started = time.monotonic()
        resp = client.post(
            f"/models/{MODEL}/invocations", json={"dataframe_records": rows(1)}, headers={"x-request-id": request_id}
        )
    return resp, time.monotonic() - started


def _logged(gw, prefix: str) -> list:
    table = storage.predictions
    with storage.engine(gw.settings.db_url).connect() as conn:
        query = sa.select(table).where(table.c.request_id.like(f"{prefix}%")).order_by(table.c.id)
        return conn.execute(query).all()


def test_a_hanging_candidate_trips_its_breaker_and_each_skipped_call_is_logged_as_its_failure(security_gateway, hang):
    gw = security_gateway
    v = gw.versions
    resp = gw.put_route(
        champion_version=v["champion"], candidate_version=v["hanging"], mode="canary", candidate_weight=100
    )
    assert resp.status_code == 200, resp.text
    skipped_before = gw.metric(
        "releasegate_gateway_model_errors_total", model=MODEL, version=v["hanging"], kind="skipped"
    )
    timings = []
    for i in range(10):
        answer, took = _post(gw, f"breaker-{i}")
        assert answer.status_code == 200 and answer.json()["arm"] == "champion", answer.text
        timings.append(took)
    # Three waited for the candidate's 0.3 s timeout; then its circuit opened and the champion answered without
    # waiting it out (the bound is the timeout itself: any more would be the wait, any less only the machine's speed).
    assert all(t >= 0.3 for t in timings[:3]) and all(t < 0.3 for t in timings[3:]), timings
    expected = 10 * 2  # a candidate row and the champion's fallback row per request
    logged = wait_until(lambda: len(rows_ := _logged(gw, "breaker-")) == expected and rows_, timeout=20, what="logs")
    candidate = [r.status for r in logged if r.arm == "candidate"]
    assert candidate == ["timeout"] * 3 + ["skipped"] * 7
    skipped = [r for r in logged if r.status == "skipped"]
    assert all(r.latency_ms is None and "circuit open after 3 failures" in r.error for r in skipped)
    assert all(r.fallback and r.served for r in logged if r.arm == "champion")
    assert gw.metric("releasegate_gateway_circuit_open", model=MODEL, version=v["hanging"]) == 1
    assert (
        gw.metric("releasegate_gateway_model_errors_total", model=MODEL, version=v["hanging"], kind="skipped")
        == skipped_before + 7
    )
    # The analysis counts a skipped call as the candidate's failure, like a timeout.
    import pandas as pd

    from releasegate import policy
    from releasegate.analysis.rows import rows as analysable

    frame = pd.DataFrame([r._mapping for r in logged])
    feedback = pd.DataFrame(columns=["request_id", "time", "ground_truth"])
    table = analysable(frame, feedback, policy.load("default"))
    assert table.loc[table["arm"] == "candidate", "error"].all()


def test_after_its_cooldown_a_recovered_candidate_serves_again(security_gateway):
    gw = security_gateway
    v = gw.versions
    resp = gw.put_route(
        champion_version=v["champion"], candidate_version=v["hanging"], mode="canary", candidate_weight=100
    )
    assert resp.status_code == 200, resp.text
    # No hang now: once the 3 s cool-down has passed, the trial call answers and the circuit closes.
    wait_until(lambda: _post(gw, "recovered")[0].json()["arm"] == "candidate", timeout=20, what="the candidate back")
    assert gw.metric("releasegate_gateway_circuit_open", model=MODEL, version=v["hanging"]) == 0


def test_a_hanging_champion_is_answered_504_with_a_clear_error(security_gateway, hang):
    gw = security_gateway
    assert gw.put_route(champion_version=gw.versions["hanging"], mode="single").status_code == 200
    resp, took = _post(gw, "champion-hangs")
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"] == f"{MODEL} v{gw.versions['hanging']} took longer than 1s"
    assert 1.0 <= took < 3
    [row] = wait_until(lambda: _logged(gw, "champion-hangs"), timeout=20, what="the call logged")
    assert (row.arm, row.status, row.served) == ("champion", "timeout", False)


def test_timed_out_requests_leave_a_hanging_versions_queue_and_a_full_queue_fails_fast(security_gateway, hang):
    gw = security_gateway
    version = gw.versions["hanging"]
    assert gw.put_route(champion_version=version, mode="single").status_code == 200
    queued = []
    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(7) as rest:
        before = _hanging_calls(gw)
        stuck = first.submit(_post, gw, "waves-stuck")  # its call hangs in the model for all three waves
        wait_until(lambda: _hanging_calls(gw) > before, timeout=10, what="the first request hanging in the model")
        refusals = 0
        for wave in range(3):
            outcomes = list(rest.map(lambda i, w=wave: _post(gw, f"wave-{w}-{i}"), range(7)))
            statuses = [resp.status_code for resp, _ in outcomes]
            # 4 rows fit the queue (RELEASEGATE_GATEWAY_SLOT_QUEUE_ROWS) and time out with 504; the others are
            # refused at once, 503 with Retry-After. (On a loaded machine a request may arrive after the first
            # ones timed out and find room: then it times out too, never more than 4 at once.)
            assert set(statuses) <= {503, 504} and statuses.count(504) >= 4, (wave, statuses)
            refusals += statuses.count(503)
            refused = [(resp, took) for resp, took in outcomes if resp.status_code == 503]
            # Refused without waiting: before the champion's 1 s timeout, which a queued request waits out.
            assert all(took < 1.0 and resp.headers["retry-after"] == "1" for resp, took in refused), refused
            assert all("rows waiting (at most 4)" in resp.json()["error"] for resp, _ in refused)
            queued.append(gw.metric("releasegate_gateway_slot_queue_rows", model=MODEL, version=version))
        assert stuck.result()[0].status_code == 504
    assert refusals >= 1, "the queue never filled: it is not bounded"
    assert queued == [0, 0, 0]  # the model still hangs, yet nothing is left waiting for it


def test_requests_over_the_in_flight_limit_get_503_with_retry_after(security_gateway):
    gw = security_gateway
    assert gw.put_route(champion_version=gw.versions["champion"], mode="single").status_code == 200
    url = urlsplit(gw.url)
    held = []
    try:
        for _ in range(8):  # RELEASEGATE_GATEWAY_MAX_IN_FLIGHT: requests whose bodies are still on their way
            sock = socket.create_connection((url.hostname, url.port))
            sock.sendall(
                f"POST /models/{MODEL}/invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
            )
            held.append(sock)
        wait_until(
            lambda: gw.metric("releasegate_gateway_requests_in_flight", endpoint="invocations") == 8,
            timeout=10,
            what="8 requests held",
        )
        for path, body in ((f"/models/{MODEL}/invocations", {"dataframe_records": rows(1)}), ("/feedback", {})):
            resp = gw.client.post(path, json=body)
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1", resp.text
            assert resp.json()["error"] == "too many requests in flight; retry shortly"
        assert gw.client.get("/healthz").status_code == 200  # health, admin and metrics are not limited
    finally:
        for sock in held:
            sock.close()
    tries = iter(range(10**6))
    wait_until(
        lambda: _post(gw, f"admitted-{next(tries)}")[0].status_code == 200, timeout=10, what="requests admitted again"
    )
    # Its row written before the next test counts the log's rows (the property tests count every row written).
    admitted = storage.predictions.c.request_id.like("admitted-%")
    wait_until(lambda: gw.count(storage.predictions, admitted) >= 1, timeout=30, what="the admitted request logged")
