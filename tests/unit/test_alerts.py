"""The alert receiver without Airflow: what it makes of Alertmanager's notifications, and what it does when
Airflow cannot take the rollback (the whole path, through a real Airflow, is in tests/system)."""

from __future__ import annotations

import socket

import pytest

from releasegate import incidents
from releasegate.serving.alerts import AlertReceiver, RollbackNotTriggered
from releasegate.serving.payloads import PayloadError
from releasegate.settings import Settings

ROLLBACK = {"alertname": "ReleasegateChampionFailing", "model": "churn", "severity": "critical", "action": "rollback"}


def _notification(status: str, labels: dict[str, str], summary: str = "") -> dict:
    return {
        "version": "4",
        "status": status,
        "receiver": "releasegate",
        "alerts": [{"status": status, "labels": labels, "annotations": {"summary": summary}, "fingerprint": "f1"}],
    }


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def receiver(rg_home) -> AlertReceiver:
    return AlertReceiver(
        Settings(home=rg_home, airflow_url=f"http://127.0.0.1:{_closed_port()}", airflow_user="u", airflow_password="p")
    )


def test_a_malformed_notification_is_refused_naming_the_field(receiver):
    with pytest.raises(PayloadError, match=r"not an Alertmanager notification: alerts.0.status") as err:
        receiver.receive({"alerts": [{"status": "burning", "labels": {}}]}, "alertmanager")
    assert err.value.status == 422
    with pytest.raises(PayloadError, match="alerts: Field required"):
        receiver.receive({"version": "4"}, "alertmanager")


def test_a_warning_opens_an_incident_and_its_repeat_joins_it(receiver):
    warning = {"alertname": "ReleasegateModelLatencyP99High", "model": "churn", "severity": "warning"}
    [first] = receiver.receive(_notification("firing", warning, "p99 320 ms"), "alertmanager")
    [again] = receiver.receive(_notification("firing", warning, "p99 340 ms"), "alertmanager")
    assert first["outcome"] == again["outcome"] == "incident" and first["incident"] == again["incident"]
    incident = incidents.get(first["incident"])
    assert (incident.severity, incident.source) == (incidents.Severity.medium, "alert.ReleasegateModelLatencyP99High")
    assert (
        incident.alert["labels"] == warning
        and incident.title == "churn: alert ReleasegateModelLatencyP99High: p99 320 ms"
    )
    [resolved] = receiver.receive(_notification("resolved", warning), "alertmanager")
    assert resolved["outcome"] == "resolved_noted"
    assert [e.event for e in incidents.get(first["incident"]).timeline] == ["opened", "repeated", "alert_resolved"]


def test_a_rollback_airflow_does_not_take_is_a_503_and_the_retry_tries_again(receiver):
    for _ in range(2):  # Alertmanager retries a failed notification
        with pytest.raises(RollbackNotTriggered, match="emergency rollback of churn was not triggered"):
            receiver.receive(_notification("firing", ROLLBACK, "20 % errors"), "alertmanager")
    [incident] = incidents.list_incidents()
    assert incident.severity is incidents.Severity.critical and incident.source == "alert.rollback"
    assert [e.event for e in incidents.get(incident.id).timeline] == ["opened", "repeated"]  # never triggered


def test_an_alert_without_a_model_is_not_actionable(receiver):
    labels = {k: v for k, v in ROLLBACK.items() if k != "model"}
    [done] = receiver.receive(_notification("firing", labels, "something fails"), "alertmanager")
    assert done["outcome"] == "incident" and done["model"] is None


@pytest.fixture
def airflow_api():
    """Airflow's REST API as a small loopback fake (token, the DAG, trigger, a run's state): enough to see what the
    receiver asks; the whole path through a real Airflow is in tests/system."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    runs: dict[str, str] = {}  # run id -> state

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path == "/auth/token":
                return self._answer({"access_token": "t"})
            run_id = f"manual__{len(runs) + 1}"
            runs[run_id] = "queued"
            return self._answer({"dag_run_id": run_id, "state": "queued"})

        def do_GET(self) -> None:
            run_id = self.path.rsplit("/", 1)[-1]
            return self._answer(
                {"dag_run_id": run_id, "state": runs[run_id]} if run_id in runs else {"is_paused": False}
            )

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", runs
    server.shutdown()


def test_a_repeat_triggers_again_only_when_the_triggered_rollback_failed(rg_home, airflow_api):
    url, runs = airflow_api
    receiver = AlertReceiver(Settings(home=rg_home, airflow_url=url, airflow_user="u", airflow_password="p"))
    fire = _notification("firing", ROLLBACK, "20 % errors")
    [first] = receiver.receive(fire, "alertmanager")
    assert first["outcome"] == "rollback_triggered" and list(runs) == [first["dag_run_id"]]
    runs[first["dag_run_id"]] = "running"
    [repeat] = receiver.receive(fire, "alertmanager")
    assert repeat["outcome"] == "rollback_already_triggered" and len(runs) == 1
    runs[first["dag_run_id"]] = "failed"  # e.g. its task could not reach Airflow's execution API
    [retried] = receiver.receive(fire, "alertmanager")
    assert retried["outcome"] == "rollback_triggered" and retried["retry_of"] == first["dag_run_id"]
    assert len(runs) == 2 and retried["incident"] == first["incident"]
    timeline = incidents.get(first["incident"]).timeline
    assert [e.event for e in timeline].count("rollback_triggered") == 2
    assert timeline[-1].note.endswith(f"again: run {first['dag_run_id']} failed")
