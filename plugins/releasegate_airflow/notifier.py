"""Airflow's notifier for releasegate's DAG runs: how a release or an emergency rollback ended, told to the
targets the settings name (`releasegate.notifications`; docs/operations.md, "Notifications")."""

from __future__ import annotations

from typing import Any

from airflow.sdk.bases.notifier import BaseNotifier

from releasegate.contract import NotificationEvent


class RunNotifier(BaseNotifier):
    """A DAG's or a task's `on_success_callback` / `on_failure_callback`: the outcome of the run's release or rollback.

    The outcome is read from releasegate's own records (the release row `finish` closed, the
    `emergency_rollback` audit event), not from the run, so the notification says what releasegate says.
    Nothing it meets is raised: the run has ended, and a notification cannot change how.
    """

    def __init__(self, event: NotificationEvent, *, failed: bool = False):
        super().__init__()
        if event not in (NotificationEvent.release_outcome, NotificationEvent.rollback):
            raise ValueError(f"a DAG run tells a release outcome or a rollback, not {event.value}")
        self.event, self.failed = event, failed

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing is templated; and the DAG `dag.test()` hands a DAG callback cannot render (it is serialized)."""

    def notify(self, context: Any) -> None:
        try:
            self._notify(context)
        except Exception:
            self.log.exception("releasegate could not tell the %s of run %s", self.event.value, context.get("run_id"))

    def _notify(self, context: Any) -> None:
        from releasegate import notifications
        from releasegate import release as releases

        dag_id, run_id = context["dag"].dag_id, context.get("run_id")
        model = _model(context)
        why = None
        if self.failed:  # a task's callback has the exception; a DAG's, the reason the run failed
            why = f"the Airflow run failed: {context.get('exception') or context.get('reason') or 'see its tasks'}"
        if self.event is NotificationEvent.rollback:
            note = notifications.rollback(model or "?", notifications.links(dag_id, run_id), failure=why)
        else:
            rel = releases.of_run(run_id) if run_id else None
            links = notifications.links(dag_id, run_id, rel.release_id if rel else None)
            if rel is not None:
                note = notifications.release_outcome(rel, links)
            else:
                note = notifications.run_failed(model, why or "no release was opened", links)
        notifications.send(note)


def _model(context: Any) -> str | None:
    """The run's model: its `model_name` parameter (the trigger form's, or the conf's)."""
    params = context.get("params") or {}
    dag_run = context.get("dag_run")
    conf = getattr(dag_run, "conf", None) or {}
    return params.get("model_name") or conf.get("model_name")
