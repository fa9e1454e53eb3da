"""Is the Airflow run that holds a model's release lock still going? Asked through the Task SDK.

The lock holder is a model_release run or a model_experiment run (both open rows of the releases table); a run
id alone does not say which, so both DAGs are asked.
"""

from __future__ import annotations

# The DAGs whose runs open releases-table rows, and so hold a model's lock.
LOCK_HOLDERS = ("model_release", "model_experiment")


def _state(dag_id: str, run_id: str) -> str | None:
    """The run's state, or None if this DAG has no such run. Only an answer that the run does not exist counts as
    None; any other error raises, rather than closing a lock whose run may be alive."""
    from airflow.sdk.api.client import ServerResponseError
    from airflow.sdk.exceptions import AirflowRuntimeError
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    try:
        state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    except AirflowRuntimeError as err:  # a worker: the supervisor relays the API server's answer
        detail = err.error.detail if isinstance(err.error.detail, dict) else {}
        if detail.get("status_code") == 404:
            return None
        raise
    except ServerResponseError as err:  # `dag.test()`: the API's answer arrives in this process as it is
        if err.response.status_code == 404:
            return None
        raise
    return str(state).lower().rsplit(".", 1)[-1]


def run_alive(run_id: str | None) -> bool:
    """True while the lock holder's run (of either DAG) is queued or running."""
    if not run_id:
        return False
    return any(_state(dag_id, run_id) in {"queued", "running"} for dag_id in LOCK_HOLDERS)
