"""Append-only, hash-chained audit log: every event commits to the one before it.

Editing or deleting a row breaks the chain from that row on; `verify` finds the first
break. The head is signed at the end of each release (see `sign_head`), so someone who
can rewrite the whole table still cannot forge a head the release key did not sign.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from releasegate import storage
from releasegate.contract import AuditAction
from releasegate.errors import TransientStorageError

T = TypeVar("T")

GENESIS = "0" * 64
_RETRIES = 50


def canonical(obj: Any) -> str:
    """The JSON form that is hashed: sorted keys, no spaces, so any writer gets the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _digest(prev_hash: str, row: Mapping[str, Any]) -> str:
    fields = {k: row[k] for k in ("seq", "time", "actor", "action", "model", "version", "release_id", "details")}
    return hashlib.sha256((prev_hash + canonical(fields)).encode()).hexdigest()


def append_in(
    conn: sa.Connection,
    actor: str,
    action: AuditAction,
    *,
    model: str | None = None,
    version: str | None = None,
    release_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one event inside the caller's transaction (so a state change and its event commit together).

    Appends are serialized by the primary key on `seq`: a concurrent writer that took the
    same number fails its insert, and the caller's retry (see `append`) reads the new head.
    """
    head = conn.execute(
        sa.select(storage.audit.c.seq, storage.audit.c.hash).order_by(storage.audit.c.seq.desc()).limit(1)
    ).first()
    seq, prev = (head.seq + 1, head.hash) if head else (1, GENESIS)
    row = {
        "seq": seq,
        "time": round(time.time(), 6),
        "actor": actor,
        "action": action.value,
        "model": model,
        "version": None if version is None else str(version),
        "release_id": release_id,
        "details": canonical(details or {}),
        "prev_hash": prev,
    }
    row["hash"] = _digest(prev, row)
    conn.execute(storage.audit.insert().values(**row))
    return row


def retrying(work: Callable[[sa.Connection], T], engine: sa.Engine | None = None) -> T:
    """Run `work(conn)` in a transaction, again while it fails on contention (see `_contention`)."""
    eng = engine or storage.engine()
    for attempt in range(_RETRIES):
        try:
            with eng.begin() as conn:
                return work(conn)
        except (sa_exc.IntegrityError, sa_exc.OperationalError, TransientStorageError) as err:
            if attempt == _RETRIES - 1 or not _contention(err):
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


# SQLite's primary result codes for a database another connection holds (extended codes keep them in the
# low byte); PostgreSQL's SQLSTATEs for a serialization failure, a deadlock and a lock not available.
_SQLITE_BUSY = {5, 6}
_PG_CONTENTION = {"40001", "40P01", "55P03"}


def _contention(err: Exception) -> bool:
    """Contention that the same work, retried, gets past: by error type and database code, never message text."""
    if isinstance(err, (TransientStorageError, sa_exc.IntegrityError)):
        # IntegrityError: a concurrent append took the same audit sequence number.
        return True
    orig = getattr(err, "orig", None)
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _SQLITE_BUSY
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) in _PG_CONTENTION


def append(
    actor: str,
    action: AuditAction,
    *,
    model: str | None = None,
    version: str | None = None,
    release_id: str | None = None,
    details: dict[str, Any] | None = None,
    engine: sa.Engine | None = None,
) -> dict[str, Any]:
    """Append one event in its own transaction."""
    return retrying(
        lambda conn: append_in(
            conn, actor, action, model=model, version=version, release_id=release_id, details=details
        ),
        engine,
    )


def events(
    *, release_id: str | None = None, model: str | None = None, engine: sa.Engine | None = None
) -> list[dict[str, Any]]:
    query = sa.select(storage.audit).order_by(storage.audit.c.seq)
    if release_id:
        query = query.where(storage.audit.c.release_id == release_id)
    if model:
        query = query.where(storage.audit.c.model == model)
    with (engine or storage.engine()).connect() as conn:
        return [dict(r._mapping) | {"details": json.loads(r.details)} for r in conn.execute(query)]


@dataclass
class ChainReport:
    ok: bool
    events: int
    head: str
    first_bad_seq: int | None = None
    message: str = ""


def verify(engine: sa.Engine | None = None) -> ChainReport:
    """Recompute the chain; report the first event whose hash or link does not match."""
    prev, count = GENESIS, 0
    with (engine or storage.engine()).connect() as conn:
        rows = conn.execute(sa.select(storage.audit).order_by(storage.audit.c.seq)).mappings()
        for expected_seq, row in enumerate(rows, start=1):
            count += 1
            if row["seq"] != expected_seq:
                return ChainReport(False, count, prev, expected_seq, f"event {expected_seq} is missing")
            if row["prev_hash"] != prev:
                return ChainReport(
                    False, count, prev, row["seq"], f"event {row['seq']} does not link to event {row['seq'] - 1}"
                )
            if _digest(prev, dict(row)) != row["hash"]:
                return ChainReport(
                    False, count, prev, row["seq"], f"event {row['seq']} was changed after it was written"
                )
            prev = row["hash"]
    return ChainReport(True, count, prev, None, f"{count} events, chain intact, head {prev[:16]}")


def sign_head(private_key: Path, engine: sa.Engine | None = None) -> dict[str, str]:
    """The current head, signed with an EC private key (ECDSA P-256, SHA-256)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    report = verify(engine)
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{private_key} is not an EC private key (audit heads are signed with ECDSA P-256)")
    payload = canonical({"seq": report.events, "head": report.head, "chain_ok": report.ok})
    signature = key.sign(payload.encode(), ec.ECDSA(hashes.SHA256()))
    return {"payload": payload, "signature": signature.hex()}


def verify_signed_head(signed: Mapping[str, str], public_keys: list[Path], engine: sa.Engine | None = None) -> bool:
    """True when a signed head was signed by a trusted key and the chain still contains it unchanged."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = json.loads(signed["payload"])
    for path in public_keys:
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TypeError(f"{path} is not an EC public key (audit heads are signed with ECDSA P-256)")
        try:
            key.verify(bytes.fromhex(signed["signature"]), signed["payload"].encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        with (engine or storage.engine()).connect() as conn:
            stored = conn.execute(sa.select(storage.audit.c.hash).where(storage.audit.c.seq == payload["seq"])).scalar()
        return stored == payload["head"] and verify(engine).ok
    return False
