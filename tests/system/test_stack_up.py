"""The production-shaped stack comes up: Airflow's REST API with a JWT, MLflow, the gateway, the release DAG."""

from __future__ import annotations

import httpx
import pytest

from tests.system.stack import AIRFLOW_USERS, MODEL

pytestmark = [pytest.mark.integration, pytest.mark.system]


def test_every_service_answers_and_the_release_dag_can_be_unpaused(system_stack):
    stack = system_stack
    with stack.airflow("admin") as airflow:
        version = airflow.get("/api/v2/version")
        assert version.status_code == 200, version.text
        assert version.json()["version"].startswith("3.")
        assert airflow.patch("/api/v2/dags/model_release", json={"is_paused": False}).json()["is_paused"] is False
        assert airflow.get("/api/v2/dags/model_release").json()["is_paused"] is False
    # Without a token the API refuses; a viewer may read but not unpause.
    assert httpx.get(f"{stack.airflow_url}/api/v2/dags/model_release", timeout=10).status_code == 401
    assert "viewer" in AIRFLOW_USERS
    with stack.airflow("viewer") as viewer:
        assert viewer.get("/api/v2/dags/model_release").status_code == 200
        assert viewer.patch("/api/v2/dags/model_release", json={"is_paused": True}).status_code == 403

    registered = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/get", params={"name": MODEL}, timeout=10
    )
    assert registered.status_code == 200, registered.text
    aliases = {a["alias"]: a["version"] for a in registered.json()["registered_model"].get("aliases", [])}
    # The demo's v1 until a release (in another module of this session) promotes one.
    assert aliases.get("champion") in stack.versions.values()

    ready = httpx.get(f"{stack.gateway_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert httpx.get(f"{stack.gateway_url}/metrics", timeout=10).status_code == 401  # a scraper needs its key
    metrics = httpx.get(
        f"{stack.gateway_url}/metrics", headers={"authorization": f"Bearer {stack.admin_key}"}, timeout=10
    )
    assert metrics.status_code == 200, metrics.text
    assert f'model="{MODEL}"' in metrics.text
