"""Offline comparison of a candidate with the champion on the candidate's holdout, as a non-inferiority test.

Each comparison (overall, and each slice value with at least `offline.min_rows` rows) is a paired test on
the same rows. It fails only on evidence: when the one-sided upper confidence bound of the candidate's
improvement (candidate − champion; champion − candidate for losses) lies below −margin. Anything else
passes, and the shadow and canary stages judge further on live traffic. `difference` is always
candidate − champion, so for a loss its lower bound is the one that must stay within +margin.

The bounds are normal (large-sample) bounds from per-row pseudo-values whose mean is the difference:
- accuracy, mae, log_loss: the paired per-row differences (correct, |error|, −log p of the label);
- rmse: the delta method, influence (e² − mse) / (2·rmse) per model, paired;
- roc_auc: DeLong's paired variance (DeLong, DeLong & Clarke-Pearson, Biometrics 44(3), 1988) from
  midranks (Sun & Xu, IEEE Signal Processing Letters 21(11), 2014); for more than two classes the
  macro average of one-vs-rest AUCs, as sklearn scores it. Chosen over a paired bootstrap because it
  is deterministic and takes milliseconds, where resampling needs a seed and thousands of resamples
  (two AUCs each) to resolve the alpha/m tails, per comparison.

Multiplicity: Bonferroni over the family of the overall comparison and every judged slice (m of them):
each bound is one-sided at level 1 − alpha/m (alpha is the policy's), and `p_value` is m × the one-sided
p-value, at most 1. Holm would reject a candidate exactly when Bonferroni does (its first step is
Bonferroni's test); it could only name more failing slices of a candidate already rejected, and its
bounds would no longer read on their own.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pydantic import BaseModel

from releasegate.contract import LABEL_TAG
from releasegate.settings import Settings, get_settings

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import pandas as pd

    from releasegate.policy import Policy

HOLDOUT_ARTIFACT = "releasegate/holdout.parquet"
# The registered-model tag naming the holdout's label column; without it a column named LABEL_COLUMN.
LABEL_COLUMN = "label"
HIGHER_IS_BETTER = {"accuracy": True, "roc_auc": True, "log_loss": False, "mae": False, "rmse": False}
# These score probabilities of the positive class (or a row of class probabilities), not labels.
PROBABILISTIC = {"log_loss", "roc_auc"}


class Comparison(BaseModel):
    """One metric on one set of rows for both models, with the paired test's bounds."""

    metric: str
    candidate: float
    champion: float
    difference: float  # candidate − champion
    margin: float
    passed: bool
    rows: int
    level: float  # 1 − alpha / m, m the comparisons in the family
    lower: float | None = None  # one-sided confidence bounds of `difference`, each at `level`; None under 2 rows
    upper: float | None = None
    p_value: float | None = None  # Bonferroni-adjusted p of "no worse than the margin": failed iff below alpha


class _Measured(TypedDict):
    """What a Comparison holds whether or not it has the rows for bounds."""

    metric: str
    candidate: float
    champion: float
    difference: float
    margin: float
    rows: int
    level: float


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
    level: float | None = None
    lower: float | None = None
    upper: float | None = None
    p_value: float | None = None


class Judgement(Comparison):
    """The overall comparison, the slices and the verdict: what the policy's offline section decides."""

    alpha: float
    comparisons: int  # the family alpha is split over: overall + judged slices
    min_rows: int
    slices: list[SliceComparison]
    reasons: list[str]  # why the candidate is rejected; empty when it passes
    notes: list[str] = []  # what was not judged, and why


class EvaluationResult(Judgement):
    """The offline evaluation the validate step decides on."""

    model: str
    candidate_version: str
    champion_version: str


def score(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, metric: str) -> float:
    """One metric from sklearn.metrics; `y_pred` holds probabilities for log_loss and roc_auc."""
    import numpy as np
    from sklearn import metrics

    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(HIGHER_IS_BETTER)})")
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} labels but {len(pred)} predictions")
    if metric == "accuracy":
        return float(metrics.accuracy_score(truth, pred))
    if metric == "log_loss":
        # A 1-D column is P(class 1); naming both labels keeps a single-class slice scorable.
        return float(metrics.log_loss(truth, pred, labels=[0, 1] if pred.ndim == 1 else None))
    if metric == "roc_auc":
        if pred.ndim == 2 and pred.shape[1] == 2:
            pred = pred[:, 1]
        multi = "ovr" if pred.ndim == 2 else "raise"
        return float(metrics.roc_auc_score(truth, pred, multi_class=multi))
    if metric == "mae":
        return float(metrics.mean_absolute_error(truth, pred))
    return float(metrics.root_mean_squared_error(truth, pred))


def compare_predictions(
    y_true: npt.ArrayLike,
    y_cand: npt.ArrayLike,
    y_champ: npt.ArrayLike,
    metric: str,
    margin: float,
    *,
    alpha: float,
    comparisons: int = 1,
) -> Comparison:
    """Paired non-inferiority test of the candidate's predictions against the champion's on the same labels,
    each bound one-sided at level 1 − alpha / comparisons."""
    import numpy as np
    from scipy import stats

    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not 0 < alpha < 1 or comparisons < 1:
        raise ValueError(f"alpha must be in (0, 1) and comparisons >= 1, got {alpha} and {comparisons}")
    y, y_c, y_h = np.asarray(y_true), np.asarray(y_cand), np.asarray(y_champ)
    cand, champ = score(y, y_c, metric), score(y, y_h, metric)
    difference, rows, level = cand - champ, len(y), 1 - alpha / comparisons
    common = _Measured(
        metric=metric, candidate=cand, champion=champ, difference=difference, margin=margin, rows=rows, level=level
    )
    if rows < 2:  # no spread, no evidence
        return Comparison(**common, passed=True)
    values = _pseudo_values(y, y_c, y_h, metric)
    se = float(np.std(values, ddof=1)) / math.sqrt(rows)
    z = float(stats.norm.ppf(level))
    improvement = difference if HIGHER_IS_BETTER[metric] else -difference
    # Rounding keeps a tie at exactly -margin from failing on floating-point noise.
    slack = round(improvement + margin, 12)
    p = float(stats.norm.cdf(slack / se)) if se > 0 else float(slack >= 0)
    return Comparison(
        **common,
        passed=round(slack + z * se, 12) >= 0,
        lower=difference - z * se,
        upper=difference + z * se,
        p_value=min(1.0, comparisons * p),
    )


def judge(
    y_true: npt.ArrayLike, y_cand: npt.ArrayLike, y_champ: npt.ArrayLike, frame: pd.DataFrame, policy: Policy
) -> Judgement:
    """The policy's offline verdict on two models' predictions, overall and per slice of `frame`'s columns."""
    import numpy as np

    metric, margin, min_rows = policy.offline.metric, policy.offline.margin, policy.offline.min_rows
    y, cand, champ = np.asarray(y_true), np.asarray(y_cand), np.asarray(y_champ)
    reasons: list[str] = []
    notes: list[str] = []
    groups = []
    for feature in policy.slices:
        if feature not in frame.columns:
            # The policy names slices for every model it governs; a model without the column has no such slices.
            notes.append(f"slice feature {feature!r} is not a column of the holdout: not analysed")
            continue
        groups += [
            (feature, str(value), index) for value, index in frame.groupby(feature, observed=True).indices.items()
        ]
    judged = 1 + sum(len(index) >= min_rows for *_, index in groups)

    def test(index: Any) -> Comparison:
        return compare_predictions(
            y[index], cand[index], champ[index], metric, margin, alpha=policy.alpha, comparisons=judged
        )

    overall = test(slice(None))
    if overall.rows < min_rows:
        reasons.append(
            f"the holdout has {overall.rows:,} rows, fewer than offline.min_rows = {min_rows:,} of "
            f"policy {policy.name!r}: log a larger {HOLDOUT_ARTIFACT}, or lower offline.min_rows in a "
            f"policy of your own (copy include/policies/default.yaml into a folder that "
            f"RELEASEGATE_POLICIES_DIR names); slices below offline.min_rows are reported but not judged"
        )
    if not overall.passed:
        reasons.append(_shortfall(overall, "overall"))

    slices = []
    for feature, value, index in groups:
        if len(index) < min_rows:
            slices.append(
                SliceComparison(
                    feature=feature,
                    value=value,
                    metric=metric,
                    candidate=None,
                    champion=None,
                    difference=None,
                    margin=margin,
                    passed=None,
                    rows=len(index),
                )
            )
            continue
        part = test(index)
        slices.append(SliceComparison(feature=feature, value=value, **part.model_dump()))
        if not part.passed:
            reasons.append(_shortfall(part, f"slice {feature}={value}"))

    return Judgement(
        **overall.model_dump(exclude={"passed"}),
        passed=not reasons,
        alpha=policy.alpha,
        comparisons=judged,
        min_rows=min_rows,
        slices=slices,
        reasons=reasons,
        notes=notes,
    )


def label_column(model: str, holdout_columns: Sequence[str], settings: Settings | None = None) -> str:
    """The holdout's label column: the model's `releasegate.label` tag, else a column named `label`."""
    from releasegate import registry

    columns = [str(c) for c in holdout_columns]
    tagged = registry.get_model_tags(model, settings=settings).get(LABEL_TAG)
    if tagged:
        if tagged in columns:
            return tagged
        raise ValueError(
            f"the {LABEL_TAG} tag of {model!r} names the label column {tagged!r}, which the holdout "
            f"does not have (columns: {', '.join(columns)})"
        )
    if LABEL_COLUMN in columns:
        return LABEL_COLUMN
    raise ValueError(
        f"registered model {model!r} has no {LABEL_TAG} tag and its holdout no {LABEL_COLUMN!r} "
        f"column: set the tag to the name of the label column (columns: {', '.join(columns)})"
    )


def compare(
    model: str, candidate_version: str, champion_version: str, policy: Policy, settings: Settings | None = None
) -> EvaluationResult:
    """Score both versions on the candidate's holdout.parquet and judge them per the policy (`judge`)."""

    from releasegate import registry, signing

    settings = settings or get_settings()
    with tempfile.TemporaryDirectory(prefix="rg-eval-") as tmp:
        holdout = registry.read_frame(
            model, candidate_version, HOLDOUT_ARTIFACT, dst=Path(tmp) / "data", settings=settings
        )
        label = label_column(model, holdout.columns, settings)
        features = holdout.drop(columns=[label])
        predictions = {}
        for role, version in (("candidate", candidate_version), ("champion", champion_version)):
            # Both versions run from the bytes their signatures cover (the release signs the candidate first).
            loaded = registry.load_pyfunc(signing.fetch_verified(model, version, settings, parent=Path(tmp)))
            predictions[role] = _predict(loaded, features, policy.offline.metric, f"{model} v{version}")

    judged = judge(holdout[label].to_numpy(), predictions["candidate"], predictions["champion"], holdout, policy)
    return EvaluationResult(
        **judged.model_dump(),
        model=model,
        candidate_version=str(candidate_version),
        champion_version=str(champion_version),
    )


def _pseudo_values(
    y: npt.NDArray[Any], cand: npt.NDArray[Any], champ: npt.NDArray[Any], metric: str
) -> npt.NDArray[np.float64]:
    """Per-row values whose mean is (about) candidate − champion and whose spread gives its standard error."""
    import numpy as np

    # numpy types arithmetic on arrays of unknown dtype (labels, predictions) as Any.
    values: npt.NDArray[np.float64]
    if metric == "accuracy":
        values = (cand == y).astype(float) - (champ == y).astype(float)
    elif metric == "mae":
        values = np.abs(y - cand) - np.abs(y - champ)
    elif metric == "log_loss":
        values = _row_log_loss(y, cand) - _row_log_loss(y, champ)
    elif metric == "rmse":
        values = _rmse_influence(y, cand) - _rmse_influence(y, champ)
    else:
        values = _auc_influence(y, cand) - _auc_influence(y, champ)
    return values


def _row_log_loss(y: npt.NDArray[Any], proba: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    import numpy as np

    if proba.ndim == 1:
        proba, classes = np.column_stack([1 - proba, proba]), np.array([0, 1])
    else:
        classes = np.unique(y)  # the column order sklearn assumes
    eps = np.finfo(float).eps  # sklearn clips at the same machine epsilon
    p: npt.NDArray[np.float64] = np.clip(
        proba.astype(float)[np.arange(len(y)), np.searchsorted(classes, y)], eps, 1 - eps
    )
    return -np.log(p)


def _rmse_influence(y: npt.NDArray[Any], pred: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    import numpy as np

    squared: npt.NDArray[np.float64] = (y - pred).astype(float) ** 2
    mse = float(squared.mean())
    rmse = math.sqrt(mse)
    if rmse == 0:  # a perfect model: every row's term is 0
        return np.zeros_like(squared)
    return rmse + (squared - mse) / (2 * rmse)


def _auc_influence(y: npt.NDArray[Any], scores: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """AUC + each row's DeLong component: their mean is the AUC; multiclass: macro one-vs-rest, as `score`."""
    import numpy as np
    from scipy.stats import rankdata

    if scores.ndim == 2 and scores.shape[1] == 2:
        scores = scores[:, 1]
    classes = np.unique(y)
    if scores.ndim == 2:
        macro: npt.NDArray[np.float64] = np.mean(
            [_auc_influence((y == c).astype(int), scores[:, k]) for k, c in enumerate(classes)], axis=0
        )
        return macro
    positive = y == classes[-1]
    m, n = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores)
    # Midranks count ties as half: a positive's share of negatives ranked below it, and the converse.
    above_negatives = (ranks[positive] - rankdata(scores[positive])) / n
    below_positives = 1 - (ranks[~positive] - rankdata(scores[~positive])) / m
    auc = above_negatives.mean()
    out = np.empty(len(y))
    out[positive] = auc + (m + n) / m * (above_negatives - auc)
    out[~positive] = auc + (m + n) / n * (below_positives - auc)
    return out


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
    """The failed comparison as a sentence with its numbers."""
    higher = HIGHER_IS_BETTER[c.metric]
    side, bound, beyond = ("upper", c.upper, "below") if higher else ("lower", c.lower, "above")
    assert bound is not None  # a comparison fails only on its bounds
    limit = -c.margin if higher else c.margin
    return (
        f"{where}: candidate {c.metric} {c.candidate:.4f} vs champion {c.champion:.4f} (difference "
        f"{_signed(c.difference)}, {c.level * 100:.4g}% {side} bound {_signed(bound)} {beyond} the "
        f"{_signed(limit, 'g')} margin{'' if higher else '; lower is better'}) on {c.rows:,} rows"
    )


def _signed(x: float, spec: str = ".4f") -> str:
    return format(x + 0.0, "+" + spec).replace("-", "−")  # + 0.0 turns −0.0 into 0.0
