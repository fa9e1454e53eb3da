"""The Verdict: a decision with every number behind it (docs/architecture.md, "The verdict").

It is what the DAG branches on, what the audit log stores and what the dashboard shows.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, TypeAlias

from pydantic import BaseModel, Field

from releasegate.contract import Arm, Stage

# What a metric guards: a guardrail (errors, latency), the primary metric, or the shadow's agreement.
MetricKind: TypeAlias = Literal["guardrail", "primary", "agreement"]


class Decision(StrEnum):
    promote = "promote"  # evidence of non-inferiority on every metric: move on (next step or promotion)
    continue_ = "continue"  # not decided yet: keep collecting in this window
    rollback = "rollback"  # a guardrail or the primary metric is worse beyond its margin
    inconclusive = "inconclusive"  # window over without enough evidence: the policy says what follows
    invalid = "invalid"  # sample ratio mismatch: the experiment itself is broken

    @property
    def decisive(self) -> bool:
        """Ends the stage's wait at once."""
        return self in (Decision.promote, Decision.rollback, Decision.invalid)

    @property
    def negative(self) -> bool:
        """Stops the release: nothing after it may route traffic to the candidate."""
        return self in (Decision.rollback, Decision.invalid, Decision.inconclusive)


class Window(BaseModel):
    start: float  # epoch seconds
    end: float
    stage: Stage


class ArmSamples(BaseModel):
    requests: int = 0
    routing_keys: int = 0
    labelled: int = 0
    errors: int = 0


class MetricResult(BaseModel):
    name: str
    kind: MetricKind
    estimate: float | None  # candidate − champion (or the share, for agreement)
    lower: float | None  # always-valid bounds of the estimate
    upper: float | None
    margin: float
    passed: bool | None  # None: undecided
    detail: str = ""
    limit: float | None = None  # the value the bounds are compared with (−margin, +margin, 0.01, min_agreement)
    higher_is_better: bool = True  # direction of `estimate`: decides which bound must clear `limit`
    alpha: float | None = None  # error level of these bounds after the split across metrics
    n: int = 0  # units behind the bounds (paired requests, or requests of both arms)
    p_value: float | None = None  # always-valid p-value of "worse than limit" (slices: Holm-adjusted)
    futile: bool = False  # undecided, and at the current estimate still undecided when the allowed extensions end


class SRM(BaseModel):
    counts: dict[Arm, int] = Field(default_factory=dict)  # routing keys (or requests) per arm
    expected: dict[Arm, float] = Field(default_factory=dict)  # configured shares
    p_value: float | None = None  # always-valid: 1 / the Bayes factor of the sequential test (srm.py)
    bayes_factor: float | None = None
    alarm: bool = False


class SliceResult(BaseModel):
    feature: str
    value: str
    samples: dict[Arm, ArmSamples] = Field(default_factory=dict)
    metrics: list[MetricResult] = Field(default_factory=list)


class PolicyRef(BaseModel):
    name: str
    digest: str


class Verdict(BaseModel):
    decision: Decision
    reason: str
    window: Window
    samples: dict[Arm, ArmSamples] = Field(default_factory=dict)
    metrics: list[MetricResult] = Field(default_factory=list)
    srm: SRM | None = None
    slices: list[SliceResult] = Field(default_factory=list)
    policy: PolicyRef
    extensions: int = 0  # windows added to the stage's before this verdict
