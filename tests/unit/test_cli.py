"""The `releasegate` command line on a real home directory."""

from __future__ import annotations

from click.testing import CliRunner

from releasegate import audit, storage
from releasegate.cli import main
from releasegate.contract import AuditAction


def test_keys_generate_writes_a_pair_and_refuses_to_overwrite(settings, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["keys", "generate", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "release.key").exists() and (tmp_path / "k" / "release.pub").exists()
    assert (tmp_path / "k" / "release.key").stat().st_mode & 0o077 == 0
    again = runner.invoke(main, ["keys", "generate", "--out", str(tmp_path / "k")])
    assert again.exit_code != 0


def test_audit_verify_exits_1_on_an_edited_chain(settings):
    audit.append("cli-test", AuditAction.validation)
    audit.append("cli-test", AuditAction.signed)
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify"])
    assert ok.exit_code == 0 and ok.output.startswith("OK")
    with storage.engine().begin() as conn:
        conn.execute(storage.audit.update().where(storage.audit.c.seq == 2).values(action="edited"))
    broken = runner.invoke(main, ["audit", "verify"])
    assert broken.exit_code == 1 and broken.output.startswith("BROKEN (edited): event 2 was changed")


def test_apikeys_create_prints_a_key_once_and_revoke_takes_it(settings):
    import json

    runner = CliRunner()
    created = runner.invoke(main, ["apikeys", "create", "--role", "predict"])
    assert created.exit_code == 0, created.output
    key = json.loads(created.output)
    assert key["role"] == "predict" and key["key"].startswith("rg_")
    with storage.engine().connect() as conn:
        digests = [row.digest for row in conn.execute(storage.api_keys.select())]
    assert key["key"] not in digests  # stored as a digest only
    revoked = runner.invoke(main, ["apikeys", "revoke", key["key_id"]])
    assert revoked.exit_code == 0


def test_verify_refuses_an_unknown_model(settings):
    result = CliRunner().invoke(main, ["verify", "models:/nothing/1"])
    assert result.exit_code == 1 and "REFUSED" in result.output
