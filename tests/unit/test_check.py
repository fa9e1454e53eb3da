"""`releasegate check models:/NAME/VERSION` on a real MLflow store: what a version lacks, said before a release."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from releasegate import signing, training
from releasegate.cli import main
from releasegate.demo import data


@pytest.fixture
def store(settings, tmp_path):
    import mlflow

    signing.ensure_keys(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.MlflowClient().create_experiment(
        "check", artifact_location=settings.mlflow_artifact_root.as_uri()
    )
    return experiment


def _register(experiment: str, *, with_data: bool, tag: bool, holdout_rows: int = 600) -> str:
    import mlflow
    from sklearn.linear_model import LogisticRegression

    frame = data.generate(2000, seed=5)
    numeric = ["age", "tenure_months", "monthly_charges"]
    model = LogisticRegression(max_iter=500).fit(frame[numeric], frame[data.LABEL])
    example = frame[numeric].head(5)
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name="own",
            input_example=example,
            signature=mlflow.models.infer_signature(example, model.predict(example)),
            serialization_format="skops",
            skops_trusted_types=training.skops_trusted_types(model),
            pip_requirements=["scikit-learn"],
        )
        if with_data:
            training.log_release_data(frame[numeric], frame[numeric + [data.LABEL]].head(holdout_rows))
    if tag:
        training.tag_model("own", suite="own", label=data.LABEL)
    return str(info.registered_model_version)


def test_a_bare_version_gets_every_missing_piece_named_with_its_fix(store):
    version = _register(store, with_data=False, tag=False)
    result = CliRunner().invoke(main, ["check", f"models:/own/{version}"])
    assert result.exit_code == 1, result.output
    assert "error   holdout    no releasegate/holdout.parquet" in result.output
    assert "warning reference  no releasegate/reference.parquet" in result.output
    assert "problem(s): a release would be rejected or could not run" in result.output


def test_a_small_holdout_and_a_missing_suite_say_how_to_fix_them_then_a_complete_version_is_ready(
    store, settings, tmp_path, monkeypatch
):
    version = _register(store, with_data=True, tag=True, holdout_rows=150)
    result = CliRunner().invoke(main, ["check", f"models:/own/{version}"])
    assert result.exit_code == 1, result.output
    assert "150 holdout rows, policy default needs offline.min_rows = 200" in result.output
    assert "expectation suite 'own' not found" in result.output
    assert "slices by region, which the holdout does not have" in result.output  # a warning, not an error

    suites = tmp_path / "suites"
    suites.mkdir()
    shutil.copy(settings.expectation_dirs[-1] / "churn.json", suites / "own.json")
    monkeypatch.setenv("RELEASEGATE_EXPECTATIONS_DIR", str(suites))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "small.yaml").write_text("offline:\n  min_rows: 100\nslices: []\n")
    monkeypatch.setenv("RELEASEGATE_POLICIES_DIR", str(policies))
    result = CliRunner().invoke(main, ["check", f"models:/own/{version}", "--policy", "small"])
    # The demo's churn suite expects columns this model does not have: the contract names them.
    assert "error   contract   suite 'own' fails on the holdout" in result.output, result.output
    (suites / "own.json").write_text(
        '{"name": "own", "expectations": [{"type": "expect_column_to_exist", "kwargs": {"column": "age"}, "meta": {}}]}'
    )
    result = CliRunner().invoke(main, ["check", f"models:/own/{version}", "--policy", "small"])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("ready for a release")
    assert "ok      label      label column 'churned'" in result.output
