"""Alertmanager's webhook receiver: firing alerts become incidents, and actionable ones emergency rollbacks.

Alertmanager POSTs its notifications (webhook payload version 4) to the gateway's `/alerts` with an API key
of role `alerts`. Each firing alert opens an incident, or adds to the active one of its model and alert
(releasegate.incidents). An alert is actionable when its labels say `action: rollback`,
`severity: critical` and name the `model`: then an `emergency_rollback` run is triggered through Airflow's
REST API (RELEASEGATE_AIRFLOW_URL and its credentials), once per active incident of the model, so the
repeats Alertmanager sends while the alert keeps firing trigger nothing more. A trigger that fails is a
503: Alertmanager retries, and the retry triggers. A resolved alert is noted in its incident's timeline;
a person resolves the incident. docs/operations.md, "Alerts".
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from releasegate import incidents
from releasegate.serving.payloads import PayloadError
from releasegate.verdict import Decision

if TYPE_CHECKING:
    from releasegate.settings import Settings

log = logging.getLogger(__name__)

ROLLBACK_DAG = "emergency_rollback"
ACTION = Decision.rollback.value  # the `action` label of an alert that asks for a rollback
ROLLBACK_SOURCE = "alert.rollback"  # one active incident (and one rollback) per model, whichever alert fired
TRIGGERED = "rollback_triggered"  # the timeline event of a successful trigger
FAILED = "failed"  # Airflow's state of a run that ended in error
SEVERITIES = {
    "critical": incidents.Severity.critical,
    "page": incidents.Severity.critical,
    "high": incidents.Severity.high,
    "error": incidents.Severity.high,
    "warning": incidents.Severity.medium,
}


class Alert(BaseModel):
    """One alert of an Alertmanager notification (the fields releasegate reads; others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    startsAt: str | None = None
    endsAt: str | None = None
    generatorURL: str | None = None
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "unnamed")

    @property
    def actionable(self) -> bool:
        labels = self.labels
        return labels.get("action") == ACTION and labels.get("severity") == "critical" and bool(labels.get("model"))

    def summary(self) -> str:
        text = self.annotations.get("summary") or self.annotations.get("description") or ""
        return f"alert {self.name}" + (f": {text}" if text else "")


class Notification(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: str = "4"
    status: str = "firing"
    receiver: str = ""
    alerts: list[Alert] = Field(max_length=1000)


class RollbackNotTriggered(RuntimeError):
    """Airflow did not take the emergency_rollback run (503: Alertmanager retries the notification)."""


class AlertReceiver:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()  # one notification at a time: a rollback is triggered once per incident

    def receive(self, body: object, actor: str) -> list[dict[str, Any]]:
        """What was done with each alert of the notification, in order."""
        try:
            notification = Notification.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])) or "body"
            raise PayloadError(f"not an Alertmanager notification: {where}: {first['msg']}", 422) from None
        with self._lock:
            return [self._one(alert, actor) for alert in notification.alerts]

    def _one(self, alert: Alert, actor: str) -> dict[str, Any]:
        model = alert.labels.get("model")
        source = ROLLBACK_SOURCE if alert.actionable else f"alert.{alert.name}"
        done: dict[str, Any] = {"alert": alert.name, "fingerprint": alert.fingerprint, "model": model}
        if alert.status == "resolved":
            found = incidents.record_on_active(
                source, model, actor=actor, event="alert_resolved", note=alert.summary(), settings=self.settings
            )
            return done | {"incident": found, "outcome": "resolved_noted" if found else "no_active_incident"}
        severity = SEVERITIES.get(alert.labels.get("severity", ""), incidents.Severity.low)
        incident = incidents.open_incident(
            actor=actor,
            source=source,
            severity=severity,
            title=(f"{model}: " if model else "") + alert.summary(),
            model=model,
            alert=alert.model_dump(),
            settings=self.settings,
        )
        done["incident"] = incident.id
        if not alert.actionable:
            return done | {"outcome": "incident"}
        triggered = [entry for entry in incident.timeline if entry.event == TRIGGERED]
        retry_of = triggered[-1].details.get("dag_run_id") if triggered else None
        # Once per incident, unless the run it triggered failed: Alertmanager repeats a firing alert
        # (the rollback route's repeat_interval), and the repeat then tries again.
        if triggered and self._run_state(str(retry_of)) != FAILED:
            return done | {"outcome": "rollback_already_triggered"}
        assert model is not None  # actionable alerts name their model
        run_id = self._trigger(model, alert, incident.id)
        incidents.record(
            incident.id,
            actor=actor,
            event=TRIGGERED,
            note=f"{ROLLBACK_DAG} run {run_id}" + (f", again: run {retry_of} failed" if retry_of else ""),
            details={"dag_run_id": run_id, "retry_of": retry_of},
            settings=self.settings,
        )
        return done | {"outcome": TRIGGERED, "dag_run_id": run_id} | ({"retry_of": retry_of} if retry_of else {})

    def _run_state(self, run_id: str) -> str | None:
        """The state of an emergency_rollback run as Airflow reports it; None when Airflow cannot say."""
        from releasegate import airflow_client as af

        s = self.settings
        try:
            with af.AirflowClient(
                s.airflow_url, token=s.airflow_token, username=s.airflow_user, password=s.airflow_password
            ) as client:
                return str(client.dag_run(ROLLBACK_DAG, run_id).get("state"))
        except (af.AirflowError, OSError) as err:  # unknown is not failed: the run may still be going
            log.warning("state of %s run %s unknown: %s", ROLLBACK_DAG, run_id, err)
            return None

    def _trigger(self, model: str, alert: Alert, incident_id: int) -> str:
        from releasegate import airflow_client as af

        s = self.settings
        conf = {
            "model_name": model,
            "reason": alert.summary()[:2000],
            "category": "alert",
            "incident": incident_id,
            "alert": {"labels": alert.labels, "annotations": alert.annotations, "startsAt": alert.startsAt},
        }
        try:
            with af.AirflowClient(
                s.airflow_url, token=s.airflow_token, username=s.airflow_user, password=s.airflow_password
            ) as client:
                if client.dag(ROLLBACK_DAG).get("is_paused"):  # an operator's decision: said, not overridden
                    raise af.AirflowError(
                        f"the {ROLLBACK_DAG} DAG is paused in Airflow; unpause it to let alerts roll back"
                    )
                run = client.trigger(ROLLBACK_DAG, conf, note=f"alert {alert.name} (incident {incident_id})")
        except (af.AirflowError, OSError) as err:
            log.error("alert %s: emergency rollback of %s not triggered: %s", alert.name, model, err)
            raise RollbackNotTriggered(f"the emergency rollback of {model} was not triggered: {err}") from err
        return str(run["dag_run_id"])
