"""The release's own operators: the analysis wait (defers to AnalysisTrigger), the watch after promotion
(defers to WatchTrigger), the human approval, and an experiment's wait (defers to ExperimentTrigger)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator
from airflow.sdk import BaseOperator, Context, Param

from releasegate.airflow_client import APPROVAL_REQUEST_XCOM
from releasegate_airflow import xcom
from releasegate_airflow.triggers import AnalysisTrigger, ExperimentTrigger, WatchTrigger


class AnalysisWaitOperator(BaseOperator):
    """Wait for a decisive verdict on the stage that the upstream route task opened."""

    template_fields = ("release", "route")
    ui_color = "#fde9c8"

    def __init__(self, *, release: Any, route: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.release = release
        self.route = route

    def execute(self, context: Context) -> dict[str, Any] | None:
        from releasegate import pipeline
        from releasegate.results import Opened, Routed

        release, route = xcom.pull(Opened, self.release), xcom.pull(Routed, self.route)
        # One look before deferring: a verdict that is already decisive (a broken candidate in its first
        # seconds) is recorded here (the Airflow race is explained in docs/architecture.md, "Deferral").
        verdict = pipeline.poll(release.release_id, route.stage, route.since, window_closed=False)
        if verdict.decision.decisive:
            return xcom.push(pipeline.record(release.release_id, verdict, actor=actor(context)))
        self.defer(
            trigger=AnalysisTrigger(release_id=release.release_id, route=route.model_dump(mode="json")),
            method_name="execute_complete",
        )
        return None

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from releasegate import pipeline
        from releasegate.results import Opened
        from releasegate.verdict import Verdict

        release = xcom.pull(Opened, self.release)
        return xcom.push(pipeline.record(release.release_id, Verdict.model_validate(event), actor=actor(context)))


class PostPromotionWatchOperator(BaseOperator):
    """Watch the promoted version for the policy's `watch.seconds`; a crossed limit puts the previous one back."""

    template_fields = ("release",)
    ui_color = "#d9ead3"

    def __init__(self, *, release: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.release = release

    def execute(self, context: Context) -> None:
        from releasegate import pipeline
        from releasegate.release import get
        from releasegate.results import Opened, Skipped

        release = xcom.pull(Opened, self.release)
        watching = pipeline.watch_started(release.release_id)
        if watching is None:
            state = get(release.release_id).state
            xcom.push(Skipped(reason="the policy has no watch after promotion", state=state))
            return
        self.defer(trigger=WatchTrigger(watching=watching.model_dump(mode="json")), method_name="execute_complete")

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from releasegate import pipeline
        from releasegate.results import Opened
        from releasegate.verdict import Verdict

        release = xcom.pull(Opened, self.release)
        return xcom.push(pipeline.end_watch(release.release_id, Verdict.model_validate(event), actor=actor(context)))


class ExperimentWaitOperator(BaseOperator):
    """Let the experiment run until it is decided or its time is up; returns the last look (experiments.Look)."""

    template_fields = ("started",)
    ui_color = "#e4d7f5"

    def __init__(self, *, started: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.started = started

    def execute(self, context: Context) -> dict[str, Any] | None:
        from releasegate import experiments

        started = xcom.pull(experiments.Started, self.started)
        self.defer(trigger=ExperimentTrigger(started=started.model_dump(mode="json")), method_name="execute_complete")
        return None

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        return event


def _tell_approval_requested(context: Context, release_id: str, approvers: list[str], seconds_left: float) -> None:
    """Tell the notification targets that the release waits for a person (docs/operations.md, "Notifications")."""
    from releasegate import notifications, release

    try:
        links = notifications.links(context["dag"].dag_id, context["run_id"], release_id)
        rel = release.get(release_id)
        notifications.send(notifications.approval_requested(rel, approvers, seconds_left, links, actor(context)))
    except Exception:  # the request stands whether or not anyone was told of it
        logging.getLogger(__name__).exception("could not tell that release %s awaits approval", release_id)


def window_end() -> float:
    """The end of a scheduled run's window of traffic: the run's logical date (its cron time), else now."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    moment = ctx.get("logical_date") or ctx["dag_run"].run_after
    return float(moment.timestamp())


def triggering_user(context: Context) -> str | None:
    """The Airflow user who triggered the run; None for a scheduled run."""
    return getattr(context.get("dag_run"), "triggering_user_name", None) or None


def actor(context: Context | None = None) -> str:
    """Who acts in the audit log: `airflow:<the user who triggered the run>`, or `airflow` for a scheduled run."""
    if context is None:
        from airflow.sdk import get_current_context

        context = get_current_context()
    user = triggering_user(context)
    return f"airflow:{user}" if user else "airflow"


class ReleaseDecisionOperator(HITLBranchOperator):
    """Branch to promote, roll back or finish; where the policy asks for a person, ask first and follow the answer.

    A branch task cannot hand a branch to a later branch task (its skips would already have landed),
    so the decision and the human approval are one task: it asks only when `pipeline.decide` says
    so. The request's text and timeout come from the release's policy when the task runs; no answer
    in time takes the default, roll back. Who answered, or that nobody did, goes to the audit log.

    Under `approval.separate_duties` the run's triggerer is left out of named approvers; Airflow's
    `assigned_users` can only allow, not exclude, so an approval by the triggerer is also refused
    when it arrives (audited) and the same request is asked again for the time left.
    """

    PROMOTE, ROLL_BACK = "Promote", "Roll back"
    template_fields = (*HITLBranchOperator.template_fields, "release")

    def __init__(
        self, *, release: Any, promote_task_id: str, rollback_task_id: str, finish_task_id: str, **kwargs: Any
    ):
        kwargs.pop("params", None)  # the DAG's own params (Airflow passes them in) are no question for the approver
        super().__init__(
            subject="Release approval",
            options=[self.PROMOTE, self.ROLL_BACK],
            defaults=[self.ROLL_BACK],
            options_mapping={self.PROMOTE: promote_task_id, self.ROLL_BACK: rollback_task_id},
            params={
                "comment": Param(
                    "", type=["string", "null"], title="Comment", description="Why: kept in the release's audit log."
                )
            },
            **kwargs,
        )
        self.release = release
        self.promote_task_id, self.rollback_task_id, self.finish_task_id = (
            promote_task_id,
            rollback_task_id,
            finish_task_id,
        )

    def execute(self, context: Context) -> Any:
        from releasegate import pipeline
        from releasegate.contract import Branch
        from releasegate.results import Opened

        release = xcom.pull(Opened, self.release)
        branch = pipeline.decide(release.release_id)
        tasks = {
            Branch.promote: self.promote_task_id,
            Branch.rollback: self.rollback_task_id,
            Branch.finish: self.finish_task_id,
        }
        if branch is not Branch.approve:
            return self.do_branch(context, tasks[branch])
        return self._ask(context, release.release_id)

    def _ask(self, context: Context, release_id: str) -> Any:
        """Put the request to a person (again, after a refused self-approval) and wait for the answer."""
        from releasegate import pipeline

        try:
            request = pipeline.request_approval(release_id, actor=actor(context), triggered_by=triggering_user(context))
        except pipeline.NoEligibleApprover as err:
            self.log.warning("not asking for an approval: %s", err)
            return self.do_branch(context, self.rollback_task_id)
        if request.seconds_left <= 0:
            pipeline.record_approval(release_id, approved=False, approver=None, timed_out=True)
            return self.do_branch(context, self.rollback_task_id)
        _tell_approval_requested(context, release_id, request.approvers, request.seconds_left)
        # `releasegate approve` reads who triggered the release here, to refuse their approval before sending it.
        context["ti"].xcom_push(key=APPROVAL_REQUEST_XCOM, value=request.model_dump(mode="json"))
        self.subject, self.body = request.subject, request.body
        self.response_timeout = timedelta(seconds=request.seconds_left)
        if request.approvers:
            self.assigned_users = [{"id": user, "name": user} for user in request.approvers]
        # Asked again, the request already stored keeps its text; writing it clears the refused answer.
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from releasegate import pipeline
        from releasegate.contract import Branch
        from releasegate.results import Opened

        release_id = xcom.pull(Opened, self.release).release_id
        chosen = event.get("chosen_options") or []
        user = event.get("responded_by_user") or {}
        params = event.get("params_input") or {}
        branch = pipeline.record_approval(
            release_id,
            approved=chosen == [self.PROMOTE],
            approver=user.get("name") or user.get("id"),
            timed_out=bool(event.get("timedout")),
            comment=params.get("comment") or None,
            triggered_by=triggering_user(context),
        )
        if branch is Branch.approve:
            self.log.warning(
                "an approval by the release's own triggerer is refused (separation of duties); asking again"
            )
            return self._ask(context, release_id)
        return super().execute_complete(context, event)
