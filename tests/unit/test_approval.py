"""What the release does after its last verdict: promote, roll back, or ask a person (and keep the answer)."""

from __future__ import annotations

import pytest

from releasegate import audit, pipeline, release
from releasegate.contract import AuditAction, Branch
from releasegate.release import State
from releasegate.verdict import Decision, Verdict
from tests.factories import SHADOW, canary, verdict

PROMOTE, CONTINUE, ROLLBACK = Decision.promote, Decision.continue_, Decision.rollback
INCONCLUSIVE, INVALID = Decision.inconclusive, Decision.invalid


def _release(policy: dict, verdicts: list[Verdict], champion: str | None = "1"):
    rel = release.open_release("churn", "2", champion, {"name": "p", **policy}, airflow_run_id="run-1", actor="test")
    for state in (State.signing, State.validating, State.shadow, State.canary):
        release.transition(rel.release_id, state, actor="test")
    for one in verdicts:
        release.record_verdict(rel.release_id, one, actor="test")
    return release.get(rel.release_id)


PASSED = [
    verdict(SHADOW, PROMOTE),
    verdict(canary(5, 1), CONTINUE),
    verdict(canary(25, 2), PROMOTE),
    verdict(canary(50, 3), PROMOTE),
]


@pytest.mark.parametrize(
    "verdicts, policy, branch",
    [
        (PASSED, {}, Branch.promote),
        (PASSED, {"approval": {"required": True}}, Branch.approve),
        (PASSED[:3], {}, Branch.rollback),  # the last step never promoted
        (PASSED[:2] + [verdict(canary(25, 2), ROLLBACK), verdict(canary(50, 3), PROMOTE)], {}, Branch.rollback),
        (PASSED[:3] + [verdict(canary(50, 3), INCONCLUSIVE)], {}, Branch.rollback),
        (PASSED[:3] + [verdict(canary(50, 3), INCONCLUSIVE)], {"inconclusive": "approve"}, Branch.approve),
        (PASSED[:3] + [verdict(canary(50, 3), INVALID)], {"inconclusive": "approve"}, Branch.rollback),
    ],
)
def test_the_branch_follows_the_verdicts_and_the_policy(rg_home, verdicts, policy, branch):
    rel = _release(policy, verdicts)
    assert pipeline.decide(rel.release_id) is branch


def test_the_approval_request_carries_the_evidence_and_the_policy_timeout(rg_home):
    rel = _release({"approval": {"required": True, "timeout_seconds": 90, "approvers": ["alice"]}}, PASSED)
    request = pipeline.request_approval(rel.release_id, actor="airflow:bob")
    assert release.get(rel.release_id).state is State.awaiting_approval
    assert request.timeout_seconds == 90 and request.approvers == ["alice"] and 0 < request.seconds_left <= 90
    assert not request.separate_duties and "Separation of duties" not in request.body
    assert request.subject == "Promote churn v2 (champion v1)?"
    assert "| canary 3 (50 %) | promote | accuracy +0.031 [+0.004, +0.058] (margin 0.02) |" in request.body
    assert "No answer within 90 s rolls the release back" in request.body
    assert pipeline.request_approval(rel.release_id).subject == request.subject  # a retry asks again, no error


@pytest.mark.parametrize(
    "approved, approver, timed_out, comment, who",
    [
        (True, "alice", False, "numbers look fine", "alice"),
        (False, "carol", False, "wait for the holiday freeze", "carol"),
        (False, None, True, None, "nobody (timeout)"),
    ],
)
def test_the_answer_or_the_timeout_is_audited_with_who(rg_home, approved, approver, timed_out, comment, who):
    rel = _release({"approval": {"required": True}}, PASSED)
    pipeline.request_approval(rel.release_id)
    branch = pipeline.record_approval(
        rel.release_id, approved=approved, approver=approver, timed_out=timed_out, comment=comment
    )
    assert branch is (Branch.promote if approved else Branch.rollback)
    event = [e for e in audit.events(release_id=rel.release_id) if e["action"] == AuditAction.approval][-1]
    assert event["details"] == {"approved": approved, "approver": who, "timed_out": timed_out, "comment": comment}
    assert event["actor"] == (f"airflow:{approver}" if approver else "airflow")
    assert audit.verify().ok
