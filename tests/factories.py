"""Small builders of releasegate's values for tests."""

from __future__ import annotations

from releasegate.contract import Stage, StageKind
from releasegate.verdict import Decision, MetricResult, PolicyRef, Verdict, Window

SHADOW = Stage.shadow()


def canary(weight: int, step: int = 0) -> Stage:
    """A canary step by its weight (the step number when a test needs it)."""
    return Stage(kind=StageKind.canary, step=step, weight=weight)


def verdict(
    stage: Stage,
    decision: Decision,
    reason: str | None = None,
    *,
    start: float = 1.0,
    end: float = 2.0,
    metrics: list[MetricResult] | None = None,
) -> Verdict:
    """A verdict as the analysis writes one, with one accuracy check unless `metrics` says otherwise."""
    accuracy = MetricResult(
        name="accuracy", kind="primary", estimate=0.031, lower=0.004, upper=0.058, margin=0.02, passed=True
    )
    return Verdict(
        decision=decision,
        reason=reason or f"{decision.value}: at {stage}",
        window=Window(start=start, end=end, stage=stage),
        metrics=[accuracy] if metrics is None else metrics,
        policy=PolicyRef(name="p", digest="0" * 64),
    )
