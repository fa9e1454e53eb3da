"""API keys: format, peppered digests, roles, revocation through the in-memory key store."""

from __future__ import annotations

import hashlib
import hmac
import stat

import pytest
import sqlalchemy as sa

from releasegate import storage
from releasegate.serving import auth


def store(settings) -> auth.KeyStore:
    keys = auth.KeyStore(auth.pepper(settings), settings.admin_api_key)
    keys.refresh(storage.engine(settings.db_url))
    return keys


def test_key_is_stored_only_as_a_peppered_hmac(settings):
    key_id, key = auth.create_key("predict", settings)
    assert key.startswith(f"rg_{key_id}_") and len(key) > 50
    with storage.engine(settings.db_url).connect() as conn:
        row = conn.execute(sa.select(storage.api_keys).where(storage.api_keys.c.key_id == key_id)).one()
    pepper = (settings.home / "keys" / "apikey.pepper").read_bytes().strip()
    assert row.digest == hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
    assert key not in row.digest and row.role == "predict" and row.revoked_at is None


def test_pepper_file_is_private_and_stable(settings):
    first = auth.pepper(settings)
    path = settings.home / "keys" / "apikey.pepper"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.pepper(settings) == first and len(first) >= 32


def test_pepper_from_the_environment_wins(settings, monkeypatch):
    from releasegate.settings import get_settings

    monkeypatch.setenv("RELEASEGATE_APIKEY_PEPPER", "pepper-from-env")
    assert auth.pepper(get_settings()) == b"pepper-from-env"
    assert not (settings.home / "keys" / "apikey.pepper").exists()


def test_roles_grant_their_endpoints_and_admin_grants_all(settings):
    made = {role: auth.create_key(role, settings) for role in auth.ROLES}
    keys = store(settings)
    for role in (auth.Role.predict, auth.Role.feedback, auth.Role.metrics):
        key_id, key = made[role]
        assert keys.require(f"Bearer {key}", role) == auth.Caller(role, key_id)
    for needed in auth.ROLES:
        assert keys.require(f"Bearer {made['admin'][1]}", needed) == auth.Caller(auth.Role.admin, made["admin"][0])
        assert keys.require(f"Bearer {settings.admin_api_key}", needed) == auth.Caller(
            auth.Role.admin, auth.ADMIN_KEY_ID
        )
    with pytest.raises(auth.AuthError, match="role 'predict'") as err:
        keys.require(f"Bearer {made['predict'][1]}", auth.Role.admin)
    assert err.value.status == 403
    with pytest.raises(auth.AuthError, match="role 'metrics'"):
        keys.require(f"Bearer {made['metrics'][1]}", auth.Role.predict)


@pytest.mark.parametrize(
    "role, key_id", [(auth.Role.metrics, auth.METRICS_KEY_ID), (auth.Role.alerts, auth.ALERTS_KEY_ID)]
)
def test_a_key_from_a_file_does_its_roles_work_and_nothing_else(settings, role, key_id):
    """Prometheus' key (metrics) and Alertmanager's (alerts), each read from a file both sides share."""
    secret = f"{role}-secret-0123456789"
    files = {"metrics_key": secret} if role is auth.Role.metrics else {"alerts_key": secret}
    keys = auth.KeyStore(auth.pepper(settings), settings.admin_api_key, **files)
    keys.refresh(storage.engine(settings.db_url))
    assert keys.require(f"Bearer {secret}", role) == auth.Caller(role, key_id)
    for other in set(auth.Role) - {role}:
        with pytest.raises(auth.AuthError) as err:
            keys.require(f"Bearer {secret}", other)
        assert err.value.status == 403


def test_creating_and_revoking_a_key_are_audited_with_who_did_it(settings):
    from releasegate import audit
    from releasegate.contract import AuditAction

    key_id, _ = auth.create_key("predict", settings, actor="apikey:abc")
    auth.revoke_key(key_id, settings)
    auth.revoke_key(key_id, settings)  # already revoked: nothing changes, no second event
    events = [e for e in audit.events(engine=storage.engine(settings.db_url)) if e["action"].startswith("apikey.")]
    assert [(e["action"], e["actor"], e["details"]) for e in events] == [
        (AuditAction.apikey_created, "apikey:abc", {"key_id": key_id, "role": "predict"}),
        (AuditAction.apikey_revoked, auth.local_actor(), {"key_id": key_id, "role": "predict"}),
    ]
    assert auth.local_actor().startswith("cli") and audit.verify(storage.engine(settings.db_url)).ok


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Bearer rg_nothere_secret", "Bearer garbage"])
def test_missing_or_unknown_key_is_unauthorized(settings, header):
    keys = store(settings)
    with pytest.raises(auth.AuthError) as err:
        keys.require(header, "predict")
    assert err.value.status == 401


def test_a_key_with_a_wrong_secret_is_refused(settings):
    key_id, _key = auth.create_key("predict", settings)
    keys = store(settings)
    with pytest.raises(auth.AuthError, match="unknown or revoked"):
        keys.require(f"Bearer rg_{key_id}_{'x' * 43}", "predict")


def test_revoked_key_stops_working_at_the_next_refresh(settings):
    key_id, key = auth.create_key("predict", settings)
    keys = store(settings)
    assert keys.require(f"Bearer {key}", "predict").role == "predict"
    auth.revoke_key(key_id, settings)
    assert keys.require(f"Bearer {key}", "predict").role == "predict"  # the cache until the poller refreshes it
    keys.refresh(storage.engine(settings.db_url))
    with pytest.raises(auth.AuthError, match="unknown or revoked") as err:
        keys.require(f"Bearer {key}", "predict")
    assert err.value.status == 401


def test_revoking_an_unknown_key_says_so(settings):
    with pytest.raises(KeyError, match="no API key with id 'nope'"):
        auth.revoke_key("nope", settings)


def test_unknown_role_is_refused(settings):
    with pytest.raises(ValueError, match="unknown role 'root'"):
        auth.create_key("root", settings)
