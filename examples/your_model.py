"""Your own regressor through a release: the steps of docs/your-model.md, on data made here.

A house-price model (`prices`, in k€): a champion trained on a mix of this year's and last year's
market, a better candidate on this year's only, and a worse one on last year's only. Replace the
data and the estimator with yours; keep the rest (signature, input example, skops, the two data
artifacts, the two tags).

    python examples/your_model.py setup my-releasegate     # your policy and expectation suite folders
    python examples/your_model.py register champion        # prints the version
    python examples/your_model.py register better         # (or worse), alias challenger
    python examples/your_model.py live-rows rows.parquet   # rows to replay as traffic, with the label
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODEL = "prices"
LABEL = "price"
FEATURES = ["size_m2", "age_years", "distance_km", "rooms"]
POLICY = "prices"
SUITE = "prices"
ROLES = {  # role → (rows of this year's market, rows of last year's)
    "champion": (3_750, 1_250),
    "better": (5_000, 0),
    "worse": (0, 5_000),
}


def homes(n: int, seed: int, concept: str = "current") -> pd.DataFrame:
    """`n` homes (features + `price` in k€); `concept="stale"` prices them as last year's market did."""
    if concept not in ("current", "stale"):
        raise ValueError(f"concept must be current or stale, got {concept!r}")
    rng = np.random.default_rng(seed)
    size = rng.uniform(30, 200, n)
    age = rng.uniform(0, 80, n)
    distance = np.clip(rng.exponential(8, n), 0, 40)
    rooms = np.clip(np.rint(size / 30 + rng.normal(0, 0.7, n)), 1, 8).astype("int64")
    per_m2, per_km = (3.2, 4.0) if concept == "current" else (2.2, 1.5)
    price = 200 + per_m2 * size - 1.1 * age - per_km * distance + 8 * rooms + rng.normal(0, 12, n)
    return pd.DataFrame(
        {
            "size_m2": size.round(1),
            "age_years": age.round(1),
            "distance_km": distance.round(2),
            "rooms": rooms,
            LABEL: price.round(2),
        }
    )


def regressor() -> Any:
    """Ridge regression on the four inputs as they come."""
    from sklearn.linear_model import Ridge

    return Ridge(alpha=1.0)


def training_rows(role: str, seed: int = 11) -> pd.DataFrame:
    current, stale = ROLES[role]
    parts = [homes(current, seed)] if current else []
    parts += [homes(stale, seed + 1, "stale")] if stale else []
    return pd.concat(parts, ignore_index=True)


def register(role: str, *, seed: int = 11, alias: str | None = None) -> str:
    """Train the role's model and register it as a release expects; returns the new version."""
    import mlflow
    from mlflow.models import infer_signature

    from releasegate import training

    train = training_rows(role, seed)
    # The holdout is what the candidate will meet: for "worse", last year's homes, so it looks fine offline.
    holdout = homes(1_500, seed + 2, "stale" if role == "worse" else "current")
    fitted = regressor().fit(train[FEATURES], train[LABEL])
    example = train[FEATURES].head(5)
    mlflow.set_experiment(f"{MODEL}-training")
    with mlflow.start_run(run_name=f"{MODEL}-{role}"):
        info = mlflow.sklearn.log_model(
            fitted,
            name="model",
            registered_model_name=MODEL,
            input_example=example,
            signature=infer_signature(example, fitted.predict(example)),
            serialization_format="skops",
            skops_trusted_types=training.skops_trusted_types(fitted),
            pip_requirements=["scikit-learn", "pandas", "numpy", "skops"],
        )
        training.log_release_data(train[FEATURES].sample(min(len(train), 2_000), random_state=0), holdout)
    training.tag_model(MODEL, suite=SUITE, label=LABEL)
    version = str(info.registered_model_version)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(MODEL, alias, version)
    return version


def suite() -> dict[str, Any]:
    """The data contract: plausible sizes, ages, distances and rooms; the price (the label) in k€."""

    def numbers(column: str, low: float, high: float, label: bool = False) -> list[dict[str, Any]]:
        meta = {"label": True} if label else {}  # checked on the holdout, not on the logged live inputs
        return [
            {"type": "expect_column_to_exist", "kwargs": {"column": column}, "meta": meta},
            {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": column}, "meta": meta},
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": column, "min_value": low, "max_value": high},
                "meta": meta,
            },
        ]

    expectations = (
        numbers("size_m2", 10, 400)
        + numbers("age_years", 0, 150)
        + numbers("distance_km", 0, 100)
        + numbers("rooms", 1, 12)
        + numbers(LABEL, 0, 2000, label=True)
    )
    return {"name": SUITE, "expectations": expectations}


def policy() -> dict[str, Any]:
    """examples/policies/regression.yaml with margins for prices of ~50-900 k€.

    A candidate may be at most 5 k€ worse per home on average, offline (mae) and live (absolute
    error); two answers within 60 k€ agree (about two sd of the champion's own error).
    """
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "policies" / "regression.yaml").read_text())
    data.update(name=POLICY, description="House prices (k€): the example regression policy, margins for its scale.")
    data["offline"]["margin"] = data["primary"]["margin"] = 5.0
    data["shadow"]["agreement_tolerance"] = 60.0
    return data


def setup(folder: Path) -> tuple[Path, Path]:
    """Write the policy and the suite into `folder`/policies and `folder`/expectations."""
    import yaml

    policies, expectations = folder / "policies", folder / "expectations"
    policies.mkdir(parents=True, exist_ok=True)
    expectations.mkdir(parents=True, exist_ok=True)
    (policies / f"{POLICY}.yaml").write_text(yaml.safe_dump(policy(), sort_keys=False))
    (expectations / f"{SUITE}.json").write_text(json.dumps(suite(), indent=2))
    return policies, expectations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup").add_argument("folder", type=Path)
    reg = commands.add_parser("register")
    reg.add_argument("role", choices=list(ROLES))
    reg.add_argument("--seed", type=int, default=11)
    rows = commands.add_parser("live-rows")
    rows.add_argument("out", type=Path)
    rows.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    if args.command == "setup":
        policies, expectations = setup(args.folder)
        print(
            f"export RELEASEGATE_POLICIES_DIR={policies.resolve()} RELEASEGATE_EXPECTATIONS_DIR={expectations.resolve()}"
        )
    elif args.command == "register":
        version = register(args.role, seed=args.seed, alias=None if args.role == "champion" else "challenger")
        print(version)
    else:
        homes(args.rows, seed=99).to_parquet(args.out)
        print(f"{args.rows:,} homes of today's market in {args.out}")


if __name__ == "__main__":
    main()
