"""Data contract (Great Expectations), schema compatibility and the whole validate step on real MLflow."""

from __future__ import annotations

import pandas as pd
import pytest

from releasegate import errors, validation
from releasegate.demo import data


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return data.generate(2000, seed=42)


def _failures_about(result, column):
    return [f for f in result.failures if f.startswith(f"{column}:")]


def test_clean_demo_data_meets_the_churn_contract(clean):
    result = validation.run_contract(clean, "churn")
    assert result.success and result.failures == []
    assert result.evaluated >= 30 and result.rows == 2000


def test_broken_data_fails_the_contract_and_each_failure_names_column_and_expectation(clean):
    broken = clean.copy()
    broken.loc[:9, "monthly_charges"] = None
    broken.loc[10:14, "age"] = 250
    broken.loc[15, "region"] = "mars"
    broken = broken.drop(columns=["channel"])
    result = validation.run_contract(broken, "churn")
    assert not result.success
    assert _failures_about(result, "channel") == ["channel: column is missing"]
    [nulls] = _failures_about(result, "monthly_charges")
    assert "expect_column_values_to_not_be_null" in nulls and "10 of 2000 rows" in nulls
    [age] = _failures_about(result, "age")
    assert "expect_column_values_to_be_between" in age and "250" in age
    [region] = _failures_about(result, "region")
    assert "expect_column_values_to_be_in_set" in region and "'mars'" in region


def test_a_float_where_the_contract_wants_an_integer_is_reported_with_the_observed_type(clean):
    result = validation.run_contract(clean.astype({"support_calls": "float64"}), "churn")
    assert any("support_calls" in f and "observed float64" in f for f in result.failures), result.failures


def test_traffic_without_labels_meets_the_feature_part_of_the_contract(clean):
    features = clean[data.FEATURES]
    assert validation.run_contract(features, "churn", features_only=True).success
    labelled = validation.run_contract(features, "churn")
    assert labelled.failures == ["churned: column is missing"]


def test_unknown_suite_is_a_clear_error(clean):
    with pytest.raises(ValueError, match="expectation suite 'nope' not found .*known: .*churn"):
        validation.run_contract(clean, "nope")


# --- schema compatibility on real MLflow signatures ---------------------------------------------


def _signature(frame: pd.DataFrame, output=None):
    from mlflow.models import infer_signature

    return infer_signature(frame, output if output is not None else pd.Series([0] * len(frame), dtype="int64"))


def test_same_inputs_are_compatible_and_a_dropped_input_is_fine(clean):
    features = clean[data.FEATURES].head(5)
    assert validation.compare_signatures(_signature(features), _signature(features)).compatible
    assert validation.compare_signatures(
        _signature(features.drop(columns=["channel"])), _signature(features)
    ).compatible


def test_candidate_needing_a_column_callers_do_not_send_is_incompatible(clean):
    features = clean[data.FEATURES].head(5)
    result = validation.compare_signatures(_signature(features.assign(contract_type="monthly")), _signature(features))
    assert not result.compatible
    assert result.problems == [
        "input 'contract_type' is required by the candidate but not part of the champion's "
        "inputs, so callers do not send it"
    ]


def test_optional_extra_column_is_compatible(clean):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    features = clean[data.FEATURES].head(5)
    champion = _signature(features)
    candidate = ModelSignature(
        Schema([*champion.inputs.inputs, ColSpec("string", "contract_type", required=False)]), champion.outputs
    )
    assert validation.compare_signatures(candidate, champion).compatible


def test_changed_input_or_output_type_is_incompatible(clean):
    features = clean[data.FEATURES].head(5)
    result = validation.compare_signatures(
        _signature(features.astype({"age": "float64"}), pd.Series([0.5] * 5)), _signature(features)
    )
    assert not result.compatible
    assert "input 'age' changes type from long to double" in result.problems
    assert "output type changes from long to double" in result.problems


def test_missing_signature_is_incompatible(clean):
    result = validation.compare_signatures(None, _signature(clean[data.FEATURES].head(5)))
    assert not result.compatible and "candidate has no input signature" in result.problems[0]


# --- the demo models and the whole validate step, on a real MLflow store ------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The three demo versions registered once in a private MLflow store for this module."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("rg-validation")
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from releasegate import signing
        from releasegate.demo import models
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        versions = models.register_demo_models(settings, model_name="churn")
        for version in versions.values():  # a release signs before it validates: validation loads verified bytes
            signing.sign_version("churn", version, settings)
        yield settings, versions


def _accuracy(settings, version, frame):
    from releasegate import registry, signing

    loaded = registry.load_pyfunc(signing.fetch_verified("churn", version, settings))
    return float((loaded.predict(frame[data.FEATURES]) == frame[data.LABEL]).mean())


def test_demo_registers_three_versions_with_aliases_artifacts_and_suite_once(demo):
    from releasegate import registry
    from releasegate.demo import models

    settings, versions = demo
    assert versions == {"champion": "1", "good": "2", "bad": "3"}
    assert registry.get_alias("churn", "champion", settings=settings) == "1"
    assert registry.get_alias("churn", "challenger", settings=settings) == "2"
    tags = registry.get_model_tags("churn", settings=settings)
    assert tags["releasegate.expectation_suite"] == "churn" and tags["releasegate.label"] == data.LABEL
    for version in versions.values():
        reference = pd.read_parquet(
            registry.download_artifact(
                "churn",
                version,
                "releasegate/reference.parquet",
                dst=settings.home / "ref" / version,
                settings=settings,
            )
        )
        holdout = pd.read_parquet(
            registry.download_artifact(
                "churn", version, "releasegate/holdout.parquet", dst=settings.home / "hold" / version, settings=settings
            )
        )
        assert list(reference.columns) == data.FEATURES and len(reference) == models.REFERENCE_ROWS
        assert list(holdout.columns) == data.FEATURES + [data.LABEL] and len(holdout) == models.HOLDOUT_ROWS
    # A second call finds the versions instead of registering new ones.
    assert models.register_demo_models(settings, model_name="churn") == versions
    assert len(registry.client(settings).search_model_versions("name='churn'")) == 3


def test_good_and_bad_candidates_both_pass_offline_validation(demo):
    from releasegate import policy

    settings, versions = demo
    for role in ("good", "bad"):
        report = validation.validate_candidate(
            "churn", versions[role], "champion", policy.load("default"), settings=settings
        )
        assert report.passed, (role, report.reasons)
        assert report.contract.success and report.schema_.compatible
        assert report.evaluation.difference > 0.03 and {s.value for s in report.evaluation.slices} == set(data.REGIONS)
        assert report.model_dump(mode="json")["schema"] == {"compatible": True, "problems": []}


def test_on_live_traffic_the_good_candidate_beats_the_champion_and_the_bad_one_loses_clearly(demo):
    settings, versions = demo
    live, stale = data.generate(5000, seed=77), data.generate(5000, seed=77, concept="stale")
    acc = {role: (_accuracy(settings, v, live), _accuracy(settings, v, stale)) for role, v in versions.items()}
    print("accuracy (current, stale):", {role: tuple(round(a, 4) for a in pair) for role, pair in acc.items()})
    assert acc["good"][0] >= acc["champion"][0] + 0.03
    assert acc["bad"][0] <= acc["champion"][0] - 0.08


def test_a_candidate_worse_than_the_champion_on_its_holdout_is_rejected_with_the_numbers(demo):
    from releasegate import policy

    settings, versions = demo
    # The champion judged as a candidate against the better model: clearly worse on its own holdout.
    report = validation.validate_candidate(
        "churn", versions["champion"], versions["good"], policy.load("default"), settings=settings
    )
    assert not report.passed and report.contract.success and report.schema_.compatible
    assert any(r.startswith("offline evaluation: overall: candidate accuracy") for r in report.reasons), report.reasons
    assert any("slice region=" in r for r in report.reasons)


def test_a_model_without_a_label_tag_is_rejected_with_one_sentence_naming_the_tag(demo):
    from releasegate import policy, registry

    settings, versions = demo
    client = registry.client(settings)
    client.delete_registered_model_tag("churn", "releasegate.label")
    try:
        report = validation.validate_candidate(
            "churn", versions["good"], "champion", policy.load("default"), settings=settings
        )
    finally:
        client.set_registered_model_tag("churn", "releasegate.label", data.LABEL)
    [reason] = report.reasons
    assert not report.passed and report.evaluation is None
    assert reason.startswith(
        "offline evaluation failed: ValueError: registered model 'churn' has no "
        "releasegate.label tag and its holdout no 'label' column: set the tag"
    ), reason


def test_an_mlflow_schema_error_becomes_one_short_line_with_its_cause(clean, tmp_path):
    import mlflow
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    x = clean[["age", "tenure_months", "support_calls"]]
    mlflow.sklearn.save_model(
        LogisticRegression().fit(x, clean[data.LABEL]),
        tmp_path / "model",
        signature=infer_signature(x, clean[data.LABEL]),
    )
    with pytest.raises(Exception) as caught:
        mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(x.assign(age=x["age"] + 0.5))
    assert len(str(caught.value)) > 500 and "\n" in str(caught.value)  # MLflow prints the whole DataFrame
    line = errors.describe(caught.value)
    assert len(line) <= 300 and "\n" not in line and line.startswith("MlflowException: Failed to enforce schema")
    assert line.endswith(
        "(cause: MlflowException: Incompatible input types for column age. Can not safely convert float64 to int64.)"
    )


def test_a_long_error_is_cut_to_its_first_line_with_an_ellipsis():
    line = errors.describe(ValueError("holdout   is\tbroken " + "x" * 1000 + "\nsecond line"))
    assert len(line) == 300 and line.startswith("ValueError: holdout is broken xxx") and line.endswith("x…")
    assert errors.describe(KeyError()) == "KeyError"


def test_registered_versions_have_compatible_signatures(demo):
    settings, versions = demo
    result = validation.check_schema_compatibility("churn", versions["bad"], versions["champion"], settings=settings)
    assert result.compatible and result.problems == []
