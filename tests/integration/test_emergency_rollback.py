"""emergency_rollback end to end: the DAG run (`airflow dags test`) against a real MLflow store and gateway.

The situation: v2 was promoted over v1 (so `previous` is v1) and a release of v3 is in canary
when v2 turns out to hurt users. Small models, so the setup costs seconds, not a demo's training.
"""

from __future__ import annotations

import json
import os
import sys
import time

import httpx
import pytest

from releasegate import audit, pipeline, registry, release, signing, storage
from releasegate.backends.local import LocalBackend
from releasegate.contract import AuditAction, Mode
from tests import forkserver
from tests.integration.conftest import Stack, free_port
from tests.webhook_sink import webhook_sink

MODEL = "fraud"
REASON = "v2 answers 30% of one region wrong since 09:00"
pytestmark = pytest.mark.integration


def _register(settings) -> dict[str, str]:
    """Three signed versions of a small logistic regression, each with the MLflow source run releasegate needs."""
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)

    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # registered_model_name= registers there
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.create_experiment("emergency", artifact_location=settings.mlflow_artifact_root.as_uri())
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x1": rng.normal(size=300), "x2": rng.normal(size=300)})
    label = (frame["x1"] > 0).astype("int64")
    versions = {}
    for name, c in (("v1", 1.0), ("v2", 0.1), ("v3", 0.01)):
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.sklearn.log_model(
                LogisticRegression(C=c).fit(frame, label),
                name="model",
                registered_model_name=MODEL,
                input_example=frame.head(2),
                pip_requirements=["scikit-learn"],
            )
        versions[name] = str(info.registered_model_version)
        signing.sign_version(MODEL, versions[name], settings)
    return versions


@pytest.fixture(scope="module")
def promoted_with_canary(tmp_path_factory, airflow_env):
    """v2 champion over previous v1, served by a real gateway, and an open release of v3 at 25 %."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("emergency")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        mp.setenv("RELEASEGATE_GATEWAY_URL", f"http://127.0.0.1:{port}")
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        versions = _register(settings)
        stack = Stack(home, dict(os.environ))
        gateway = stack.start("gateway", [sys.executable, "-m", "releasegate.serving", "--port", str(port)])
        deadline = time.time() + 120
        while True:
            assert gateway.poll() is None, stack.log("gateway")
            try:
                if httpx.get(f"{settings.gateway_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "gateway did not start:\n" + stack.log("gateway")
            time.sleep(0.3)
        try:
            LocalBackend().set_route(MODEL, versions["v2"])
            registry.set_alias(MODEL, "previous", versions["v1"])
            registry.set_alias(MODEL, "champion", versions["v2"])
            opened = pipeline.start(MODEL, versions["v3"], actor="test")
            LocalBackend().set_route(
                MODEL, versions["v2"], versions["v3"], Mode.canary, 25, release_id=opened.release_id
            )
            yield {
                **versions,
                "release_id": opened.release_id,
                "gateway_url": settings.gateway_url,
                "admin_key": settings.admin_api_key,
            }
        finally:
            stack.stop("gateway")
            storage.dispose_all()


def answered_by(ctx: dict, n: int = 20) -> set[str]:
    """The versions whose answers n live requests get."""
    with httpx.Client(
        base_url=ctx["gateway_url"], headers={"authorization": f"Bearer {ctx['admin_key']}"}, timeout=30
    ) as client:
        return {
            client.post(
                f"/models/{MODEL}/invocations", json={"dataframe_records": [{"x1": i / 10, "x2": -i / 10}]}
            ).json()["model_version"]
            for i in range(n)
        }


def test_dag_puts_the_previous_champion_back_aborts_the_open_release_and_tells_the_webhook(promoted_with_canary):
    v1, v2 = promoted_with_canary["v1"], promoted_with_canary["v2"]
    rel_id = promoted_with_canary["release_id"]
    assert answered_by(promoted_with_canary, 40) == {v2, promoted_with_canary["v3"]}  # the canary is live
    conf = {"model_name": MODEL, "reason": REASON, "category": "wrong predictions", "release_id": rel_id}
    with webhook_sink() as sink:
        out = forkserver.run(
            ["airflow", "dags", "test", "emergency_rollback", "-c", json.dumps(conf)],
            env={**os.environ, "RELEASEGATE_NOTIFY_WEBHOOK": sink.url, "RELEASEGATE_NOTIFY_WEBHOOK_TOKEN": "n0tify"},
            timeout=600,
        )
    assert "state=success" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    # The DAG's success callback (Airflow's notifier) told the rollback; the library told the incident it opened.
    [told] = sink.bodies("rollback")
    assert (told["schema"], told["model"], told["state"]) == ("releasegate.notification/v1", MODEL, "rolled_back")
    assert (told["from_version"], told["version"], told["release_id"]) == (v2, v1, rel_id)
    assert told["reasons"] == [REASON] and told["actor"].startswith("airflow")
    assert "/dags/emergency_rollback/runs/" in told["links"]["airflow_run"]
    [opened] = sink.bodies("incident_opened")
    assert (opened["model"], opened["severity"], opened["release_id"]) == (MODEL, "critical", rel_id)
    assert {auth for auth, _ in sink.received} == {"Bearer n0tify"}

    route = LocalBackend().get_route(MODEL)
    assert (route.champion_version, route.candidate_version, route.mode) == (v1, None, Mode.single)
    assert registry.get_alias(MODEL, "champion") == v1
    assert registry.get_alias(MODEL, "previous") == v1  # a second rollback cannot jump back to v2
    assert registry.get_version_tags(MODEL, v2)["releasegate.emergency_rollback"] == REASON
    rel = release.get(rel_id)
    assert rel.state is release.State.aborted and REASON in rel.reasons[-1]
    event = [e for e in audit.events(model=MODEL) if e["action"] == AuditAction.emergency_rollback][-1]
    assert event["actor"].startswith("airflow")
    assert event["details"]["reason"] == REASON and event["details"]["category"] == "wrong predictions"
    assert (event["details"]["from_version"], event["details"]["to_version"]) == (v2, v1)
    assert event["details"]["aborted_release"]["release_id"] == rel_id
    from releasegate import incidents

    # A critical incident, opened by the rollback, naming the release it stopped and why.
    [incident] = [i for i in incidents.list_incidents(model=MODEL) if i.source == AuditAction.emergency_rollback]
    assert incident.severity is incidents.Severity.critical and incident.release_id == rel_id
    assert REASON in incident.title and incident.state is incidents.IncidentState.open
    assert audit.verify().ok
    assert answered_by(promoted_with_canary) == {v1}


def test_a_repeat_changes_nothing_and_bad_requests_say_why(promoted_with_canary):
    v1 = promoted_with_canary["v1"]
    again = pipeline.emergency_rollback(MODEL, REASON, actor="cli:test")
    assert again.champion == v1 and again.rolled_back_from == v1 and again.aborted_release is None
    assert registry.get_alias(MODEL, "champion") == v1

    with pytest.raises(ValueError, match="at least 10 characters"):
        pipeline.emergency_rollback(MODEL, "oops", actor="cli:test")
    with pytest.raises(registry.RegistryError):
        pipeline.emergency_rollback("no-such-model", REASON, actor="cli:test")
    registry.delete_alias(MODEL, "previous")
    with pytest.raises(release.ReleaseError, match="no `previous` alias"):
        pipeline.emergency_rollback(MODEL, REASON, actor="cli:test")
