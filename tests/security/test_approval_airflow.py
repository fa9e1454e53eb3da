"""Separation of duties against Airflow's own Human-in-the-loop: API server, scheduler and dag-processor.

A stand-in of model_release around the real `ReleaseDecisionOperator` (the release is opened with
the shipped gated policy and evidence that passed; promote and rollback only move its state):
alice triggers it, and neither `releasegate approve` nor Airflow's REST API lets her approval
through; bob's does.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from releasegate import airflow_client as af
from tests.integration.test_trigger_cli import PG_ADMIN, MiniAirflow
from tests.require import require

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "separation_of_duties"

DAG = """
import pendulum
from airflow.sdk import TriggerRule, dag, get_current_context, task

from releasegate_airflow import xcom
from releasegate_airflow.operators import ReleaseDecisionOperator


@dag(dag_id="%(dag_id)s", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
def separation_of_duties():
    @task
    def open_release() -> dict:
        from releasegate import policy, release
        from releasegate.release import State
        from releasegate.results import Opened
        from releasegate.verdict import Decision
        from tests.factories import SHADOW, canary, verdict

        pol = policy.load("gated")
        rel = release.open_release("churn", "2", "1", pol.model_dump(mode="json"),
                                   airflow_run_id=get_current_context()["run_id"], actor="airflow")
        for state in (State.signing, State.validating, State.shadow, State.canary):
            release.transition(rel.release_id, state, actor="airflow")
        for stage in [SHADOW] + [canary(w, n) for n, w in enumerate(pol.canary.steps, start=1)]:
            release.record_verdict(rel.release_id, verdict(stage, Decision.promote), actor="airflow")
        return xcom.push(Opened(release_id=rel.release_id, model="churn", candidate="2", champion="1",
                                policy=pol.name, policy_digest=pol.digest))

    def _end(opened: dict, *states) -> None:
        from releasegate import release

        for state in states:
            release.transition(opened["release_id"], state, actor="airflow", reason="stand-in")

    @task(task_id="promote")
    def promote(opened: dict) -> None:
        from releasegate.release import State

        _end(opened, State.promoting, State.promoted)

    @task(task_id="rollback")
    def rollback(opened: dict) -> None:
        from releasegate.release import State

        _end(opened, State.rolled_back)

    @task(task_id="finish", trigger_rule=TriggerRule.ALL_DONE)
    def finish() -> None:
        pass

    opened = open_release()
    decide = ReleaseDecisionOperator(task_id="decide", release=opened, promote_task_id="promote",
                                     rollback_task_id="rollback", finish_task_id="finish")
    finished = finish()
    decide >> [promote(opened), rollback(opened)] >> finished
    decide >> finished


separation_of_duties()
""" % {"dag_id": DAG_ID}


class ReleaseAirflow(MiniAirflow):
    """The trigger tests' Airflow, with two operators (alice, bob), the stand-in DAG and a releasegate home."""

    def __init__(self, home: Path):
        super().__init__(home)
        (home / "dags" / "separation_of_duties.py").write_text(DAG)
        self.passwords = {"ci": self.password, "alice": secrets.token_urlsafe(12), "bob": secrets.token_urlsafe(12)}
        (home / "passwords.json").write_text(json.dumps(self.passwords))
        self.rg_home = home / "releasegate"
        self.rg_home.mkdir()
        self.rg_env = {
            "RELEASEGATE_HOME": str(self.rg_home),
            "RELEASEGATE_DB_URL": f"sqlite:///{self.rg_home}/releasegate.db",
            "MLFLOW_TRACKING_URI": (home / "mlruns").as_uri(),  # no model there: the request goes out without a link
        }
        self.env.update(
            self.rg_env,
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="ci:admin,alice:op,bob:op",
            PYTHONPATH=os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]),
        )

    def client(self, user: str) -> af.AirflowClient:
        return af.AirflowClient(self.url, username=user, password=self.passwords[user], timeout=10)

    def approve(self, user: str, run_id: str, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RELEASEGATE_"))}
        env.update(
            RELEASEGATE_AIRFLOW_URL=self.url,
            RELEASEGATE_AIRFLOW_USER=user,
            RELEASEGATE_AIRFLOW_PASSWORD=self.passwords[user],
        )
        return subprocess.run(
            [sys.executable, "-m", "releasegate.cli", "approve", run_id, "--dag-id", DAG_ID, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def approvals(self) -> list[sa.Row]:
        engine = sa.create_engine(self.rg_env["RELEASEGATE_DB_URL"])
        try:
            with engine.connect() as conn:
                return list(conn.execute(sa.text("select actor, details from audit where action = 'approval'")))
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    from tests.system.stack import postgres_problem

    if problem := postgres_problem(PG_ADMIN):
        require(problem)
    stack = ReleaseAirflow(tmp_path_factory.mktemp("airflow-sod"))
    try:
        stack.start()
        with stack.client("alice") as alice:
            deadline = time.monotonic() + 120
            while alice.request("GET", f"/dags/{DAG_ID}").status_code != 200:
                assert time.monotonic() < deadline, "the stand-in DAG was not parsed:\n" + stack.log("dag-processor")
                time.sleep(1)
            alice.unpause(DAG_ID)
        yield stack
    finally:
        stack.stop()


def _waiting_for_input(client: af.AirflowClient, run_id: str, timeout: float = 180) -> None:
    """Until decide waits for a person; then a few scheduler loops more, as a person would take (see the system test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.dag_run(DAG_ID, run_id)
        assert run["state"] in ("queued", "running"), f"the run ended {run['state']} while waiting for input"
        ti = client.request("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/decide").json()
        if ti.get("state") == "awaiting_input" and client.pending_approvals(DAG_ID, run_id):
            time.sleep(8)
            return
        time.sleep(1)
    raise AssertionError(f"decide of {run_id} never waited for input")


def _ended(client: af.AirflowClient, run_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.dag_run(DAG_ID, run_id)
        if run["state"] in ("success", "failed"):
            return {ti["task_id"]: ti["state"] for ti in client.task_instances(DAG_ID, run_id)}
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not end")


def test_a_triggerer_cannot_approve_their_own_release_through_airflow(airflow):
    with airflow.client("alice") as alice:
        run_id = alice.trigger(DAG_ID, {})["dag_run_id"]
        assert alice.dag_run(DAG_ID, run_id)["triggering_user_name"] == "alice"
        _waiting_for_input(alice, run_id)
        info = alice.xcom(DAG_ID, run_id, "decide", key=af.APPROVAL_REQUEST_XCOM)
        assert info["separate_duties"] is True and info["triggered_by"] == "alice"

        # The command line refuses before anything reaches Airflow.
        refused = airflow.approve("alice", run_id, "--comment", "my own")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "REFUSED: alice triggered this release" in refused.stderr
        assert alice.pending_approvals(DAG_ID, run_id)

        # Airflow's API takes the answer (it can only allow named users); the decide task refuses it and asks again.
        [request] = alice.pending_approvals(DAG_ID, run_id)
        assert not request.get("assigned_users")
        alice.respond(DAG_ID, run_id, "decide", ["Promote"], {"comment": "my own, via the API"})
        deadline = time.monotonic() + 120
        while not any(json.loads(a.details).get("refused") for a in airflow.approvals()):
            assert time.monotonic() < deadline, airflow.log("scheduler")
            time.sleep(1)
        _waiting_for_input(alice, run_id)

    # bob's approval counts.
    approved = airflow.approve("bob", run_id, "--comment", "checked the canary")
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "Promote (answered by bob)" in approved.stdout
    with airflow.client("bob") as bob:
        states = _ended(bob, run_id)
    assert states["decide"] == "success" and states["promote"] == "success" and states["rollback"] == "skipped"
    answers = [(a.actor, json.loads(a.details)) for a in airflow.approvals()]
    assert [(actor, d["approved"], d["approver"], "refused" in d) for actor, d in answers] == [
        ("airflow:alice", False, "alice", True),
        ("airflow:bob", True, "bob", False),
    ]
