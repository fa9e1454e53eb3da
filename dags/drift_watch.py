"""
# Drift watch

Every five minutes (cron: the default policy's `monitoring.watch.schedule`, or
`RELEASEGATE_DRIFT_WATCH_SCHEDULE`), for each model with a route:

1. **watch**: the champion's last `monitoring.watch.window_minutes` (15) of logged inputs, a
   hash-uniform sample of at most `monitoring.watch.max_rows` (5,000) requests, tested against the
   version's reference data with the nightly's tests (K-S / chi-square at 1 % ÷ columns) and its
   `max_drifted_share` limit. A window with fewer than `min_rows` requests is skipped, saying so.
   Drift is an audit event (`drift_watch.alarm`) and an incident (one per model while it is
   active); a new one calls the alert hook.
2. **flag_retraining** (mapped): for a new alarm, an event on the asset
   `releasegate://retraining-needed`, as the nightly evaluation emits it; skipped otherwise.
3. **alert**: fails the run with the reasons when it raised a new alarm, or when a model could
   not be watched (no reference data, say: the others are watched all the same); a shift that
   persists adds to its incident and leaves later runs green.

The nightly evaluation still makes the full reports (docs/drift.md, "Near-real-time watch"). Each task is one
call into `releasegate.drift_watch`.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, TriggerRule, chain, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from releasegate.contract import RETRAINING_ASSET
from releasegate_airflow.operators import window_end

WATCH = "watch"
FLAG_RETRAINING = "flag_retraining"
ALERT = "alert"

RETRAINING_NEEDED = Asset(RETRAINING_ASSET)
DEFAULT_SCHEDULE = "*/5 * * * *"
ACTOR = "airflow:drift_watch"

log = logging.getLogger(__name__)


def _schedule() -> str:
    """The watch's cron: the environment's, else the default policy's (read with yaml only)."""
    from releasegate.settings import get_settings

    if get_settings().drift_watch_schedule:
        return str(get_settings().drift_watch_schedule)
    from releasegate import policy

    try:
        return policy.load("default").monitoring.watch.schedule
    except policy.PolicyError:
        return DEFAULT_SCHEDULE


@dag(
    dag_id="drift_watch",
    doc_md=__doc__,
    schedule=_schedule(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=10),
    tags=["releasegate", "monitoring"],
    params={
        "policy": Param(
            "default",
            type="string",
            title="Policy",
            description="Policy whose `monitoring` limits and `monitoring.watch` window apply (include/policies/).",
        )
    },
    default_args={"retries": 0},
)
def drift_watch():
    @task(task_id=WATCH)
    def watch() -> list[dict]:
        """The nightly's drift tests on every champion's last minutes of traffic; alarms audited and opened."""
        from releasegate import drift_watch as watcher

        params = get_current_context()["params"]
        results = watcher.watch(until=window_end(), policy=params["policy"], actor=ACTOR)
        return [r.model_dump(mode="json") for r in results]

    @task(task_id=FLAG_RETRAINING, outlets=[RETRAINING_NEEDED], map_index_template="{{ result['model'] }}")
    def flag_retraining(result: dict) -> dict:
        """An asset event with the model, version and reasons when this run opened a drift alarm."""
        if not result["new_alarm"]:
            raise AirflowSkipException(f"{result['model']} v{result['version']}: no new drift alarm")
        extra = {
            "model": result["model"],
            "version": result["version"],
            "reasons": result["reasons"],
            "reports": None,
            "source": "drift_watch",
            "incident": result["incident"],
        }
        get_current_context()["outlet_events"][RETRAINING_NEEDED].extra = extra
        return extra

    @task(task_id=ALERT, trigger_rule=TriggerRule.NONE_FAILED)
    def alert(results: list[dict]) -> str:
        """Fail the run with the reasons when it raised a new alarm or could not watch a model."""
        from releasegate import drift_watch as watcher

        results = list(results or [])
        message = watcher.alert_message(results)
        if message:
            raise AirflowFailException(message)
        summary = watcher.summary(results)
        log.info(summary)
        return summary

    watched = watch()
    flagged = flag_retraining.expand(result=watched)
    chain(watched, flagged, alert(watched))


drift_watch()
