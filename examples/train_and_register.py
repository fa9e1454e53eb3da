"""Train a churn model and register it in MLflow as releasegate expects, then point `challenger` at it.

What CI runs before `releasegate sign` and `releasegate trigger` (see .github/workflows/release.yml).
A version is releasable when it has, beside the model: `releasegate/reference.parquet` (a sample of
the training inputs: drift and contracts compare live traffic with it) and
`releasegate/holdout.parquet` (labelled evaluation data: the offline comparison with the
champion). Replace the demo data with your own training; keep those two artifacts.

Then sign it here, where it was built: a deployment in `verify-only` mode holds public keys only and
rejects an unsigned candidate.

    python examples/train_and_register.py --model churn            # prints the new version
    releasegate sign models:/churn/VERSION                         # with RELEASEGATE_SIGNING_KEY
"""

from __future__ import annotations

import argparse
import os
from importlib import metadata


def train_and_register(model: str, rows: int, seed: int, alias: str | None) -> str:
    import mlflow
    from mlflow.models import infer_signature

    from releasegate import training
    from releasegate.demo import data
    from releasegate.demo.models import build_pipeline

    train = data.generate(rows, seed=seed)
    holdout = data.generate(max(rows // 5, 500), seed=seed + 1)
    x, y = train[data.FEATURES], train[data.LABEL]
    pipeline = build_pipeline("binned_logistic").fit(x, y)
    accuracy = float((pipeline.predict(holdout[data.FEATURES]) == holdout[data.LABEL]).mean())
    example = x.head(5)

    mlflow.set_experiment(f"{model}-training")
    with mlflow.start_run(run_name=f"{model}-ci-{os.environ.get('GITHUB_SHA', 'local')[:8]}"):
        mlflow.log_metric("holdout_accuracy", accuracy)
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            registered_model_name=model,
            input_example=example,
            signature=infer_signature(example, pipeline.predict(example).astype("int64")),
            serialization_format="skops",
            skops_trusted_types=training.skops_trusted_types(pipeline),
            # Listed rather than inferred: inferring loads the model in a subprocess.
            pip_requirements=[
                f"{dist}=={metadata.version(dist)}" for dist in ("scikit-learn", "pandas", "numpy", "mlflow", "skops")
            ],
        )
        # Drift compares live inputs with the reference; validation compares the versions on the holdout.
        training.log_release_data(x.sample(min(len(x), 5000), random_state=seed), holdout)
    version = str(info.registered_model_version)
    # The data contract (include/expectations/churn.json) and the holdout's label column.
    training.tag_model(model, suite="churn", label=data.LABEL)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(model, alias, version)
    print(f"registered {model} v{version} (holdout accuracy {accuracy:.3f})" + (f", alias {alias}" if alias else ""))
    print(f"next, sign it where it was built: releasegate sign models:/{model}/{version}")
    return version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="churn")
    parser.add_argument("--rows", type=int, default=20_000, help="training rows")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("GITHUB_RUN_NUMBER", "1")))
    parser.add_argument("--alias", default="challenger", help="alias to point at the new version ('' for none)")
    args = parser.parse_args()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        parser.error("set MLFLOW_TRACKING_URI to the MLflow server the release pipeline reads")
    version = train_and_register(args.model, args.rows, args.seed, args.alias or None)
    if os.environ.get("GITHUB_OUTPUT"):  # for the next steps: steps.<id>.outputs.version, .model_uri
        with open(os.environ["GITHUB_OUTPUT"], "a") as out:
            out.write(f"version={version}\nmodel_uri=models:/{args.model}/{version}\n")


if __name__ == "__main__":
    main()
