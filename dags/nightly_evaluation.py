"""
# Nightly evaluation

Every night (cron: the default policy's `monitoring.schedule`, or `RELEASEGATE_NIGHTLY_SCHEDULE`),
for each registered model with a `champion` alias:

1. **champions**: the models to evaluate, found in the MLflow registry at run time.
2. **evaluate** (one mapped task per champion): the policy's window of logged traffic (24 h by
   default) → input drift against the version's reference data, prediction drift of shadowed
   candidates, the Great Expectations contract on the logged inputs, and quality where feedback
   labels exist. Reports (Evidently HTML + JSON) become MLflow artifacts of the champion version
   under `releasegate/reports/nightly/<time>/`; the numbers go to the audit log.
3. **flag_retraining** (mapped): when a limit is crossed, an event on the asset
   `releasegate://retraining-needed` with the model, version and reasons in its extra, so a
   retraining DAG can be scheduled on it; skipped otherwise.
4. **alert**: fails the run with the reasons (after calling the notifier hook) when any
   champion crossed a limit; a window without traffic ends green, saying so.
5. **purge** (after the evaluations, whatever they found): predictions, feedback and nightly
   reports older than each model's retention (tag `releasegate.retention`; default 90 days of
   predictions, 365 of feedback and reports) are deleted in batches; the counts go to the
   audit log (`data.purged`).

Each task is one call into `releasegate.nightly`.
"""

from __future__ import annotations

import logging

import pendulum
from airflow.sdk import Asset, Param, TriggerRule, chain, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from releasegate.contract import RETRAINING_ASSET
from releasegate_airflow import xcom
from releasegate_airflow.operators import window_end

CHAMPIONS = "champions"
EVALUATE = "evaluate"
FLAG_RETRAINING = "flag_retraining"
ALERT = "alert"
PURGE = "purge"

RETRAINING_NEEDED = Asset(RETRAINING_ASSET)
DEFAULT_SCHEDULE = "0 3 * * *"

log = logging.getLogger(__name__)


def _schedule() -> str:
    """The cron of the nightly run: the environment's, else the default policy's (read with yaml only)."""
    from releasegate.settings import get_settings

    if get_settings().nightly_schedule:
        return str(get_settings().nightly_schedule)
    from releasegate import policy

    try:
        return policy.load("default").monitoring.schedule
    except policy.PolicyError:
        return DEFAULT_SCHEDULE


@dag(
    dag_id="nightly_evaluation",
    doc_md=__doc__,
    schedule=_schedule(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["releasegate", "monitoring"],
    params={
        "policy": Param(
            "default",
            type="string",
            title="Policy",
            description="Policy whose `monitoring` limits apply (include/policies/).",
        )
    },
    default_args={"retries": 0},
)
def nightly_evaluation():
    @task(task_id=CHAMPIONS)
    def champions() -> list[dict]:
        """Every registered model with a champion alias."""
        from releasegate import nightly

        return nightly.champions()

    @task(task_id=EVALUATE, map_index_template="{{ champion['model'] }}")
    def evaluate(champion: dict) -> dict:
        """Drift, contract and quality reports on the champion's recent traffic."""
        from releasegate import nightly

        params = get_current_context()["params"]
        result = nightly.evaluate(
            champion["model"],
            champion["version"],
            until=window_end(),
            policy=params["policy"],
            actor="airflow:nightly_evaluation",
        )
        return xcom.push(result)

    @task(task_id=FLAG_RETRAINING, outlets=[RETRAINING_NEEDED], map_index_template="{{ result['model'] }}")
    def flag_retraining(result: dict) -> dict:
        """An asset event with the model, version and reasons when a limit was crossed."""
        if not result["reasons"]:
            raise AirflowSkipException(f"{result['model']} v{result['version']}: within the policy's limits")
        extra = {
            "model": result["model"],
            "version": result["version"],
            "reasons": result["reasons"],
            "reports": result["artifacts"],
        }
        get_current_context()["outlet_events"][RETRAINING_NEEDED].extra = extra
        return extra

    @task(task_id=ALERT, trigger_rule=TriggerRule.NONE_FAILED)
    def alert(results: list[dict]) -> str:
        """Fail the run, after notifying, when any champion needs retraining."""
        from releasegate import nightly

        results = list(results or [])
        message = nightly.notify(results, actor="airflow:nightly_evaluation")
        if message:
            raise AirflowFailException(message)
        summary = nightly.no_traffic_message(results)
        log.info(summary)
        return summary

    @task(task_id=PURGE, trigger_rule=TriggerRule.ALL_DONE)
    def purge() -> list[dict]:
        """Delete what is older than each model's retention, in batches; audit the counts."""
        from releasegate import retention

        return [done.model_dump(mode="json") for done in retention.purge(actor="airflow:nightly_evaluation")]

    found = champions()
    evaluated = evaluate.expand(champion=found)
    flagged = flag_retraining.expand(result=evaluated)
    chain(found, evaluated, flagged, alert(evaluated))
    chain(evaluated, purge())


nightly_evaluation()
