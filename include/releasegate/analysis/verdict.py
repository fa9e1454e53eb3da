"""The Verdict: a decision with every number behind it (DESIGN.md, "The verdict")."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field


class Decision(StrEnum):
    promote = "promote"  # evidence of non-inferiority on every metric: move on (next step or promotion)
    continue_ = "continue"  # not decided yet: keep collecting in this window
    rollback = "rollback"  # a guardrail or the primary metric is worse beyond its margin
    inconclusive = "inconclusive"  # window over without enough evidence: the policy says what follows
    invalid = "invalid"  # sample ratio mismatch: the experiment itself is broken


class Window(BaseModel):
    start: float  # epoch seconds
    end: float
    stage: str = ""  # "shadow" or "canary-25" ...


class ArmSamples(BaseModel):
    requests: int = 0
    routing_keys: int = 0
    labelled: int = 0
    errors: int = 0


class MetricResult(BaseModel):
    name: str
    kind: Literal["guardrail", "primary", "agreement"]
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
    counts: dict[str, int] = Field(default_factory=dict)  # routing keys per arm
    expected: dict[str, float] = Field(default_factory=dict)  # configured shares
    p_value: float | None = None  # always-valid: 1 / the Bayes factor of the sequential test (srm.py)
    bayes_factor: float | None = None
    alarm: bool = False


class SliceResult(BaseModel):
    feature: str
    value: str
    samples: dict[str, ArmSamples] = Field(default_factory=dict)
    metrics: list[MetricResult] = Field(default_factory=list)


class PolicyRef(BaseModel):
    name: str
    digest: str


class Verdict(BaseModel):
    decision: Decision
    reason: str
    window: Window
    samples: dict[str, ArmSamples] = Field(default_factory=dict)  # champion / candidate
    metrics: list[MetricResult] = Field(default_factory=list)
    srm: SRM | None = None
    slices: list[SliceResult] = Field(default_factory=list)
    policy: PolicyRef
