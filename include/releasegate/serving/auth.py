"""API keys: `rg_<key_id>_<secret>`, stored as an HMAC-SHA256 digest under a server pepper.

Keys are random and high-entropy, so a fast keyed digest is enough (no password hashing on
the request path); the gateway checks them against an in-memory copy of `api_keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from releasegate.settings import Settings

ROLES = ("predict", "feedback", "admin")
_VERIFIED_MAX = 10_000


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
    settings = _settings(settings)
    if settings.apikey_pepper:
        return settings.apikey_pepper.encode()
    path = Path(settings.home) / "keys" / "apikey.pepper"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first; use theirs
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()


def digest(key: str, pepper_bytes: bytes) -> str:
    """HMAC-SHA256 of the whole key under the pepper, hex."""
    return hmac.new(pepper_bytes, key.encode(), hashlib.sha256).hexdigest()


def parse_key(key: str) -> str | None:
    """The key id of a well-formed `rg_<key_id>_<secret>` key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "rg" or not parts[1] or not parts[2]:
        return None
    return parts[1]


def create_key(role: str, settings: Settings | None = None) -> tuple[str, str]:
    """A new key for `role`; returns (key_id, key). The key itself is never stored."""
    from releasegate import storage

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    settings = _settings(settings)
    key_id = secrets.token_hex(8)
    key = f"rg_{key_id}_{secrets.token_urlsafe(32)}"
    with storage.engine(settings.db_url).begin() as conn:
        conn.execute(
            storage.api_keys.insert().values(
                key_id=key_id, role=role, digest=digest(key, pepper(settings)), created_at=time.time()
            )
        )
    return key_id, key


def revoke_key(key_id: str, settings: Settings | None = None) -> None:
    """Mark a key revoked; gateways stop accepting it within their poll interval."""
    from releasegate import storage

    settings = _settings(settings)
    table = storage.api_keys
    with storage.engine(settings.db_url).begin() as conn:
        found = conn.execute(
            table.update()
            .where(table.c.key_id == key_id)
            .where(table.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        ).rowcount
        if not found:
            exists = conn.execute(table.select().where(table.c.key_id == key_id)).first()
            if exists is None:
                raise KeyError(f"no API key with id {key_id!r}")


class KeyStore:
    """The live keys in memory; `refresh()` re-reads `api_keys`, `role_of()` checks a bearer key."""

    def __init__(self, pepper_bytes: bytes, admin_key: str | None = None):
        self._pepper = pepper_bytes
        self._admin_key = admin_key
        self._keys: dict[str, tuple[str, str]] = {}  # key_id -> (role, digest); revoked keys left out
        self._lock = threading.Lock()
        # Authorization headers already checked against the current keys -> role. A request then costs one
        # dict lookup instead of an HMAC; emptied whenever the keys change (a revoked key stops at the next
        # refresh, as before) and when it reaches _VERIFIED_MAX headers.
        self._verified: dict[str, str] = {}

    def refresh(self, engine: sa.Engine) -> int:
        """Reload the unrevoked keys from the database; returns how many there are."""
        from releasegate import storage

        table = storage.api_keys
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.key_id, table.c.role, table.c.digest, table.c.revoked_at)).all()
        keys = {r.key_id: (r.role, r.digest) for r in rows if r.revoked_at is None}
        with self._lock:
            changed = keys != self._keys
            self._keys = keys
            if changed:  # after the new keys are in place: see role_of
                self._verified = {}
        return len(keys)

    def role_of(self, authorization: str | None) -> str:
        """The role of the key in an `Authorization: Bearer ...` header; AuthError(401) if none is valid."""
        if not authorization:
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>'")
        # Taken before the check: if a refresh replaces it meanwhile, this header's role goes into the
        # discarded dict, never into the one that follows the new keys.
        verified = self._verified
        role = verified.get(authorization)
        if role is not None:
            return role
        role = self._check(authorization)
        if len(verified) >= _VERIFIED_MAX:
            verified.clear()
        verified[authorization] = role
        return role

    def _check(self, authorization: str) -> str:
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError(401, "malformed Authorization header: expected 'Bearer <key>'")
        if self._admin_key and hmac.compare_digest(key.encode(), self._admin_key.encode()):
            return "admin"
        key_id = parse_key(key)
        entry = self._keys.get(key_id) if key_id else None
        if entry is None or not hmac.compare_digest(entry[1], digest(key, self._pepper)):
            raise AuthError(401, "unknown or revoked API key")
        return entry[0]

    def require(self, authorization: str | None, role: str) -> str:
        """Check the key and that its role may do `role`'s work (admin may do everything)."""
        have = self.role_of(authorization)
        if have != role and have != "admin":
            raise AuthError(403, f"this API key has role '{have}'; this endpoint needs '{role}' or 'admin'")
        return have
