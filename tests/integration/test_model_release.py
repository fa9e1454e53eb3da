"""model_release end to end with dag.test(): a real MLflow store, a real gateway process, real traffic.

The tests run in file order on one stack: the better candidate is promoted, then the worse
one is rolled back against the new champion, then the refusals.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from releasegate import audit, pipeline, registry, release, signing
from releasegate.backends import DeploymentError
from releasegate.backends.local import LocalBackend

ROOT = Path(__file__).resolve().parents[2]
MODEL = "churn"
pytestmark = pytest.mark.integration


def run_release(version: str, policy: str = "default"):
    """One model_release run through Airflow's dag.test(); returns the Airflow run's state."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["model_release"]
    run = dag.test(run_conf={"model_name": MODEL, "version": version, "policy": policy})
    return str(run.state)


def newest_release(version: str) -> release.Release:
    return next(r for r in release.list_releases(MODEL) if r.candidate_version == version)


def test_better_candidate_is_promoted(stack):
    good, champion = stack.versions["good"], stack.versions["champion"]
    run_release(good)
    rel = newest_release(good)
    assert rel.state is release.State.promoted, (rel.reasons, stack.log("gateway"))
    stages = [v["window"]["stage"] for v in rel.verdicts]
    assert stages[0] == "shadow" and len(stages) == 4 and all(v["decision"] == "promote" for v in rel.verdicts)
    assert registry.get_alias(MODEL, "champion") == good
    assert registry.get_alias(MODEL, "previous") == champion
    route = LocalBackend().get_route(MODEL)
    assert route["champion_version"] == good and route["mode"] == "single"
    assert registry.get_version_tags(MODEL, good)["releasegate.state"] == "promoted"
    assert audit.verify().ok


def test_worse_candidate_is_rolled_back(stack):
    bad, good = stack.versions["bad"], stack.versions["good"]
    run_release(bad)
    rel = newest_release(bad)
    assert rel.state is release.State.rolled_back, rel.reasons
    assert rel.verdicts[-1]["decision"] == "rollback"
    assert "accuracy" in rel.reasons[-1]
    assert registry.get_alias(MODEL, "champion") == good
    route = LocalBackend().get_route(MODEL)
    assert route["champion_version"] == good and route["candidate_version"] is None
    tags = registry.get_version_tags(MODEL, bad)
    assert tags["releasegate.state"] == "rolled_back" and "accuracy" in tags["releasegate.reasons"]


def _new_signed_version(tmp_path: Path) -> str:
    """Register a copy of the champion's model directory as a new version, with its data, and sign it."""
    import mlflow

    source = registry.resolve_version(MODEL, "champion")
    model_dir = registry.download_model(MODEL, source, dst=tmp_path / "copy")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), "model")
    version = str(mlflow.register_model(f"runs:/{run.info.run_id}/model", MODEL).version)
    for name in ("reference.parquet", "holdout.parquet"):
        local = registry.download_artifact(MODEL, source, f"releasegate/{name}", dst=tmp_path / name.split(".")[0])
        registry.log_artifact(MODEL, version, local, artifact_path="releasegate")
    signing.sign_version(MODEL, version)
    return version


def _tamper(version: str) -> None:
    """Change one byte of the stored model file, as someone with write access to the artifact store could."""
    from releasegate.settings import get_settings

    run_id = registry.client().get_model_version(MODEL, version).run_id
    stored = [p for p in get_settings().mlflow_artifact_root.rglob("model.*")
              if run_id in p.parts and "releasegate" not in p.parts and p.suffix in (".pkl", ".skops")]
    assert stored, "the model file was not found in the artifact store"
    for path in stored:
        path.write_bytes(path.read_bytes() + b"\0")


def test_tampered_model_is_refused_by_gateway_and_release_is_rejected(stack, tmp_path):
    version = _new_signed_version(tmp_path)
    _tamper(version)
    champion = registry.resolve_version(MODEL, "champion")
    with pytest.raises(DeploymentError, match="signature"):
        LocalBackend().set_route(MODEL, champion, version, "shadow", 0)
    assert LocalBackend().get_route(MODEL)["candidate_version"] is None

    run_release(version)
    rel = newest_release(version)
    assert rel.state is release.State.rejected
    assert "signature" in rel.reasons[-1]
    assert LocalBackend().get_route(MODEL)["champion_version"] == champion


def test_second_release_is_refused_while_one_runs_and_a_dead_run_does_not_block(stack, airflow_env):
    candidate = stack.versions["bad"]
    # A live holder: a queued Airflow run of model_release (no scheduler runs here, so it stays queued).
    subprocess.run(["airflow", "dags", "trigger", "model_release", "--run-id", "holder-run",
                    "--conf", '{"model_name": "churn", "version": "%s"}' % candidate],
                   env=airflow_env, check=True, capture_output=True, timeout=300)
    holder = pipeline.start(MODEL, candidate, airflow_run_id="holder-run", actor="test")

    assert "failed" in run_release(candidate).lower()
    assert release.active(MODEL).release_id == holder["release_id"]
    assert len([r for r in release.list_releases(MODEL) if r.candidate_version == candidate]) == 2  # the first, + holder

    # The holder's run dies: the next release closes it as failed and goes ahead.
    subprocess.run(["airflow", "dags", "delete", "model_release", "--yes"], env=airflow_env, check=True,
                   capture_output=True, timeout=300)
    run_release(candidate)
    assert release.get(holder["release_id"]).state is release.State.failed
    assert "gone or failed" in release.get(holder["release_id"]).reasons[-1]
    assert newest_release(candidate).release_id != holder["release_id"]
