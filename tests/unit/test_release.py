"""The release state machine and the audit chain, on a real SQLite database."""

from __future__ import annotations

import pytest

from releasegate import audit, release, storage
from releasegate.contract import AuditAction
from releasegate.release import State
from releasegate.verdict import Decision
from tests.factories import SHADOW, verdict

POLICY = {"name": "default"}


def _open(model="churn", run_id="run-1", **kw):
    return release.open_release(model, "2", "1", POLICY, airflow_run_id=run_id, actor="test", **kw)


def test_a_release_moves_through_its_states_and_each_move_is_audited(rg_home):
    rel = _open()
    for state in (State.signing, State.validating, State.shadow, State.canary, State.promoting, State.promoted):
        rel = release.transition(rel.release_id, state, actor="test")
    assert rel.state is State.promoted and rel.ended_at is not None
    actions = [e["action"] for e in audit.events(release_id=rel.release_id)]
    assert actions == [
        "release.opened",
        "release.signing",
        "release.validating",
        "release.shadow",
        "release.canary",
        "release.promoting",
        "release.promoted",
    ]


def test_a_move_the_state_machine_forbids_is_refused(rg_home):
    rel = _open()
    with pytest.raises(release.ReleaseError, match="cannot move from pending to promoted"):
        release.transition(rel.release_id, State.promoted, actor="test")
    with pytest.raises(release.ReleaseError, match="cannot move from pending to validating"):
        release.transition(rel.release_id, State.validating, actor="test")  # nothing is loaded before it is signed
    release.transition(rel.release_id, State.signing, actor="test")
    release.transition(rel.release_id, State.rejected, actor="test", reason="signature refused")
    with pytest.raises(release.ReleaseError, match="cannot move from rejected"):
        release.transition(rel.release_id, State.validating, actor="test")


def test_repeating_a_transition_is_a_no_op(rg_home):
    rel = _open()
    release.transition(rel.release_id, State.signing, actor="test")
    release.transition(rel.release_id, State.validating, actor="test")
    assert [e["action"] for e in audit.events(release_id=rel.release_id)].count("release.validating") == 1


def test_second_release_of_a_model_is_refused_while_one_runs(rg_home):
    first = _open(run_id="run-1")
    with pytest.raises(release.ReleaseInProgress, match=first.release_id):
        _open(run_id="run-2", is_run_alive=lambda run_id: True)
    # The same run asking again (a task retry) gets its own release back.
    assert _open(run_id="run-1").release_id == first.release_id
    # Another model is not blocked.
    assert _open(model="fraud", run_id="run-3").model == "fraud"


def test_release_whose_run_died_is_closed_as_failed_by_the_next(rg_home):
    stale = _open(run_id="run-dead")
    restored = []
    fresh = _open(run_id="run-new", is_run_alive=lambda run_id: False, close_stale=restored.append)
    assert release.get(stale.release_id).state is State.failed
    assert "gone or failed" in release.get(stale.release_id).reasons[-1]
    assert [r.release_id for r in restored] == [stale.release_id]
    assert fresh.state is State.pending


def test_verdicts_are_recorded_once(rg_home):
    rel = _open()
    once = verdict(SHADOW, Decision.promote, "fine")
    release.record_verdict(rel.release_id, once, actor="test")
    release.record_verdict(rel.release_id, once, actor="test")
    assert release.get(rel.release_id).verdicts == [once]


def test_audit_chain_detects_an_edited_event(rg_home):
    rel = _open()
    release.transition(rel.release_id, State.signing, actor="test")
    assert audit.verify().ok
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.update().where(storage.audit.c.seq == 1).values(actor="mallory"))
    report = audit.verify()
    assert not report.ok and report.first_bad_seq == 1 and "changed" in report.message


def test_audit_chain_detects_a_deleted_event(rg_home):
    rel = _open()
    release.transition(rel.release_id, State.signing, actor="test")
    release.transition(rel.release_id, State.validating, actor="test")
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.delete().where(storage.audit.c.seq == 2))
    report = audit.verify()
    assert not report.ok and report.first_bad_seq == 2


def test_concurrent_appends_keep_one_unbroken_chain(rg_home):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: audit.append("t", AuditAction.route, details={"i": i}), range(80)))
    report = audit.verify()
    assert report.ok and report.events == 80


def test_signed_head_detects_a_rewritten_chain(rg_home, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    priv.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    audit.append("t", AuditAction.validation)
    audit.append("t", AuditAction.signed)
    signed = audit.sign_head(priv)
    assert audit.verify_signed_head(signed, [pub])
    # Rewrite the whole chain consistently (what a database admin could do): the signed head no longer matches.
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.delete())
    audit.append("mallory", AuditAction.validation)
    audit.append("mallory", AuditAction.signed)
    assert audit.verify().ok
    assert not audit.verify_signed_head(signed, [pub])
