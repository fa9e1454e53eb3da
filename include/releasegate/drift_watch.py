"""Near-real-time drift: each champion's last minutes of logged inputs, tested as the nightly evaluation tests them.

`watch` is what dags/drift_watch.py runs every few minutes (docs/drift.md, "Near-real-time watch"). For every
model with a route, it reads a hash-uniform sample of the champion arm's inputs in the policy's window and runs
the nightly's tests on it against the version's reference data (`drift.input_drift_statistics`: the numbers of
`drift.input_drift` without Evidently's report). A window over the policy's `max_drifted_share` is an alarm: an
audit event every run that sees it, and an incident keyed by model and source. The run that opens the incident
also calls the alert hook and flags retraining; the runs after it, while the incident is active, only add to its
timeline, so a shift that persists alarms once. The nightly job still makes the full reports.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel

from releasegate import audit, drift, incidents, privacy
from releasegate.contract import Arm, AuditAction
from releasegate.settings import Settings, get_settings

if TYPE_CHECKING:
    from releasegate.policy import Policy

log = logging.getLogger(__name__)

SOURCE = AuditAction.drift_watch_alarm  # the incidents' source: one active incident per model


class Watched(BaseModel):
    """One champion's window: what was tested, what drifted, and whether this run raised the alarm."""

    model: str
    version: str
    since: float
    until: float
    requests: int = 0  # the champion's requests in the window
    input_drift: dict[str, Any] | None = None  # drift.DriftStatistics of the sample
    reasons: list[str] = []
    incident: int | None = None
    new_alarm: bool = False  # this run opened the incident: alert and flag retraining
    note: str = ""
    error: str | None = None  # why the model could not be watched (no reference, data that cannot be compared)
    seconds: float = 0.0

    @property
    def alarm(self) -> bool:
        return bool(self.reasons)


def champions(engine: sa.Engine) -> list[tuple[str, str]]:
    """(model, champion version) of every model with a route, from the routes table the gateway serves."""
    from releasegate import storage

    t = storage.routes
    with engine.connect() as conn:
        return [(r.model, r.champion_version) for r in conn.execute(sa.select(t.c.model, t.c.champion_version))]


def watch(
    until: float,
    policy: str | Policy = "default",
    actor: str = "drift_watch",
    settings: Settings | None = None,
) -> list[Watched]:
    """Every champion's window ending at `until`, tested; alarms audited, incidents opened, new ones alerted."""
    from releasegate import policy as policy_module
    from releasegate import storage

    settings = settings or get_settings()
    if isinstance(policy, str):
        policy = policy_module.load(policy, settings.policy_dirs)
    engine = storage.engine(settings.db_url)
    results = []
    for model, version in champions(engine):
        try:
            results.append(check(model, version, until, policy, actor, settings, engine))
        except (LookupError, ValueError) as err:  # one model's missing reference must not blind the watch to the rest
            log.error("drift watch of %s v%s: %s", model, version, err)
            since = until - policy.monitoring.watch.window_minutes * 60
            results.append(Watched(model=model, version=version, since=since, until=until, error=str(err)))
    new = [r.model_dump(mode="json") for r in results if r.new_alarm]
    if new:
        from releasegate import nightly

        nightly.post_alert(str(alert_message(new)), new, settings)
    return results


def check(
    model: str,
    version: str,
    until: float,
    policy: Policy,
    actor: str,
    settings: Settings,
    engine: sa.Engine,
) -> Watched:
    """One champion's window: read, tested, and on drift the audit event and the incident."""
    started = time.perf_counter()
    limits = policy.monitoring
    since = until - limits.watch.window_minutes * 60
    result = Watched(model=model, version=version, since=since, until=until)
    current = drift.read_logged_inputs(
        model, since, until, arm=Arm.champion, max_rows=limits.watch.max_rows, engine=engine
    )
    result.requests = int(current.attrs.get("requests_in_window", len(current)))
    if result.requests < limits.watch.min_rows:
        result.note = (
            f"{model}: {result.requests} requests between {_clock(since)} and {_clock(until)}, fewer than the "
            f"{limits.watch.min_rows} a window needs: not tested"
        )
        result.seconds = time.perf_counter() - started
        return result

    from releasegate import registry  # MLflow is slow to import; a quiet model never needs it

    with tempfile.TemporaryDirectory(prefix="rg-drift-watch-") as tmp:
        reference = registry.read_frame(model, version, drift.REFERENCE_ARTIFACT, dst=Path(tmp), settings=settings)
    found = drift.input_drift_statistics(reference, current, decrypt=privacy.report_allowance(model, settings))
    result.input_drift = found.model_dump()
    if found.drifted_share > limits.max_drifted_share:
        result.reasons.append(
            f"input drift in {len(found.drifted_columns)} of {len(found.columns)} columns "
            f"({found.drifted_share:.0%} > {limits.max_drifted_share:.0%}) in the "
            f"{limits.watch.window_minutes:g} minutes to {_clock(until)}: " + ", ".join(found.drifted_columns)
        )
    if result.alarm:
        _raise_alarm(result, actor, settings, engine)
    result.seconds = time.perf_counter() - started
    return result


def _raise_alarm(result: Watched, actor: str, settings: Settings, engine: sa.Engine) -> None:
    """The audit event, and the model's incident opened (a new alarm) or added to (the same shift, again)."""
    title = f"{result.model} v{result.version}: {'; '.join(result.reasons)}"
    details = {"since": result.since, "until": result.until, "requests": result.requests, "reasons": result.reasons}

    def work(conn: sa.Connection) -> tuple[int, str]:
        audit.append_in(
            conn,
            actor,
            AuditAction.drift_watch_alarm,
            model=result.model,
            version=result.version,
            details=result.model_dump(mode="json", exclude={"seconds"}),
        )
        return incidents.open_in(
            conn,
            actor=actor,
            source=SOURCE.value,
            severity=incidents.Severity.medium,
            title=title,
            model=result.model,
            details=details,
        )

    result.incident, event = audit.retrying(work, engine)
    result.new_alarm = event == "opened"
    incidents.notify(incidents.get(result.incident, engine), event, settings)
    log.warning("%s (incident %d, %s)", title, result.incident, event)


def alert_message(results: list[dict[str, Any]]) -> str | None:
    """One sentence per new alarm and per model that could not be watched; None when there is neither."""
    new = [r for r in results if r.get("new_alarm")]
    failed = [r for r in results if r.get("error")]
    parts = []
    if new:
        parts.append(
            "input drift: "
            + " | ".join(
                f"{r['model']} v{r['version']}: {'; '.join(r['reasons'])} (incident {r['incident']})" for r in new
            )
        )
    if failed:
        parts.append("not watched: " + " | ".join(f"{r['model']} v{r['version']}: {r['error']}" for r in failed))
    return " || ".join(parts) or None


def summary(results: list[dict[str, Any]]) -> str:
    """What a run without a new alarm says."""
    if not results:
        return "no model has a route: nothing to watch"
    lines = []
    for r in results:
        if r["note"]:
            lines.append(r["note"])
        elif r["reasons"]:
            lines.append(f"{r['model']} v{r['version']}: drift persists (incident {r['incident']})")
        else:
            lines.append(f"{r['model']} v{r['version']}: {r['requests']} requests, no drift")
    return "; ".join(lines)


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")
