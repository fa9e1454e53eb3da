"""What the release does after its last verdict: promote, roll back, or ask a person (and keep the answer)."""

from __future__ import annotations

import pytest

from releasegate import audit, pipeline, release
from releasegate.release import State


def _verdict(stage: str, decision: str, reason: str | None = None) -> dict:
    return {"decision": decision, "reason": reason or f"{decision}: at {stage}",
            "window": {"start": 1.0, "end": 2.0, "stage": stage},
            "metrics": [{"name": "accuracy", "estimate": 0.031, "lower": 0.004, "upper": 0.058, "margin": 0.02}]}


def _release(policy: dict, verdicts: list[dict], champion: str | None = "1"):
    rel = release.open_release("churn", "2", champion, {"name": "p", **policy}, airflow_run_id="run-1", actor="test")
    for state in (State.validating, State.signing, State.shadow, State.canary):
        release.transition(rel.release_id, state, actor="test")
    for verdict in verdicts:
        release.record_verdict(rel.release_id, verdict, actor="test")
    return release.get(rel.release_id)


PASSED = [_verdict("shadow", "promote"), _verdict("canary-5", "continue"), _verdict("canary-25", "promote"),
          _verdict("canary-50", "promote")]


@pytest.mark.parametrize("verdicts, policy, branch", [
    (PASSED, {}, "promote"),
    (PASSED, {"approval": {"required": True}}, pipeline.APPROVE),
    (PASSED[:3], {}, "rollback"),  # the last step never promoted
    (PASSED[:2] + [_verdict("canary-25", "rollback"), _verdict("canary-50", "promote")], {}, "rollback"),
    (PASSED[:3] + [_verdict("canary-50", "inconclusive")], {}, "rollback"),
    (PASSED[:3] + [_verdict("canary-50", "inconclusive")], {"inconclusive": "approve"}, pipeline.APPROVE),
    (PASSED[:3] + [_verdict("canary-50", "invalid")], {"inconclusive": "approve"}, "rollback"),
])
def test_the_branch_follows_the_verdicts_and_the_policy(rg_home, verdicts, policy, branch):
    rel = _release(policy, verdicts)
    assert pipeline.decide(rel.release_id) == branch


def test_the_approval_request_carries_the_evidence_and_the_policy_timeout(rg_home):
    rel = _release({"approval": {"required": True, "timeout_seconds": 90, "approvers": ["alice"]}}, PASSED)
    request = pipeline.request_approval(rel.release_id, actor="airflow:bob")
    assert release.get(rel.release_id).state is State.awaiting_approval
    assert request["timeout_seconds"] == 90 and request["approvers"] == ["alice"]
    assert request["subject"] == "Promote churn v2 (champion v1)?"
    assert "| canary-50 | promote | accuracy +0.031 [+0.004, +0.058] (margin 0.02) |" in request["body"]
    assert "No answer within 90 s rolls the release back" in request["body"]
    assert pipeline.request_approval(rel.release_id)["subject"] == request["subject"]  # a retry asks again, no error


@pytest.mark.parametrize("approved, approver, timed_out, comment, who", [
    (True, "alice", False, "numbers look fine", "alice"),
    (False, "carol", False, "wait for the holiday freeze", "carol"),
    (False, None, True, None, "nobody (timeout)"),
])
def test_the_answer_or_the_timeout_is_audited_with_who(rg_home, approved, approver, timed_out, comment, who):
    rel = _release({"approval": {"required": True}}, PASSED)
    pipeline.request_approval(rel.release_id)
    branch = pipeline.record_approval(rel.release_id, approved=approved, approver=approver, timed_out=timed_out,
                                      comment=comment)
    assert branch == ("promote" if approved else "rollback")
    event = [e for e in audit.events(release_id=rel.release_id) if e["action"] == "approval"][-1]
    assert event["details"] == {"approved": approved, "approver": who, "timed_out": timed_out, "comment": comment}
    assert event["actor"] == (f"airflow:{approver}" if approver else "airflow")
    assert audit.verify().ok
