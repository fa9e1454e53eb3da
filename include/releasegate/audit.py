"""Append-only, hash-chained audit log: every event commits to the one before it, and its head is anchored.

Editing, deleting or reordering a row breaks the chain from that row on; `verify` finds the
first break. The chain alone cannot show that its last events were deleted, nor that the
whole table was rewritten with fresh hashes, so every committed event also moves a signed
head (sequence number and hash, ECDSA P-256 with the audit key) forward in a file outside
the database (`Anchor`, settings `audit_head` and `audit_key`). `verify` checks the chain
against that head: a log that ends before it was truncated, a log whose event at the head
differs was rewritten, and events after it were signed by no key holder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from releasegate import storage
from releasegate.contract import AuditAction
from releasegate.errors import TransientStorageError

T = TypeVar("T")
log = logging.getLogger(__name__)

GENESIS = "0" * 64
_RETRIES = 50
# Rows appended in the open transaction, kept on the connection until `retrying` has committed them.
_PENDING = "releasegate.audit.pending"


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
    Commit through `retrying`, which moves the anchored head once the event is committed.
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
    conn.info.setdefault(_PENDING, []).append(row)
    return row


def retrying(work: Callable[[sa.Connection], T], engine: sa.Engine | None = None) -> T:
    """Run `work(conn)` in a transaction, again while it fails on contention (see `_contention`).

    Once the transaction has committed, the anchored head moves to the last event it appended.
    """
    eng = engine or storage.engine()
    for attempt in range(_RETRIES):
        try:
            with eng.begin() as conn:
                conn.info.pop(_PENDING, None)  # left by a transaction that rolled back on this connection
                result = work(conn)
                appended: list[dict[str, Any]] = conn.info.pop(_PENDING, [])
        except (sa_exc.IntegrityError, sa_exc.OperationalError, TransientStorageError) as err:
            if attempt == _RETRIES - 1 or not _contention(err):
                raise
            time.sleep(0.01 * (attempt + 1))
            continue
        if appended:
            _move_anchor(eng, appended[-1])
        return result
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
    *,
    release_id: str | None = None,
    model: str | None = None,
    version: str | None = None,
    action: str | None = None,
    engine: sa.Engine | None = None,
) -> list[dict[str, Any]]:
    """The events that match every filter given, oldest first, their details parsed."""
    query = sa.select(storage.audit).order_by(storage.audit.c.seq)
    if release_id:
        query = query.where(storage.audit.c.release_id == release_id)
    if model:
        query = query.where(storage.audit.c.model == model)
    if version:
        query = query.where(storage.audit.c.version == version)
    if action:
        query = query.where(storage.audit.c.action == action)
    with (engine or storage.engine()).connect() as conn:
        return [dict(r._mapping) | {"details": json.loads(r.details)} for r in conn.execute(query)]


# --- the anchored head -------------------------------------------------------------------------


class AnchorError(Exception):
    """An anchored head that cannot be read, or whose signature the audit key does not verify."""


@dataclass(frozen=True)
class SignedHead:
    """The chain's head as a key holder signed it: the event's sequence number and hash."""

    seq: int
    head: str
    signed_at: float
    payload: str
    signature: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "head": self.head,
            "signed_at": self.signed_at,
            "payload": self.payload,
            "signature": self.signature,
        }


_keys: dict[tuple[Path, int], Any] = {}


def _load_key(path: Path, private: bool) -> Any:
    """A PEM key, parsed once per file version (signing every event should not re-parse it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cache_key = (path, path.stat().st_mtime_ns)
    if cache_key not in _keys:
        data = path.read_bytes()
        key: Any = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
        wanted = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
        if not isinstance(key, wanted):
            raise TypeError(f"{path} is not an EC key (audit heads are signed with ECDSA P-256)")
        _keys[cache_key] = key
    return _keys[cache_key]


@dataclass(frozen=True)
class Anchor:
    """Where the signed head lives outside the database, and the key pair that signs and checks it.

    The checking side needs only the public key beside the private one (`<name>.pub`), so a
    host that shows the chain (the dashboard's) need not hold the private key.
    """

    path: Path
    private_key: Path

    @property
    def public_key(self) -> Path:
        return self.private_key.with_suffix(".pub")

    @property
    def can_sign(self) -> bool:
        return self.private_key.is_file()

    @property
    def can_check(self) -> bool:
        return self.public_key.is_file() or self.private_key.is_file()

    def _verifier(self) -> Any:
        if self.public_key.is_file():
            return _load_key(self.public_key, private=False)
        return _load_key(self.private_key, private=True).public_key()

    def sign(self, seq: int, head: str) -> SignedHead:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        signed_at = round(time.time(), 6)
        payload = canonical({"seq": seq, "head": head, "signed_at": signed_at})
        signature = _load_key(self.private_key, private=True).sign(payload.encode(), ec.ECDSA(hashes.SHA256()))
        return SignedHead(seq, head, signed_at, payload, signature.hex())

    def read(self) -> SignedHead | None:
        """The anchored head, its signature checked; None when none is anchored yet. Raises AnchorError."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            payload, signature = str(stored["payload"]), bytes.fromhex(stored["signature"])
            fields = json.loads(payload)
            head = SignedHead(
                int(fields["seq"]), str(fields["head"]), float(fields["signed_at"]), payload, stored["signature"]
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AnchorError(f"the signed head at {self.path} is unreadable ({type(err).__name__}: {err})") from err
        try:
            self._verifier().verify(signature, payload.encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise AnchorError(
                f"the signed head at {self.path} does not verify with the audit key {self.public_key}"
            ) from None
        except (OSError, ValueError, TypeError) as err:
            raise AnchorError(f"the audit key cannot check the signed head at {self.path}: {err}") from err
        return head

    def write(self, head: SignedHead) -> None:
        """Replace the anchored head in one step (a reader sees the old file or the new one, never half)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(head.as_json(), out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    def locked(self) -> _FileLock:
        """Serializes movers of the head across threads and processes (a lock file beside it)."""
        return _FileLock(self.path.with_name(self.path.name + ".lock"))


class _FileLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _anchors(eng: sa.Engine) -> Anchor | None:
    """The anchor of the configured database's audit log; none for another database (a test's, a copy)."""
    from releasegate.settings import get_settings

    settings = get_settings()
    if eng.url != sa.engine.make_url(settings.db_url):
        return None
    return Anchor(settings.audit_head, settings.audit_key)


def _segment(conn: sa.Connection, after_seq: int, after_hash: str, to_seq: int) -> str | None:
    """Why the rows after `after_seq` up to `to_seq` do not extend `after_hash`, or None when they do."""
    rows = conn.execute(
        sa.select(storage.audit)
        .where(storage.audit.c.seq > after_seq, storage.audit.c.seq <= to_seq)
        .order_by(storage.audit.c.seq)
    ).mappings()
    report = _check_rows(rows, start_seq=after_seq + 1, start_hash=after_hash)
    if not report.ok:
        return report.message
    return None if report.events == to_seq - after_seq else f"events up to {to_seq} are missing"


def _move_anchor(eng: sa.Engine, row: Mapping[str, Any]) -> None:
    """Sign the committed event as the new head if it extends the anchored one: never backwards, never onto a fork.

    Every commit moves it (not every N events), so no event however recent can be deleted unseen,
    for one signature and one small file write per commit. A failure is logged, not raised: the
    event is committed, and `verify` reports the head that did not move.
    """
    anchor = _anchors(eng)
    if anchor is None or not anchor.can_sign:
        return
    try:
        with anchor.locked():
            try:
                current = anchor.read()
            except AnchorError as err:
                # Unreadable, or signed by another key (the audit key was rotated): anchor afresh on an intact chain.
                log.warning("re-anchoring the audit log: %s", err)
                current = None
            if current is not None and current.seq >= row["seq"]:
                return  # a later event of a concurrent writer is anchored already
            after_seq, after_hash = (current.seq, current.head) if current else (0, GENESIS)
            with eng.connect() as conn:
                problem = _segment(conn, after_seq, after_hash, row["seq"])
                at_row = conn.execute(sa.select(storage.audit.c.hash).where(storage.audit.c.seq == row["seq"])).scalar()
            if problem is None and at_row != row["hash"]:
                problem = f"event {row['seq']} in the database is not the one just written"
            if problem is not None:
                log.error(
                    "audit head left at event %s: the log does not extend it (%s); `releasegate audit verify` says more",
                    after_seq,
                    problem,
                )
                return
            anchor.write(anchor.sign(row["seq"], row["hash"]))
    except (OSError, TypeError, ValueError, sa_exc.SQLAlchemyError) as err:
        log.error("could not anchor the audit head at %s: %s", anchor.path, err)


# --- verification ------------------------------------------------------------------------------


class ChainFailure(StrEnum):
    """Which way a log fails to verify: what `releasegate audit verify` and the dashboard name."""

    missing = "missing"  # a sequence number is skipped: an event in the middle was deleted
    edited = "edited"  # an event no longer matches its own hash
    relinked = "relinked"  # an event does not point at the one before it
    reordered = "reordered"  # events are out of the order they were written in
    truncated = "truncated"  # the log ends before the anchored head: its last events were deleted
    rewritten = "rewritten"  # the event at the anchored head is not the one that was signed
    unanchored = "unanchored"  # events after the anchored head that no holder of the audit key signed
    no_anchor = "no_anchor"  # the audit key exists, events exist, and no signed head is anchored
    bad_anchor = "bad_anchor"  # the anchored head is unreadable, or the audit key did not sign it


@dataclass
class ChainReport:
    ok: bool
    events: int
    head: str
    first_bad_seq: int | None = None
    message: str = ""
    failure: ChainFailure | None = None
    anchored_seq: int | None = None  # the sequence number of the signed head checked; None: no anchor


def _check_rows(rows: Iterable[sa.RowMapping], start_seq: int = 1, start_hash: str = GENESIS) -> ChainReport:
    """Recompute a run of rows (by seq) from `start_hash`; the first event whose number, link or hash is wrong."""
    listed = list(rows)
    by_hash = {row["hash"]: row["seq"] for row in listed}
    prev, count = start_hash, 0
    for expected_seq, row in enumerate(listed, start=start_seq):
        count += 1
        seq = row["seq"]
        if seq != expected_seq:
            return ChainReport(
                False, count, prev, expected_seq, f"event {expected_seq} is missing", ChainFailure.missing
            )
        if row["prev_hash"] != prev:
            # Its link names another event of the log: the events were put in another order than written.
            linked = by_hash.get(row["prev_hash"])
            if linked is not None and linked != seq - 1:
                return ChainReport(
                    False,
                    count,
                    prev,
                    seq,
                    f"event {seq} was written after the event now numbered {linked}: the events were reordered",
                    ChainFailure.reordered,
                )
            return ChainReport(
                False, count, prev, seq, f"event {seq} does not link to event {seq - 1}", ChainFailure.relinked
            )
        if _digest(prev, dict(row)) != row["hash"]:
            return ChainReport(
                False, count, prev, seq, f"event {seq} was changed after it was written", ChainFailure.edited
            )
        prev = row["hash"]
    return ChainReport(True, count, prev)


def _verify_once(eng: sa.Engine, anchor: Anchor | None) -> ChainReport:
    # The head is read before the rows: every event it covers was committed before it was written,
    # so the rows read next include them (a head read after the rows could be ahead of them).
    anchored = anchor is not None and (anchor.can_check or anchor.path.exists())
    signed: SignedHead | None = None
    anchor_problem: str | None = None
    if anchor is not None and anchored:
        if not anchor.can_check:
            anchor_problem = f"no audit key to check the signed head at {anchor.path} ({anchor.public_key} is missing)"
        else:
            try:
                signed = anchor.read()
            except AnchorError as err:
                anchor_problem = str(err)
    with eng.connect() as conn:
        rows = list(conn.execute(sa.select(storage.audit).order_by(storage.audit.c.seq)).mappings())
    report = _check_rows(rows)
    if not report.ok:
        return report
    n, head = report.events, report.head
    if anchor is None or not anchored:
        return ChainReport(
            True, n, head, None, f"{n} events, chain intact, head {head[:16]} (not anchored: no audit key)"
        )
    if anchor_problem is not None:
        return ChainReport(False, n, head, None, anchor_problem, ChainFailure.bad_anchor)
    if signed is None:
        if n == 0:
            return ChainReport(True, 0, head, None, "0 events")
        return ChainReport(
            False,
            n,
            head,
            1,
            f"no signed head is anchored at {anchor.path} for the {n} events in the database "
            "(deleted, or not written yet: the next event anchors one)",
            ChainFailure.no_anchor,
        )
    if n < signed.seq:
        gone = f"event {signed.seq} was" if signed.seq == n + 1 else f"events {n + 1}–{signed.seq} were"
        return ChainReport(
            False,
            n,
            head,
            n + 1,
            f"the log ends at event {n}, but the signed head is at event {signed.seq}: {gone} deleted",
            ChainFailure.truncated,
            signed.seq,
        )
    if rows[signed.seq - 1]["hash"] != signed.head:  # an intact chain numbers its rows 1..n
        return ChainReport(
            False,
            n,
            head,
            signed.seq,
            f"event {signed.seq} is not the one the audit key signed: the log was rewritten up to there",
            ChainFailure.rewritten,
            signed.seq,
        )
    if n > signed.seq:
        return ChainReport(
            False,
            n,
            head,
            signed.seq + 1,
            f"events {signed.seq + 1}–{n} come after the signed head at event {signed.seq}: no holder of the "
            "audit key signed them (written into the database directly, or by a process without the key)",
            ChainFailure.unanchored,
            signed.seq,
        )
    return ChainReport(
        True, n, head, None, f"{n} events, chain intact, head {head[:16]} signed and anchored", None, signed.seq
    )


def verify(engine: sa.Engine | None = None) -> ChainReport:
    """Recompute the chain and check it against the anchored signed head; report the first problem found."""
    eng = engine or storage.engine()
    anchor = _anchors(eng)
    report = _verify_once(eng, anchor)
    # A writer commits an event, then anchors it: a reader between the two sees an event not yet signed.
    for attempt in range(3):
        if report.failure not in (ChainFailure.unanchored, ChainFailure.no_anchor):
            break
        time.sleep(0.1 * (attempt + 1))
        report = _verify_once(eng, anchor)
    return report


def sign_head(private_key: Path, engine: sa.Engine | None = None) -> dict[str, str]:
    """The current head, verified and signed with an EC private key (ECDSA P-256, SHA-256): a release's copy."""
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
