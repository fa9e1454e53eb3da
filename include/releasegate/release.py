"""The release state machine (docs/architecture.md, "The release state machine"), written down once.

`transition` is the only way a release changes state: it checks the move, updates the
`releases` row and writes the audit event in one transaction.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from releasegate import audit, incidents, storage
from releasegate.contract import AuditAction, Outcome
from releasegate.errors import ReleasegateError, TransientStorageError
from releasegate.verdict import Verdict


class State(StrEnum):
    pending = "pending"
    validating = "validating"
    signing = "signing"
    shadow = "shadow"
    canary = "canary"
    awaiting_approval = "awaiting_approval"
    promoting = "promoting"
    watching = "watching"  # promoted, the previous champion kept loaded while the watch looks for a crossed limit
    promoted = "promoted"
    rejected = "rejected"  # failed validation or signature; never routed traffic
    rolled_back = "rolled_back"  # a verdict or a human said no
    invalid = "invalid"  # sample ratio mismatch: the experiment itself is broken
    aborted = "aborted"  # an operator stopped it
    failed = "failed"  # the pipeline itself errored; traffic restored to the champion
    # An experiment (releasegate.experiments) holds the same lock: its arms are signed, then share the traffic.
    experimenting = "experimenting"
    concluded = "concluded"  # the experiment ended with its result (a winner or none); traffic back to the champion


ID_PATTERN = re.compile(r"rel-[0-9a-f]{12}")  # a release's or an experiment's id, as open_release makes it
TERMINAL = frozenset(
    {State.promoted, State.rejected, State.rolled_back, State.invalid, State.aborted, State.failed, State.concluded}
)
# The ends that open an incident (releasegate.incidents), and how severe: a rollback or a failure left traffic
# on the champion with its cause unknown; an invalid release harmed nothing but its evidence. A rejection or
# an abort is a person's decision, not an incident.
INCIDENT_SEVERITY = {
    State.rolled_back: incidents.Severity.high,
    State.failed: incidents.Severity.high,
    State.invalid: incidents.Severity.medium,
}
_ENDINGS = {State.aborted, State.failed}
MOVES: dict[State, frozenset[State]] = {
    # Signed first: validation runs the candidate, and only verified bytes are ever loaded.
    State.pending: frozenset({State.signing}) | _ENDINGS,
    State.signing: frozenset({State.validating, State.experimenting, State.rejected}) | _ENDINGS,
    State.validating: frozenset({State.shadow, State.awaiting_approval, State.promoting, State.rejected}) | _ENDINGS,
    State.shadow: frozenset(
        {State.canary, State.awaiting_approval, State.promoting, State.rolled_back, State.invalid, State.rejected}
    )
    | _ENDINGS,
    State.canary: frozenset({State.awaiting_approval, State.promoting, State.rolled_back, State.invalid}) | _ENDINGS,
    State.awaiting_approval: frozenset({State.promoting, State.rolled_back}) | _ENDINGS,
    State.promoting: frozenset({State.promoted, State.watching, State.failed}),
    # The watch after promotion: passed, or a crossed limit puts the previous champion back.
    State.watching: frozenset({State.promoted, State.rolled_back}) | _ENDINGS,
    State.experimenting: frozenset({State.concluded, State.invalid}) | _ENDINGS,
}
# Outcome of a release for `releasegate trigger --wait` and CI.
EXIT_CODES = {
    State.promoted: 0,
    State.concluded: 0,
    State.rejected: 1,
    State.rolled_back: 1,
    State.invalid: 1,
    State.aborted: 1,
    State.failed: 2,
}


class ReleaseError(ReleasegateError):
    """A move the state machine does not allow, or a release that does not exist."""


class ConcurrentChange(TransientStorageError):
    """Another writer moved the release between our read and our write: read again and retry."""


class ReleaseInProgress(ReleaseError):
    """Another release of the same model is still running."""


class Release(BaseModel):
    release_id: str
    model: str
    candidate_version: str
    champion_version: str | None
    policy: dict[str, Any]
    state: State
    verdicts: list[Verdict]
    decision: Outcome | None
    reasons: list[str]
    airflow_run_id: str | None
    started_at: float
    ended_at: float | None
    updated_at: float

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def last_verdict(self) -> Verdict | None:
        return self.verdicts[-1] if self.verdicts else None

    @classmethod
    def from_row(cls, row: Any) -> Release:
        data = dict(row._mapping)
        for key in ("policy", "verdicts", "reasons"):
            data[key] = json.loads(data[key])
        return cls(**data)


def get(release_id: str, engine: sa.Engine | None = None) -> Release:
    with (engine or storage.engine()).connect() as conn:
        row = conn.execute(sa.select(storage.releases).where(storage.releases.c.release_id == release_id)).first()
    if row is None:
        raise ReleaseError(f"release {release_id} does not exist")
    return Release.from_row(row)


def list_releases(model: str | None = None, engine: sa.Engine | None = None, limit: int = 100) -> list[Release]:
    query = sa.select(storage.releases).order_by(storage.releases.c.started_at.desc()).limit(limit)
    if model:
        query = query.where(storage.releases.c.model == model)
    with (engine or storage.engine()).connect() as conn:
        return [Release.from_row(r) for r in conn.execute(query)]


def of_run(airflow_run_id: str, engine: sa.Engine | None = None) -> Release | None:
    """The release an Airflow run opened, if it opened one."""
    query = sa.select(storage.releases).where(storage.releases.c.airflow_run_id == airflow_run_id)
    with (engine or storage.engine()).connect() as conn:
        row = conn.execute(query.order_by(storage.releases.c.started_at.desc())).first()
    return Release.from_row(row) if row else None


def active(model: str, engine: sa.Engine | None = None) -> Release | None:
    """The model's release in a non-terminal state, if any: it holds the model's release lock."""
    query = (
        sa.select(storage.releases)
        .where(storage.releases.c.model == model, storage.releases.c.state.not_in([s.value for s in TERMINAL]))
        .order_by(storage.releases.c.started_at.desc())
    )
    with (engine or storage.engine()).connect() as conn:
        row = conn.execute(query).first()
    return Release.from_row(row) if row else None


def open_release(
    model: str,
    candidate_version: str,
    champion_version: str | None,
    policy: dict[str, Any],
    *,
    airflow_run_id: str | None,
    actor: str,
    is_run_alive: Callable[[str | None], bool] = lambda run_id: True,
    close_stale: Callable[[Release], None] | None = None,
    engine: sa.Engine | None = None,
    experiment_id: str | None = None,
) -> Release:
    """Open a release, or return the one this Airflow run already opened (a retry). `experiment_id`: the
    experiment whose winner the candidate is, recorded in the audited opening (what skips its stages).

    A non-terminal release of the same model whose run is still alive refuses the new one;
    one whose run is gone is closed as `failed` first (after `close_stale` restored its traffic).
    """
    eng = engine or storage.engine()
    current = active(model, eng)
    if current is not None and airflow_run_id and current.airflow_run_id == airflow_run_id:
        return current
    if current is not None:
        if is_run_alive(current.airflow_run_id):
            raise ReleaseInProgress(
                f"{model} already has release {current.release_id} in state {current.state.value} "
                f"(Airflow run {current.airflow_run_id}); one release per model at a time"
            )
        if close_stale is not None:
            close_stale(current)
        transition(
            current.release_id,
            State.failed,
            actor=actor,
            engine=eng,
            reason=f"its Airflow run {current.airflow_run_id} is gone or failed; closed by the next release",
            details={"closed_by_run": airflow_run_id},
        )

    release_id = f"rel-{uuid.uuid4().hex[:12]}"  # ID_PATTERN
    now = time.time()

    def work(conn: sa.Connection) -> None:
        # Re-check inside the transaction: two runs racing to open both see no active release above.
        clash = conn.execute(
            sa.select(storage.releases.c.release_id).where(
                storage.releases.c.model == model, storage.releases.c.state.not_in([s.value for s in TERMINAL])
            )
        ).first()
        if clash is not None:
            raise ReleaseInProgress(f"{model} already has release {clash.release_id} in progress")
        conn.execute(
            storage.releases.insert().values(
                release_id=release_id,
                model=model,
                candidate_version=str(candidate_version),
                champion_version=None if champion_version is None else str(champion_version),
                policy=json.dumps(policy),
                state=State.pending.value,
                verdicts="[]",
                decision=None,
                reasons="[]",
                airflow_run_id=airflow_run_id,
                started_at=now,
                ended_at=None,
                updated_at=now,
            )
        )
        audit.append_in(
            conn,
            actor,
            AuditAction.release_opened,
            model=model,
            version=str(candidate_version),
            release_id=release_id,
            details={"champion": champion_version, "policy": policy.get("name"), "airflow_run_id": airflow_run_id}
            | ({"experiment_id": experiment_id} if experiment_id else {}),
        )

    audit.retrying(work, eng)
    return get(release_id, eng)


def transition(
    release_id: str,
    to: State,
    *,
    actor: str,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    decision: Outcome | None = None,
    engine: sa.Engine | None = None,
) -> Release:
    """Move a release to `to`, or do nothing if it is already there (idempotent retries).

    Raises ReleaseError for a move the state machine does not allow, e.g. out of a terminal state.
    """
    eng = engine or storage.engine()

    def work(conn: sa.Connection) -> tuple[int, str] | None:
        row = conn.execute(sa.select(storage.releases).where(storage.releases.c.release_id == release_id)).first()
        if row is None:
            raise ReleaseError(f"release {release_id} does not exist")
        current = State(row.state)
        if current == to:
            return None
        if to not in MOVES.get(current, frozenset()):
            raise ReleaseError(f"release {release_id} cannot move from {current.value} to {to.value}")
        now = time.time()
        values: dict[str, Any] = {"state": to.value, "updated_at": now}
        if reason:
            values["reasons"] = json.dumps(json.loads(row.reasons) + [reason])
        if decision:
            values["decision"] = decision
        if to in TERMINAL:
            values["ended_at"] = now
        updated = conn.execute(
            storage.releases.update()
            .where(storage.releases.c.release_id == release_id, storage.releases.c.state == current.value)
            .values(**values)
        )
        if updated.rowcount != 1:
            raise ConcurrentChange(f"release {release_id} moved while it was being moved to {to.value}")
        audit.append_in(
            conn,
            actor,
            AuditAction.moved_to(to),
            model=row.model,
            version=row.candidate_version,
            release_id=release_id,
            details={"from": current.value, "to": to.value, "reason": reason, **(details or {})},
        )
        severity = INCIDENT_SEVERITY.get(to)
        if severity is None:
            return None
        # Opened with the move, in its transaction: an ended release never lacks its incident.
        return incidents.open_in(
            conn,
            actor=actor,
            source=AuditAction.moved_to(to).value,
            severity=severity,
            title=f"{row.model} v{row.candidate_version}: release {to.value}" + (f": {reason}" if reason else ""),
            model=row.model,
            release_id=release_id,
        )

    opened = audit.retrying(work, eng)
    if opened is not None:
        incidents.notify(incidents.get(opened[0], eng), opened[1])
    return get(release_id, eng)


def record_verdict(release_id: str, verdict: Verdict, *, actor: str, engine: sa.Engine | None = None) -> Release:
    """Append a verdict to the release and to the audit log; the same verdict twice is kept once."""
    eng = engine or storage.engine()
    stored = verdict.model_dump(mode="json")

    def work(conn: sa.Connection) -> None:
        row = conn.execute(sa.select(storage.releases).where(storage.releases.c.release_id == release_id)).first()
        if row is None:
            raise ReleaseError(f"release {release_id} does not exist")
        verdicts = json.loads(row.verdicts)
        if stored in verdicts:
            return
        conn.execute(
            storage.releases.update()
            .where(storage.releases.c.release_id == release_id)
            .values(verdicts=json.dumps(verdicts + [stored]), updated_at=time.time())
        )
        audit.append_in(
            conn,
            actor,
            AuditAction.verdict,
            model=row.model,
            version=row.candidate_version,
            release_id=release_id,
            details=stored,
        )

    audit.retrying(work, eng)
    return get(release_id, eng)
