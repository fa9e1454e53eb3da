"""One check's always-valid bounds against its limit, and the slice family with Holm's correction.

A check passes when its bound clears the limit, fails when the bound lies wholly beyond it, and is
undecided otherwise; futility (see `metric`) gives up on one that the time still allowed cannot decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np

from releasegate.analysis import sequential
from releasegate.contract import Arm
from releasegate.policy import Policy
from releasegate.verdict import ArmSamples, MetricKind, MetricResult, SliceResult

SLOW_SHARE = 0.01  # p99: the share of requests allowed above the latency limit
MIN_P99_ROWS = 100  # a p99 from fewer rows is just the maximum


class CheckName(StrEnum):
    error_rate = "error_rate"
    latency_p99 = "latency_p99"
    agreement = "agreement"


@dataclass(frozen=True)
class Check:
    name: str
    kind: MetricKind
    margin: float
    limit: float
    higher_is_better: bool
    support: tuple[float, float] | None = None  # the range the estimate cannot leave


@dataclass(frozen=True)
class StageChecks:
    """The checks every stage runs: the two guardrails and the primary metric."""

    error_rate: Check
    latency: Check
    primary: Check

    @classmethod
    def of(cls, policy: Policy) -> StageChecks:
        g, p = policy.guardrails, policy.primary
        accuracy = p.metric == "accuracy"
        return cls(
            error_rate=Check(
                CheckName.error_rate,
                "guardrail",
                g.error_rate_margin,
                g.error_rate_margin,
                higher_is_better=False,
                support=(-1.0, 1.0),
            ),
            # How much larger the candidate's share of requests over the latency limit is than the champion's,
            # against 1% (the p99's share): "candidate p99 ≤ limit" with the gateway's own stalls netted out.
            latency=Check(
                CheckName.latency_p99, "guardrail", SLOW_SHARE, SLOW_SHARE, higher_is_better=False, support=(-1.0, 1.0)
            ),
            primary=Check(
                p.metric,
                "primary",
                p.margin,
                -p.margin if accuracy else p.margin,
                higher_is_better=accuracy,
                support=(-1.0, 1.0) if accuracy else None,
            ),
        )


def agreement_check(policy: Policy) -> Check:
    m = policy.shadow.min_agreement
    return Check(CheckName.agreement, "agreement", m, m, higher_is_better=True, support=(0.0, 1.0))


def undecided(check: Check, alpha: float, n: int, detail: str, estimate: float | None = None) -> MetricResult:
    return MetricResult(
        name=check.name,
        kind=check.kind,
        estimate=estimate,
        lower=None,
        upper=None,
        margin=check.margin,
        passed=None,
        detail=detail,
        limit=check.limit,
        higher_is_better=check.higher_is_better,
        alpha=alpha,
        n=n,
    )


def metric(
    check: Check,
    values: sequential.Values,
    alpha: float,
    t_opt: float,
    detail: str,
    arms_ok: bool = True,
    grow: float | None = None,
    min_n: int = 0,
) -> MetricResult:
    """The check's always-valid bounds and pass/fail; `grow` (see decide.grow) also judges futility.

    `min_n`: the check decides nothing on fewer units (a latency share from the first few hundred requests
    of a busy machine measures the machine, not the model).
    """
    x = sequential.summary(values)
    if x.n < min_n:
        return undecided(
            check,
            alpha,
            x.n,
            f"{detail}; {x.n:,} of the {min_n:,} requests it needs to decide",
            x.mean if x.n else None,
        )
    bound = sequential.confidence_sequence(x, alpha, t_opt) if arms_ok else None
    if bound is not None and check.support is not None:
        # Intersecting with the known range keeps coverage and reads better than a −0.1% share.
        lo, hi = check.support
        bound = replace(bound, lower=max(bound.lower, lo), upper=min(bound.upper, hi))
    if bound is None:
        return undecided(
            check,
            alpha,
            x.n,
            f"{detail}; fewer than {sequential.MIN_UNITS} units per arm to bound",
            x.mean if x.n else None,
        )
    passed: bool | None
    if check.higher_is_better:
        passed = True if bound.lower > check.limit else False if bound.upper < check.limit else None
    else:
        passed = True if bound.upper < check.limit else False if bound.lower > check.limit else None
    p = sequential.p_value(x, check.limit, "below" if check.higher_is_better else "above", alpha, t_opt)
    futile = False
    if passed is None and grow is not None:
        # Conditional futility: even if the truth were one standard error better than the estimate, the
        # bound at the end of the allowed extensions would not clear the limit, so extending cannot decide
        # for the candidate. (The bare estimate would give up on half the candidates that need them.)
        half = bound.sd * sequential.radius(int(bound.n * grow), alpha, t_opt)
        se = bound.sd / math.sqrt(bound.n)
        futile = (
            (bound.estimate + se - half <= check.limit)
            if check.higher_is_better
            else (bound.estimate - se + half >= check.limit)
        )
    return MetricResult(
        name=check.name,
        kind=check.kind,
        estimate=bound.estimate,
        lower=bound.lower,
        upper=bound.upper,
        margin=check.margin,
        passed=passed,
        detail=detail,
        limit=check.limit,
        higher_is_better=check.higher_is_better,
        alpha=alpha,
        n=bound.n,
        p_value=p,
        futile=futile,
    )


def slice_min(stage_min: int) -> int:
    """A slice is decided from a quarter of the stage's minimum sample (never below the CS burn-in)."""
    return max(sequential.MIN_UNITS, stage_min // 4)


@dataclass(frozen=True)
class SliceGroup:
    """One slice's primary-metric contrasts, ready for the family's bounds and Holm's test."""

    feature: str
    value: str
    values: sequential.Values  # per-unit contrasts (or their Summary)
    decided: bool  # enough labelled rows per arm to decide
    samples: dict[Arm, ArmSamples]
    detail: str


def slice_results(groups: list[SliceGroup], check: Check, alpha: float, min_n: int) -> list[SliceResult]:
    """The primary check per slice: bounds at alpha / m (Bonferroni), regressions by Holm at alpha across m slices."""
    m = max(len(groups), 1)
    decided = [g for g in groups if g.decided]
    pvals = np.array(
        [
            sequential.p_value(g.values, check.limit, "below" if check.higher_is_better else "above", alpha / m, min_n)
            for g in decided
        ]
    )
    adjusted = holm(pvals, m)
    results = []
    j = 0
    for group in groups:
        if not group.decided:
            x = sequential.summary(group.values)
            result = undecided(
                check,
                alpha / m,
                x.n,
                f"{group.detail}; too few for a decision ({min_n} per arm)",
                x.mean if x.n else None,
            )
        else:
            result = metric(check, group.values, alpha / m, min_n, group.detail)
            regressed = adjusted[j] <= alpha
            passed = False if regressed else (True if result.passed else None)
            result = result.model_copy(update={"passed": passed, "p_value": float(adjusted[j])})
            j += 1
        results.append(SliceResult(feature=group.feature, value=group.value, samples=group.samples, metrics=[result]))
    return results


def holm(p: np.ndarray, m: int) -> np.ndarray:
    """Holm-adjusted p-values for the decided slices; undecided ones count in m with p = 1."""
    if not len(p):
        return p
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(len(p)))))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def arms_detail(metric_name: str, mean_c: float | None, n_c: int, mean_b: float | None, n_b: int, what: str) -> str:
    if not n_c or not n_b or mean_c is None or mean_b is None:
        return f"{n_c:,} candidate and {n_b:,} champion {what} requests"
    return f"{metric_name}: candidate {mean_c:.3f} vs champion {mean_b:.3f} on {n_c:,} / {n_b:,} {what} requests"
