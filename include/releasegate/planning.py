"""Planning a comparison: the requests it needs to detect an effect, and how long the model's traffic takes.

Two designs for the same question (does each candidate arm differ from the control by at least the
minimum detectable effect?), with the error level split across the k − 1 comparisons (Bonferroni):

- **fixed horizon**: one look at the planned sample, the two-sample z-test's size
  n = (z₁₋α′/₂ + z_power)² · (σ₀²/w₀ + σⱼ²/wⱼ) / δ² in total requests (wᵢ: the arms' traffic shares);
- **sequential**: releasegate's always-valid confidence sequence (docs/decisions.md, "Always-valid
  bounds") on the per-request contrasts, whose variance is the same σ₀²/w₀ + σⱼ²/wⱼ; it may stop at any
  look. Reported: the requests by which its bound clears zero at the true effect δ with probability
  `power` (what to plan for), and with probability ½ (about its median).

The closed forms are written out rather than taken from statsmodels, whose power classes assume one
standard deviation for both arms; tests/unit/test_planning.py checks them against it where both apply.
"""

from __future__ import annotations

import math
import time
from enum import StrEnum

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.stats import norm

from releasegate import storage
from releasegate.analysis import sequential


class MetricKind(StrEnum):
    proportion = "proportion"  # e.g. conversion: a share of requests, baseline p, σ² = p(1 − p)
    mean = "mean"  # e.g. revenue per request: baseline mean and standard deviation


class Design(BaseModel):
    """What is compared, and how sure the answer must be."""

    model_config = ConfigDict(allow_inf_nan=False)  # a NaN or infinite figure plans nothing
    kind: MetricKind
    baseline: float = Field(description="The control's proportion or mean.")
    sd: float | None = Field(default=None, gt=0, description="The metric's standard deviation (a mean's only).")
    mde: float = Field(gt=0, description="Minimum detectable effect, absolute (in the metric's units).")
    alpha: float = Field(default=0.05, gt=0, lt=1)
    power: float = Field(default=0.8, gt=0, lt=1)
    weights: list[float] = Field(default=[0.5, 0.5], min_length=2, description="Traffic shares, the control first.")

    @model_validator(mode="after")
    def _consistent(self) -> Design:
        if self.kind is MetricKind.proportion and not 0 < self.baseline < 1:
            raise ValueError(f"a proportion's baseline is between 0 and 1, got {self.baseline}")
        if self.kind is MetricKind.proportion and not 0 < self.baseline + self.mde < 1:
            raise ValueError(f"baseline + mde leaves the proportion's range: {self.baseline} + {self.mde}")
        if self.kind is MetricKind.mean and self.sd is None:
            raise ValueError("a mean needs its standard deviation (sd)")
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"every arm needs a positive share of the traffic, got {self.weights}")
        total = sum(self.weights)
        self.weights = [w / total for w in self.weights]
        return self

    @property
    def comparisons(self) -> int:
        return len(self.weights) - 1

    @property
    def alpha_each(self) -> float:
        """The error level of each comparison with the control (Bonferroni over k − 1)."""
        return self.alpha / self.comparisons

    def variance(self) -> float:
        """Of one request's contrast, for the worst-placed candidate arm (the smallest share)."""
        w0, wj = self.weights[0], min(self.weights[1:])
        if self.kind is MetricKind.proportion:
            p0, pj = self.baseline, self.baseline + self.mde
            return p0 * (1 - p0) / w0 + pj * (1 - pj) / wj
        assert self.sd is not None
        return self.sd**2 * (1 / w0 + 1 / wj)


class Plan(BaseModel):
    """The requests each design needs, in total over all arms, and how long at `rps`."""

    design: Design
    fixed_requests: int
    sequential_requests: int  # its bound clears at δ with probability `power`
    sequential_median_requests: int  # … with probability ½
    rps: float | None  # the model's traffic, requests per second (None: unknown)

    def seconds(self, requests: int) -> float | None:
        return requests / self.rps if self.rps else None


def fixed_horizon(design: Design) -> int:
    z = float(norm.ppf(1 - design.alpha_each / 2) + norm.ppf(design.power))
    return math.ceil(z**2 * design.variance() / design.mde**2)


def sequential_requests(design: Design, probability: float, t_opt: float) -> int:
    """The fewest requests n at which the always-valid lower bound clears 0 with `probability` at effect δ.

    The bound is estimate − sd·radius(n); the estimate is δ ± sd/√n, so it clears with that probability
    once δ − z_probability·sd/√n ≥ sd·radius(n), which shrinks in n: found by bisection.
    """
    sd, z = math.sqrt(design.variance()), float(norm.ppf(probability))

    def clears(n: int) -> bool:
        return design.mde - z * sd / math.sqrt(n) >= sd * sequential.radius(n, design.alpha_each, t_opt)

    low, high = 2, 4
    while not clears(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if clears(mid) else (mid, high)
    return max(high, sequential.MIN_UNITS)


def plan(design: Design, rps: float | None = None) -> Plan:
    fixed = fixed_horizon(design)
    # The boundary is tuned (ρ) to be tightest where the fixed design would look: the same expected size.
    return Plan(
        design=design,
        fixed_requests=fixed,
        sequential_requests=sequential_requests(design, design.power, t_opt=fixed),
        sequential_median_requests=sequential_requests(design, 0.5, t_opt=fixed),
        rps=rps,
    )


def traffic_rate(model: str, window_seconds: float = 3600, engine: sa.Engine | None = None) -> float | None:
    """The model's requests per second over the last `window_seconds` of its prediction log; None without any."""
    p = storage.predictions
    now = time.time()
    query = sa.select(sa.func.count(sa.distinct(p.c.request_id)), sa.func.min(p.c.time)).where(
        p.c.model == model, p.c.time >= now - window_seconds
    )
    with (engine or storage.engine()).connect() as conn:
        count, first = conn.execute(query).one()
    if not count:
        return None
    return float(count) / max(now - float(first), 1.0)
