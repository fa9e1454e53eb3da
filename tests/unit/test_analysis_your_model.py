"""Verdicts on a user's own models: regressors, agreement switched off, a clean start, a minimum latency sample."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest

from releasegate import policy as policies
from releasegate.analysis import Decision, analyse_frames, sequential
from releasegate.contract import Stage, StageKind

SHADOW = Stage.shadow()


def canary(weight: int) -> Stage:
    return Stage(kind=StageKind.canary, weight=weight)


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def regression_shadow(
    n: int, *, candidate_noise: float, champion_noise: float = 3.0, seed: int = 0, candidate_latency_ms: float = 20.0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shadow pairs of two regressors: truth y, each arm's answer y + its own noise (no two answers equal)."""
    rng = np.random.default_rng(seed)
    rows, fb = [], []
    for i in range(n):
        rid, t = f"r{i}", 1000.0 + i * 0.01
        y = float(rng.normal(50, 10))
        for j, (arm, noise, latency) in enumerate(
            (("champion", champion_noise, 20.0), ("candidate", candidate_noise, candidate_latency_ms))
        ):
            rows.append(
                {
                    "id": 2 * i + j,
                    "request_id": rid,
                    "time": t + j * 0.001,
                    "arm": arm,
                    "routing_key_hash": _key(rid),
                    "fallback": False,
                    "inputs": json.dumps({"region": "north"}),
                    "outputs": json.dumps([y + float(rng.normal(0, noise))]),
                    "latency_ms": float(rng.lognormal(math.log(latency), 0.3)),
                    "status": "ok",
                }
            )
        fb.append({"request_id": rid, "time": t + 1, "ground_truth": json.dumps(y)})
    return pd.DataFrame(rows), pd.DataFrame(fb)


REGRESSION = {
    "name": "regression",
    "offline": {"metric": "mae", "margin": 0.5},
    "primary": {"metric": "absolute_error", "margin": 0.5},
}


def test_a_better_regressor_is_promoted_in_shadow_although_no_two_answers_are_equal():
    preds, fb = regression_shadow(3000, candidate_noise=1.0)
    verdict = analyse_frames(preds, fb, SHADOW, policies.parse(REGRESSION), window=(1000, 1030))
    assert verdict.decision is Decision.promote, verdict.reason
    assert [m.name for m in verdict.metrics] == ["error_rate", "latency_p99", "absolute_error"]
    error = next(m for m in verdict.metrics if m.name == "absolute_error")
    assert error.upper < 0  # the candidate's absolute error is clearly lower


def test_a_worse_regressor_is_rolled_back_on_its_error_in_target_units():
    preds, fb = regression_shadow(3000, candidate_noise=6.0)
    verdict = analyse_frames(preds, fb, SHADOW, policies.parse(REGRESSION), window=(1000, 1030))
    assert verdict.decision is Decision.rollback
    assert verdict.reason.startswith("rollback: absolute error of candidate − champion is +"), verdict.reason


def test_a_regressors_agreement_counts_answers_within_the_tolerance():
    preds, fb = regression_shadow(3000, candidate_noise=1.0)
    strict = policies.parse({**REGRESSION, "shadow": {"agreement_tolerance": 0.5, "min_agreement": 0.8}})
    loose = policies.parse({**REGRESSION, "shadow": {"agreement_tolerance": 20.0, "min_agreement": 0.8}})
    # Answers differ by N(0, sqrt(3² + 1²)): within 0.5 about 12 % of the time, within 20 always.
    tight = analyse_frames(preds, fb, SHADOW, strict, window=(1000, 1030))
    assert tight.decision is Decision.rollback and "agree" in tight.reason
    assert next(m for m in tight.metrics if m.name == "agreement").estimate == pytest.approx(0.12, abs=0.03)
    wide = analyse_frames(preds, fb, SHADOW, loose, window=(1000, 1030))
    assert wide.decision is Decision.promote and next(m for m in wide.metrics if m.name == "agreement").passed


def test_min_agreement_zero_switches_the_agreement_check_off_and_widens_nothing_else():
    on = policies.parse({"name": "on"})
    off = policies.parse({"name": "off", "shadow": {"min_agreement": 0}})
    assert on.agreement_checked and not off.agreement_checked
    preds, fb = regression_shadow(400, candidate_noise=1.0)
    fb["ground_truth"] = [json.dumps(int(float(v) > 50)) for v in fb["ground_truth"]]
    verdict = analyse_frames(preds, fb, SHADOW, off, window=(1000, 1004))
    assert "agreement" not in [m.name for m in verdict.metrics]
    # Three checks share alpha (error rate, latency, primary) instead of four.
    assert verdict.metrics[0].alpha == pytest.approx(off.alpha / 3)


def test_a_policy_mixing_a_regression_and_a_classification_metric_is_refused_naming_both():
    with pytest.raises(policies.PolicyError, match="offline.metric accuracy and primary.metric absolute_error"):
        policies.parse({"name": "mixed", "primary": {"metric": "absolute_error"}})


def test_zero_errors_in_both_arms_estimate_an_error_difference_of_exactly_zero():
    # A 5 % canary: before the candidate's first unit, the champion's units used to contrast against 0.5.
    rng = np.random.default_rng(3)
    treated = rng.random(2000) < 0.05
    contrasts = sequential.aipw_contrasts(np.zeros(2000), treated, 0.05)
    assert np.all(contrasts == 0.0)
    # And on real differences the estimate stays unbiased: candidate 2 % errors, champion 1 %.
    estimates = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        treated = rng.random(4000) < 0.05
        y = (rng.random(4000) < np.where(treated, 0.02, 0.01)).astype(float)
        estimates.append(sequential.aipw_contrasts(y, treated, 0.05).mean())
    assert np.mean(estimates) == pytest.approx(0.01, abs=0.002)


def test_the_latency_check_waits_for_its_minimum_sample_before_it_decides():
    policy = policies.parse({**REGRESSION, "shadow": {"min_samples": 300}})
    slow = regression_shadow(200, candidate_noise=1.0, candidate_latency_ms=200.0)
    early = analyse_frames(*slow, SHADOW, policy, window=(1000, 1002))
    latency = next(m for m in early.metrics if m.name == "latency_p99")
    assert latency.passed is None and "200 of the 300 requests it needs" in latency.detail
    assert early.decision is Decision.continue_
    late = analyse_frames(
        *regression_shadow(400, candidate_noise=1.0, candidate_latency_ms=200.0), SHADOW, policy, window=(1000, 1004)
    )
    assert late.decision is Decision.rollback and "slower than the latency limit" in late.reason


def test_a_stall_of_the_whole_gateway_slows_both_arms_and_is_not_held_against_the_candidate():
    preds, fb = regression_shadow(3000, candidate_noise=1.0)
    stalled = preds["request_id"].isin([f"r{i}" for i in range(0, 3000, 40)])  # 2.5 % of requests, both arms
    preds.loc[stalled, "latency_ms"] = 400.0
    verdict = analyse_frames(preds, fb, SHADOW, policies.parse(REGRESSION), window=(1000, 1030))
    latency = next(m for m in verdict.metrics if m.name == "latency_p99")
    assert latency.passed and abs(latency.estimate) < 0.005, latency
    # A candidate slow on its own, on the same share of requests, is caught.
    own = preds.copy()
    own.loc[stalled & (own["arm"] == "champion"), "latency_ms"] = 20.0
    slow = analyse_frames(own, fb, SHADOW, policies.parse(REGRESSION), window=(1000, 1030))
    assert next(m for m in slow.metrics if m.name == "latency_p99").passed is False
