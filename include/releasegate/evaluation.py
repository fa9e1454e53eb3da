"""Offline comparison of a candidate with the champion on the candidate's holdout, as a non-inferiority test.

Passed iff the candidate is at most `margin` worse than the champion, overall and in every slice with
enough rows. `difference` is always candidate − champion; for loss metrics lower is better.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel

from releasegate.settings import Settings, get_settings

if TYPE_CHECKING:
    from releasegate.policy import Policy

HOLDOUT_ARTIFACT = "releasegate/holdout.parquet"
LABEL_TAG = "releasegate.label"
DEFAULT_LABEL = "churned"
HIGHER_IS_BETTER = {"accuracy": True, "roc_auc": True, "log_loss": False, "mae": False, "rmse": False}
# These score probabilities of the positive class (or a row of class probabilities), not labels.
PROBABILISTIC = {"log_loss", "roc_auc"}


class Comparison(BaseModel):
    """One metric on one set of rows for both models."""

    metric: str
    candidate: float
    champion: float
    difference: float
    margin: float
    passed: bool
    rows: int


class SliceComparison(BaseModel):
    """The comparison within one value of a slice feature; `passed` is None when too few rows to judge."""

    feature: str
    value: str
    metric: str
    candidate: float | None
    champion: float | None
    difference: float | None
    margin: float
    passed: bool | None
    rows: int


class EvaluationResult(Comparison):
    """The offline evaluation the validate step decides on."""

    model: str
    candidate_version: str
    champion_version: str
    min_rows: int
    slices: list[SliceComparison]
    reasons: list[str]


def score(y_true: Sequence, y_pred: Sequence, metric: str) -> float:
    """One metric from sklearn.metrics; `y_pred` holds probabilities for log_loss and roc_auc."""
    import numpy as np
    from sklearn import metrics

    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(HIGHER_IS_BETTER)})")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if metric == "accuracy":
        return float(metrics.accuracy_score(y_true, y_pred))
    if metric == "log_loss":
        # A 1-D column is P(class 1); naming both labels keeps a single-class slice scorable.
        return float(metrics.log_loss(y_true, y_pred, labels=[0, 1] if y_pred.ndim == 1 else None))
    if metric == "roc_auc":
        if y_pred.ndim == 2 and y_pred.shape[1] == 2:
            y_pred = y_pred[:, 1]
        multi = "ovr" if y_pred.ndim == 2 else "raise"
        return float(metrics.roc_auc_score(y_true, y_pred, multi_class=multi))
    if metric == "mae":
        return float(metrics.mean_absolute_error(y_true, y_pred))
    return float(metrics.root_mean_squared_error(y_true, y_pred))


def compare_predictions(y_true: Sequence, y_cand: Sequence, y_champ: Sequence, metric: str,
                        margin: float) -> Comparison:
    """Non-inferiority of the candidate's predictions against the champion's on the same labels."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    cand, champ = score(y_true, y_cand, metric), score(y_true, y_champ, metric)
    improvement = cand - champ if HIGHER_IS_BETTER[metric] else champ - cand
    # Rounding keeps a tie at exactly -margin from failing on floating-point noise.
    return Comparison(metric=metric, candidate=cand, champion=champ, difference=cand - champ, margin=margin,
                      passed=round(improvement, 12) >= -margin, rows=len(y_true))


def compare(model: str, candidate_version: str, champion_version: str, policy: "Policy",
            settings: Settings | None = None) -> EvaluationResult:
    """Score both versions on the candidate's holdout.parquet and test non-inferiority per policy.offline."""
    import pandas as pd

    from releasegate import registry

    settings = settings or get_settings()
    metric, margin, min_rows = policy.offline.metric, policy.offline.margin, policy.offline.min_rows
    label = registry.get_model_tags(model, settings=settings).get(LABEL_TAG, DEFAULT_LABEL)
    with tempfile.TemporaryDirectory(prefix="rg-eval-") as tmp:
        holdout = pd.read_parquet(registry.download_artifact(model, candidate_version, HOLDOUT_ARTIFACT,
                                                             dst=Path(tmp) / "data", settings=settings))
        if label not in holdout.columns:
            raise ValueError(f"holdout of {model} v{candidate_version} has no label column {label!r} "
                             f"(columns: {', '.join(holdout.columns)})")
        features = holdout.drop(columns=[label])
        predictions = {}
        for role, version in (("candidate", candidate_version), ("champion", champion_version)):
            model_dir = registry.download_model(model, version, Path(tmp) / role, settings=settings)
            loaded = registry.load_pyfunc(model_dir)
            predictions[role] = _predict(loaded, features, metric, f"{model} v{version}")

    y = holdout[label].to_numpy()
    overall = compare_predictions(y, predictions["candidate"], predictions["champion"], metric, margin)
    reasons = []
    if overall.rows < min_rows:
        reasons.append(f"holdout has {overall.rows} rows, the policy needs at least {min_rows}")
    if not overall.passed:
        reasons.append(_shortfall(overall, "overall"))

    slices = []
    for feature in policy.slices:
        if feature not in holdout.columns:
            reasons.append(f"slice feature {feature!r} is not a column of the holdout")
            continue
        for value, index in holdout.groupby(feature, observed=True).indices.items():
            rows = len(index)
            if rows < min_rows:
                slices.append(SliceComparison(feature=feature, value=str(value), metric=metric, candidate=None,
                                              champion=None, difference=None, margin=margin, passed=None,
                                              rows=rows))
                continue
            part = compare_predictions(y[index], predictions["candidate"][index], predictions["champion"][index],
                                       metric, margin)
            slices.append(SliceComparison(feature=feature, value=str(value), **part.model_dump()))
            if not part.passed:
                reasons.append(_shortfall(part, f"slice {feature}={value}"))

    return EvaluationResult(**overall.model_dump(exclude={"passed"}), passed=not reasons, model=model,
                            candidate_version=str(candidate_version), champion_version=str(champion_version),
                            min_rows=min_rows, slices=slices, reasons=reasons)


def _predict(pyfunc_model: Any, features: Any, metric: str, name: str) -> Any:
    import numpy as np

    if metric in PROBABILISTIC:
        raw = pyfunc_model.get_raw_model()
        if not hasattr(raw, "predict_proba"):
            raise ValueError(f"{name} has no predict_proba, so {metric} cannot be computed; use accuracy")
        proba = np.asarray(raw.predict_proba(features))
        return proba[:, 1] if proba.ndim == 2 and proba.shape[1] == 2 else proba
    out = pyfunc_model.predict(features)
    return np.asarray(out.iloc[:, 0] if hasattr(out, "iloc") and getattr(out, "ndim", 1) == 2 else out).ravel()


def _shortfall(c: Comparison, where: str) -> str:
    direction = "higher" if HIGHER_IS_BETTER[c.metric] else "lower"
    return (f"{where}: candidate {c.metric} {c.candidate:.4f} vs champion {c.champion:.4f} "
            f"(difference {c.difference:+.4f}, {direction} is better, margin {c.margin}) on {c.rows} rows")


