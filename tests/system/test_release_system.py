"""The whole stack as production runs it: CI triggers releases through Airflow's REST API, a person approves.

Airflow's scheduler, dag-processor, triggerer and API server (LocalExecutor, PostgreSQL), the MLflow
server (PostgreSQL), the gateway and live traffic run as separate processes (tests/system/stack.py).
Releases are started with `releasegate trigger --wait` exactly as the example CI workflow does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.require import require
from tests.system.stack import MODEL, ROOT
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.system]
RELEASEGATE = str(Path(sys.executable).parent / "releasegate")
POLICY = "gated"  # include/policies/gated.yaml: shadow, canary 25 → 50 %, then a person's approval


class Trigger:
    """`releasegate trigger --wait` as a CI job runs it, its output collected line by line as it streams."""

    def __init__(self, stack, version: str, user: str = "admin"):
        env = dict(
            stack.env,
            RELEASEGATE_AIRFLOW_URL=stack.airflow_url,
            RELEASEGATE_AIRFLOW_USER=user,
            RELEASEGATE_AIRFLOW_PASSWORD=stack.passwords[user],
        )
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                RELEASEGATE,
                "trigger",
                "--model",
                MODEL,
                "--version",
                version,
                "--policy",
                POLICY,
                "--wait",
                "--unpause",
                "--poll-seconds",
                "2",
                "--timeout",
                "1200",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def run_id(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                found = re.match(r"triggered model_release run (\S+):", line)
                if found:
                    return found.group(1)
            assert self.proc.poll() is None, self.output
            time.sleep(0.5)
        raise AssertionError(f"no run id printed within {timeout}s:\n{self.output}")

    def wait(self, timeout: float = 1200) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def _pending_approval(stack, run_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    with stack.airflow("admin") as airflow:
        while time.monotonic() < deadline:
            run = airflow.get(f"/api/v2/dags/model_release/dagRuns/{run_id}").json()
            assert run["state"] in ("queued", "running"), f"the run ended {run['state']} before asking for approval"
            body = airflow.get(
                f"/api/v2/dags/model_release/dagRuns/{run_id}/hitlDetails", params={"response_received": "false"}
            ).json()
            if body.get("hitl_details"):
                request = body["hitl_details"][0]
                task = request["task_instance"]["task_id"]
                ti = airflow.get(f"/api/v2/dags/model_release/dagRuns/{run_id}/taskInstances/{task}").json()
                if ti["state"] == "awaiting_input":
                    # Airflow 3.3 fails the task when an answer lands before the scheduler has processed the
                    # executor's report of the pause (seen here: answered 0.6 s after the request). A person
                    # never answers that fast; the test waits a few scheduler loops like one would.
                    time.sleep(8)
                    return request
            time.sleep(2)
    raise AssertionError(f"run {run_id} asked for no approval within {timeout}s")


def _releases_db(stack) -> sa.Engine:
    return sa.create_engine(stack.env["RELEASEGATE_DB_URL"])


def test_ci_trigger_waits_for_a_person_then_promotes_the_better_candidate(system_stack):
    stack = system_stack
    trigger = Trigger(stack, stack.versions["good"])
    run_id = trigger.run_id()
    request = _pending_approval(stack, run_id)
    assert request["subject"] == f"Promote {MODEL} v{stack.versions['good']} (champion v{stack.versions['champion']})?"
    assert "| canary 2 (50 %) | promote |" in request["body"] and "No answer within 1,800 s" in request["body"]
    assert request["options"] == ["Promote", "Roll back"] and request["defaults"] == ["Roll back"]
    task = request["task_instance"]["task_id"]
    answer_path = f"/api/v2/dags/model_release/dagRuns/{run_id}/taskInstances/{task}/-1/hitlDetails"
    answer = {"chosen_options": ["Promote"], "params_input": {"comment": "system test sign-off"}}
    with stack.airflow("viewer") as viewer:  # a viewer may look but not decide
        refused = viewer.patch(answer_path, json=answer)
        assert refused.status_code == 403, refused.text
    with stack.airflow("operator") as operator:
        accepted = operator.patch(answer_path, json=answer)
        assert accepted.status_code == 200, accepted.text

    assert trigger.wait() == 0, trigger.output
    assert "waiting for approval" in trigger.output and "promoted" in trigger.lines[-1], trigger.output
    with _releases_db(stack).connect() as db:
        rel = db.execute(
            sa.text("select release_id, state, reasons from releases where candidate_version = :v"),
            {"v": stack.versions["good"]},
        ).one()
        approvals = db.execute(
            sa.text("select actor, details from audit where release_id = :r and action = 'approval'"),
            {"r": rel.release_id},
        ).all()
    assert rel.state == "promoted"
    assert "approved by operator: system test sign-off" in rel.reasons
    assert [a.actor for a in approvals] == ["airflow:operator"]
    route = httpx.get(
        f"{stack.gateway_url}/admin/routes/{MODEL}", timeout=10, headers={"authorization": f"Bearer {stack.admin_key}"}
    ).json()
    assert route["champion_version"] == stack.versions["good"] and route["mode"] == "single"


def test_ci_trigger_exits_1_when_the_worse_candidate_is_rolled_back(system_stack):
    stack = system_stack
    trigger = Trigger(stack, stack.versions["bad"])
    assert trigger.wait() == 1, trigger.output
    assert "rolled_back" in trigger.lines[-1], trigger.output
    assert "waiting for approval" not in trigger.output  # a failed verdict needs nobody's approval


def test_nightly_evaluation_runs_when_triggered(system_stack):
    stack = system_stack
    with stack.airflow("admin") as airflow:
        airflow.patch("/api/v2/dags/nightly_evaluation", json={"is_paused": False}).raise_for_status()
        run = airflow.post("/api/v2/dags/nightly_evaluation/dagRuns", json={"logical_date": None, "conf": {}})
        assert run.status_code == 200, run.text
        run_id = run.json()["dag_run_id"]
        deadline = time.monotonic() + 600
        while (state := airflow.get(f"/api/v2/dags/nightly_evaluation/dagRuns/{run_id}").json()["state"]) in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, "nightly_evaluation did not finish in 10 minutes"
            time.sleep(3)
        tis = {
            t["task_id"]: t["state"]
            for t in airflow.get(f"/api/v2/dags/nightly_evaluation/dagRuns/{run_id}/taskInstances").json()[
                "task_instances"
            ]
        }
    assert state == "success", tis
    assert all(s in ("success", "skipped") for s in tis.values()), tis


def test_dashboard_lists_the_releases_in_headless_chromium(system_stack, tmp_path):
    from tests import browser

    missing = browser.available()
    if missing:
        require(missing)
    stack = system_stack
    shot = Path(os.environ.get("RELEASEGATE_SCREENSHOT_DIR", tmp_path)) / "dashboard-system.png"
    page = browser.render(
        f"{stack.airflow_url}/releasegate/", token=stack.airflow_token("viewer"), screenshot=shot, wait_for_css="table"
    )
    assert stack.versions["good"] and f"v{stack.versions['good']}" in page.html
    assert "promoted" in page.html and "rolled_back" in page.html.replace("rolled back", "rolled_back")
    assert shot.stat().st_size > 10_000
    anonymous = httpx.get(f"{stack.airflow_url}/releasegate/", timeout=10)
    assert anonymous.status_code in (401, 403)


def _alertmanager_notification(status: str, labels: dict[str, str], summary: str) -> dict:
    """A notification as Alertmanager's webhook receiver POSTs it (payload version 4)."""
    alert = {
        "status": status,
        "labels": labels,
        "annotations": {"summary": summary},
        "startsAt": "2026-12-01T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-12-01T10:05:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": "c0ffee" + labels["alertname"][:6].lower(),
    }
    return {
        "version": "4",
        "groupKey": "{}:{alertname}",
        "status": status,
        "receiver": "releasegate",
        "groupLabels": {"alertname": labels["alertname"]},
        "commonLabels": labels,
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://alertmanager:9093",
        "truncatedAlerts": 0,
        "alerts": [alert],
    }


def test_an_actionable_alert_rolls_the_champion_back_through_airflow_once(system_stack):
    """Last, as it changes the champion: Alertmanager's notifications to the gateway's /alerts (an `alerts` key).
    A warning opens an incident only; a critical `action: rollback` alert for the model triggers one
    emergency_rollback run through Airflow's REST API (traffic back on `previous`, the alert in the audit event,
    the run recorded in the alert's incident, now critical); its repeat triggers nothing; its resolution is noted."""
    import json

    stack = system_stack
    made = stack.run([RELEASEGATE, "apikeys", "create", "--role", "alerts"], timeout=120)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout.strip().splitlines()[-1])["key"]
    gateway = httpx.Client(base_url=stack.gateway_url, headers={"authorization": f"Bearer {key}"}, timeout=60)
    champion, previous = stack.versions["good"], stack.versions["champion"]  # the first test promoted `good`
    rollback = {"alertname": "ReleasegateChampionErrors", "model": MODEL, "severity": "critical", "action": "rollback"}
    with stack.airflow("admin") as airflow:
        airflow.patch("/api/v2/dags/emergency_rollback", json={"is_paused": False}).raise_for_status()

        def post(status: str, labels: dict[str, str], summary: str) -> list[dict]:
            def answered() -> httpx.Response | None:
                resp = gateway.post("/alerts", json=_alertmanager_notification(status, labels, summary))
                return None if resp.status_code == 401 else resp  # the gateway polls new keys every second

            resp = wait_until(answered, timeout=30, every=0.5, what="the alerts key seen by the gateway")
            assert resp.status_code == 200, resp.text
            return resp.json()["alerts"]

        [warned] = post(
            "firing", {"alertname": "ReleasegateLatencyHigh", "model": MODEL, "severity": "warning"}, "p99 up"
        )
        assert warned["outcome"] == "incident" and "dag_run_id" not in warned
        [fired] = post("firing", rollback, "20 % of churn's requests fail")
        assert fired["outcome"] == "rollback_triggered", fired
        [repeat] = post("firing", rollback, "20 % of churn's requests fail")
        assert repeat["outcome"] == "rollback_already_triggered" and repeat["incident"] == fired["incident"]
        run_path = f"/api/v2/dags/emergency_rollback/dagRuns/{fired['dag_run_id']}"
        deadline = time.monotonic() + 600
        while (state := airflow.get(run_path).json()["state"]) in ("queued", "running"):
            assert time.monotonic() < deadline, "emergency_rollback did not finish in 10 minutes"
            time.sleep(2)
        assert state == "success", stack.log_tail("airflow-scheduler")
        runs = airflow.get("/api/v2/dags/emergency_rollback/dagRuns").json()["dag_runs"]
        # Only this model's: other tests roll other models back.
        runs = [r for r in runs if (r.get("conf") or {}).get("model_name") == MODEL]
        assert [r["dag_run_id"] for r in runs] == [fired["dag_run_id"]]  # one run for the alert and its repeat
    [resolved] = post("resolved", rollback, "errors back to normal")
    assert resolved["outcome"] == "resolved_noted" and resolved["incident"] == fired["incident"]

    route = httpx.get(
        f"{stack.gateway_url}/admin/routes/{MODEL}", timeout=10, headers={"authorization": f"Bearer {stack.admin_key}"}
    ).json()
    assert (route["champion_version"], route["mode"]) == (previous, "single"), (champion, route)
    with _releases_db(stack).connect() as db:
        incidents = {
            row.id: row
            for row in db.execute(
                sa.text("select id, severity, source, state, alert from incidents where model = :m"), {"m": MODEL}
            )
        }
        timeline = (
            db.execute(
                sa.text("select event from incident_events where incident_id = :i order by id"),
                {"i": fired["incident"]},
            )
            .scalars()
            .all()
        )
        event = db.execute(
            sa.text("select details from audit where action = 'emergency_rollback' order by seq desc limit 1")
        ).scalar_one()
    assert incidents[warned["incident"]].severity == "medium" and incidents[warned["incident"]].source == (
        "alert.ReleasegateLatencyHigh"
    )
    alerted = incidents[fired["incident"]]
    assert (alerted.severity, alerted.source, alerted.state) == ("critical", "alert.rollback", "open")
    assert json.loads(alerted.alert)["labels"] == rollback
    assert timeline == ["opened", "rollback_triggered", "repeated", "rolled_back", "alert_resolved"] or timeline == [
        "opened",
        "rollback_triggered",
        "rolled_back",
        "repeated",
        "alert_resolved",
    ], timeline
    details = json.loads(event)
    assert details["incident"] == fired["incident"] and details["alert"]["labels"] == rollback
    assert (details["from_version"], details["to_version"]) == (champion, previous)
