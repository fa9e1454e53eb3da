"""Separation of duties: under the gated policy, whoever triggered a release may not approve it.

The decision is the library's (pipeline.request_approval and record_approval, on a real
releasegate database with the shipped policies); `releasegate approve` refuses it before it
reaches Airflow. tests/security/test_approval_airflow.py runs the same against Airflow's own
Human-in-the-loop.
"""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from releasegate import airflow_client as af
from releasegate import audit, pipeline, release
from releasegate import policy as policies
from releasegate.cli import main
from releasegate.release import State
from tests.unit.mlflow_store import migrated_mlflow_db, store  # noqa: F401  (fixtures)

RUN = "manual__2026-12-01T09:00:00+00:00"


def _awaiting(policy_name: str = "gated", model: str = "churn", **approval) -> release.Release:
    """A release under a shipped policy whose evidence passed every stage: it waits for a person."""
    from releasegate.verdict import Decision
    from tests.factories import SHADOW, canary, verdict

    pol = policies.load(policy_name)
    if approval:
        pol = pol.model_copy(update={"approval": pol.approval.model_copy(update=approval)})
    rel = release.open_release(model, "2", "1", pol.model_dump(mode="json"), airflow_run_id=RUN, actor="airflow:alice")
    for state in (State.signing, State.validating, State.shadow, State.canary):
        release.transition(rel.release_id, state, actor="airflow:alice")
    stages = [SHADOW] + [canary(weight, step) for step, weight in enumerate(pol.canary.steps, start=1)]
    for stage in stages:
        release.record_verdict(rel.release_id, verdict(stage, Decision.promote), actor="airflow:alice")
    return release.get(rel.release_id)


def _approvals(release_id: str) -> list[dict]:
    return [e for e in audit.events(release_id=release_id) if e["action"] == "approval"]


def test_a_triggerer_cannot_approve_their_own_release_under_the_gated_policy(store):
    assert policies.load("gated").approval.separate_duties and not policies.load("default").approval.separate_duties
    from releasegate.contract import Branch

    rel = _awaiting()
    assert pipeline.decide(rel.release_id) is Branch.approve
    request = pipeline.request_approval(rel.release_id, actor="airflow:alice", triggered_by="alice")
    assert request.separate_duties and request.triggered_by == "alice"
    assert "**Separation of duties**: alice triggered this release, so someone else must approve it" in request.body

    # alice approves her own release: refused, audited, and the request stands (ask again).
    branch = pipeline.record_approval(
        rel.release_id, approved=True, approver="alice", comment="LGTM", triggered_by="alice"
    )
    assert branch is Branch.approve
    [refused] = _approvals(rel.release_id)
    assert refused["actor"] == "airflow:alice"
    assert refused["details"] == {
        "approved": False,
        "approver": "alice",
        "timed_out": False,
        "comment": "LGTM",
        "refused": "alice triggered this release and may not approve it (separation of duties)",
    }
    assert release.get(rel.release_id).state is State.awaiting_approval
    again = pipeline.request_approval(rel.release_id, triggered_by="alice")
    assert again.subject == request.subject and 0 < again.seconds_left <= request.seconds_left

    # Someone else may approve it; alice may still roll it back.
    assert (
        pipeline.record_approval(rel.release_id, approved=True, approver="bob", triggered_by="alice") is Branch.promote
    )
    assert _approvals(rel.release_id)[-1]["details"]["approver"] == "bob"
    assert pipeline.record_approval(rel.release_id, approved=False, approver="alice", triggered_by="alice") is (
        Branch.rollback
    )
    assert audit.verify().ok


def test_the_default_policy_lets_the_triggerer_approve(store):
    from releasegate.contract import Branch

    rel = _awaiting("default", required=True)
    request = pipeline.request_approval(rel.release_id, triggered_by="alice")
    assert not request.separate_duties and "Separation of duties" not in request.body
    assert pipeline.record_approval(rel.release_id, approved=True, approver="alice", triggered_by="alice") is (
        Branch.promote
    )


def test_named_approvers_leave_out_the_triggerer_and_none_left_rolls_back_at_once(store):
    rel = _awaiting(approvers=["alice", "bob"])
    assert pipeline.request_approval(rel.release_id, triggered_by="alice").approvers == ["bob"]

    only = _awaiting(model="fraud", approvers=["alice"])
    with pytest.raises(pipeline.NoEligibleApprover, match="names only alice to approve, who triggered this release"):
        pipeline.request_approval(only.release_id, triggered_by="alice")
    [event] = _approvals(only.release_id)
    assert event["details"]["approved"] is False and event["details"]["approver"] == "nobody (separation of duties)"
    assert release.get(only.release_id).state is State.awaiting_approval  # the rollback task ends it


class _Airflow:
    """Airflow's REST API as `releasegate approve` sees it: one pending request of the decide task, and its XCom."""

    def __init__(self, triggered_by: str, separate_duties: bool = True):
        self.request_info = {
            "subject": "Promote churn v2 (champion v1)?",
            "body": "...",
            "timeout_seconds": 1800,
            "seconds_left": 1700,
            "approvers": [],
            "triggered_by": triggered_by,
            "separate_duties": separate_duties,
        }
        self.answered: list[dict] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/auth/token":
            return httpx.Response(201, json={"access_token": json.loads(request.content)["username"]})
        user = request.headers["authorization"].removeprefix("Bearer ")  # the test's token is the user name
        if path == "/ui/auth/me":
            return httpx.Response(200, json={"id": user, "username": user})
        if path == "/api/v2/dags/model_release/dagRuns/~/hitlDetails":
            pending = {
                "task_instance": {"task_id": "decide", "dag_run_id": RUN, "map_index": -1},
                "subject": "Promote churn v2 (champion v1)?",
                "body": "**Release** `rel-1`: ...",
                "options": ["Promote", "Roll back"],
                "params": {"comment": {"value": ""}},
            }
            return httpx.Response(200, json={"hitl_details": [pending], "total_entries": 1})
        if path.endswith("/taskInstances/decide/xcomEntries/approval_request"):
            return httpx.Response(200, json={"key": "approval_request", "value": self.request_info})
        if path.endswith("/taskInstances/decide/-1/hitlDetails") and request.method == "PATCH":
            body = json.loads(request.content)
            self.answered.append(body | {"user": user})
            return httpx.Response(200, json={"chosen_options": body["chosen_options"], "responded_by": {"name": user}})
        return httpx.Response(404, json={"detail": f"not here: {path}"})


@pytest.fixture
def fake_airflow(monkeypatch):
    def install(airflow: _Airflow) -> _Airflow:
        real = af.AirflowClient

        class Client(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, transport=httpx.MockTransport(airflow.handler), **kwargs)

        monkeypatch.setattr(af, "AirflowClient", Client)
        return airflow

    return install


def _approve(user: str, *extra: str):
    return CliRunner().invoke(
        main,
        ["approve", "rel-1", "--airflow-url", "http://airflow.test", "--user", user, "--password", "pw", *extra],
    )


def test_releasegate_approve_refuses_the_triggerers_own_approval(fake_airflow):
    airflow = fake_airflow(_Airflow(triggered_by="alice"))
    refused = _approve("alice", "--comment", "mine, looks fine")
    assert refused.exit_code == 1 and not airflow.answered
    assert "REFUSED: alice triggered this release and its policy requires someone else to approve it" in refused.output

    rejected = _approve("alice", "--reject")  # rolling back one's own release is fine
    assert rejected.exit_code == 0 and airflow.answered[-1]["chosen_options"] == ["Roll back"]
    approved = _approve("bob")
    assert approved.exit_code == 0 and "Promote (answered by bob)" in approved.output
    assert airflow.answered[-1] == {"chosen_options": ["Promote"], "params_input": {}, "user": "bob"}


def test_releasegate_approve_lets_the_triggerer_approve_where_the_policy_does_not_separate_duties(fake_airflow):
    airflow = fake_airflow(_Airflow(triggered_by="alice", separate_duties=False))
    assert _approve("alice").exit_code == 0 and airflow.answered[-1]["chosen_options"] == ["Promote"]
