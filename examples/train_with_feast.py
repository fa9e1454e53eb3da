"""Train the churn model on features from Feast and register it so the gateway looks them up at inference.

The training set comes from Feast's point-in-time join (`get_historical_features`): each labelled row
gets the account features as they were when its label was observed, not as they are now. The
registered model declares its feature service and entity key (the `releasegate.feast` tag), so a
request to the gateway carries only `customer_id` and its own fields (age, region, plan, channel).
Without `--repo`, it builds the demo's feature repository (SQLite online store) in a folder of its own.

    python examples/train_with_feast.py --model churn-feast --repo path/to/feature_repo
    RELEASEGATE_FEAST_REPO=path/to/feature_repo releasegate-gateway …   # the gateway reads the same repository
"""

from __future__ import annotations

import argparse
import os
from importlib import metadata
from pathlib import Path

from releasegate.contract import MissingFeatures


def train_and_register(
    model: str,
    repo: Path,
    *,
    kind: str = "logistic_regression",
    on_missing: MissingFeatures = MissingFeatures.reject,
    defaults: dict | None = None,
    extra_column: str | None = None,
) -> str:
    """Train on the repository's labelled customers with their point-in-time features; returns the new version.

    `extra_column` adds a numeric input of that name that neither the store nor callers have (for tests).
    """
    import mlflow
    import pandas as pd

    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import FeatureStore
    from mlflow.models import infer_signature

    from releasegate import training
    from releasegate.demo import data, feature_repo
    from releasegate.demo.models import build_pipeline

    store = FeatureStore(repo_path=str(repo))
    labelled = pd.read_parquet(repo / "labelled.parquet")
    frame = training.historical_features(store, labelled, feature_repo.FEATURE_SERVICE)
    columns = list(data.FEATURES)
    if extra_column:
        frame[extra_column] = range(len(frame))
        columns.append(extra_column)
    split = int(len(frame) * 0.8)
    train, holdout = frame.iloc[:split], frame.iloc[split:]
    x = train[columns]
    pipeline = build_pipeline(kind).fit(x, train[data.LABEL])
    accuracy = float((pipeline.predict(holdout[columns]) == holdout[data.LABEL]).mean())
    example = x.head(5)
    with mlflow.start_run(run_name=f"{model}-feast"):
        mlflow.log_metric("holdout_accuracy", accuracy)
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            registered_model_name=model,
            input_example=example,
            signature=infer_signature(example, pipeline.predict(example).astype("int64")),
            serialization_format="skops",
            skops_trusted_types=training.skops_trusted_types(pipeline),
            pip_requirements=[
                f"{dist}=={metadata.version(dist)}" for dist in ("scikit-learn", "pandas", "numpy", "mlflow", "skops")
            ],
        )
        training.log_release_data(x.sample(min(len(x), 5000), random_state=0), holdout[[*columns, data.LABEL]])
    training.tag_model(model, suite="churn", label=data.LABEL)
    training.declare_features(
        model,
        feature_service=feature_repo.FEATURE_SERVICE,
        entities=[feature_repo.ENTITY],
        on_missing=on_missing,
        defaults=defaults,
    )
    version = str(info.registered_model_version)
    print(f"registered {model} v{version} (holdout accuracy {accuracy:.3f}), features from {repo}")
    return version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="churn-feast")
    parser.add_argument("--repo", type=Path, default=None, help="a Feast repository built by the demo's feature_repo")
    parser.add_argument("--customers", type=int, default=5_000, help="customers in a repository built here")
    args = parser.parse_args()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        parser.error("set MLFLOW_TRACKING_URI to the MLflow server the release pipeline reads")
    repo = args.repo
    if repo is None:
        from releasegate.demo import feature_repo

        repo = Path("feature_repo").resolve()
        feature_repo.build(repo, n=args.customers)
        print(f"built the demo's feature repository in {repo} (SQLite online store)")
    train_and_register(args.model, repo)


if __name__ == "__main__":
    main()
