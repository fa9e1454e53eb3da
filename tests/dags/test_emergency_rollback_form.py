"""The emergency_rollback DAG: one task, and a trigger form that refuses a rollback without a usable reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# DagBag parses the file as the DAG processor does; the form's rules are the params' JSON schema.
_CHECK = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.definitions.param import ParamsDict
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags["emergency_rollback"]
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'evidently', 'great_expectations', 'sklearn'})

def refused(conf):
    params = ParamsDict(dict(dag.params.items()))
    try:
        params.update(conf)
        params.validate()
    except Exception as err:
        return type(err).__name__
    return None

schema = {k: {**dag.params.get_param(k).schema, "description": dag.params.get_param(k).description}
          for k in dag.params}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "tasks": [t.task_id for t in dag.tasks],
                  "schema": schema, "heavy": heavy,
                  "no_reason": refused({}), "short": refused({"reason": "bad"}),
                  "bad_category": refused({"reason": "error rate at 30%", "category": "boredom"}),
                  "bad_release": refused({"reason": "error rate at 30%", "release_id": "42"}),
                  "bad_incident": refused({"reason": "error rate at 30%", "incident": "first"}),
                  "from_alert": refused({"reason": "alert ChampionFailing", "category": "alert", "incident": 7,
                                         "alert": {"labels": {"alertname": "ChampionFailing"}}}),
                  "ok": refused({"reason": "error rate at 30%", "release_id": "rel-0123456789ab"})}))
"""


def _check(airflow_env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, str(ROOT / "dags" / "emergency_rollback.py")],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_emergency_rollback_form_needs_a_reason_and_offers_categories(airflow_env):
    result = _check(airflow_env)
    assert result["errors"] == {} and result["heavy"] == []
    assert result["tasks"] == ["roll_back"]
    schema = result["schema"]
    assert set(schema) == {"model_name", "reason", "category", "release_id", "incident", "alert"}
    assert all(s.get("title") and s.get("description") for s in schema.values())
    assert "errors" in schema["category"]["enum"] and schema["reason"]["minLength"] == 10
    # The form refuses what the rollback could not record properly, and accepts a proper request.
    assert result["no_reason"] and result["short"] and result["bad_category"] and result["bad_release"]
    assert result["bad_incident"]
    assert result["ok"] is None and result["from_alert"] is None  # what the alert receiver sends is accepted
