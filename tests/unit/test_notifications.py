"""Notifications: the documented JSON shape, delivered to a real HTTP sink on a loopback port; a dead target fails
nothing; an opened incident is told once; Airflow's notifier tells the outcome of its run's release."""

from __future__ import annotations

import importlib.util
import logging
import socket

import pytest

from releasegate import incidents, notifications, release
from releasegate.contract import NotificationEvent
from releasegate.notifications import Channel
from releasegate.release import State
from tests.unit.test_release import _open
from tests.webhook_sink import webhook_sink


@pytest.fixture
def sink(rg_home, monkeypatch):
    with webhook_sink() as s:
        monkeypatch.setenv("RELEASEGATE_NOTIFY_WEBHOOK", s.url)
        monkeypatch.setenv("RELEASEGATE_NOTIFY_WEBHOOK_TOKEN", "n0tify")
        monkeypatch.setenv("RELEASEGATE_NOTIFY_LINKS_URL", "https://airflow.example/")
        yield s


def _rolled_back(run_id: str = "manual__2026-12-01T10:00:00+00:00") -> release.Release:
    rel = _open(run_id=run_id)
    for state in (State.signing, State.validating, State.shadow):
        release.transition(rel.release_id, state, actor="test")
    return release.transition(rel.release_id, State.rolled_back, actor="airflow", reason="rollback: accuracy −0.041")


def test_a_release_outcome_reaches_the_webhook_in_the_documented_shape(sink):
    rel = _rolled_back()
    links = notifications.links("model_release", rel.airflow_run_id, rel.release_id)

    assert notifications.send(notifications.release_outcome(rel, links)) == [Channel.webhook]

    [body] = sink.bodies(NotificationEvent.release_outcome)
    assert sink.received[-1][0] == "Bearer n0tify"
    assert body["schema"] == "releasegate.notification/v1"
    assert (body["model"], body["release_id"], body["version"], body["from_version"], body["state"]) == (
        "churn",
        rel.release_id,
        "2",
        "1",
        "rolled_back",
    )
    assert body["reasons"] == ["rollback: accuracy −0.041"] and "rolled_back" in body["title"]
    assert body["links"] == {
        "airflow_run": "https://airflow.example/dags/model_release/runs/manual__2026-12-01T10%3A00%3A00%2B00%3A00",
        "dashboard": f"https://airflow.example/releasegate/releases/{rel.release_id}",
    }


def test_an_opened_incident_is_told_once_and_its_repeats_are_not(sink):
    _rolled_back()  # a rolled-back release opens a high incident in the move's transaction
    first = sink.bodies(NotificationEvent.incident_opened)
    assert len(first) == 1
    [opened] = incidents.list_incidents()
    assert (first[0]["incident"], first[0]["severity"], first[0]["state"]) == (opened.id, "high", "open")
    assert first[0]["release_id"] == opened.release_id and first[0]["links"]["dashboard"].endswith(opened.release_id)

    for _ in range(2):  # the same cause while it is open joins that incident
        incidents.open_incident(
            actor="test", source="release.rolled_back", severity=incidents.Severity.high, title="again", model="churn"
        )
    assert len(sink.bodies(NotificationEvent.incident_opened)) == 1
    incidents.open_incident(actor="test", source="alert", severity=incidents.Severity.low, title="other", model="churn")
    assert len(sink.bodies(NotificationEvent.incident_opened)) == 2


def test_a_failing_or_unreachable_target_fails_nothing(sink, monkeypatch, caplog):
    sink.status = 500
    with caplog.at_level(logging.ERROR, logger="releasegate.notifications"):
        rel = _rolled_back()  # the incident's notification fails inside the release's move
        assert rel.state is State.rolled_back and incidents.list_incidents()
        links = notifications.links("model_release", "run-1", rel.release_id)
        assert notifications.send(notifications.release_outcome(rel, links)) == []
    assert sink.bodies(NotificationEvent.release_outcome) and "500" in caplog.text

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("RELEASEGATE_NOTIFY_WEBHOOK", f"http://127.0.0.1:{closed}/hook/s3cret-path")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="releasegate.notifications"):
        assert notifications.send(notifications.release_outcome(rel, links)) == []
    assert "failed" in caplog.text and "s3cret-path" not in caplog.text  # the URL's secret is not logged


def test_nothing_is_sent_where_no_target_is_named(rg_home, monkeypatch):
    monkeypatch.delenv("RELEASEGATE_NOTIFY_WEBHOOK", raising=False)
    rel = _rolled_back()
    assert notifications.send(notifications.release_outcome(rel, notifications.Links())) == []


@pytest.mark.skipif(importlib.util.find_spec("apprise") is not None, reason="apprise is installed here")
def test_apprise_targets_without_apprise_installed_are_logged_and_the_webhook_still_gets_it(sink, monkeypatch, caplog):
    monkeypatch.setenv("RELEASEGATE_NOTIFY_APPRISE_URLS", "json://127.0.0.1:9/x  mailtos://u:p@example.org")
    rel = _rolled_back()
    with caplog.at_level(logging.WARNING, logger="releasegate.notifications"):
        took = notifications.send(notifications.release_outcome(rel, notifications.Links()))
    assert took == [Channel.webhook] and "apache-airflow-providers-apprise" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("apprise") is None, reason="apprise is an installed extra, absent here")
def test_an_apprise_target_gets_the_title_and_text(sink, monkeypatch):
    host = sink.url.removeprefix("http://")
    monkeypatch.setenv("RELEASEGATE_NOTIFY_APPRISE_URLS", f"json://{host}")
    monkeypatch.delenv("RELEASEGATE_NOTIFY_WEBHOOK")
    rel = _rolled_back()
    took = notifications.send(notifications.release_outcome(rel, notifications.Links()))
    assert took == [Channel.apprise]
    [body] = [b for _, b in sink.received if "title" in b and rel.release_id in b["title"]]
    assert "rollback: accuracy −0.041" in body["message"]


def test_airflows_notifier_tells_the_outcome_its_run_left_in_the_release_row(sink):
    from airflow.sdk import DAG

    from releasegate_airflow.notifier import RunNotifier

    rel = _rolled_back(run_id="manual__r1")
    dag = DAG("model_release", schedule=None)
    RunNotifier(NotificationEvent.release_outcome)(
        {"dag": dag, "run_id": "manual__r1", "params": {"model_name": "churn"}}
    )
    [body] = sink.bodies(NotificationEvent.release_outcome)
    assert (body["release_id"], body["state"]) == (rel.release_id, "rolled_back")
    assert body["links"]["airflow_run"].endswith("/dags/model_release/runs/manual__r1")

    # A failed run that never opened a release (another one held the model) is told as failed.
    RunNotifier(NotificationEvent.release_outcome, failed=True)(
        {"dag": dag, "run_id": "manual__r2", "params": {"model_name": "churn"}, "reason": "task_failure"}
    )
    failed = sink.bodies(NotificationEvent.release_outcome)[-1]
    assert (failed["model"], failed["release_id"], failed["state"]) == ("churn", None, "failed")
    assert "task_failure" in failed["reasons"][0]


def test_airflows_notifier_tells_a_failed_rollback_with_its_error(sink):
    from airflow.sdk import DAG

    from releasegate_airflow.notifier import RunNotifier

    context = {
        "dag": DAG("emergency_rollback", schedule=None),
        "run_id": "manual__r3",
        "params": {"model_name": "fraud"},
        "exception": ValueError("fraud has no `previous` alias"),
    }
    RunNotifier(NotificationEvent.rollback, failed=True)(context)
    [body] = sink.bodies(NotificationEvent.rollback)
    assert (body["model"], body["state"]) == ("fraud", "failed")
    assert "no `previous` alias" in body["reasons"][0]


def test_an_approval_request_is_told_with_who_may_answer_and_for_how_long(sink):
    from types import SimpleNamespace

    from airflow.sdk import DAG

    from releasegate_airflow.operators import _tell_approval_requested

    rel = _open(run_id="manual__r4")
    for state in (State.signing, State.validating, State.shadow, State.awaiting_approval):
        rel = release.transition(rel.release_id, state, actor="test", reason="awaiting approval: policy asks")
    context = {
        "dag": DAG("model_release", schedule=None),
        "run_id": "manual__r4",
        "dag_run": SimpleNamespace(triggering_user_name="carol"),
    }
    _tell_approval_requested(context, rel.release_id, ["alice", "bob"], 5400)  # what `decide` does as it asks
    [body] = sink.bodies(NotificationEvent.approval_requested)
    assert (body["release_id"], body["state"], body["actor"]) == (rel.release_id, "awaiting_approval", "airflow:carol")
    assert "alice, bob" in body["title"] and "1 h 30 min" in body["title"]
    assert body["reasons"] == ["awaiting approval: policy asks"]


def test_a_rollback_is_told_from_its_audit_event_with_the_release_it_stopped(sink):
    from releasegate import audit
    from releasegate.contract import AuditAction

    audit.append(
        "airflow:dana",
        AuditAction.emergency_rollback,
        model="fraud",
        version="1",
        release_id="rel-0123456789ab",
        details={
            "from_version": "2",
            "to_version": "1",
            "reason": "v2 answers wrong",
            "aborted_release": {"release_id": "rel-0123456789ab", "state": "aborted", "candidate": "3"},
        },
    )
    note = notifications.rollback("fraud", notifications.links("emergency_rollback", "manual__r5"))
    assert (note.from_version, note.version, note.release_id, note.state) == (
        "2",
        "1",
        "rel-0123456789ab",
        "rolled_back",
    )
    assert (note.reasons, note.actor) == (["v2 answers wrong"], "airflow:dana")
    assert note.links.dashboard == "https://airflow.example/releasegate/releases/rel-0123456789ab"
    assert note.links.airflow_run == "https://airflow.example/dags/emergency_rollback/runs/manual__r5"
