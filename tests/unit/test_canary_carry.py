"""Evidence carried across canary steps: pooled bounds, per-step SRM and minimum samples, the step hand-over."""

from __future__ import annotations

import pandas as pd
import pytest

from releasegate import policy as policies
from releasegate.analysis import Decision, carry, frame_stats, verdict_from_stats
from releasegate.contract import Stage, StageKind
from tests.unit.test_analysis import traffic

SHADOW = Stage.shadow()


def canary(weight: int) -> Stage:
    return Stage(kind=StageKind.canary, weight=weight)


@pytest.fixture(scope="module")
def policy() -> policies.Policy:
    return policies.parse({"name": "test", "slices": ["region"], "canary": {"steps": [5, 25, 50]}})


def _later(preds: pd.DataFrame, fb: pd.DataFrame, offset: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same kind of traffic, logged `offset` seconds later under other request ids (a later step)."""
    preds, fb = preds.copy(), fb.copy()
    preds["time"] += offset
    fb["time"] += offset
    preds["id"] += 1_000_000
    preds["request_id"] = preds["request_id"] + f"@{offset}"
    fb["request_id"] = fb["request_id"] + f"@{offset}"
    return preds, fb


def test_carrying_a_step_adds_its_statistics_exactly(policy):
    """Two windows at one weight, carried, count what one window over both counts and estimate the same.

    The contrasts' plug-in arm means restart with each step, so the sums differ slightly from one
    long window's; counts add exactly and the estimates agree within sampling noise.
    """
    a = traffic(3000, "canary", weight=25, seed=11)
    b = _later(*traffic(2000, "canary", weight=25, seed=12), offset=500)
    first, second = frame_stats(*a, policy, 25), frame_stats(*b, policy, 25)
    pooled = carry(first, second)
    whole = frame_stats(
        pd.concat([a[0], b[0]], ignore_index=True), pd.concat([a[1], b[1]], ignore_index=True), policy, 25
    )
    for name in ("error", "primary"):
        got, want = getattr(pooled, name), getattr(whole, name)
        assert got.n == want.n == getattr(first, name).n + getattr(second, name).n
        assert got.total == pytest.approx(getattr(first, name).total + getattr(second, name).total)
        assert got.mean == pytest.approx(want.mean, abs=0.01)
    assert pooled.arms == whole.arms
    assert [(s.value, s.contrasts.n) for s in pooled.slices] == [(s.value, s.contrasts.n) for s in whole.slices]
    assert pooled.primary_means["candidate"] == pytest.approx(whole.primary_means["candidate"])
    assert pooled.carried == (25,) and pooled.own_arms == frame_stats(*b, policy, 25).arms


def test_an_earlier_step_whose_window_closes_undecided_hands_its_evidence_on(policy):
    small = traffic(600, "canary", weight=5, seed=13, candidate_acc=0.80)
    verdict = verdict_from_stats(frame_stats(*small, policy, 5), canary(5), policy, (0, 600), window_closed=True)
    assert verdict.decision is Decision.continue_, verdict.reason
    assert "evidence carries into the next step" in verdict.reason
    last = verdict_from_stats(
        frame_stats(*traffic(600, "canary", weight=50, seed=13, candidate_acc=0.80), policy, 50),
        canary(50),
        policy,
        (0, 600),
        window_closed=True,
    )
    assert last.decision is Decision.inconclusive, last.reason


def test_carried_evidence_decides_a_step_its_own_traffic_could_not(policy):
    earlier = frame_stats(
        *traffic(10000, "canary", weight=25, seed=14, candidate_acc=0.84, champion_err=0.0, candidate_err=0.0),
        policy,
        25,
    )
    current = frame_stats(
        *_later(
            *traffic(900, "canary", weight=50, seed=15, candidate_acc=0.84, champion_err=0.0, candidate_err=0.0),
            offset=900,
        ),
        policy,
        50,
    )
    alone = verdict_from_stats(current, canary(50), policy, (900, 1000))
    pooled = verdict_from_stats(carry(earlier, current), canary(50), policy, (900, 1000))
    assert alone.decision is Decision.continue_, alone.reason
    assert pooled.decision is Decision.promote, pooled.reason
    assert "at 25 → 50 %" in pooled.reason


def test_a_bad_candidate_is_still_caught_when_evidence_is_carried(policy):
    earlier = frame_stats(*traffic(3000, "canary", weight=5, seed=16, candidate_acc=0.80), policy, 5)
    current = frame_stats(
        *_later(*traffic(3000, "canary", weight=25, seed=17, candidate_acc=0.80, candidate_err=0.08), offset=900),
        policy,
        25,
    )
    verdict = verdict_from_stats(carry(earlier, current), canary(25), policy, (900, 1000))
    assert verdict.decision is Decision.rollback, verdict.reason
    assert verdict.reason.startswith("rollback: error rate")


def test_sample_ratio_is_judged_on_the_current_step_alone(policy):
    """A 5 % step then a 50 % step: pooled, the arms are far from 50/50, yet each step's split is right."""
    earlier = frame_stats(*traffic(4000, "canary", weight=5, seed=18), policy, 5)
    current = frame_stats(*_later(*traffic(2000, "canary", weight=50, seed=19), offset=900), policy, 50)
    verdict = verdict_from_stats(carry(earlier, current), canary(50), policy, (900, 1000))
    assert not verdict.srm.alarm, verdict.srm
    assert verdict.srm.counts["candidate"] + verdict.srm.counts["champion"] == 2000
    broken = frame_stats(
        *_later(*traffic(2000, "canary", weight=50, seed=19, candidate_share=0.3), offset=900), policy, 50
    )
    assert verdict_from_stats(carry(earlier, broken), canary(50), policy, (900, 1000)).decision is Decision.invalid


def test_each_step_needs_its_own_minimum_sample_before_it_promotes(policy):
    earlier = frame_stats(*traffic(6000, "canary", weight=25, seed=20), policy, 25)
    current = frame_stats(*_later(*traffic(120, "canary", weight=50, seed=21), offset=900), policy, 50)
    verdict = verdict_from_stats(carry(earlier, current), canary(50), policy, (900, 910))
    assert verdict.decision is Decision.continue_, verdict.reason
    assert "labelled requests at 50 % of 200 per arm" in verdict.reason


def test_an_earlier_step_ends_the_release_when_the_rest_of_the_canary_could_not_clear_a_check(policy):
    """At a 25 % step's planned end, futility counts what the 50 % step and its extensions could still add."""
    slow = frame_stats(
        *traffic(4000, "canary", weight=25, seed=22, champion_acc=0.85, candidate_acc=0.85, candidate_slowdown=1.5),
        policy,
        25,
    )
    closed = verdict_from_stats(slow, canary(25), policy, (0, 600), window_closed=True)
    assert closed.decision is Decision.rollback, closed.reason
    assert "not even the canary time still allowed would show extra share over the latency limit" in closed.reason
    fine = frame_stats(*traffic(20000, "canary", weight=25, seed=22, champion_acc=0.85, candidate_acc=0.85), policy, 25)
    passed_on = verdict_from_stats(fine, canary(25), policy, (0, 600), window_closed=True)
    assert passed_on.decision in (Decision.continue_, Decision.promote), passed_on.reason
