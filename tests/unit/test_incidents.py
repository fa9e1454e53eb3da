"""Incidents: opened with the release end that causes them, moved through their lifecycle, audited, and sent to
the webhook in the documented shape (a real HTTP server on a loopback port)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest
from click.testing import CliRunner

from releasegate import audit, incidents, release
from releasegate.cli import main
from releasegate.incidents import IncidentState, Severity
from releasegate.release import State
from tests.unit.test_release import _open


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str | None, dict]]] = []
    status: ClassVar[int] = 200

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).received.append((self.headers.get("authorization"), body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook(monkeypatch):
    _Hook.received, _Hook.status = [], 200
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RELEASEGATE_INCIDENT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
    monkeypatch.setenv("RELEASEGATE_INCIDENT_WEBHOOK_TOKEN", "s3cret")
    yield _Hook
    server.shutdown()


def _to_rolled_back(reason: str) -> release.Release:
    rel = _open()
    for state in (State.signing, State.validating, State.shadow):
        release.transition(rel.release_id, state, actor="test")
    return release.transition(rel.release_id, State.rolled_back, actor="airflow", reason=reason)


def test_a_rolled_back_release_opens_an_incident_that_the_webhook_receives(rg_home, webhook):
    rel = _to_rolled_back("rollback: accuracy of candidate − champion is −0.041")
    [incident] = incidents.list_incidents()
    assert (incident.state, incident.severity, incident.model, incident.release_id) == (
        IncidentState.open,
        Severity.high,
        "churn",
        rel.release_id,
    )
    assert incident.source == "release.rolled_back" and "accuracy of candidate" in incident.title
    [(authorization, body)] = webhook.received
    assert authorization == "Bearer s3cret"
    assert body["schema"] == "releasegate.incident/v1" and body["event"] == "incident.opened"
    assert body["incident"]["id"] == incident.id and body["incident"]["timeline"][0]["event"] == "opened"
    opened = [e for e in audit.events(release_id=rel.release_id) if e["action"] == "incident.opened"]
    assert [e["details"]["incident"] for e in opened] == [incident.id]


def test_an_incident_moves_through_its_lifecycle_each_move_audited_and_sent(rg_home, webhook):
    _to_rolled_back("rollback: error rate")
    [incident] = incidents.list_incidents()
    incidents.move(incident.id, IncidentState.acknowledged, actor="amal")
    with pytest.raises(incidents.IncidentError, match="needs its resolution"):
        incidents.move(incident.id, IncidentState.resolved, actor="amal")
    incidents.move(incident.id, IncidentState.resolved, actor="amal", resolution="bad feature join; fixed upstream")
    with pytest.raises(incidents.IncidentError, match="is resolved: it cannot move to acknowledged"):
        incidents.move(incident.id, IncidentState.acknowledged, actor="amal")
    closed = incidents.move(incident.id, IncidentState.closed, actor="amal", review_url="https://wiki/pir/42")
    assert closed.owner == "amal" and closed.resolution.startswith("bad feature join")
    assert closed.review_url == "https://wiki/pir/42"
    assert [e.event for e in closed.timeline] == ["opened", "acknowledged", "resolved", "closed"]
    assert [body["event"] for _, body in webhook.received] == [
        "incident.opened",
        "incident.acknowledged",
        "incident.resolved",
        "incident.closed",
    ]
    moves = [e["action"] for e in audit.events(model="churn") if e["action"].startswith("incident.")]
    assert moves == ["incident.opened", "incident.acknowledged", "incident.resolved", "incident.closed"]
    assert audit.verify().ok
    with pytest.raises(incidents.IncidentError, match="incident 99 does not exist"):
        incidents.move(99, IncidentState.acknowledged, actor="amal")


def test_a_repeat_of_the_cause_joins_the_open_incident_and_a_resolved_one_does_not_take_it(rg_home):
    for _ in range(2):
        rel = _open()
        release.transition(rel.release_id, State.failed, actor="airflow", reason="task crashed")
    [incident] = incidents.list_incidents()
    assert [e.event for e in incidents.get(incident.id).timeline] == ["opened", "repeated"]
    incidents.move(incident.id, IncidentState.resolved, actor="amal", resolution="worker restarted")
    rel = _open()
    release.transition(rel.release_id, State.failed, actor="airflow", reason="task crashed again")
    assert [i.state for i in incidents.list_incidents()] == [IncidentState.open, IncidentState.resolved]


def test_a_dead_webhook_loses_no_incident_and_fails_no_release(rg_home, webhook):
    webhook.status = 500
    rel = _to_rolled_back("rollback: latency")
    assert rel.state is State.rolled_back
    assert len(incidents.list_incidents(IncidentState.open)) == 1


def test_a_rejection_or_an_abort_opens_none(rg_home):
    rel = _open()
    release.transition(rel.release_id, State.aborted, actor="amal", reason="wrong version")
    assert incidents.list_incidents() == []


def test_the_incidents_command_lists_and_moves_them(rg_home):
    _to_rolled_back("rollback: agreement")
    runner = CliRunner()
    listed = runner.invoke(main, ["incidents", "list", "--state", "open"])
    assert listed.exit_code == 0 and "#1" in listed.output and "high" in listed.output, listed.output
    acked = runner.invoke(main, ["incidents", "ack", "1", "--owner", "ml-oncall", "--actor", "amal"])
    assert acked.exit_code == 0 and "#1 acknowledged" in acked.output, acked.output
    refused = runner.invoke(main, ["incidents", "close", "1", "--actor", "amal"])
    assert refused.exit_code == 1 and "is acknowledged: it cannot move to closed" in refused.output
    shown = json.loads(runner.invoke(main, ["incidents", "show", "1"]).output)
    assert shown["owner"] == "ml-oncall" and [e["actor"] for e in shown["timeline"]] == ["airflow", "amal"]
