"""A/B/n experiments: every candidate arm against the control on declared metrics, safe to look at any time.

Each metric is a proportion (conversion), a mean (revenue per request, CPU seconds per call, latency)
or a ratio of two per-request sums (revenue per converted request), whose variance is the delta
method's: for R = ΣX / ΣY per unit Var ≈ (σ²_X − 2R·σ_XY + R²·σ²_Y) / μ²_Y. The difference arm − control
gets the always-valid confidence sequence of docs/decisions.md ("Always-valid bounds") at
α / (k − 1) (Bonferroni over the k − 1 comparisons with the control), with the contrast variance
σ²₀/w₀ + σ²ⱼ/wⱼ per request of the experiment, as releasegate.planning plans it. A guard that shows
the arm clearly worse stops that arm (its traffic goes back to the control); the winner is the arm
whose deciding metric clears in its goal direction with no guard crossed (the best estimate if
several). The split of traffic is checked by the sequential multinomial SRM test (analysis/srm.py).
The statistics behind it are in docs/decisions.md ("Experiments").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, model_validator

from releasegate.analysis import sequential, srm

# A proportion's sd is regularised as sequential.Summary.sd does (one pseudo-observation of the
# Bernoulli maximum variance), so that 0 conversions of 40 do not give a zero-width bound.
_PROPORTION_PRIOR_VARIANCE = 0.25

Array = npt.NDArray[np.float64]


class MetricKind(StrEnum):
    proportion = "proportion"  # a 0/1 value per request
    mean = "mean"  # a value per request
    ratio = "ratio"  # Σ numerator / Σ denominator over requests (delta method)


class Goal(StrEnum):
    increase = "increase"
    decrease = "decrease"

    @property
    def sign(self) -> int:
        return 1 if self is Goal.increase else -1


class Role(StrEnum):
    decide = "decide"  # picks the winner
    guard = "guard"  # stops an arm that is clearly worse


class Hypothesis(StrEnum):
    superiority = "superiority"  # better than the control (a guard: not worse at all)
    non_inferiority = "non_inferiority"  # not worse than the control by more than mde


class Metric(BaseModel):
    """One metric of the experiment, declared before the data."""

    name: str
    kind: MetricKind
    goal: Goal
    mde: float = Field(gt=0, description="Minimum detectable effect, absolute; the non-inferiority margin.")
    role: Role
    test: Hypothesis


class Experiment(BaseModel):
    """The declared metrics (exactly one deciding) and the error level over all comparisons."""

    metrics: list[Metric] = Field(min_length=1)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    t_opt: float = Field(gt=0, description="Requests (all arms) where the bounds are tightest: the planned size.")
    srm_alarm_below: float = Field(default=0.001, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_deciding_metric(self) -> Experiment:
        deciding = [m.name for m in self.metrics if m.role is Role.decide]
        if len(deciding) != 1:
            raise ValueError(f"an experiment needs exactly one deciding metric, got {deciding}")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"metric names must be unique, got {names}")
        return self

    @property
    def deciding(self) -> Metric:
        return next(m for m in self.metrics if m.role is Role.decide)

    def alpha_each(self, arms: int) -> float:
        """The level of each comparison with the control: Bonferroni over the arms − 1 comparisons."""
        return self.alpha / max(arms - 1, 1)


@dataclass(frozen=True)
class RatioSummary:
    """Per-request sums a ratio metric needs for the delta method: both sums, their squares and cross product."""

    n: int
    num: float
    num_sq: float
    den: float
    den_sq: float
    cross: float

    @classmethod
    def of(cls, numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> RatioSummary:
        x, y = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
        if x.shape != y.shape or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError("a ratio needs finite numerator and denominator values of one length")
        return cls(len(x), float(x.sum()), float(x @ x), float(y.sum()), float(y @ y), float(x @ y))

    def __add__(self, other: RatioSummary) -> RatioSummary:
        return RatioSummary(
            self.n + other.n,
            self.num + other.num,
            self.num_sq + other.num_sq,
            self.den + other.den,
            self.den_sq + other.den_sq,
            self.cross + other.cross,
        )


Stats = sequential.Summary | RatioSummary


@dataclass(frozen=True)
class ArmStats:
    """One arm's requests, its configured share of the traffic and each metric's sufficient statistics."""

    name: str
    share: float
    metrics: dict[str, Stats]

    @property
    def requests(self) -> int:
        return max((s.n for s in self.metrics.values()), default=0)


# The vectorised core: arrays broadcast over experiments (the benchmark) or are scalars (decide()).


def estimate_and_variance(kind: MetricKind, stats: dict[str, npt.ArrayLike]) -> tuple[Array, Array]:
    """The arm's estimate and the per-request variance of it (Var(estimate) ≈ variance / n); NaN when undefined.

    stats holds n, total, total_sq (proportion, mean) or n, num, num_sq, den, den_sq, cross (ratio).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.asarray(stats["n"], dtype=float)
        if kind is MetricKind.ratio:
            mx, my = np.asarray(stats["num"]) / n, np.asarray(stats["den"]) / n
            r = mx / my
            sxx = (np.asarray(stats["num_sq"]) - n * mx**2) / (n - 1)
            syy = (np.asarray(stats["den_sq"]) - n * my**2) / (n - 1)
            sxy = (np.asarray(stats["cross"]) - n * mx * my) / (n - 1)
            var = np.maximum(sxx - 2 * r * sxy + r**2 * syy, 0.0) / my**2
            return np.where(my > 0, r, np.nan), np.where(my > 0, var, np.nan)
        mean = np.asarray(stats["total"]) / n
        ss = np.maximum(np.asarray(stats["total_sq"]) - n * mean**2, 0.0)
        if kind is MetricKind.proportion:
            var = (ss + _PROPORTION_PRIOR_VARIANCE) / (n + 1)
        else:
            var = ss / (n - 1)
        return mean, var


def difference_bounds(
    kind: MetricKind,
    control: dict[str, npt.ArrayLike],
    arm: dict[str, npt.ArrayLike],
    requests: npt.ArrayLike,
    alpha_each: float,
    t_opt: float,
) -> tuple[Array, Array, Array]:
    """Estimate, lower and upper always-valid bound of arm − control; NaN below sequential.MIN_UNITS per arm.

    `requests` counts every request of the experiment (all arms): each is a unit of the comparison, those
    of other arms contributing only the predictable plug-in, as the canary's AIPW contrasts do.
    """
    e0, v0 = estimate_and_variance(kind, control)
    e1, v1 = estimate_and_variance(kind, arm)
    n0, n1 = np.asarray(control["n"], dtype=float), np.asarray(arm["n"], dtype=float)
    t = np.asarray(requests, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(t * (v0 / n0 + v1 / n1))
        half = sd * sequential.radius(np.maximum(t, 1.0), alpha_each, t_opt)
    enough = (n0 >= sequential.MIN_UNITS) & (n1 >= sequential.MIN_UNITS)
    d = np.where(enough, e1 - e0, np.nan)
    return d, d - half, d + half


def crossed(metric: Metric, lower: npt.ArrayLike, upper: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """A guard's verdict: the arm is clearly worse (by more than mde under non-inferiority)."""
    worst_good = np.where(metric.goal is Goal.increase, upper, -np.asarray(lower))  # the most favourable bound
    limit = -metric.mde if metric.test is Hypothesis.non_inferiority else 0.0
    return np.asarray(worst_good < limit)


def cleared(metric: Metric, lower: npt.ArrayLike, upper: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """The deciding metric shows the arm better (superiority) or not worse by mde (non-inferiority)."""
    least_good = np.where(metric.goal is Goal.increase, lower, -np.asarray(upper))
    limit = -metric.mde if metric.test is Hypothesis.non_inferiority else 0.0
    return np.asarray(least_good > limit)


def futile(metric: Metric, lower: npt.ArrayLike, upper: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """The deciding metric's bound rules out what the arm set out to show (an effect of mde, or non-inferiority)."""
    best_good = np.where(metric.goal is Goal.increase, upper, -np.asarray(lower))
    limit = metric.mde if metric.test is Hypothesis.superiority else -metric.mde
    return np.asarray(best_good < limit)


def stats_arrays(stats: Stats) -> dict[str, npt.ArrayLike]:
    if isinstance(stats, RatioSummary):
        return {
            "n": stats.n,
            "num": stats.num,
            "num_sq": stats.num_sq,
            "den": stats.den,
            "den_sq": stats.den_sq,
            "cross": stats.cross,
        }
    return {"n": stats.n, "total": stats.total, "total_sq": stats.total_sq}


# The typed decision for one experiment.


class ArmStatus(StrEnum):
    running = "running"
    winner = "winner"
    better = "better"  # cleared its deciding metric, but another arm's estimate is better
    stopped = "stopped"  # a guard crossed: the arm's traffic goes back to the control
    futile = "futile"  # cannot show what it set out to show


class MetricBound(BaseModel):
    """One metric of one arm against the control: arm − control, with its always-valid bounds."""

    name: str
    role: Role
    control: float | None
    arm: float | None
    difference: float | None
    lower: float | None
    upper: float | None
    cleared: bool
    crossed: bool


class ArmResult(BaseModel):
    arm: str
    requests: int
    status: ArmStatus
    reason: str
    metrics: list[MetricBound]


class SRMCheck(BaseModel):
    counts: dict[str, int]
    expected: dict[str, float]
    p_value: float
    alarm: bool


class ExperimentResult(BaseModel):
    """The experiment's verdict with its evidence: per arm the bounds and status, the winner, the SRM check."""

    control: str
    alpha_each: float
    arms: list[ArmResult]
    srm: SRMCheck
    winner: str | None
    decided: bool
    reason: str


def _optional(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def srm_check(arms: list[ArmStats], alarm_below: float) -> SRMCheck:
    """The sequential Dirichlet-multinomial test of the requests per arm against the configured shares."""
    total_share = sum(a.share for a in arms)
    expected = {a.name: a.share / total_share for a in arms}
    counts = {a.name: a.requests for a in arms}
    if sum(counts.values()) == 0:
        return SRMCheck(counts=counts, expected=expected, p_value=1.0, alarm=False)
    log_bf = srm.log_bayes_factor(list(counts.values()), list(expected.values()))
    p = min(1.0, math.exp(-log_bf))
    return SRMCheck(counts=counts, expected=expected, p_value=p, alarm=p < alarm_below)


def decide(
    experiment: Experiment,
    control: ArmStats,
    candidates: list[ArmStats],
    srm_arms: list[ArmStats] | None = None,
    comparisons: int | None = None,
) -> ExperimentResult:
    """Every candidate arm against the control at α / (k − 1); a crossed guard stops an arm; the best cleared wins.

    The SRM test counts the arms given, or `srm_arms` (the same arms counted since their shares last changed:
    after an arm stops, the control's share grows); an SRM alarm voids the comparison: no winner and no stop.
    `comparisons`: how many arms were ever compared with the control (stopped ones too: their looks were spent),
    the Bonferroni divisor; default the candidates given.
    """
    if not candidates:
        raise ValueError("an experiment needs at least one candidate arm besides the control")
    arms = [control, *candidates]
    for each in arms:
        missing = {m.name for m in experiment.metrics} - set(each.metrics)
        if missing:
            raise ValueError(f"arm {each.name!r} has no statistics for {sorted(missing)}")
    alpha_each = experiment.alpha_each(1 + (comparisons or len(candidates)))
    requests = sum(each.requests for each in arms)
    check = srm_check(arms if srm_arms is None else srm_arms, experiment.srm_alarm_below)
    deciding = experiment.deciding
    results: list[ArmResult] = []
    scores: dict[str, float] = {}
    for arm in candidates:
        bounds: list[MetricBound] = []
        stop: list[str] = []
        wins = cannot = False
        for metric in experiment.metrics:
            c, a = stats_arrays(control.metrics[metric.name]), stats_arrays(arm.metrics[metric.name])
            e0, _ = estimate_and_variance(metric.kind, c)
            e1, _ = estimate_and_variance(metric.kind, a)
            d, lo, hi = (float(v) for v in difference_bounds(metric.kind, c, a, requests, alpha_each, experiment.t_opt))
            known = not math.isnan(d)
            is_guard = metric.role is Role.guard
            worse = known and is_guard and bool(crossed(metric, lo, hi))
            better = known and not is_guard and bool(cleared(metric, lo, hi))
            if worse:
                stop.append(metric.name)
            if better:
                wins, scores[arm.name] = True, metric.goal.sign * d
            if known and not is_guard and bool(futile(metric, lo, hi)):
                cannot = True
            bounds.append(
                MetricBound(
                    name=metric.name,
                    role=metric.role,
                    control=_optional(float(e0)),
                    arm=_optional(float(e1)),
                    difference=_optional(d),
                    lower=_optional(lo),
                    upper=_optional(hi),
                    cleared=better,
                    crossed=worse,
                )
            )
        if check.alarm:
            status, reason = ArmStatus.running, "sample ratio mismatch: the comparison is void until it is explained"
        elif stop:
            status, reason = ArmStatus.stopped, f"clearly worse on {', '.join(stop)}: traffic back to the control"
            scores.pop(arm.name, None)
        elif wins:
            status, reason = ArmStatus.better, f"{deciding.name} clears its {deciding.test} bound, no guard crossed"
        elif cannot:
            status, reason = ArmStatus.futile, f"{deciding.name}'s bound rules out its {deciding.test} by mde"
        else:
            status, reason = ArmStatus.running, "undecided"
        results.append(ArmResult(arm=arm.name, requests=arm.requests, status=status, reason=reason, metrics=bounds))
    winner = max(scores, key=lambda name: scores[name]) if scores and not check.alarm else None
    if winner is not None:
        results = [r.model_copy(update={"status": ArmStatus.winner}) if r.arm == winner else r for r in results]
    resolved = all(r.status in (ArmStatus.stopped, ArmStatus.futile) for r in results)
    decided = not check.alarm and (winner is not None or resolved)
    if check.alarm:
        reason = f"sample ratio mismatch (p = {check.p_value:.2g}): no decision"
    elif winner is not None:
        reason = f"{winner} wins on {deciding.name} at α/(k−1) = {alpha_each:.3g}"
    elif resolved:
        reason = "no arm beats the control: every arm stopped or futile"
    else:
        reason = "undecided: keep the experiment running"
    return ExperimentResult(
        control=control.name,
        alpha_each=alpha_each,
        arms=results,
        srm=check,
        winner=winner,
        decided=decided,
        reason=reason,
    )
