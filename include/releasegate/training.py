"""What a training script calls to register a version the way a release expects it (docs/your-model.md).

A releasable version has, beside the model (with its signature and input example), two data
artifacts in its run, `releasegate/reference.parquet` and `releasegate/holdout.parquet`, and its
registered model the tags `releasegate.expectation_suite` and `releasegate.label`. A model whose
features live in Feast builds its training set with `historical_features` and declares them with
`declare_features`, so the gateway looks them up at inference (docs/features.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from releasegate.contract import FEAST_TAG, LABEL_TAG, SUITE_TAG, MissingFeatures

if TYPE_CHECKING:
    import pandas as pd

    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import FeatureStore


def skops_trusted_types(estimator: Any) -> list[str]:
    """The types skops refuses to load from `estimator` unless told they are trusted: pass them to log_model.

    skops (MLflow's safe format) loads only types it knows; an estimator's own internals (a gradient
    boosting model's tree nodes, numpy dtypes) are listed here so the person who built the model can
    trust them by name, instead of finding them one failed save at a time.
    """
    import skops.io

    return list(skops.io.get_untrusted_types(data=skops.io.dumps(estimator)))


def log_release_data(reference: pd.DataFrame, holdout: pd.DataFrame, *, encrypt: bool | None = None) -> None:
    """Log the training-input sample (drift's reference) and the labelled holdout into the active MLflow run;
    sealed with the deployment's data key when `encrypt` (default: RELEASEGATE_ENCRYPT_DATA_ARTIFACTS)."""
    import mlflow

    from releasegate.settings import get_settings

    settings = get_settings()
    protector = None
    if settings.encrypt_data_artifacts if encrypt is None else encrypt:
        from releasegate.privacy import Protector

        protector = Protector.of(settings)
    with tempfile.TemporaryDirectory(prefix="rg-release-data-") as tmp:
        for name, frame in (("reference", reference), ("holdout", holdout)):
            path = Path(tmp) / f"{name}.parquet"
            frame.reset_index(drop=True).to_parquet(path)
            if protector is not None:
                path.write_bytes(protector.seal(path.read_bytes()))
            mlflow.log_artifact(str(path), artifact_path="releasegate")


def tag_model(model: str, *, suite: str, label: str) -> None:
    """Name the registered model's expectation suite (a JSON on the suite search path) and its label column."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_registered_model_tag(model, SUITE_TAG, suite)
    client.set_registered_model_tag(model, LABEL_TAG, label)


def historical_features(store: FeatureStore, entity_rows: pd.DataFrame, feature_service: str) -> pd.DataFrame:
    """The training set: each of `entity_rows` (entity keys, `event_timestamp`, label, the request's own fields)
    with the service's features as they were at its timestamp (Feast's point-in-time join), in its order."""
    service = store.get_feature_service(feature_service)
    # Feast returns the rows in an order of its own and passes extra columns through: a row number restores it.
    numbered = entity_rows.reset_index(drop=True).assign(_releasegate_row=range(len(entity_rows)))
    frame = store.get_historical_features(entity_df=numbered, features=service).to_df()
    return frame.sort_values("_releasegate_row").drop(columns="_releasegate_row").reset_index(drop=True)


def declare_features(
    model: str,
    *,
    feature_service: str,
    entities: list[str],
    on_missing: MissingFeatures = MissingFeatures.reject,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Tag the registered model with the Feast features the gateway looks up for its requests (releasegate.feast)."""
    import mlflow

    from releasegate.serving.features import FeastDeclaration

    declared = FeastDeclaration(
        feature_service=feature_service, entities=entities, on_missing=on_missing, defaults=defaults or {}
    )
    mlflow.MlflowClient().set_registered_model_tag(model, FEAST_TAG, declared.model_dump_json())
