"""The analysis wait as an operator: defers to AnalysisTrigger, records the verdict it returns."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from releasegate_airflow.triggers import AnalysisTrigger


class AnalysisWaitOperator(BaseOperator):
    """Wait for a decisive verdict on the stage that the upstream route task opened."""

    template_fields = ("release", "route")
    ui_color = "#fde9c8"

    def __init__(self, *, release: Any, route: Any, **kwargs):
        super().__init__(**kwargs)
        self.release = release
        self.route = route

    def execute(self, context) -> None:
        route = self.route
        if not route or "skipped" in route:
            raise AirflowSkipException((route or {}).get("skipped", "no traffic was routed"))
        self.defer(
            trigger=AnalysisTrigger(
                release_id=self.release["release_id"], analysis_stage=route["analysis_stage"],
                since=route["since"], candidate_weight=route["candidate_weight"],
                window_seconds=route["window_seconds"], max_extensions=route["max_extensions"],
                poll_seconds=route["poll_seconds"]),
            method_name="execute_complete")

    def execute_complete(self, context, event: dict) -> dict:
        from releasegate import pipeline

        return pipeline.record(self.release["release_id"], event, actor=_actor(context))


def _actor(context) -> str:
    user = getattr(context.get("dag_run"), "triggering_user_name", None)
    return f"airflow:{user}" if user else "airflow"
