"""Pre-release validation: the data contract (Great Expectations), I/O schema compatibility, offline evaluation.

`validate_candidate` is what the release's validate step calls; every failure becomes a readable reason.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from releasegate.contract import SUITE_TAG
from releasegate.errors import InfrastructureError, describe
from releasegate.evaluation import HOLDOUT_ARTIFACT, EvaluationResult
from releasegate.settings import Settings, get_settings

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.core import ExpectationValidationResult
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    from releasegate.policy import Policy
    from releasegate.privacy import DataClass


class ContractResult(BaseModel):
    """Outcome of one expectation suite on one dataframe."""

    suite: str
    success: bool
    failures: list[str]
    evaluated: int
    rows: int
    # Checks of values the data holds only as tokens or ciphertexts (logged traffic of classified columns).
    skipped: list[str] = []


class SchemaResult(BaseModel):
    """Whether the candidate accepts what the champion's callers send and answers in the same types."""

    compatible: bool
    problems: list[str]


class FeatureSupply(BaseModel):
    """What the gateway looks up for a model's requests: its feature service's features the online store serves."""

    feature_service: str
    entities: list[str]
    online: list[str]
    offline: list[str]  # features of the service's views kept offline only: no request could get them


class ValidationReport(BaseModel):
    """Everything the validate step decided on, with the reasons for a rejection."""

    model: str
    candidate_version: str
    champion_version: str | None  # None: the model's first version, with nothing to compare against
    passed: bool
    reasons: list[str]
    contract: ContractResult | None
    # `schema` would shadow a BaseModel attribute: stored as schema_, read and written as "schema".
    schema_: SchemaResult | None = Field(default=None, alias="schema")
    evaluation: EvaluationResult | None
    features: FeatureSupply | None = None  # the model's Feast features, when it declares them

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


# --- data contract -----------------------------------------------------------------------------


def load_suite(suite_name: str, settings: Settings | None = None) -> dict[str, Any]:
    """The suite's JSON from the expectation folders (the user's first); a clear error when it does not exist."""
    settings = settings or get_settings()
    folders = settings.expectation_dirs
    path = (
        Path(suite_name)
        if suite_name.endswith(".json")
        else next(
            (d / f"{suite_name}.json" for d in folders if (d / f"{suite_name}.json").is_file()), folders[-1] / "-"
        )
    )
    if not path.is_file():
        known = sorted({p.stem for d in folders for p in d.glob("*.json")})
        raise ValueError(
            f"expectation suite {suite_name!r} not found in {', '.join(map(str, folders))} "
            f"(known: {', '.join(known) or 'none'}; RELEASEGATE_EXPECTATIONS_DIR adds folders of your "
            f"own)"
        )
    try:
        suite: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"expectation suite {path.name} is not valid JSON: {exc}") from exc
    return suite


def run_contract(
    df: pd.DataFrame,
    suite_name: str,
    settings: Settings | None = None,
    features_only: bool = False,
    logged: dict[str, DataClass] | None = None,
) -> ContractResult:
    """Run an expectation suite on a dataframe; `features_only` skips expectations marked `meta.label`
    (logged traffic has no label). `logged` names the columns the data holds in a protected form
    (`privacy.logged_classes`): a pseudonymised column's value set is checked on its tokens, an encrypted
    one's values not at all, and the other checks of their values are listed as skipped."""
    suite_json = load_suite(suite_name, settings)
    expectations = [
        e for e in suite_json.get("expectations", []) if not (features_only and (e.get("meta") or {}).get("label"))
    ]
    skipped: list[str] = []
    if logged:
        expectations, skipped = _in_logged_form(expectations, logged, settings)
    if not expectations:
        raise ValueError(f"expectation suite {suite_name!r} has no expectations to run")

    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In memory, no usage statistics, no progress bars: this runs inside Airflow tasks and tests.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(project_config=config, mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("releasegate")
        .add_dataframe_asset("frame")
        .add_batch_definition_whole_dataframe("whole")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = gx.ExpectationSuite(name=suite_json.get("name") or suite_name, expectations=expectations)
    result = batch.validate(suite, result_format="SUMMARY")

    expectations_run = [_config(r) for r in result.results]
    missing = {
        ran.kwargs.get("column")
        for r, ran in zip(result.results, expectations_run, strict=True)
        if ran.type == "expect_column_to_exist" and not r.success
    }
    failures = []
    for r, ran in zip(result.results, expectations_run, strict=True):
        column = ran.kwargs.get("column")
        # One line for a missing column, not one per expectation that could not run on it.
        if r.success or (column in missing and ran.type != "expect_column_to_exist"):
            continue
        failures.append(_describe_failure(r))
    return ContractResult(
        suite=suite.name,
        success=not failures,
        failures=failures,
        evaluated=len(result.results),
        rows=len(df),
        skipped=skipped,
    )


# Expectations about a column that hold whatever form its values are in.
_FORM_FREE = ("expect_column_to_exist", "expect_column_values_to_not_be_null")
_SETS = ("expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set")


def _in_logged_form(
    expectations: list[dict[str, Any]], logged: dict[str, DataClass], settings: Settings | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The expectations as they apply to protected columns: value sets of pseudonymised columns as tokens;
    other checks of protected values dropped, and named."""
    from releasegate.privacy import DataClass, Protector
    from releasegate.settings import get_settings

    protector = Protector.of(settings or get_settings())
    kept, skipped = [], []
    for e in expectations:
        kwargs = e.get("kwargs") or {}
        cls = logged.get(str(kwargs.get("column")))
        if cls is None or e.get("type") in _FORM_FREE:
            kept.append(e)
        elif cls is DataClass.pseudonymise and e.get("type") in _SETS:
            tokens = [protector.pseudonym(v) for v in kwargs.get("value_set", [])]
            kept.append(e | {"kwargs": kwargs | {"value_set": tokens}})
        else:
            form = "pseudonymised" if cls is DataClass.pseudonymise else "encrypted"
            skipped.append(f"{kwargs.get('column')}: {e.get('type')} (its values are logged {form})")
    return kept, skipped


def _config(r: ExpectationValidationResult) -> ExpectationConfiguration:
    """The expectation a result is of: a suite's validation sets it on every result."""
    config = r.expectation_config
    assert config is not None
    return config


def _describe_failure(r: ExpectationValidationResult) -> str:
    config = _config(r)
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column")}
    column = config.kwargs.get("column", "(table)")
    head = f"{column}: {config.type}"
    if kwargs:
        head += "(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    info = r.exception_info or {}
    if info.get("raised_exception"):
        message = (info.get("exception_message") or "error").strip().splitlines()[0]
        return f"{head} could not be evaluated: {message}"
    res = r.result or {}
    if config.type == "expect_column_to_exist":
        return f"{column}: column is missing"
    if "observed_value" in res:
        return f"{head}: observed {res['observed_value']}"
    if "unexpected_count" in res:
        examples = ", ".join(repr(v) for v in (res.get("partial_unexpected_list") or [])[:5])
        return f"{head}: {res['unexpected_count']} of {res.get('element_count', '?')} rows unexpected" + (
            f" (e.g. {examples})" if examples else ""
        )
    return f"{head}: failed"


# --- features from a feature store -------------------------------------------------------------


def feature_supply(model: str, settings: Settings | None = None) -> tuple[FeatureSupply | None, list[str]]:
    """The features the gateway would look up for `model` (None: it declares none), and the problems that keep
    it from serving them: a malformed declaration, no repository, an unknown service, offline-only features."""
    from releasegate import registry
    from releasegate.serving import features

    settings = settings or get_settings()
    try:
        declared = features.declaration(model, registry.get_model_tags(model, settings=settings))
        if declared is None:
            return None, []
        store = features.open_store(settings)
        _, online, offline = features.service_features(store, declared.feature_service)
    except features.FeatureDeclarationError as exc:
        return None, [f"features: {exc}"]
    supply = FeatureSupply(
        feature_service=declared.feature_service, entities=declared.entities, online=online, offline=offline
    )
    problems = (
        [
            f"features: feature service {declared.feature_service!r} has features the online store does not serve: "
            + ", ".join(offline)
        ]
        if offline
        else []
    )
    return supply, problems


# --- schema compatibility ----------------------------------------------------------------------


def check_schema_compatibility(
    model: str,
    candidate_version: str,
    champion_version: str,
    settings: Settings | None = None,
    features: FeatureSupply | None = None,
) -> SchemaResult:
    """Compare the two versions' MLflow signatures: the candidate may not need more than callers send and the
    gateway looks up (`features`), or retype anything."""
    from mlflow.models import Model

    from releasegate import registry

    settings = settings or get_settings()
    with tempfile.TemporaryDirectory(prefix="rg-schema-") as tmp:
        signatures = {}
        for role, version in (("candidate", candidate_version), ("champion", champion_version)):
            model_dir = registry.download_model(model, version, Path(tmp) / role, settings=settings)
            signatures[role] = Model.load(str(Path(model_dir) / "MLmodel")).signature
    return compare_signatures(signatures["candidate"], signatures["champion"], features)


def compare_signatures(candidate: Any, champion: Any, features: FeatureSupply | None = None) -> SchemaResult:
    """The pure core of `check_schema_compatibility`, on two `mlflow.models.ModelSignature`s (or None)."""
    problems: list[str] = []
    if candidate is None or candidate.inputs is None:
        problems.append("candidate has no input signature, so its inputs cannot be checked")
    if champion is None or champion.inputs is None:
        problems.append("champion has no input signature, so what its callers send is unknown")
    if problems:
        return SchemaResult(compatible=False, problems=problems)

    cand_in, champ_in = candidate.inputs, champion.inputs
    if not (cand_in.has_input_names() and champ_in.has_input_names()):
        if cand_in.to_dict() != champ_in.to_dict():
            problems.append(f"unnamed input signature changed: champion {champ_in}, candidate {cand_in}")
    else:
        sent = {spec.name: spec for spec in champ_in.inputs}
        for spec in cand_in.inputs:
            old = sent.get(spec.name)
            required = getattr(spec, "required", True)
            if old is None and features is not None and spec.name in features.online:
                continue  # the gateway looks it up
            if old is None:
                if required:
                    problems.append(
                        f"input {spec.name!r} is required by the candidate but not part of the "
                        f"champion's inputs, so callers do not send it"
                        + (
                            f", and the online store does not serve it in feature service {features.feature_service!r}"
                            if features is not None
                            else ""
                        )
                    )
                continue
            if _type(spec) != _type(old):
                problems.append(f"input {spec.name!r} changes type from {_type(old)} to {_type(spec)}")
            elif required and not getattr(old, "required", True):
                problems.append(f"input {spec.name!r} is optional for the champion but required by the candidate")

    cand_out, champ_out = candidate.outputs, champion.outputs
    if cand_out is not None and champ_out is not None:
        old_types = [_type(s) for s in champ_out.inputs]
        new_types = [_type(s) for s in cand_out.inputs]
        if old_types != new_types:
            problems.append(f"output type changes from {', '.join(old_types)} to {', '.join(new_types)}")
    return SchemaResult(compatible=not problems, problems=problems)


def _type(spec: Any) -> str:
    # DataType enums and numpy dtypes have a readable .name; a TensorSpec's shape is part of its type.
    kind = getattr(spec.type, "name", None) or str(spec.type)
    shape = getattr(spec, "shape", None)
    return f"{kind}{list(shape)}" if shape is not None else kind


# --- the validate step -------------------------------------------------------------------------


def validate_candidate(
    model: str,
    candidate_version: str,
    champion_version: str | None,
    policy: Policy | str,
    settings: Settings | None = None,
) -> ValidationReport:
    """Data contract on the candidate's holdout, schema compatibility and offline comparison with the champion.

    A model's first version (no champion) is held to its data contract only.
    """

    from releasegate import evaluation, registry
    from releasegate import policy as policy_module

    settings = settings or get_settings()
    if isinstance(policy, str):
        policy = policy_module.load(policy, settings.policy_dirs)
    candidate_version = str(registry.resolve_version(model, candidate_version, settings=settings))
    if champion_version is not None:
        champion_version = str(registry.resolve_version(model, champion_version, settings=settings))
    reasons: list[str] = []

    contract = None
    suite = registry.get_model_tags(model, settings=settings).get(SUITE_TAG)
    if not suite:
        reasons.append(f"registered model {model!r} has no {SUITE_TAG} tag, so its data contract cannot run")
    else:
        try:
            with tempfile.TemporaryDirectory(prefix="rg-holdout-") as tmp:
                holdout = registry.read_frame(model, candidate_version, HOLDOUT_ARTIFACT, dst=tmp, settings=settings)
            contract = run_contract(holdout, suite, settings=settings)
            if not contract.success:
                reasons.append(
                    f"data contract {suite!r} failed on the candidate's holdout: " + "; ".join(contract.failures)
                )
        except (ValueError, LookupError, OSError) as exc:
            reasons.append(f"data contract {suite!r} could not run: {describe(exc)}")

    supply, problems = feature_supply(model, settings)
    reasons.extend(problems)

    schema, result = None, None
    if champion_version is None:
        return ValidationReport(
            model=model,
            candidate_version=candidate_version,
            champion_version=None,
            passed=not reasons,
            reasons=reasons,
            contract=contract,
            schema=None,
            evaluation=None,
            features=supply,
        )
    schema = check_schema_compatibility(model, candidate_version, champion_version, settings=settings, features=supply)
    if not schema.compatible:
        reasons.append("schema incompatible with the champion: " + "; ".join(schema.problems))

    try:
        result = evaluation.compare(model, candidate_version, champion_version, policy, settings=settings)
        if not result.passed:
            reasons.extend(f"offline evaluation: {r}" for r in result.reasons)
    except Exception as exc:
        if _outage(exc):
            raise InfrastructureError(
                f"offline evaluation of {model} v{candidate_version} could not reach what it needs: {describe(exc)}"
            ) from exc
        # A candidate that cannot even score its holdout is a rejection, not a crash.
        reasons.append(f"offline evaluation failed: {describe(exc)}")

    return ValidationReport(
        model=model,
        candidate_version=candidate_version,
        champion_version=champion_version,
        passed=not reasons,
        reasons=reasons,
        contract=contract,
        schema=schema,
        evaluation=result,
        features=supply,
    )


def _outage(exc: BaseException) -> bool:
    """Whether `exc` is a dependency failing (MLflow, a database, the network), not the candidate's fault."""
    import requests
    import sqlalchemy as sa
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # A missing or refused thing is the version's problem; anything else is MLflow's.
        return exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    return isinstance(
        exc, (requests.ConnectionError, requests.Timeout, sa.exc.OperationalError, ConnectionError, TimeoutError)
    )
