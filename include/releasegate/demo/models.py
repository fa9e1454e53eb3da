"""The demo's three registered versions: a logistic-regression champion, a better and a worse candidate.

v1 champion: logistic regression on current data. v2 "good": logistic regression on binned numeric
features, on current data (it learns the curves and thresholds the plain linear model cannot, at almost
the same cost per call, so it also passes the latency guardrail). v3 "bad": the same binned model
trained and held out on a stale snapshot, so it passes offline validation and fails on live traffic.
All three convert to ONNX, so the gateway serves them on its compiled path (serving/compiled.py);
`spline_logistic` (spline features, which skl2onnx cannot convert) stays for the sklearn path.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypedDict

from releasegate.contract import CLASSIFICATION_TAG, LABEL_TAG, SUITE_TAG
from releasegate.demo import data
from releasegate.settings import Settings, get_settings
from releasegate.training import log_release_data, skops_trusted_types

if TYPE_CHECKING:
    from mlflow import MlflowClient

ROLES = ("champion", "good", "bad")
ROLE_TAG = "releasegate.demo_role"
EXPERIMENT = "releasegate-demo"
TRAIN_ROWS, REFERENCE_ROWS, HOLDOUT_ROWS = 20_000, 5_000, 3_000


class _Spec(TypedDict):
    """How one role's version is trained and described."""

    kind: str
    concept: str
    train_seed: int
    holdout_seed: int
    description: str


# Seeds away from the traffic generator's default (7), so live traffic is never the training data.
_SPECS: dict[str, _Spec] = {
    "champion": {
        "kind": "logistic_regression",
        "concept": "current",
        "train_seed": 1001,
        "holdout_seed": 2001,
        "description": "Logistic regression on current data: the model in production.",
    },
    "good": {
        "kind": "binned_logistic",
        "concept": "current",
        "train_seed": 1002,
        "holdout_seed": 2002,
        "description": "Logistic regression on binned numeric features, current data: learns curves and thresholds.",
    },
    "bad": {
        "kind": "binned_logistic",
        "concept": "stale",
        "train_seed": 1003,
        "holdout_seed": 2003,
        "description": "The binned model on a stale snapshot: fine on its own holdout, wrong on live traffic.",
    },
}


def say(message: str) -> None:
    print(f"[demo.models] {message}", flush=True)


def build_pipeline(kind: str) -> Any:
    """An unfitted sklearn Pipeline: one-hot categoricals, scaled numerics, then the estimator."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import KBinsDiscretizer, OneHotEncoder, SplineTransformer, StandardScaler

    estimators = {
        "logistic_regression": lambda: LogisticRegression(max_iter=1000),
        "spline_logistic": lambda: LogisticRegression(max_iter=2000, C=0.5),
        "binned_logistic": lambda: LogisticRegression(max_iter=2000, C=0.5),
        "gradient_boosting": lambda: HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=0),
    }
    if kind not in estimators:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(estimators)})")
    if kind == "binned_logistic":
        continuous = [c for c in data.NUMERIC if c not in data.COUNTS]
        features = ColumnTransformer(
            [
                (
                    "bins",
                    KBinsDiscretizer(
                        n_bins=8, encode="onehot-dense", strategy="quantile", quantile_method="averaged_inverted_cdf"
                    ),
                    continuous,
                ),
                # A count has too few values for quantile bins: one column per value (its effect is a threshold).
                ("counts", OneHotEncoder(handle_unknown="ignore", sparse_output=False), data.COUNTS),
                ("categorical", OneHotEncoder(handle_unknown="ignore", sparse_output=False), data.CATEGORICAL),
            ]
        )
        return Pipeline([("features", features), ("model", estimators[kind]())])
    if kind == "spline_logistic":
        features = ColumnTransformer(
            [
                ("splines", SplineTransformer(n_knots=6, degree=3), data.NUMERIC),
                ("categorical", OneHotEncoder(handle_unknown="ignore", sparse_output=False), data.CATEGORICAL),
            ]
        )
        return Pipeline([("features", features), ("scale", StandardScaler()), ("model", estimators[kind]())])
    features = ColumnTransformer(
        [
            ("numeric", StandardScaler(), data.NUMERIC),
            ("categorical", OneHotEncoder(handle_unknown="ignore"), data.CATEGORICAL),
        ]
    )
    return Pipeline([("features", features), ("model", estimators[kind]())])


def register_demo_models(settings: Settings | None = None, model_name: str = "churn") -> dict[str, str]:
    """Train and register champion, good and bad versions (once); returns {"champion": "1", "good": "2", "bad": "3"}."""
    import mlflow

    from releasegate import registry

    settings = settings or get_settings()
    client = registry.client(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # registered_model_name= registers there

    versions = _existing(client, model_name)
    for role in ROLES:
        if role in versions:
            say(f"{model_name} v{versions[role]} ({role}) already registered")
            continue
        versions[role] = _train_and_register(client, model_name, role, settings)

    if not registry.get_model_tags(model_name, settings=settings).get(SUITE_TAG):
        client.set_registered_model_tag(model_name, SUITE_TAG, "churn")
    if not registry.get_model_tags(model_name, settings=settings).get(LABEL_TAG):
        client.set_registered_model_tag(model_name, LABEL_TAG, data.LABEL)
    # What the log may hold of each column (docs/operations.md, "Personal data"): where the customer lives only as
    # a token, so its slices are still reported; other text as tokens too, numbers as sent.
    if not registry.get_model_tags(model_name, settings=settings).get(CLASSIFICATION_TAG):
        classes = {"columns": {"region": "pseudonymise"}, "strings": "pseudonymise", "others": "public"}
        client.set_registered_model_tag(model_name, CLASSIFICATION_TAG, json.dumps(classes))
    # Only a fresh registry gets the starting aliases: a rerun after a promotion must not undo it.
    if registry.get_alias(model_name, "champion", settings=settings) is None:
        registry.set_alias(model_name, "champion", versions["champion"], settings=settings)
    if registry.get_alias(model_name, "challenger", settings=settings) is None:
        registry.set_alias(model_name, "challenger", versions["good"], settings=settings)
    say(
        f"{model_name}: champion v{versions['champion']}, good candidate v{versions['good']}, "
        f"bad candidate v{versions['bad']}"
    )
    return {role: versions[role] for role in ROLES}


def _existing(client: MlflowClient, model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return {}
    versions: dict[str, str] = {}
    for mv in sorted(found, key=lambda mv: int(mv.version)):
        role = (mv.tags or {}).get(ROLE_TAG)
        if role in ROLES and role not in versions:
            versions[role] = str(mv.version)
    return versions


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    if settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        # A tracking server stores (or proxies) artifacts itself; a path here exists on this machine only.
        return client.create_experiment(EXPERIMENT)
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(EXPERIMENT, artifact_location=settings.mlflow_artifact_root.resolve().as_uri())


def _train_and_register(client: MlflowClient, model_name: str, role: str, settings: Settings) -> str:
    import mlflow
    import numpy as np
    import pandas as pd
    import sklearn
    import skops
    from mlflow.models import infer_signature

    spec = _SPECS[role]
    say(f"training {role}: {spec['kind']} on {TRAIN_ROWS} rows of {spec['concept']} data")
    train = data.generate(TRAIN_ROWS, seed=spec["train_seed"], concept=spec["concept"])
    holdout = data.generate(HOLDOUT_ROWS, seed=spec["holdout_seed"], concept=spec["concept"])
    x, y = train[data.FEATURES], train[data.LABEL]
    pipeline = build_pipeline(spec["kind"]).fit(x, y)
    holdout_accuracy = float((pipeline.predict(holdout[data.FEATURES]) == holdout[data.LABEL]).mean())
    example = x.head(5)
    signature = infer_signature(example, pipeline.predict(example).astype("int64"))

    with mlflow.start_run(experiment_id=_experiment_id(client, settings), run_name=f"{model_name}-{role}"):
        mlflow.log_params(
            {
                "kind": spec["kind"],
                "concept": spec["concept"],
                "train_rows": TRAIN_ROWS,
                "train_seed": spec["train_seed"],
            }
        )
        mlflow.log_metric("holdout_accuracy", holdout_accuracy)
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=model_name,
            # Pinned here because inferring requirements loads the model in a subprocess (seconds each).
            pip_requirements=[
                f"scikit-learn=={sklearn.__version__}",
                f"pandas=={pd.__version__}",
                f"numpy=={np.__version__}",
                f"mlflow=={mlflow.__version__}",
                f"skops=={skops.__version__}",
            ],
            serialization_format="skops",
            skops_trusted_types=skops_trusted_types(pipeline),
        )
        log_release_data(x.sample(REFERENCE_ROWS, random_state=spec["train_seed"]), holdout)

    version = str(info.registered_model_version)
    client.set_model_version_tag(model_name, version, ROLE_TAG, role)
    client.update_model_version(model_name, version, description=spec["description"])
    say(f"registered {model_name} v{version} ({role}); accuracy on its own holdout {holdout_accuracy:.3f}")
    return version
