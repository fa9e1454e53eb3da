"""The audit log against someone who can write its database: every event moves a signed head kept outside it.

A real SQLite database and real keys; the attacker's edits are plain SQL on the audit table, as
a database user (not the key holder) could run them.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from releasegate import audit, dashboard, signing, storage
from releasegate.cli import main

try:
    from releasegate.contract import AuditAction

    ROUTE = AuditAction.route
except ImportError:  # 674b38f, whose log these tests are also run against (issue 12), took the action's string
    ROUTE = "route"


@pytest.fixture
def keyed(settings):
    """A home whose audit key (the signing key, by default) exists: every event is anchored."""
    signing.generate_keys(settings.signing_key.parent)
    return settings


def _events(n: int) -> None:
    for i in range(n):
        audit.append("airflow:alice", ROUTE, model="churn", release_id="rel-1", details={"i": i})


def _rows() -> list[dict]:
    with storage.engine().connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(storage.audit).order_by(storage.audit.c.seq))]


def _rechain(rows: list[dict]) -> None:
    """Rewrite the table as a careful attacker would: every hash and link recomputed, so the chain itself is intact."""
    prev = audit.GENESIS
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.delete())
        for seq, row in enumerate(rows, start=1):
            row = row | {"seq": seq, "prev_hash": prev}
            row["hash"] = audit._digest(prev, row)
            conn.execute(storage.audit.insert().values(**row))
            prev = row["hash"]


def test_truncating_the_last_events_is_detected(keyed):
    _events(5)
    anchored = audit.verify()
    assert anchored.ok
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.delete().where(storage.audit.c.seq >= 4))

    report = audit.verify()
    assert not report.ok and report.failure is audit.ChainFailure.truncated and anchored.anchored_seq == 5
    assert report.first_bad_seq == 4 and "events 4–5 were deleted" in report.message
    # What is left is a perfectly linked chain: only the anchored head shows the loss.
    assert audit._check_rows(_rows()).ok

    # The pipeline writing on does not paper over it: the head never moves onto a log that lost its events.
    _events(4)
    report = audit.verify()
    assert not report.ok and report.failure is audit.ChainFailure.rewritten and report.anchored_seq == 5


def test_an_edited_event_is_detected_even_with_every_hash_recomputed(keyed):
    _events(5)
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.update().where(storage.audit.c.seq == 2).values(actor="airflow:mallory"))
    edited = audit.verify()
    assert not edited.ok and edited.first_bad_seq == 2

    rows = _rows()
    _rechain(rows)
    report = audit.verify()
    assert not report.ok and report.failure is audit.ChainFailure.rewritten
    assert "event 5 is not the one the audit key signed" in report.message
    assert audit._check_rows(_rows()).ok  # the chain alone now says intact
    assert edited.failure is audit.ChainFailure.edited


def test_reordered_events_are_detected(keyed):
    _events(5)
    with storage.engine().begin() as conn:  # events 2 and 3 swap places
        conn.execute(storage.audit.update().where(storage.audit.c.seq == 2).values(seq=-2))
        conn.execute(storage.audit.update().where(storage.audit.c.seq == 3).values(seq=2))
        conn.execute(storage.audit.update().where(storage.audit.c.seq == -2).values(seq=3))
    reordered = audit.verify()
    assert not reordered.ok and reordered.first_bad_seq == 2

    rows = _rows()
    _rechain(rows)  # the same order, re-linked and re-hashed to look as written
    report = audit.verify()
    assert not report.ok and report.failure is audit.ChainFailure.rewritten
    assert reordered.failure is audit.ChainFailure.reordered and "reordered" in reordered.message


def test_events_inserted_after_the_signed_head_are_flagged(keyed):
    _events(3)
    last = _rows()[-1]
    forged = last | {"seq": 4, "actor": "airflow:mallory", "prev_hash": last["hash"], "time": last["time"] + 1}
    forged["hash"] = audit._digest(last["hash"], forged)
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.insert().values(**forged))
    report = audit.verify()
    assert not report.ok and report.failure is audit.ChainFailure.unanchored and report.first_bad_seq == 4


def test_the_head_is_anchored_outside_the_database_and_checked_by_audit_verify(keyed):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    _events(5)
    head_file = keyed.home / "audit" / "head.json"
    stored = json.loads(head_file.read_text())
    payload = json.loads(stored["payload"])
    assert payload["seq"] == 5 and payload["head"] == _rows()[-1]["hash"]
    public = serialization.load_pem_public_key(keyed.signing_key.with_suffix(".pub").read_bytes())
    public.verify(bytes.fromhex(stored["signature"]), stored["payload"].encode(), ec.ECDSA(hashes.SHA256()))
    assert keyed.audit_head == head_file and keyed.audit_key == keyed.signing_key  # the defaults

    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify"])
    assert ok.exit_code == 0 and ok.output.startswith("OK: 5 events, chain intact") and "anchored" in ok.output

    with storage.engine().begin() as conn:
        conn.execute(storage.audit.delete().where(storage.audit.c.seq == 5))
    truncated = runner.invoke(main, ["audit", "verify"])
    assert truncated.exit_code == 1
    assert truncated.output.startswith("BROKEN (truncated): the log ends at event 4, but the signed head is at event 5")

    # The dashboard's header says the same.
    status = dashboard.chain_status()
    assert status["status"] == "broken" and status["failure"] == "truncated" and status["first_bad_seq"] == 5


def test_a_missing_or_forged_head_fails_verification(keyed, tmp_path):
    _events(3)
    head_file = keyed.home / "audit" / "head.json"  # settings.audit_head
    saved = head_file.read_text()
    head_file.unlink()
    gone = CliRunner().invoke(main, ["audit", "verify"])
    assert gone.exit_code == 1 and gone.output.startswith("BROKEN (no_anchor)")

    # A head signed with a key of the attacker's own: its signature does not verify with the audit key.
    other_private, _ = signing.generate_keys(tmp_path / "mallory")
    forged = audit.Anchor(head_file, other_private)
    forged.write(forged.sign(3, _rows()[-1]["hash"]))
    report = audit.verify()
    assert not report.ok and report.failure is audit.ChainFailure.bad_anchor and "does not verify" in report.message

    head_file.write_text(saved)
    assert audit.verify().ok


def test_concurrent_appends_leave_the_head_at_the_last_event(keyed):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: audit.append("t", ROUTE, details={"i": i}), range(80)))
    report = audit.verify()
    assert report.ok and report.events == 80 and report.anchored_seq == 80


def test_a_verify_only_deployment_anchors_with_its_audit_key_and_checks_with_the_public_key_alone(
    rg_home, monkeypatch, tmp_path
):
    from releasegate.settings import get_settings

    monkeypatch.setenv("RELEASEGATE_SIGNING_MODE", "verify-only")
    settings = get_settings()
    assert settings.audit_key == rg_home / "keys" / "audit.key"
    signing.generate_keys(rg_home / "keys", name="audit")
    _events(3)
    assert audit.verify().anchored_seq == 3

    # The dashboard's host holds the public key only.
    checker = tmp_path / "checker"
    checker.mkdir()
    shutil.copy(rg_home / "keys" / "audit.pub", checker / "audit.pub")
    monkeypatch.setenv("RELEASEGATE_AUDIT_KEY", str(checker / "audit.key"))
    assert audit.verify().ok
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.delete().where(storage.audit.c.seq == 3))
    assert audit.verify().failure is audit.ChainFailure.truncated


def test_without_an_audit_key_the_chain_is_checked_and_said_to_be_unanchored(settings):
    _events(2)
    report = audit.verify()
    assert report.ok and "not anchored" in report.message and report.anchored_seq is None
    assert not settings.audit_head.exists()
