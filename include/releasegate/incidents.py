"""Incidents (ITIL): what went wrong with a model in production, who owns it, how it ended.

An incident is opened, in the same transaction as its cause, when a release ends `rolled_back`, `failed`
or `invalid`, on an emergency rollback, and on a nightly or drift-watch alarm; `open_incident` opens one for
anything else (an alert). A cause that repeats while an incident with its key (model and source) is still open adds
to that incident's timeline instead of opening another. Its lifecycle:

    open -> acknowledged -> resolved -> closed        (resolved -> open: reopened)

Every move is an audit event (`incident.<state>`) and a timeline entry, and is POSTed to
RELEASEGATE_INCIDENT_WEBHOOK (ServiceNow, Jira, PagerDuty through their inbound webhooks) as the JSON
`payload` builds: docs/operations.md, "Incidents".
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel

from releasegate import audit, storage
from releasegate.contract import AuditAction
from releasegate.errors import ReleasegateError

if TYPE_CHECKING:
    from releasegate.settings import Settings

SCHEMA = "releasegate.incident/v1"  # the webhook payload's `schema`; a change of shape gets a new version


class IncidentState(StrEnum):
    open = "open"
    acknowledged = "acknowledged"
    resolved = "resolved"
    closed = "closed"


class Severity(StrEnum):
    critical = "critical"  # production traffic was affected and restored by force
    high = "high"  # a release failed or was rolled back: traffic is back on the champion, the cause is open
    medium = "medium"  # no traffic harmed: an invalid release, a drift or quality alarm
    low = "low"


MOVES: dict[IncidentState, frozenset[IncidentState]] = {
    IncidentState.open: frozenset({IncidentState.acknowledged, IncidentState.resolved}),
    IncidentState.acknowledged: frozenset({IncidentState.resolved}),
    IncidentState.resolved: frozenset({IncidentState.closed, IncidentState.open}),
    IncidentState.closed: frozenset(),
}
ACTIVE = (IncidentState.open, IncidentState.acknowledged)  # a repeat of the cause joins these
_RANK = {Severity.critical: 0, Severity.high: 1, Severity.medium: 2, Severity.low: 3}


class IncidentError(ReleasegateError):
    """An incident that does not exist, or a move its lifecycle does not allow."""


class TimelineEntry(BaseModel):
    time: float
    actor: str
    event: str  # opened | repeated | acknowledged | resolved | closed | reopened
    note: str = ""
    details: dict[str, Any] = {}


class Incident(BaseModel):
    id: int
    state: IncidentState
    severity: Severity
    title: str
    source: str  # what opened it: an audit action (release.rolled_back, emergency_rollback, ...) or `alert`
    model: str | None = None
    release_id: str | None = None
    alert: dict[str, Any] | None = None  # the alert that opened it, as Alertmanager sent it
    owner: str | None = None
    resolution: str | None = None
    review_url: str | None = None  # the post-incident review
    opened_at: float
    updated_at: float
    timeline: list[TimelineEntry] = []


def open_in(
    conn: sa.Connection,
    *,
    actor: str,
    source: str,
    severity: Severity,
    title: str,
    model: str | None = None,
    release_id: str | None = None,
    alert: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
) -> tuple[int, str]:
    """Open an incident inside the caller's transaction, or add to the active one with the same model and
    source; (its id, `opened` or `repeated`)."""
    t, now = storage.incidents, time.time()
    key = f"{model or '-'}:{source}"
    active = conn.execute(
        sa.select(t.c.id).where(t.c.dedup_key == key, t.c.state.in_([s.value for s in ACTIVE])).order_by(t.c.id)
    ).first()
    if active is not None:
        _entry(conn, active.id, now, actor, "repeated", title, details)
        conn.execute(t.update().where(t.c.id == active.id).values(updated_at=now))
        return active.id, "repeated"
    inserted = conn.execute(
        t.insert().values(
            state=IncidentState.open.value,
            severity=severity.value,
            title=title[:4000],
            source=source,
            model=model,
            release_id=release_id,
            alert=json.dumps(alert) if alert is not None else None,
            dedup_key=key,
            opened_at=now,
            updated_at=now,
        )
    ).inserted_primary_key
    assert inserted is not None  # an INSERT of one row
    incident_id = int(inserted[0])
    _entry(conn, incident_id, now, actor, "opened", title, details)
    audit.append_in(
        conn,
        actor,
        AuditAction.incident_opened,
        model=model,
        release_id=release_id,
        details={"incident": incident_id, "severity": severity.value, "source": source, "title": title[:500]},
    )
    return incident_id, "opened"


def open_incident(
    *,
    actor: str,
    source: str,
    severity: Severity,
    title: str,
    model: str | None = None,
    release_id: str | None = None,
    alert: dict[str, Any] | None = None,
    engine: sa.Engine | None = None,
    settings: Settings | None = None,
) -> Incident:
    """`open_in` in its own transaction, then the webhook told."""
    eng = engine or storage.engine(settings.db_url if settings else None)
    incident_id, event = audit.retrying(
        lambda conn: open_in(
            conn,
            actor=actor,
            source=source,
            severity=severity,
            title=title,
            model=model,
            release_id=release_id,
            alert=alert,
        ),
        eng,
    )
    found = get(incident_id, eng)
    notify(found, event, settings)
    return found


def _entry(
    conn: sa.Connection,
    incident_id: int,
    when: float,
    actor: str,
    event: str,
    note: str,
    details: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        storage.incident_events.insert().values(
            incident_id=incident_id,
            time=when,
            actor=actor,
            event=event,
            note=note[:4000],
            details=json.dumps(details or {}, default=str),
        )
    )


def move(
    incident_id: int,
    to: IncidentState,
    *,
    actor: str,
    note: str = "",
    owner: str | None = None,
    resolution: str | None = None,
    review_url: str | None = None,
    engine: sa.Engine | None = None,
    settings: Settings | None = None,
) -> Incident:
    """Move an incident along its lifecycle (IncidentError for a move it does not allow); audited, told."""
    if to is IncidentState.resolved and not (resolution or "").strip():
        raise IncidentError("resolving an incident needs its resolution: what was done")
    eng = engine or storage.engine(settings.db_url if settings else None)
    t = storage.incidents
    event = "reopened" if to is IncidentState.open else to.value

    def work(conn: sa.Connection) -> None:
        row = conn.execute(sa.select(t).where(t.c.id == incident_id)).first()
        if row is None:
            raise IncidentError(f"incident {incident_id} does not exist")
        current = IncidentState(row.state)
        if to not in MOVES[current]:
            raise IncidentError(f"incident {incident_id} is {current.value}: it cannot move to {to.value}")
        now = time.time()
        values: dict[str, Any] = {"state": to.value, "updated_at": now}
        for name, value in (("owner", owner), ("resolution", resolution), ("review_url", review_url)):
            if value is not None:
                values[name] = value
        if to is IncidentState.acknowledged and owner is None:
            values["owner"] = actor
        updated = conn.execute(t.update().where(t.c.id == incident_id, t.c.state == current.value).values(**values))
        if updated.rowcount != 1:
            raise IncidentError(f"incident {incident_id} moved while it was being moved to {to.value}")
        changed = {k: v for k, v in values.items() if k not in ("state", "updated_at")}
        _entry(conn, incident_id, now, actor, event, note, changed)
        audit.append_in(
            conn,
            actor,
            AuditAction(f"incident.{event}"),
            model=row.model,
            release_id=row.release_id,
            details={"incident": incident_id, "from": current.value, "to": to.value, "note": note, **changed},
        )

    audit.retrying(work, eng)
    found = get(incident_id, eng)
    notify(found, event, settings)
    return found


def record(
    incident_id: int,
    *,
    actor: str,
    event: str,
    note: str = "",
    details: dict[str, Any] | None = None,
    severity: Severity | None = None,
    engine: sa.Engine | None = None,
    settings: Settings | None = None,
) -> Incident:
    """Add an entry to an incident's timeline (what was done about it, or what its alert did), raising its
    severity to `severity` when that is more severe; told to the webhook."""
    eng = engine or storage.engine(settings.db_url if settings else None)
    t = storage.incidents

    def work(conn: sa.Connection) -> None:
        row = conn.execute(sa.select(t).where(t.c.id == incident_id)).first()
        if row is None:
            raise IncidentError(f"incident {incident_id} does not exist")
        now = time.time()
        values: dict[str, Any] = {"updated_at": now}
        if severity is not None and _RANK[severity] < _RANK[Severity(row.severity)]:
            values["severity"] = severity.value
        conn.execute(t.update().where(t.c.id == incident_id).values(**values))
        _entry(conn, incident_id, now, actor, event, note, details)

    audit.retrying(work, eng)
    found = get(incident_id, eng)
    notify(found, event, settings)
    return found


def record_on_active(
    source: str, model: str | None, *, actor: str, event: str, note: str = "", settings: Settings | None = None
) -> int | None:
    """`record` on the active incident of `model` and `source`, if there is one; its id."""
    eng = storage.engine(settings.db_url if settings else None)
    t = storage.incidents
    with eng.connect() as conn:
        row = conn.execute(
            sa.select(t.c.id)
            .where(t.c.dedup_key == f"{model or '-'}:{source}", t.c.state.in_([s.value for s in ACTIVE]))
            .order_by(t.c.id)
        ).first()
    if row is None:
        return None
    record(row.id, actor=actor, event=event, note=note, engine=eng, settings=settings)
    return int(row.id)


def get(incident_id: int, engine: sa.Engine | None = None) -> Incident:
    t, e = storage.incidents, storage.incident_events
    with (engine or storage.engine()).connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.id == incident_id)).first()
        if row is None:
            raise IncidentError(f"incident {incident_id} does not exist")
        entries = conn.execute(sa.select(e).where(e.c.incident_id == incident_id).order_by(e.c.id)).all()
    return _incident(row._mapping, [_timeline(r._mapping) for r in entries])


def list_incidents(
    state: IncidentState | None = None, model: str | None = None, engine: sa.Engine | None = None
) -> list[Incident]:
    """Incidents newest first, without their timelines (`get` has them)."""
    t = storage.incidents
    query = sa.select(t).order_by(t.c.id.desc())
    if state is not None:
        query = query.where(t.c.state == state.value)
    if model is not None:
        query = query.where(t.c.model == model)
    with (engine or storage.engine()).connect() as conn:
        return [_incident(row._mapping, []) for row in conn.execute(query)]


def _incident(row: Any, timeline: list[TimelineEntry]) -> Incident:
    values = {k: row[k] for k in Incident.model_fields if k != "timeline"}
    values["alert"] = json.loads(row["alert"]) if row["alert"] else None
    return Incident(**values, timeline=timeline)


def _timeline(row: Any) -> TimelineEntry:
    return TimelineEntry(
        time=row["time"], actor=row["actor"], event=row["event"], note=row["note"], details=json.loads(row["details"])
    )


def payload(incident: Incident, event: str) -> dict[str, Any]:
    """What the webhook receives: the event, and the incident as it is now (timeline included)."""
    return {"schema": SCHEMA, "event": f"incident.{event}", "incident": incident.model_dump(mode="json")}


def notify(incident: Incident, event: str, settings: Settings | None = None) -> bool:
    """POST the event to RELEASEGATE_INCIDENT_WEBHOOK (bearer RELEASEGATE_INCIDENT_WEBHOOK_TOKEN when set), and tell
    the notification targets of a newly opened one (a repeat is not news). A failure is logged, never raised: the
    incident is already recorded, and its cause must not fail with it."""
    from releasegate import notifications
    from releasegate.settings import get_settings

    settings = settings or get_settings()
    if event == "opened":
        notifications.send(notifications.incident_opened(incident, settings), settings)
    url = settings.incident_webhook
    if not url:
        return False
    return notifications.post_json(
        url,
        payload(incident, event),
        token=settings.incident_webhook_token,
        what=f"incident webhook (incident {incident.id}, {event})",
    )
