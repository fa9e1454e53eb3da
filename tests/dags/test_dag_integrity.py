"""The DAG files parse without errors and without the heavy libraries (the DAG processor parses often)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PARSE = """
import json, sys, time
start = time.time()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'evidently', 'great_expectations', 'sklearn'})
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": {d: [t.task_id for t in dag.tasks] for d, dag in bag.dags.items()},
                  "params": {d: list(dag.params.keys()) for d, dag in bag.dags.items()},
                  "schedules": {d: str(dag.schedule) for d, dag in bag.dags.items()},
                  "heavy": heavy, "seconds": time.time() - start}))
"""


def _parse(airflow_env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PARSE, str(ROOT / "dags")],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dags_parse_without_errors_or_heavy_imports(airflow_env):
    result = _parse(airflow_env)
    assert result["errors"] == {}
    assert set(result["dags"]) == {
        "model_release",
        "model_experiment",
        "nightly_evaluation",
        "drift_watch",
        "emergency_rollback",
        "data_subject_request",
    }
    assert result["heavy"] == [], f"parsing dags/ imported {result['heavy']}"


def test_model_release_has_the_release_steps_and_form_params(airflow_env):
    result = _parse(airflow_env)
    tasks = result["dags"]["model_release"]
    for task_id in (
        "open_release",
        "validate",
        "sign",
        "shadow.route",
        "shadow.wait",
        "canary_1.route",
        "canary_1.wait",
        "decide",
        "promote",
        "rollback",
        "finish",
    ):
        assert task_id in tasks
    assert set(result["params"]["model_release"]) == {"model_name", "version", "policy", "experiment_id"}


def test_nightly_evaluation_maps_over_champions_and_flags_retraining(airflow_env):
    result = _parse(airflow_env)
    assert result["dags"]["nightly_evaluation"] == ["champions", "evaluate", "flag_retraining", "alert", "purge"]
    assert set(result["params"]["nightly_evaluation"]) == {"policy"}


def test_drift_watch_watches_then_flags_retraining_per_model_every_five_minutes(airflow_env):
    result = _parse(airflow_env)
    assert result["dags"]["drift_watch"] == ["watch", "flag_retraining", "alert"]
    assert set(result["params"]["drift_watch"]) == {"policy"}
    assert result["schedules"]["drift_watch"] == "*/5 * * * *"


def test_data_subject_request_takes_the_key_the_request_and_its_reference(airflow_env):
    result = _parse(airflow_env)
    assert result["dags"]["data_subject_request"] == ["fulfil"]
    assert set(result["params"]["data_subject_request"]) == {"subject_key", "request_type", "reference", "decrypt"}
