"""Always-valid (time-uniform) confidence sequences for a mean, safe to look at after every poll.

Method: the asymptotic confidence sequence with the two-sided normal-mixture (Robbins) boundary of
I. Waudby-Smith, D. Arbour, R. Sinha, E. H. Kennedy, A. Ramdas, "Time-uniform central limit theory
and asymptotic confidence sequences", Annals of Statistics 52(6), 2024 (arXiv:2103.06476), Thm 2.2:

    C_t = mean_t ± sd_t · sqrt( 2(tρ² + 1) / (t²ρ²) · log( sqrt(tρ² + 1) / α ) )

ρ is fixed before the data (tuned to be tightest at t_opt, here the policy's minimum sample), as
it must be: a ρ chosen from the data would void the time-uniform guarantee. For differences of
two arms we take the mean of per-unit contrasts: paired differences (shadow), or the augmented
inverse-propensity-weighted pseudo-outcomes with predictable plug-in arm means (canary; paper §3).

savvi (PyPI) was considered: it offers sequential multinomial (SRM) and linear-model tests with
per-row Python updates and a cvxpy dependency, but no CS for a difference of means, so no fit here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias, overload

import numpy as np
import numpy.typing as npt

# The asymptotic CS is a large-sample statement: no bound is reported on fewer units than this.
MIN_UNITS = 30

# The sample sd is regularised with one pseudo-observation of this variance (the Bernoulli maximum),
# so that an all-equal start (0 errors of 40) does not give a zero-width, overconfident bound.
_PRIOR_VARIANCE = 0.25


@dataclass(frozen=True)
class Summary:
    """The sufficient statistics of the bounds: count, sum and sum of squares of the per-unit values.

    The verdict is computed from these alone, so the release DAG (from logged rows) and the decision
    benchmark (from simulated running sums) go through the same code.
    """

    n: int
    total: float
    total_sq: float

    @classmethod
    def of(cls, values: npt.ArrayLike) -> Summary:
        x = np.asarray(values, dtype=float)
        if not np.all(np.isfinite(x)):
            raise ValueError("sequential statistics got non-finite values")
        return cls(n=len(x), total=float(x.sum()), total_sq=float(x @ x))

    def __add__(self, other: Summary) -> Summary:
        """The statistics of both samples together (counts and sums add)."""
        return Summary(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def sd(self) -> float:
        """The sd regularised with one pseudo-observation of variance _PRIOR_VARIANCE."""
        ss = max(self.total_sq - self.n * self.mean**2, 0.0) if self.n else 0.0
        return math.sqrt((ss + _PRIOR_VARIANCE) / (self.n + 1))


# What the bounds take: per-unit values, or their Summary.
Values: TypeAlias = "Summary | npt.ArrayLike"


def summary(values: Values) -> Summary:
    """`values` as a Summary (a Summary passes through)."""
    return values if isinstance(values, Summary) else Summary.of(values)


@dataclass(frozen=True)
class Bound:
    """A confidence-sequence interval for a mean at one look."""

    estimate: float
    lower: float
    upper: float
    n: int
    sd: float
    alpha: float


def rho2(t_opt: float, alpha: float) -> float:
    """The mixture variance ρ² that makes the boundary (nearly) tightest at t_opt (paper, eq. after Thm 2.2)."""
    if t_opt <= 0 or not 0 < alpha < 1:
        raise ValueError(f"t_opt must be > 0 and alpha in (0, 1), got t_opt={t_opt}, alpha={alpha}")
    log_inv = 2 * math.log(1 / alpha)
    return (log_inv + math.log(1 + log_inv)) / t_opt


@overload
def radius(t: int, alpha: float, t_opt: float) -> float: ...
@overload
def radius(t: npt.NDArray[np.float64], alpha: float, t_opt: float) -> npt.NDArray[np.float64]: ...
def radius(t: int | npt.NDArray[np.float64], alpha: float, t_opt: float) -> float | npt.NDArray[np.float64]:
    """Half-width of the unit-variance two-sided normal-mixture boundary after t observations."""
    r2 = rho2(t_opt, alpha)
    looks = np.asarray(t, dtype=float)
    v = looks * r2 + 1
    out = np.sqrt(2 * v / (looks**2 * r2) * np.log(np.sqrt(v) / alpha))
    return float(out) if out.ndim == 0 else out


def confidence_sequence(values: Values, alpha: float, t_opt: float) -> Bound | None:
    """The always-valid (1 − alpha) interval for the mean of `values` (or their Summary); None below MIN_UNITS."""
    s = summary(values)
    if s.n < MIN_UNITS:
        return None
    sd = s.sd
    half = sd * radius(s.n, alpha, t_opt)
    mean = s.mean
    return Bound(estimate=mean, lower=mean - half, upper=mean + half, n=s.n, sd=sd, alpha=alpha)


def running_bounds(
    values: npt.ArrayLike, alpha: float, t_opt: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Lower and upper bounds after each prefix 1..n (what repeated looks would have seen)."""
    x = np.asarray(values, dtype=float)
    t = np.arange(1, len(x) + 1, dtype=float)
    mean = np.cumsum(x) / t
    ss = np.cumsum(x**2) - t * mean**2
    sd = np.sqrt((np.maximum(ss, 0) + _PRIOR_VARIANCE) / (t + 1))
    half = sd * radius(t, alpha, t_opt)
    return mean - half, mean + half


def p_value(values: Values, null: float, worse_if: str, alpha_opt: float, t_opt: float) -> float:
    """Always-valid p-value against "the mean is on the good side of `null`".

    worse_if "below": evidence that the mean < null; "above": that it is > null. It is the α at
    which the confidence sequence would just exclude `null` on that side (1 / the mixture
    martingale), with ρ tuned for (alpha_opt, t_opt) as for the bounds.
    """
    if worse_if not in ("below", "above"):
        raise ValueError(f"worse_if must be 'below' or 'above', got {worse_if!r}")
    s = summary(values)
    n = s.n
    if n < MIN_UNITS:
        return 1.0
    sd = s.sd
    gap = (null - s.mean) if worse_if == "below" else (s.mean - null)
    if gap <= 0:
        return 1.0
    r2 = rho2(t_opt, alpha_opt)
    v = n * r2 + 1
    z = gap / sd
    log_p = 0.5 * math.log(v) - z**2 * n**2 * r2 / (2 * v)
    return float(min(1.0, math.exp(log_p)))


def aipw_contrasts(y: npt.ArrayLike, treated: npt.ArrayLike, propensity: float) -> npt.NDArray[np.float64]:
    """Per-unit pseudo-outcomes whose mean estimates E[Y | candidate] − E[Y | champion] (time-ordered units).

    Augmented IPW with each arm's running mean of the *earlier* units as the predictable plug-in
    (Waudby-Smith et al. 2024, §3): the assignment probability is the configured canary weight.
    """
    y = np.asarray(y, dtype=float)
    a = np.asarray(treated, dtype=bool)
    if not 0 < propensity < 1:
        raise ValueError(f"propensity must be in (0, 1), got {propensity}")

    def earlier(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.concatenate([[0.0], np.cumsum(values)[:-1]])

    # Before an arm has a unit of its own, the mean of every earlier unit stands in for it (0 before the
    # first): any predictable value keeps validity, and this one adds no contrast where the arms do not
    # differ (a fixed 0.5 made zero errors look like +0.007 at a 5 % step until the first candidate unit).
    pooled_sums, pooled_counts = earlier(y), earlier(np.ones_like(y))
    pooled = np.where(pooled_counts > 0, pooled_sums / np.maximum(pooled_counts, 1), 0.0)

    def predictable_mean(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        sums, counts = earlier(np.where(mask, y, 0.0)), earlier(mask.astype(float))
        return np.where(counts > 0, sums / np.maximum(counts, 1), pooled)

    mu1, mu0 = predictable_mean(a), predictable_mean(~a)
    return (mu1 - mu0) + a * (y - mu1) / propensity - (~a) * (y - mu0) / (1 - propensity)
