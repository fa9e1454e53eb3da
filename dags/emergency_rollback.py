"""
# Emergency rollback

Puts a model back on its **`previous` champion at once**, from the trigger form, without
waiting for a release's evidence:

1. **roll_back**: all traffic to the previous champion (the gateway loads and verifies it
   first); an open release of the model is closed as `aborted`; the `champion` alias moves
   back to the previous version; who triggered it and why go to the audit log, and a critical
   incident is opened (or, when an Alertmanager alert triggered it, recorded in the alert's).

When the run ends, the rollback (or its failure) is sent to the notification targets
(`RELEASEGATE_NOTIFY_WEBHOOK`, Apprise URLs).

Use it when the live champion is hurting users. It always goes one champion back; to stop
only a release still in shadow or canary, keeping the champion, use `releasegate abort`.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from releasegate.contract import NotificationEvent
from releasegate_airflow import xcom
from releasegate_airflow.notifier import RunNotifier
from releasegate_airflow.operators import actor

ROLL_BACK = "roll_back"
CATEGORIES = ["errors", "latency", "wrong predictions", "data incident", "security incident", "alert", "other"]


@dag(
    dag_id="emergency_rollback",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["releasegate", "rollback"],
    params={
        "model_name": Param(
            "churn",
            type="string",
            minLength=1,
            title="Model",
            description="Registered model name in MLflow; it goes back to its `previous` alias.",
        ),
        "reason": Param(
            type="string",
            minLength=10,
            title="Reason",
            description="What is wrong with the current champion (at least 10 characters); "
            "kept in the audit log with your user name.",
        ),
        "category": Param(
            "other",
            type="string",
            enum=CATEGORIES,
            title="What went wrong",
            description="The kind of problem, for the audit log and the dashboard.",
        ),
        "release_id": Param(
            None,
            type=["null", "string"],
            pattern="^rel-[0-9a-f]{12}$",
            title="Release (optional)",
            description="The release this is about (rel-…); an open release of the model is aborted either way.",
        ),
        "incident": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            title="Incident (optional)",
            description="The incident this rollback answers (`releasegate incidents list`); the alert receiver "
            "sets it. Without one, the rollback opens a critical incident.",
        ),
        "alert": Param(
            None,
            type=["null", "object"],
            title="Alert (set by the alert receiver)",
            description="The Alertmanager alert that triggered this run: kept in the audit event.",
        ),
    },
    default_args={"retries": 0},
)
def emergency_rollback():
    # The run is its one task, so the task's callbacks tell its outcome, from the worker that has the settings.
    @task(
        task_id=ROLL_BACK,
        on_success_callback=RunNotifier(NotificationEvent.rollback),
        on_failure_callback=RunNotifier(NotificationEvent.rollback, failed=True),
    )
    def roll_back() -> dict[str, Any]:
        """Route, open release and champion alias back to the previous champion; who and why audited."""
        from releasegate import pipeline

        params = get_current_context()["params"]
        return xcom.push(
            pipeline.emergency_rollback(
                params["model_name"],
                params["reason"],
                actor(),
                release_id=params.get("release_id") or None,
                category=params.get("category"),
                incident=params.get("incident"),
                alert=params.get("alert"),
            )
        )

    roll_back()


emergency_rollback()
