"""The watch after promotion: the new champion's rows against its last canary step's candidate arm."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from releasegate import policy as policies
from releasegate import release
from releasegate.analysis import watch
from releasegate.contract import Arm, Stage
from releasegate.release import State
from releasegate.verdict import Decision, Window

WINDOW = Window(start=0.0, end=60.0, stage=Stage.watch())


def _rows(n: int, *, error_rate: float, latency_ms: float, accuracy: float, seed: int) -> pd.DataFrame:
    """Analysable rows (rows.rows' columns) of one arm: errors, latencies and labelled 0/1 correctness."""
    rng = np.random.default_rng(seed)
    error = rng.random(n) < error_rate
    correct = (rng.random(n) < accuracy).astype(float)
    return pd.DataFrame(
        {
            "arm": Arm.candidate.value,
            "routing_key_hash": [f"k{i % 500}" for i in range(n)],
            "error": error,
            "latency_ms": rng.gamma(4.0, latency_ms / 4.0, n),
            "label": np.where(error, None, "1"),
            "value": np.where(error, np.nan, correct),
        }
    )


@pytest.fixture
def policy() -> policies.Policy:
    return policies.load("default").model_copy(update={"watch": policies.Watch(seconds=300, min_requests=200)})


def test_errors_that_start_after_promotion_roll_back_with_the_numbers(policy):
    base = _rows(4000, error_rate=0.0, latency_ms=5, accuracy=0.9, seed=1)
    after = _rows(1500, error_rate=0.2, latency_ms=5, accuracy=0.9, seed=2)
    verdict = watch.judge(base, after, policy, WINDOW, window_closed=False)
    assert verdict.decision is Decision.rollback
    assert verdict.reason.startswith("after promotion: error_rate crossed its limit")
    [crossed] = [m for m in verdict.metrics if m.passed is False]
    assert crossed.name == "error_rate" and crossed.lower > policy.guardrails.error_rate_margin
    assert verdict.samples[Arm.champion].errors == int(after["error"].sum())


def test_a_slower_or_less_accurate_champion_rolls_back(policy):
    base = _rows(4000, error_rate=0.0, latency_ms=5, accuracy=0.9, seed=1)
    slow = watch.judge(base, _rows(2000, error_rate=0.0, latency_ms=40, accuracy=0.9, seed=3), policy, WINDOW, False)
    assert slow.decision is Decision.rollback and "latency_p99" in slow.reason
    worse = watch.judge(base, _rows(4000, error_rate=0.0, latency_ms=5, accuracy=0.7, seed=4), policy, WINDOW, False)
    assert worse.decision is Decision.rollback and "accuracy" in worse.reason


def test_the_same_behaviour_as_in_canary_keeps_watching_then_passes(policy):
    base = _rows(4000, error_rate=0.002, latency_ms=5, accuracy=0.9, seed=1)
    after = _rows(3000, error_rate=0.002, latency_ms=5, accuracy=0.9, seed=5)
    assert watch.judge(base, after, policy, WINDOW, window_closed=False).decision is Decision.continue_
    passed = watch.judge(base, after, policy, WINDOW, window_closed=True)
    assert passed.decision is Decision.promote and "no limit crossed in 3,000 requests" in passed.reason


def test_too_few_requests_decide_nothing(policy):
    base = _rows(4000, error_rate=0.0, latency_ms=5, accuracy=0.9, seed=1)
    after = _rows(100, error_rate=0.5, latency_ms=5, accuracy=0.9, seed=6)
    verdict = watch.judge(base, after, policy, WINDOW, window_closed=False)
    assert verdict.decision is Decision.continue_ and all(m.passed is None for m in verdict.metrics)


def test_a_watched_release_holds_the_lock_until_the_watch_ends(rg_home):
    rel = release.open_release("churn", "2", "1", {"name": "t"}, airflow_run_id="r", actor="t")
    for state in (State.signing, State.validating, State.shadow, State.canary, State.promoting, State.watching):
        release.transition(rel.release_id, state, actor="t")
    assert release.active("churn").release_id == rel.release_id  # a second release of churn would be refused
    ended = release.transition(rel.release_id, State.rolled_back, actor="t", reason="after promotion: errors")
    assert ended.terminal and release.active("churn") is None


def test_a_policy_without_a_watch_says_so():
    assert policies.load("default").watch.seconds == 0
    with pytest.raises(policies.PolicyError, match="seconds"):
        policies.parse({"name": "x", "watch": {"seconds": -1}})
