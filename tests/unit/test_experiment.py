"""A/B/n experiments: per-arm bounds at α/(k−1), guards that stop arms, the winner, the delta method, SRM."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from releasegate.analysis import sequential
from releasegate.analysis.experiment import (
    ArmStats,
    ArmStatus,
    Experiment,
    Goal,
    Hypothesis,
    Metric,
    MetricKind,
    RatioSummary,
    Role,
    cleared,
    decide,
    difference_bounds,
    estimate_and_variance,
)

CONVERSION = Metric(
    name="conversion",
    kind=MetricKind.proportion,
    goal=Goal.increase,
    mde=0.01,
    role=Role.decide,
    test=Hypothesis.superiority,
)
CPU = Metric(
    name="cpu", kind=MetricKind.mean, goal=Goal.decrease, mde=0.01, role=Role.guard, test=Hypothesis.non_inferiority
)


def _arm(name: str, n: int, conversions: int, cpu: tuple[float, float] = (0.05, 0.01), share: float = 1.0) -> ArmStats:
    """An arm of n requests with that many conversions and CPU seconds of (mean, sd) per call."""
    mean, sd = cpu
    return ArmStats(
        name=name,
        share=share,
        metrics={
            "conversion": sequential.Summary(n, float(conversions), float(conversions)),
            "cpu": sequential.Summary(n, n * mean, (n - 1) * sd**2 + n * mean**2),
        },
    )


def test_bounds_are_the_confidence_sequence_of_the_difference_at_alpha_over_k_minus_1():
    spec = Experiment(metrics=[CONVERSION, CPU], t_opt=4000)
    result = decide(spec, _arm("A", 2000, 100), [_arm("B", 2000, 160), _arm("C", 2000, 100)])
    # By hand: proportion variances regularised as sequential.Summary.sd, Σ(x − x̄)² = conversions − n·p².
    v0 = (100 - 2000 * 0.05**2 + 0.25) / 2001
    v1 = (160 - 2000 * 0.08**2 + 0.25) / 2001
    half = math.sqrt(6000 * (v0 / 2000 + v1 / 2000)) * sequential.radius(6000, 0.05 / 2, 4000)
    assert result.alpha_each == pytest.approx(0.025)
    b = result.arms[0].metrics[0]
    assert (b.control, b.arm, b.difference) == pytest.approx((0.05, 0.08, 0.03))
    assert (b.lower, b.upper) == pytest.approx((0.03 - half, 0.03 + half))
    assert half == pytest.approx(0.0256, abs=1e-4)  # 0.03 − half > 0: B's conversion clears
    assert result.winner == "B" and result.decided
    assert [a.status for a in result.arms] == [ArmStatus.winner, ArmStatus.running]


def test_an_arm_clearly_worse_on_a_guard_is_stopped_and_cannot_win():
    spec = Experiment(metrics=[CONVERSION, CPU], t_opt=4000)
    result = decide(spec, _arm("A", 2000, 100), [_arm("B", 2000, 200, cpu=(0.10, 0.02)), _arm("C", 2000, 100)])
    b, c = result.arms
    assert b.status is ArmStatus.stopped and "cpu" in b.reason
    assert b.metrics[0].cleared  # better on conversion, but the guard decides
    assert b.metrics[1].crossed and not c.metrics[1].crossed
    assert result.winner is None and not result.decided


def test_of_several_arms_that_clear_the_best_estimate_wins():
    spec = Experiment(metrics=[CONVERSION, CPU], t_opt=4000)
    result = decide(spec, _arm("A", 2000, 100), [_arm("B", 2000, 180), _arm("C", 2000, 220)])
    assert result.winner == "C"
    assert {a.arm: a.status for a in result.arms} == {"B": ArmStatus.better, "C": ArmStatus.winner}


def test_arms_that_cannot_beat_the_control_by_the_mde_decide_the_experiment_without_a_winner():
    spec = Experiment(metrics=[CONVERSION, CPU], t_opt=4000)
    result = decide(spec, _arm("A", 40_000, 2000), [_arm("B", 40_000, 2000), _arm("C", 40_000, 1990)])
    assert [a.status for a in result.arms] == [ArmStatus.futile, ArmStatus.futile]
    assert result.decided and result.winner is None


def test_a_sample_ratio_mismatch_voids_the_comparison():
    spec = Experiment(metrics=[CONVERSION, CPU], t_opt=4000)
    result = decide(spec, _arm("A", 1000, 50), [_arm("B", 1400, 140)])
    assert result.srm.alarm and result.srm.p_value < 0.001
    assert result.winner is None and not result.decided
    assert result.arms[0].status is ArmStatus.running


def test_an_experiment_needs_exactly_one_deciding_metric():
    with pytest.raises(ValidationError, match="exactly one deciding metric"):
        Experiment(metrics=[CPU], t_opt=100)
    with pytest.raises(ValidationError, match="exactly one deciding metric"):
        Experiment(metrics=[CONVERSION, CONVERSION.model_copy(update={"name": "other"})], t_opt=100)


def test_delta_method_variance_of_revenue_per_conversion_matches_simulation():
    """Revenue per converted request (a ratio of per-request sums): the delta method's variance vs 4000 replicates."""
    rng = np.random.default_rng(1)
    n, reps = 2000, 4000
    converted = rng.random((reps, n)) < 0.05
    revenue = np.where(converted, rng.lognormal(np.log(30), 1.0, (reps, n)), 0.0)
    ratios = revenue.sum(axis=1) / converted.sum(axis=1)
    stats = {
        "n": np.full(reps, n),
        "num": revenue.sum(axis=1),
        "num_sq": (revenue**2).sum(axis=1),
        "den": converted.sum(axis=1),
        "den_sq": converted.sum(axis=1),
        "cross": (revenue * converted).sum(axis=1),
    }
    estimate, variance = estimate_and_variance(MetricKind.ratio, stats)
    assert np.allclose(estimate, ratios)
    assert np.mean(variance) / n == pytest.approx(ratios.var(), rel=0.1)  # heavy tails: the mean, not the median
    # The typed summary gives the same statistics.
    one = RatioSummary.of(revenue[0], converted[0])
    assert (one.num, one.den, one.cross) == pytest.approx((stats["num"][0], stats["den"][0], stats["cross"][0]))


def _aa_false_winner_rate(arms: int, alpha_each: float, experiments: int = 400) -> float:
    """A/A with `arms` arms, a look every 1000 requests per arm up to 20 looks: how often some arm 'wins'."""
    rng = np.random.default_rng(7)
    per_look = 1000
    conversions = np.cumsum(rng.binomial(per_look, 0.1, (20, experiments, arms)), axis=0).astype(float)
    won = np.zeros(experiments, bool)
    for look in range(20):
        n = np.full(experiments, per_look * (look + 1.0))
        control = {"n": n, "total": conversions[look, :, 0], "total_sq": conversions[look, :, 0]}
        for arm in range(1, arms):
            a = {"n": n, "total": conversions[look, :, arm], "total_sq": conversions[look, :, arm]}
            _, lo, hi = difference_bounds(MetricKind.proportion, control, a, n * arms, alpha_each, t_opt=10_000 * arms)
            won |= cleared(CONVERSION, lo, hi)
    return float(won.mean())


def test_many_arms_keep_the_false_winner_rate_at_alpha_only_with_the_bonferroni_split():
    arms = 8
    corrected = _aa_false_winner_rate(arms, 0.05 / (arms - 1))
    uncorrected = _aa_false_winner_rate(arms, 0.05)
    assert corrected <= 0.05
    assert uncorrected > corrected
