"""`releasegate check`: what a registered version lacks for a release, said before a release finds it.

Every finding names what is wrong and how to fix it. Nothing here unpickles the model: the release
loads it only after its signature is verified, so the check reads the MLmodel file, the artifacts,
the tags and the policy, and verifies a signature that exists.
"""

from __future__ import annotations

import tempfile
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from releasegate.contract import SUITE_TAG
from releasegate.errors import describe
from releasegate.settings import Settings, SigningMode, get_settings

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models import ModelSignature

    from releasegate.policy import Policy


class Level(StrEnum):
    ok = "ok"
    warning = "warning"  # the release runs, but something will be weaker than it could be
    error = "error"  # the release would be rejected, or could not run


class Finding(BaseModel):
    level: Level
    topic: str
    message: str


class CheckReport(BaseModel):
    model: str
    version: str
    policy: str
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level is Level.error]


class _Findings:
    def __init__(self) -> None:
        self.items: list[Finding] = []

    def ok(self, topic: str, message: str) -> None:
        self.items.append(Finding(level=Level.ok, topic=topic, message=message))

    def warn(self, topic: str, message: str) -> None:
        self.items.append(Finding(level=Level.warning, topic=topic, message=message))

    def error(self, topic: str, message: str) -> None:
        self.items.append(Finding(level=Level.error, topic=topic, message=message))


# A label with more distinct numeric values than this looks like a regression target.
_CLASSES_AT_MOST = 20


def check_version(
    model: str, version: str, policy_name: str = "default", settings: Settings | None = None
) -> CheckReport:
    """Everything a release of models:/model/version needs, checked without loading the model."""
    from releasegate import policy as policies
    from releasegate import registry

    settings = settings or get_settings()
    found = _Findings()
    try:
        version = registry.resolve_version(model, version, settings=settings)
    except registry.RegistryError as err:
        found.error("registry", f"{err}: register it with mlflow.<flavor>.log_model(..., registered_model_name=...)")
        return CheckReport(model=model, version=str(version), policy=policy_name, findings=found.items)
    found.ok("registry", f"{model} v{version} is registered")
    try:
        policy = policies.load(policy_name, settings.policy_dirs)
        found.ok(
            "policy",
            f"policy {policy.name}: offline {policy.offline.metric} (margin {policy.offline.margin:g}), "
            f"online {policy.primary.metric} (margin {policy.primary.margin:g})",
        )
    except policies.PolicyError as err:
        found.error("policy", str(err))
        policy = None

    with tempfile.TemporaryDirectory(prefix="rg-check-") as tmp:
        signature = _signature(model, version, Path(tmp), settings, found)
        holdout = _holdout(model, version, Path(tmp), settings, found)
    _reference(model, version, settings, found)
    label = _label(model, holdout, settings, found) if holdout is not None else None
    if holdout is not None and signature is not None:
        _holdout_columns(holdout, signature, label, found)
    if policy is not None and holdout is not None:
        _against_policy(policy, holdout, label, found)
    if holdout is not None:
        _contract(model, holdout, label, settings, found)
    _champion(model, version, settings, found)
    _signing(model, version, settings, found)
    return CheckReport(model=model, version=version, policy=policy_name, findings=found.items)


def _signature(model: str, version: str, tmp: Path, settings: Settings, found: _Findings) -> ModelSignature | None:
    from mlflow.models import Model

    from releasegate import registry

    try:
        model_dir = registry.download_model(model, version, tmp / "model", settings=settings)
        meta = Model.load(str(model_dir / "MLmodel"))
    except Exception as err:
        found.error("model", f"the model directory cannot be read: {describe(err)}")
        return None
    signature: ModelSignature | None = meta.signature  # mlflow leaves the property unannotated
    if signature is None or signature.inputs is None:
        found.error(
            "signature",
            "no input signature: log the model with "
            "signature=mlflow.models.infer_signature(X, model.predict(X)); the gateway checks "
            "every request against it and validation compares it with the champion's",
        )
        return None
    if not signature.inputs.has_input_names() or signature.inputs.is_tensor_spec():
        found.warn(
            "signature",
            "the input signature has no named columns: the gateway cannot check requests "
            "column by column, and schema changes cannot be compared",
        )
    else:
        required = [s.name for s in signature.inputs.inputs if getattr(s, "required", True)]
        found.ok("signature", f"{len(signature.inputs.inputs)} input columns ({len(required)} required)")
    if meta.saved_input_example_info is None:
        found.warn(
            "signature",
            "no input example: the gateway warms the model up with placeholder values "
            "instead (log the model with input_example=X.head(5))",
        )
    flavors = meta.flavors.get("sklearn") or {}
    if flavors.get("serialization_format") in ("pickle", "cloudpickle"):
        found.warn(
            "model",
            f"saved with {flavors['serialization_format']}: loading it runs code. releasegate loads "
            f"it only after its signature verifies; serialization_format='skops' avoids the risk",
        )
    return signature


def _holdout(model: str, version: str, tmp: Path, settings: Settings, found: _Findings) -> pd.DataFrame | None:

    from releasegate import registry
    from releasegate.evaluation import HOLDOUT_ARTIFACT

    try:
        holdout = registry.read_frame(model, version, HOLDOUT_ARTIFACT, dst=tmp / "holdout", settings=settings)
    except registry.RegistryError:
        found.error(
            "holdout",
            f"no {HOLDOUT_ARTIFACT}: log labelled evaluation data with "
            f"mlflow.log_artifact('holdout.parquet', artifact_path='releasegate') in the "
            f"version's run; validation compares the candidate with the champion on it",
        )
        return None
    except Exception as err:
        found.error("holdout", f"{HOLDOUT_ARTIFACT} is not readable parquet: {describe(err)}")
        return None
    found.ok("holdout", f"{HOLDOUT_ARTIFACT}: {len(holdout):,} rows, {len(holdout.columns)} columns")
    return holdout


def _reference(model: str, version: str, settings: Settings, found: _Findings) -> None:
    from releasegate import registry

    if registry.has_artifact(model, version, "releasegate/reference.parquet", settings=settings):
        found.ok("reference", "releasegate/reference.parquet is there (drift compares live inputs with it)")
    else:
        found.warn(
            "reference",
            "no releasegate/reference.parquet (a sample of the training inputs): drift "
            "reports have nothing to compare live inputs with",
        )


def _label(model: str, holdout: pd.DataFrame, settings: Settings, found: _Findings) -> str | None:
    from releasegate import evaluation

    try:
        label = evaluation.label_column(model, list(holdout.columns), settings=settings)
    except ValueError as err:
        found.error("label", str(err))
        return None
    found.ok("label", f"label column {label!r}")
    return label


def _holdout_columns(holdout: pd.DataFrame, signature: ModelSignature, label: str | None, found: _Findings) -> None:
    if not signature.inputs.has_input_names():
        return
    required = [s.name for s in signature.inputs.inputs if getattr(s, "required", True)]
    missing = [c for c in required if c not in holdout.columns]
    if missing:
        found.error("holdout", f"the holdout lacks the model's required input column(s) {', '.join(missing)}")
    if label is not None and label in [s.name for s in signature.inputs.inputs]:
        found.error("label", f"the label {label!r} is also a model input: the model would see the answer")


def _against_policy(policy: Policy, holdout: pd.DataFrame, label: str | None, found: _Findings) -> None:
    import pandas as pd

    if len(holdout) < policy.offline.min_rows:
        found.error(
            "holdout",
            f"{len(holdout):,} holdout rows, policy {policy.name} needs offline.min_rows = "
            f"{policy.offline.min_rows:,}: log a bigger holdout, or lower offline.min_rows in a "
            f"policy of your own (RELEASEGATE_POLICIES_DIR)",
        )
    missing = [s for s in policy.slices if s not in holdout.columns]
    if missing:
        found.warn(
            "policy",
            f"policy {policy.name} slices by {', '.join(missing)}, which the holdout does not have: "
            f"those slices are not analysed (set `slices` in a policy of your own)",
        )
    if label is None or label not in holdout.columns:
        return
    y = holdout[label]
    numeric = pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
    looks_continuous = numeric and y.nunique() > _CLASSES_AT_MOST
    if looks_continuous and not policy.regression:
        found.error(
            "policy",
            f"label {label!r} has {y.nunique():,} distinct numeric values (a regression target), "
            f"but policy {policy.name} judges a classifier ({policy.primary.metric}): use a "
            f"regression policy (examples/policies/regression.yaml)",
        )
    elif policy.regression and not numeric:
        found.error("policy", f"policy {policy.name} judges a regressor, but label {label!r} is not numeric")


def _contract(model: str, holdout: pd.DataFrame, label: str | None, settings: Settings, found: _Findings) -> None:
    from releasegate import registry, validation

    suite = registry.get_model_tags(model, settings=settings).get(SUITE_TAG)
    if not suite:
        found.error(
            "contract",
            f"the registered model has no {SUITE_TAG} tag: write a Great Expectations "
            f"suite (JSON) into a folder of RELEASEGATE_EXPECTATIONS_DIR and tag the model with "
            f"its name",
        )
        return
    try:
        result = validation.run_contract(holdout, suite, settings=settings)
    except ValueError as err:
        found.error("contract", str(err))
        return
    if result.success:
        found.ok("contract", f"suite {suite!r}: {result.evaluated} expectations pass on the holdout")
    else:
        found.error("contract", f"suite {suite!r} fails on the holdout: {'; '.join(result.failures)}")


def _champion(model: str, version: str, settings: Settings, found: _Findings) -> None:
    from releasegate import registry, validation

    champion = registry.get_alias(model, "champion", settings=settings)
    if champion is None:
        found.ok("champion", "no champion yet: this version would be the model's first (no comparison)")
        return
    if champion == version:
        found.error("champion", f"v{version} is already the champion: nothing to release")
        return
    try:
        schema = validation.check_schema_compatibility(model, version, champion, settings=settings)
    except Exception as err:
        found.error("schema", f"cannot compare with champion v{champion}: {describe(err)}")
        return
    if schema.compatible:
        found.ok("schema", f"inputs compatible with champion v{champion} (callers' columns suffice)")
    else:
        found.error("schema", f"incompatible with champion v{champion}: {'; '.join(schema.problems)}")


def _signing(model: str, version: str, settings: Settings, found: _Findings) -> None:
    from releasegate import signing

    if signing.is_signed(model, version, settings=settings):
        try:
            signing.fetch_verified(model, version, settings=settings).remove()
        except signing.SignatureError as err:
            found.error("signature", f"{err}")
            return
        found.ok("signature", "signed, and the signature verifies with a trusted key")
    elif settings.signing_mode is SigningMode.sign and settings.signing_key.is_file():
        found.ok("signature", f"not signed yet: the release signs it with {settings.signing_key}")
    else:
        why = (
            "this deployment only verifies (RELEASEGATE_SIGNING_MODE=verify-only)"
            if settings.signing_mode is SigningMode.verify_only
            else f"there is no signing key at {settings.signing_key}"
        )
        found.error(
            "signature",
            f"not signed, and {why}: sign it where it is built (`releasegate sign models:/{model}/{version}`)",
        )
