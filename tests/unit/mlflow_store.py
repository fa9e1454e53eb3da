"""A tiny classifier and a pre-migrated MLflow store, shared by the registry and signing tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from releasegate import registry, signing

MODEL = "churn"


@pytest.fixture(scope="session")
def classifier():
    """A tiny fitted LogisticRegression and the frame it was fitted on."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.normal(40, 10, 200), "tenure_months": rng.integers(1, 72, 200).astype(float)})
    label = (frame["tenure_months"] < 24).astype(int)
    return LogisticRegression().fit(frame, label), frame


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once: creating one costs about a second per test otherwise."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(settings, migrated_mlflow_db):
    """The test's settings, with an MLflow store and the default signing key pair in its home."""
    shutil.copyfile(migrated_mlflow_db, settings.home / "mlflow.db")
    signing.ensure_keys(settings)
    return settings


def register(settings, classifier, model: str = MODEL) -> str:
    """Log the classifier under a new run and register it as the next version of `model`."""
    import mlflow
    import mlflow.sklearn

    mlflow_client = registry.client(settings)
    experiment = mlflow_client.get_experiment_by_name("tests")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else mlflow_client.create_experiment("tests", artifact_location=settings.mlflow_artifact_root.as_uri())
    )
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.sklearn.log_model(
            classifier[0], name="model", registered_model_name=model, pip_requirements=["scikit-learn"]
        )
    return str(info.registered_model_version)


def stored_model_dir(settings, version: str, model: str = MODEL) -> Path:
    """Where the store keeps the version's model files on disk (what an attacker with disk access edits)."""
    uri = registry.client(settings).get_model_version_download_uri(model, version)
    return Path(unquote(urlparse(uri).path))
