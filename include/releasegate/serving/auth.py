"""API keys: `rg_<key_id>_<secret>`, stored as an HMAC-SHA256 digest under a server pepper.

Keys are random and high-entropy, so a fast keyed digest is enough (no password hashing on
the request path); the gateway checks them against an in-memory copy of `api_keys`. Creating
and revoking a key are audit events, written in the same transaction as the key.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import secrets
import threading
import time
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, cast

import sqlalchemy as sa

if TYPE_CHECKING:
    from releasegate.settings import Settings


class Role(StrEnum):
    """What a key may call; `admin` may call everything."""

    predict = "predict"  # inference, v2 metadata, the OpenAPI document
    feedback = "feedback"  # POST /feedback
    admin = "admin"  # routes, load errors, and everything above
    metrics = "metrics"  # GET /metrics only: a Prometheus scraper's key
    alerts = "alerts"  # POST /alerts only: Alertmanager's key


ROLES = tuple(Role)
# The key ids of the keys that are not in `api_keys`: RELEASEGATE_ADMIN_KEY and the metrics key file.
ADMIN_KEY_ID = "env:admin"
METRICS_KEY_ID = "file:metrics"
ALERTS_KEY_ID = "file:alerts"
_VERIFIED_MAX = 10_000


class Caller(NamedTuple):
    """Who a request's key says it is: the key's role and its id (what the audit and the prediction log name)."""

    role: Role
    key_id: str


class AuthError(Exception):
    """A request without a usable key (401) or with a key of the wrong role (403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _settings(settings: Settings | None) -> Settings:
    if settings is None:
        from releasegate.settings import get_settings

        return get_settings()
    return settings


def pepper(settings: Settings | None = None) -> bytes:
    """The server pepper: $RELEASEGATE_APIKEY_PEPPER, else <home>/keys/apikey.pepper (created 0600)."""
    from releasegate.settings import home_secret

    settings = _settings(settings)
    return home_secret(settings, settings.apikey_pepper, "apikey.pepper")


def digest(key: str, pepper_bytes: bytes) -> str:
    """HMAC-SHA256 of the whole key under the pepper, hex."""
    return hmac.new(pepper_bytes, key.encode(), hashlib.sha256).hexdigest()


def parse_key(key: str) -> str | None:
    """The key id of a well-formed `rg_<key_id>_<secret>` key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "rg" or not parts[1] or not parts[2]:
        return None
    return parts[1]


def local_actor() -> str:
    """The audit actor of a key change made from this machine's command line: `cli:<login name>`."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # a container user without a passwd entry or login variables
        return "cli"


def create_key(role: str, settings: Settings | None = None, *, actor: str | None = None) -> tuple[str, str]:
    """A new key for `role`; returns (key_id, key). The key itself is never stored.

    The `apikey.created` audit event names `actor` (default `local_actor()`), the key id and the role.
    """
    from releasegate import audit, storage
    from releasegate.contract import AuditAction

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    settings = _settings(settings)
    key_id = secrets.token_hex(8)
    key = f"rg_{key_id}_{secrets.token_urlsafe(32)}"
    row = {"key_id": key_id, "role": str(role), "digest": digest(key, pepper(settings)), "created_at": time.time()}

    def insert(conn: sa.Connection) -> None:
        conn.execute(storage.api_keys.insert().values(**row))
        audit.append_in(
            conn, actor or local_actor(), AuditAction.apikey_created, details={"key_id": key_id, "role": str(role)}
        )

    audit.retrying(insert, storage.engine(settings.db_url))
    return key_id, key


def revoke_key(key_id: str, settings: Settings | None = None, *, actor: str | None = None) -> None:
    """Mark a key revoked; gateways stop accepting it within their poll interval.

    The `apikey.revoked` audit event names `actor` (default `local_actor()`) and the key; revoking a key
    already revoked changes nothing and writes no event.
    """
    from releasegate import audit, storage
    from releasegate.contract import AuditAction

    settings = _settings(settings)
    table = storage.api_keys

    def revoke(conn: sa.Connection) -> None:
        found = conn.execute(
            table.update()
            .where(table.c.key_id == key_id)
            .where(table.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        ).rowcount
        if found:
            role = conn.execute(sa.select(table.c.role).where(table.c.key_id == key_id)).scalar()
            audit.append_in(
                conn, actor or local_actor(), AuditAction.apikey_revoked, details={"key_id": key_id, "role": role}
            )
        elif conn.execute(table.select().where(table.c.key_id == key_id)).first() is None:
            raise KeyError(f"no API key with id {key_id!r}")

    audit.retrying(revoke, storage.engine(settings.db_url))


class KeyStore:
    """The live keys in memory; `refresh()` re-reads `api_keys`, `caller()` checks a bearer key."""

    def __init__(
        self,
        pepper_bytes: bytes,
        admin_key: str | None = None,
        metrics_key: str | None = None,
        alerts_key: str | None = None,
    ):
        self._pepper = pepper_bytes
        # Keys outside the table, each with its caller: compared in constant time, in this order.
        self._static = [
            (key.encode(), Caller(role, key_id))
            for key, role, key_id in (
                (admin_key, Role.admin, ADMIN_KEY_ID),
                (metrics_key, Role.metrics, METRICS_KEY_ID),
                (alerts_key, Role.alerts, ALERTS_KEY_ID),
            )
            if key
        ]
        self._keys: dict[str, tuple[Role, str]] = {}  # key_id -> (role, digest); revoked keys left out
        self._lock = threading.Lock()
        # Authorization headers already checked against the current keys -> caller. A request then costs one
        # dict lookup instead of an HMAC; emptied whenever the keys change (a revoked key stops at the next
        # refresh, as before) and when it reaches _VERIFIED_MAX headers.
        self._verified: dict[str, Caller] = {}

    def refresh(self, engine: sa.Engine) -> int:
        """Reload the unrevoked keys from the database; returns how many there are."""
        from releasegate import storage

        table = storage.api_keys
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.key_id, table.c.role, table.c.digest, table.c.revoked_at)).all()
        # A role this version does not know (a newer one's) grants nothing here.
        keys = {r.key_id: (Role(r.role), r.digest) for r in rows if r.revoked_at is None and r.role in ROLES}
        with self._lock:
            changed = keys != self._keys
            self._keys = keys
            if changed:  # after the new keys are in place: see role_of
                self._verified = {}
        return len(keys)

    def caller(self, authorization: str | None) -> Caller:
        """The caller of the key in an `Authorization: Bearer ...` header; AuthError(401) if none is valid."""
        if not authorization:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>'")
        # Taken before the check: if a refresh replaces it meanwhile, this header's caller goes into the
        # discarded dict, never into the one that follows the new keys.
        verified = self._verified
        caller = verified.get(authorization)
        if caller is not None:
            return caller
        caller = self._check(authorization)
        if len(verified) >= _VERIFIED_MAX:
            verified.clear()
        verified[authorization] = caller
        return caller

    def _check(self, authorization: str) -> Caller:
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError(401, "malformed Authorization header: expected 'Bearer <key>'")
        given = key.encode()
        for static, caller in self._static:
            if hmac.compare_digest(given, static):
                return caller
        key_id = parse_key(key)
        entry = self._keys.get(key_id) if key_id else None
        if entry is None or not hmac.compare_digest(entry[1], digest(key, self._pepper)):
            raise AuthError(401, "unknown or revoked API key")
        return Caller(entry[0], cast("str", key_id))  # found in _keys: a well-formed key's id

    def require(self, authorization: str | None, role: Role) -> Caller:
        """Check the key and that its role may do `role`'s work (admin may do everything)."""
        caller = self.caller(authorization)
        if caller.role != role and caller.role is not Role.admin:
            raise AuthError(403, f"this API key has role '{caller.role}'; this endpoint needs '{role}' or 'admin'")
        return caller
