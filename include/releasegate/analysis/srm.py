"""Sample ratio mismatch: does the split of routing keys between the arms match the configured weight?

The DAG re-runs this at every poll, so a fixed-n chi-square at p < 0.001 would raise false alarms as
the looks add up. The test is the Dirichlet-multinomial mixture sequential probability ratio test of
M. Lindon, A. Malek, "Anytime-Valid Inference for Multinomial Count Data", NeurIPS 2022
(arXiv:2011.03567): with a Dirichlet(k·θ0) prior on the arm shares, the Bayes factor

    BF_n = B(k·θ0 + x) / B(k·θ0) / Π θ0_i^x_i        (B the multivariate Beta function)

is a nonnegative martingale under the configured split θ0, so by Ville's inequality
P(BF_n ≥ 1/α at any look) ≤ α, and 1/BF_n is an always-valid p-value. The counts are exchangeable,
so the window's totals are all it needs. savvi (PyPI) implements the same test but pulls in cvxpy.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from scipy.special import gammaln

from releasegate.contract import Arm
from releasegate.verdict import SRM


class Unit(StrEnum):
    """What a backend assigns to an arm, and so what the test counts."""

    routing_keys = "routing_keys"  # the gateway: a customer's key sticks to one arm
    requests = "requests"  # KServe: Knative picks a revision per request


# The Dirichlet prior's concentration k (savvi's default, the paper's experiments): prior shares k·θ0.
CONCENTRATION = 100.0


def log_bayes_factor(counts: npt.ArrayLike, shares: npt.ArrayLike, concentration: float = CONCENTRATION) -> float:
    """log BF of "the shares differ from `shares`" against "they are `shares`" for multinomial `counts`."""
    x = np.asarray(counts, dtype=float)
    theta = np.asarray(shares, dtype=float)
    if x.shape != theta.shape or np.any(x < 0) or np.any(theta <= 0) or not math.isclose(theta.sum(), 1.0):
        raise ValueError(
            f"need non-negative counts and positive shares summing to 1 of one length, "
            f"got counts={list(x)}, shares={list(theta)}"
        )
    prior = concentration * theta

    def log_beta(a: np.ndarray) -> float:
        return float(gammaln(a).sum() - gammaln(a.sum()))

    return log_beta(prior + x) - log_beta(prior) - float(x @ np.log(theta))


def check(counts: dict[Arm, int], candidate_weight: int, alarm_below: float) -> SRM:
    """Sequential test of the units per arm against candidate_weight % / the rest; alarm when p < alarm_below."""
    if not 0 < candidate_weight < 100:
        raise ValueError(f"candidate_weight must be between 1 and 99 for a canary, got {candidate_weight}")
    expected = {Arm.champion: (100 - candidate_weight) / 100, Arm.candidate: candidate_weight / 100}
    observed = [int(counts.get(Arm.champion, 0)), int(counts.get(Arm.candidate, 0))]
    result = SRM(counts=dict(zip(expected, observed, strict=True)), expected=expected)
    if sum(observed) == 0:
        return result
    log_bf = log_bayes_factor(observed, list(expected.values()))
    p = min(1.0, math.exp(-log_bf))
    return result.model_copy(
        update={"p_value": p, "bayes_factor": math.exp(min(log_bf, 700.0)), "alarm": p < alarm_below}
    )
