"""A user's own models for the release tests: data made here (not the demo's churn), models, suites, a policy.

Two kinds of model, as a user brings them:

- `segments`: a three-class classifier. The classes are Gaussian clusters in (a, b) with a third
  coordinate c that separates them further, so a logistic regression on a, b, c is right 99.5 % of
  the time and one that ignores c 93 %; `d` is noise, `region` a category the default
  policy slices by (independent of the class: every region's accuracy is the overall one).
- `prices`: a regressor of a price in k€ (about 50 to 900), the one docs/your-model.md walks
  through (examples/your_model.py). The `stale` concept is last year's market, cheaper per m² and
  less sensitive to distance, so a model trained on it does well on its own holdout and badly on
  today's traffic.

Each registered version follows what a release expects of it: an MLflow signature and input
example, skops format, the artifacts `releasegate/reference.parquet` (training inputs) and
`releasegate/holdout.parquet` (what callers send, with the label), and the registered-model tags
naming its expectation suite and its label column.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from examples import your_model

EXPERIMENT = "releasegate-own-models"
REGIONS = ["north", "south", "east", "west"]

SEGMENT_LABEL = "segment"
SEGMENT_NUMERIC = ["a", "b", "c", "d"]
SEGMENT_FEATURES = SEGMENT_NUMERIC + ["region"]
OPTIONAL_FEATURE = "e"  # a newer signal: present for some rows of the training data, sent by no caller yet

PRICE_LABEL = your_model.LABEL
PRICE_FEATURES = your_model.FEATURES
PRICE_POLICY = your_model.POLICY  # the regression policy in the test's own policy folder


# --- data --------------------------------------------------------------------------------------


def segments(n: int, seed: int) -> pd.DataFrame:
    """`n` rows of the three-class data (features + `segment`), the same for the same seed."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 3, n)
    angle = 2 * np.pi * k / 3
    frame = pd.DataFrame(
        {
            "a": 2.0 * np.cos(angle) + rng.normal(0, 1, n),
            "b": 2.0 * np.sin(angle) + rng.normal(0, 1, n),
            "c": np.array([-4.0, 0.0, 4.0])[k] + rng.normal(0, 1, n),
            "d": rng.normal(0, 1, n),
            "region": rng.choice(REGIONS, size=n, p=[0.3, 0.25, 0.25, 0.2]),
        }
    )
    # The optional signal is a noisy copy of the class, and only some rows of the training data have it.
    frame[OPTIONAL_FEATURE] = np.where(rng.random(n) < 0.4, k + rng.normal(0, 0.5, n), np.nan)
    frame[SEGMENT_LABEL] = k.astype("int64")
    return frame


prices = your_model.homes  # the house-price data of examples/your_model.py, the docs' walk-through


# --- models ------------------------------------------------------------------------------------


def segment_classifier(numeric: list[str], optional: list[str] = ()) -> Any:
    """Scaled numbers (`optional` ones imputed with their mean), one-hot region, logistic regression.

    Every input column is declared in the signature; a column left out of `numeric` is accepted and unused.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts = [
        ("numeric", StandardScaler(), list(numeric)),
        ("region", OneHotEncoder(handle_unknown="ignore", sparse_output=False), ["region"]),
    ]
    if optional:
        # No missing-value indicator: skl2onnx converts this imputer, and not the indicator's extra column.
        parts.append(
            (
                "optional",
                Pipeline([("impute", SimpleImputer(strategy="mean")), ("scale", StandardScaler())]),
                list(optional),
            )
        )
    return Pipeline([("features", ColumnTransformer(parts)), ("model", LogisticRegression(max_iter=1000))])


price_regressor = your_model.regressor


# --- registration ------------------------------------------------------------------------------


def register(
    model: str,
    fitted: Any,
    inputs: pd.DataFrame,
    holdout: pd.DataFrame,
    *,
    role: str,
    optional: list[str] = (),
    settings=None,
) -> str:
    """Log `fitted` as a new version of `model` with signature, example and the release's two artifacts.

    `inputs`: the training inputs (the signature's columns; a sample becomes the reference data);
    `holdout`: what callers send, with the label column; `optional`: inputs the signature marks
    `required=False`.
    """
    import mlflow
    import sklearn
    import skops
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema

    from releasegate import registry, training
    from releasegate.settings import get_settings

    settings = settings or get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    example = inputs.head(5)
    signature = infer_signature(example, np.asarray(fitted.predict(example)))
    if optional:
        specs = [ColSpec(spec.type, spec.name, required=spec.name not in optional) for spec in signature.inputs.inputs]
        signature = ModelSignature(Schema(specs), signature.outputs)
    with mlflow.start_run(experiment_id=_experiment_id(settings), run_name=f"{model}-{role}"):
        mlflow.log_param("role", role)
        info = mlflow.sklearn.log_model(
            fitted,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=model,
            # Pinned: inferring requirements loads the model in a subprocess, seconds per version.
            pip_requirements=[
                f"scikit-learn=={sklearn.__version__}",
                f"pandas=={pd.__version__}",
                f"numpy=={np.__version__}",
                f"mlflow=={mlflow.__version__}",
                f"skops=={skops.__version__}",
            ],
            serialization_format="skops",
            skops_trusted_types=training.skops_trusted_types(fitted),
        )
        with tempfile.TemporaryDirectory(prefix="rg-own-") as tmp:
            reference, evaluation = Path(tmp) / "reference.parquet", Path(tmp) / "holdout.parquet"
            inputs.sample(min(len(inputs), 2000), random_state=0).reset_index(drop=True).to_parquet(reference)
            holdout.reset_index(drop=True).to_parquet(evaluation)
            mlflow.log_artifact(str(reference), artifact_path="releasegate")
            mlflow.log_artifact(str(evaluation), artifact_path="releasegate")
    version = str(info.registered_model_version)
    registry.set_version_tags(model, version, {"releasegate.own_role": role}, settings=settings)
    return version


def describe(model: str, suite: str, label: str, settings=None) -> None:
    """The registered-model tags a release reads: the expectation suite and the holdout's label column."""
    from releasegate import registry
    from releasegate.contract import LABEL_TAG, SUITE_TAG

    client = registry.client(settings)
    client.set_registered_model_tag(model, SUITE_TAG, suite)
    client.set_registered_model_tag(model, LABEL_TAG, label)


def _experiment_id(settings) -> str:
    from releasegate import registry

    client = registry.client(settings)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(EXPERIMENT, artifact_location=settings.mlflow_artifact_root.resolve().as_uri())


# --- expectation suites and the regression policy ------------------------------------------------


def _expect(kind: str, column: str, label: bool = False, **kwargs) -> dict:
    return {"type": f"expect_{kind}", "kwargs": {"column": column, **kwargs}, "meta": {"label": True} if label else {}}


def _numbers(column: str, low: float, high: float, label: bool = False) -> list[dict]:
    return [
        _expect("column_to_exist", column, label),
        _expect("column_values_to_not_be_null", column, label),
        _expect("column_values_to_be_between", column, label, min_value=low, max_value=high),
    ]


def segments_suite() -> dict:
    """The data contract of the three-class data: five inputs, no gaps, a known region, the class label."""
    expectations = [e for column in SEGMENT_NUMERIC for e in _numbers(column, -10, 10)]
    expectations += [
        _expect("column_to_exist", "region"),
        _expect("column_values_to_not_be_null", "region"),
        _expect("column_values_to_be_in_set", "region", value_set=REGIONS),
    ]
    expectations += [
        _expect("column_to_exist", SEGMENT_LABEL, True),
        _expect("column_values_to_not_be_null", SEGMENT_LABEL, True),
        _expect("column_values_to_be_in_set", SEGMENT_LABEL, True, value_set=[0, 1, 2]),
    ]
    return {"name": "segments", "expectations": expectations, "meta": {"owner": "tests/integration/own_models.py"}}


prices_suite = your_model.suite


def write_suites(folder: Path) -> dict[str, Path]:
    """The suites as JSON files in `folder` (a RELEASEGATE_EXPECTATIONS_DIR)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for suite in (segments_suite(), prices_suite()):
        paths[suite["name"]] = folder / f"{suite['name']}.json"
        paths[suite["name"]].write_text(json.dumps(suite, indent=2))
    return paths


def write_price_policy(folder: Path) -> Path:
    """The walk-through's regression policy (margins in k€) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{PRICE_POLICY}.yaml"
    path.write_text(yaml.safe_dump(your_model.policy(), sort_keys=False))
    return path
