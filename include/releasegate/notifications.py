"""Notifications: the moments people are told about, sent to the targets the settings name.

Four events (`contract.NotificationEvent`): a release's outcome, an approval requested, an emergency
rollback, an incident opened. Each is a `Notification`, sent as the JSON `payload` builds
(`releasegate.notification/v1`, docs/operations.md, "Notifications") to RELEASEGATE_NOTIFY_WEBHOOK, and as a
title and a text to every
RELEASEGATE_NOTIFY_APPRISE_URLS target when the `apprise` package is installed. Sending never raises:
what it tells of has already happened, and a dead target must not fail it. The DAGs send theirs from
Airflow callbacks (`releasegate_airflow.notifier`); an incident is told by `incidents.notify`.
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pydantic import BaseModel

from releasegate.contract import AuditAction, NotificationEvent

if TYPE_CHECKING:
    import sqlalchemy as sa

    from releasegate.incidents import Incident
    from releasegate.release import Release
    from releasegate.settings import Settings

log = logging.getLogger(__name__)

SCHEMA = "releasegate.notification/v1"  # the payload's `schema`; a change of shape gets a new version


class Channel(StrEnum):
    webhook = "webhook"
    apprise = "apprise"


class Links(BaseModel):
    airflow_run: str | None = None
    dashboard: str | None = None


class Notification(BaseModel):
    """What happened, to which model and release, how it ended and why, and where to look."""

    event: NotificationEvent
    title: str  # one sentence: a chat message, a mail's subject
    model: str | None = None
    release_id: str | None = None
    version: str | None = None  # the candidate; for a rollback, the version serving now
    from_version: str | None = None  # the champion the candidate was to replace; the version rolled away from
    state: str  # a release's state; `rolled_back` or `failed` for a rollback; an incident's state
    reasons: list[str] = []
    actor: str | None = None
    incident: int | None = None
    severity: str | None = None  # an incident's
    links: Links = Links()
    time: float


def payload(note: Notification) -> dict[str, Any]:
    """What the webhook receives."""
    return {"schema": SCHEMA, **note.model_dump(mode="json")}


def text(note: Notification) -> str:
    """The notification as a few lines a person reads (Apprise's body)."""
    lines = [note.title, *(f"- {reason}" for reason in note.reasons)]
    lines += [f"{name.replace('_', ' ')}: {url}" for name, url in note.links.model_dump().items() if url]
    return "\n".join(lines)


def links(dag_id: str, run_id: str | None, release_id: str | None = None, settings: Settings | None = None) -> Links:
    """The Airflow run's page and the release's dashboard page, at the address people reach Airflow by."""
    settings = _settings(settings)
    return Links(
        airflow_run=f"{_base(settings)}/dags/{quote(dag_id)}/runs/{quote(run_id, safe='')}" if run_id else None,
        dashboard=_dashboard(release_id, settings) if release_id else None,
    )


def _dashboard(release_id: str, settings: Settings | None = None) -> str:
    return f"{_base(_settings(settings))}/releasegate/releases/{quote(release_id)}"


def _base(settings: Settings) -> str:
    return (settings.notify_links_url or settings.airflow_url).rstrip("/")


def release_outcome(rel: Release, links: Links) -> Notification:
    """How a release ended (or where it stands, when its run failed before it ended), from its row."""
    how = rel.state.value if rel.terminal else f"left {rel.state.value}: its run ended before it did"
    return Notification(
        event=NotificationEvent.release_outcome,
        title=f"{rel.model} v{rel.candidate_version}: release {rel.release_id} {how}",
        model=rel.model,
        release_id=rel.release_id,
        version=rel.candidate_version,
        from_version=rel.champion_version,
        state=rel.state.value,
        reasons=rel.reasons,
        links=links,
        time=time.time(),
    )


def run_failed(model: str | None, reason: str, links: Links) -> Notification:
    """A release run that failed before it opened a release (another one running, a candidate not found)."""
    from releasegate.release import State

    return Notification(
        event=NotificationEvent.release_outcome,
        title=f"{model or 'a model'}: release run failed before a release was opened",
        model=model,
        state=State.failed.value,
        reasons=[reason],
        links=links,
        time=time.time(),
    )


def approval_requested(
    rel: Release, approvers: list[str], seconds_left: float, links: Links, actor: str | None = None
) -> Notification:
    """A release that waits for a person, who may answer, and for how long."""
    who = ", ".join(approvers) if approvers else "anyone allowed to approve in Airflow"
    return Notification(
        event=NotificationEvent.approval_requested,
        title=f"{rel.model} v{rel.candidate_version}: release {rel.release_id} awaits approval "
        f"({who}) within {_duration(seconds_left)}",
        model=rel.model,
        release_id=rel.release_id,
        version=rel.candidate_version,
        from_version=rel.champion_version,
        state=rel.state.value,
        reasons=rel.reasons[-1:],
        actor=actor,
        links=links,
        time=time.time(),
    )


def rollback(model: str, links: Links, failure: str | None = None, engine: sa.Engine | None = None) -> Notification:
    """An emergency rollback of `model` as its run ended: the last `emergency_rollback` audit event, or why it failed."""
    from releasegate import audit
    from releasegate.release import State

    if failure is not None:
        return Notification(
            event=NotificationEvent.rollback,
            title=f"{model}: emergency rollback failed",
            model=model,
            state=State.failed.value,
            reasons=[failure],
            links=links,
            time=time.time(),
        )
    events = audit.events(model=model, action=AuditAction.emergency_rollback.value, engine=engine)
    if not events:
        return rollback(model, links, failure="no emergency_rollback event was recorded", engine=engine)
    event = events[-1]
    details = event["details"]
    aborted = details.get("aborted_release") or {}
    return Notification(
        event=NotificationEvent.rollback,
        title=f"{model}: emergency rollback from v{details.get('from_version')} to v{details.get('to_version')}",
        model=model,
        release_id=aborted.get("release_id"),
        version=details.get("to_version"),
        from_version=details.get("from_version"),
        state=State.rolled_back.value,
        reasons=[details.get("reason") or ""],
        actor=event["actor"],
        links=links.model_copy(update={"dashboard": _dashboard(aborted["release_id"]) if aborted else None}),
        time=time.time(),
    )


def incident_opened(incident: Incident, settings: Settings | None = None) -> Notification:
    """A new incident: its severity, what opened it, and the release it is about."""
    link = links("model_release", None, incident.release_id, settings) if incident.release_id else Links()
    return Notification(
        event=NotificationEvent.incident_opened,
        title=f"incident {incident.id} ({incident.severity.value}): {incident.title}"[:500],
        model=incident.model,
        release_id=incident.release_id,
        state=incident.state.value,
        reasons=[incident.title],
        actor=incident.timeline[0].actor if incident.timeline else None,
        incident=incident.id,
        severity=incident.severity.value,
        links=link,
        time=incident.opened_at,
    )


def send(note: Notification, settings: Settings | None = None) -> list[Channel]:
    """Send to every target the settings name; the channels that took it. Failures are logged, never raised."""
    settings = _settings(settings)
    took: list[Channel] = []
    if settings.notify_webhook and post_json(
        settings.notify_webhook,
        payload(note),
        token=settings.notify_webhook_token,
        timeout=settings.notify_timeout,
        what=f"notification webhook ({note.event.value})",
    ):
        took.append(Channel.webhook)
    if settings.notify_apprise_urls and _apprise(note, settings.notify_apprise_urls):
        took.append(Channel.apprise)
    return took


def post_json(url: str, body: Any, *, token: str | None = None, timeout: float = 10.0, what: str) -> bool:
    """POST `body` as JSON (bearer `token` when given); False, logged, when the target fails or cannot be reached."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        httpx.post(url, json=body, headers=headers, timeout=timeout).raise_for_status()
    except httpx.HTTPError as err:
        # Scheme and host only: a chat's webhook URL holds its secret in the path.
        log.error("%s at %s failed: %s", what, _where(url), err)
        return False
    return True


def _apprise(note: Notification, urls: list[str]) -> bool:
    try:
        import apprise
    except ImportError:
        log.warning(
            "RELEASEGATE_NOTIFY_APPRISE_URLS is set but the apprise package is not installed "
            "(pip install apache-airflow-providers-apprise): %s not sent there",
            note.event.value,
        )
        return False
    try:
        targets = apprise.Apprise()
        for url in urls:
            if not targets.add(url):
                log.error(
                    "apprise does not understand a %s:// URL of RELEASEGATE_NOTIFY_APPRISE_URLS", url.split(":")[0]
                )
        return bool(targets.notify(title=note.title, body=text(note)))
    except Exception as err:  # a plugin's own error: the event has happened, the notification is best effort
        log.error("apprise failed to send %s: %s", note.event.value, err)
        return False


def _where(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(max(seconds, 0)), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min"


def _settings(settings: Settings | None) -> Settings:
    from releasegate.settings import get_settings

    return settings or get_settings()
