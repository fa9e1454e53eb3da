"""The analysis: always-valid bounds, SRM, and verdicts on synthetic logged traffic."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.special import gammaln

from releasegate import policy as policies
from releasegate.analysis import (
    Decision,
    Verdict,
    analyse,
    analyse_frames,
    frame_stats,
    sequential,
    srm,
    verdict_from_stats,
)
from releasegate.analysis.labels import scalar
from releasegate.contract import Stage, StageKind
from releasegate.verdict import Window

SHADOW = Stage.shadow()


def canary(weight: int) -> Stage:
    return Stage(kind=StageKind.canary, weight=weight)


REGIONS = ("north", "south", "east", "west")


@pytest.fixture(scope="module")
def policy() -> policies.Policy:
    return policies.parse({"name": "test", "slices": ["region"]})


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _row(
    i, request_id, t, arm, mode, key, *, output, latency, status="ok", served=True, fallback=False, region="north"
):
    return {
        "id": i,
        "request_id": request_id,
        "time": t,
        "model": "churn",
        "version": "2" if arm == "candidate" else "1",
        "arm": arm,
        "mode": mode,
        "release_id": "rel-1",
        "routing_key_hash": key,
        "sample_bucket": int(_hash(request_id), 16) % 1000,
        "served": served,
        "fallback": fallback,
        "inputs": json.dumps({"region": region, "tenure_months": 12}),
        "outputs": None if status != "ok" else json.dumps(output),
        "latency_ms": latency,
        "status": status,
        "error": None if status == "ok" else "boom",
    }


def traffic(
    n: int,
    mode: str = "shadow",
    *,
    weight: int = 50,
    seed: int = 0,
    champion_acc: float = 0.80,
    candidate_acc: float | dict = 0.88,
    champion_err: float = 0.005,
    candidate_err: float = 0.005,
    candidate_slowdown: float = 1.0,
    median_latency_ms: float = 20.0,
    candidate_share: float | None = None,
    labelled: float = 1.0,
    output_shape=lambda y: [y],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Logged rows as the gateway writes them: shadow pairs, or canary splits by routing-key hash.

    candidate_acc may be a dict region -> accuracy; a correct champion stays correct for a good
    candidate mostly, which keeps the arms' agreement high as in real model upgrades.
    """
    rng = np.random.default_rng(seed)
    rows, fb = [], []
    row_id = 0
    share = weight / 100 if candidate_share is None else candidate_share
    for i in range(n):
        rid, key = f"r{seed}-{i}", _hash(f"c{seed}-{i}")
        t = 1000.0 + i * 0.01
        region = REGIONS[i % 4]
        y = int(rng.random() < 0.3)
        target = candidate_acc[region] if isinstance(candidate_acc, dict) else candidate_acc
        b_ok = rng.random() < champion_acc
        # P(candidate right | champion right/wrong) chosen so the candidate's accuracy is `target`.
        if target >= champion_acc:
            c_ok = b_ok or rng.random() < (target - champion_acc) / (1 - champion_acc)
        else:
            c_ok = b_ok and rng.random() < target / champion_acc
        b_out, c_out = (y if b_ok else 1 - y), (y if c_ok else 1 - y)
        lat_b = float(rng.lognormal(math.log(median_latency_ms), 0.4))
        lat_c = float(rng.lognormal(math.log(median_latency_ms), 0.4)) * candidate_slowdown
        b_status = "error" if rng.random() < champion_err else "ok"
        c_status = "error" if rng.random() < candidate_err else "ok"
        if mode == "shadow":
            rows.append(
                _row(
                    row_id,
                    rid,
                    t,
                    "champion",
                    "shadow",
                    key,
                    output=output_shape(b_out),
                    latency=lat_b,
                    status=b_status,
                    region=region,
                )
            )
            rows.append(
                _row(
                    row_id + 1,
                    rid,
                    t + 0.001,
                    "candidate",
                    "shadow",
                    key,
                    output=output_shape(c_out),
                    latency=lat_c,
                    status=c_status,
                    served=False,
                    region=region,
                )
            )
            row_id += 2
        elif rng.random() < share:
            rows.append(
                _row(
                    row_id,
                    rid,
                    t,
                    "candidate",
                    "canary",
                    key,
                    output=output_shape(c_out),
                    latency=lat_c,
                    status=c_status,
                    served=c_status == "ok",
                    region=region,
                )
            )
            if c_status != "ok":  # the champion answers for the failed candidate
                rows.append(
                    _row(
                        row_id + 1,
                        rid,
                        t + 0.001,
                        "champion",
                        "canary",
                        key,
                        output=output_shape(b_out),
                        latency=lat_b,
                        fallback=True,
                        region=region,
                    )
                )
            row_id += 2
        else:
            rows.append(
                _row(
                    row_id,
                    rid,
                    t,
                    "champion",
                    "canary",
                    key,
                    output=output_shape(b_out),
                    latency=lat_b,
                    status=b_status,
                    region=region,
                )
            )
            row_id += 1
        if rng.random() < labelled:
            fb.append(
                {"id": len(fb), "request_id": rid, "time": t + 5, "ground_truth": json.dumps(y), "business_value": None}
            )
    return pd.DataFrame(rows), pd.DataFrame(fb, columns=["id", "request_id", "time", "ground_truth", "business_value"])


def metric(verdict: Verdict, name: str):
    return next(m for m in verdict.metrics if m.name == name)


# -- the confidence sequence --------------------------------------------------------------------------------------


def test_confidence_sequence_matches_hand_computation():
    x = [1] * 24 + [0] * 16
    # mean 0.6; sum of squares 9.6; sd = sqrt((9.6 + 0.25) / 41) = 0.49015
    # rho² = (2 ln 20 + ln(1 + 2 ln 20)) / 40 = 0.198404; t rho² + 1 = 8.93615
    # radius = sqrt(2 · 8.93615 / (1600 · 0.198404) · ln(sqrt(8.93615) / 0.05)) = 0.47991
    bound = sequential.confidence_sequence(x, alpha=0.05, t_opt=40)
    assert bound.estimate == pytest.approx(0.6)
    assert bound.sd == pytest.approx(0.49015, abs=1e-5)
    assert bound.lower == pytest.approx(0.6 - 0.49015 * 0.47991, abs=1e-4)
    assert bound.upper == pytest.approx(0.8352, abs=1e-4)
    assert sequential.confidence_sequence(x[:29], 0.05, 40) is None  # below the burn-in


def test_confidence_sequence_keeps_coverage_under_repeated_looks():
    rng = np.random.default_rng(7)
    runs, n, alpha, true_diff = 300, 3000, 0.05, 0.05
    # Paired accuracy differences: candidate right w.p. 0.85, champion w.p. 0.80, independent.
    diffs = (rng.random((runs, n)) < 0.85).astype(float) - (rng.random((runs, n)) < 0.80)
    ever_missed = 0
    naive_missed = 0
    looks = np.arange(sequential.MIN_UNITS - 1, n)  # a look after every new request
    for x in diffs:
        lower, upper = sequential.running_bounds(x, alpha, t_opt=300)
        ever_missed += bool(np.any((lower[looks] > true_diff) | (upper[looks] < true_diff)))
        t = np.arange(1, n + 1)
        mean = np.cumsum(x) / t
        sd = np.sqrt(np.maximum(np.cumsum(x**2) / t - mean**2, 1e-12))
        z = 1.96 * sd / np.sqrt(t)
        naive_missed += bool(np.any(np.abs(mean - true_diff)[looks] > z[looks]))
    assert ever_missed / runs <= alpha + 0.02
    assert naive_missed / runs > 2 * alpha  # what peeking at a fixed-n interval would have done


def test_aipw_contrasts_cover_the_difference_of_disjoint_arms():
    rng = np.random.default_rng(11)
    runs, n, alpha, p = 200, 4000, 0.05, 0.25
    missed = 0
    for _ in range(runs):
        a = rng.random(n) < p
        y = np.where(a, rng.random(n) < 0.83, rng.random(n) < 0.80).astype(float)
        lower, upper = sequential.running_bounds(sequential.aipw_contrasts(y, a, p), alpha, t_opt=800)
        missed += bool(np.any((lower[29:] > 0.03) | (upper[29:] < 0.03)))
    assert missed / runs <= alpha + 0.03


def test_p_value_is_the_level_at_which_the_bound_reaches_the_limit():
    x = np.r_[np.ones(70), np.zeros(130)] - 0.1  # mean 0.25
    p = sequential.p_value(x, 0.1, "above", alpha_opt=0.05, t_opt=200)
    bound = sequential.confidence_sequence(x, alpha=p, t_opt=200)
    # Same ρ (tuned at 0.05) is needed for an exact match, so compare through the radius directly.
    r2 = sequential.rho2(200, 0.05)
    v = 200 * r2 + 1
    half = bound.sd * math.sqrt(2 * v / (200**2 * r2) * math.log(math.sqrt(v) / p))
    assert x.mean() - half == pytest.approx(0.1, abs=1e-9)
    assert sequential.p_value(x, 0.5, "above", 0.05, 200) == 1.0


# -- sample ratio mismatch ----------------------------------------------------------------------------------------


def test_srm_bayes_factor_matches_hand_computation():
    # Shares ½/½, prior Dirichlet(1, 1) (k = 2): BF = B(1 + x1, 1 + x2) / B(1, 1) / ½^n.
    assert srm.log_bayes_factor([1, 0], [0.5, 0.5], concentration=2) == pytest.approx(0.0)  # (1/2) / 1 / ½
    assert srm.log_bayes_factor([2, 0], [0.5, 0.5], concentration=2) == pytest.approx(math.log(4 / 3))
    assert srm.log_bayes_factor([1, 1], [0.5, 0.5], concentration=2) == pytest.approx(math.log(2 / 3))


def test_srm_bayes_factor_matches_scipy_dirichlet_multinomial():
    counts, shares = [900, 100], [0.75, 0.25]
    prior = [100 * s for s in shares]
    reference = stats.dirichlet_multinomial.logpmf(counts, prior, sum(counts)) - stats.multinomial.logpmf(
        counts, sum(counts), shares
    )
    assert srm.log_bayes_factor(counts, shares) == pytest.approx(reference, rel=1e-9)


def test_srm_alarm_is_sequential_and_rare_under_the_configured_split():
    ok = srm.check({"champion": 1030, "candidate": 970}, candidate_weight=50, alarm_below=0.001)
    assert not ok.alarm and ok.p_value == pytest.approx(
        min(1.0, math.exp(-srm.log_bayes_factor([1030, 970], [0.5, 0.5])))
    )
    skewed = srm.check({"champion": 900, "candidate": 100}, candidate_weight=25, alarm_below=0.001)
    assert skewed.alarm and skewed.p_value < 1e-10 and skewed.bayes_factor > 1e10
    # A look after every key, 10 000 keys, 400 releases: Ville's inequality caps the alarms at alpha.
    rng = np.random.default_rng(3)
    alpha, n = 0.05, 10_000
    looks = np.arange(1, n + 1)
    alarms = 0
    for _ in range(400):
        candidate = np.cumsum(rng.random(n) < 0.05)
        x = np.stack([looks - candidate, candidate], axis=1).astype(float)
        prior = 100 * np.array([0.95, 0.05])
        log_bf = (
            gammaln(prior + x).sum(1)
            - gammaln(100 + looks)
            - gammaln(prior).sum()
            + gammaln(100)
            - x @ np.log([0.95, 0.05])
        )
        alarms += bool(np.any(log_bf >= math.log(1 / alpha)))
    assert alarms / 400 <= alpha
    assert log_bf[-1] == pytest.approx(srm.log_bayes_factor(x[-1], [0.95, 0.05]))


# -- verdicts ----------------------------------------------------------------------------------------------------


def test_clearly_better_candidate_in_shadow_is_promoted(policy):
    preds, fb = traffic(3000)
    verdict = analyse_frames(preds, fb, SHADOW, policy, window=(1000, 1100))
    assert verdict.decision is Decision.promote, verdict.reason
    acc = metric(verdict, "accuracy")
    assert acc.lower > -0.02 and acc.estimate == pytest.approx(0.08, abs=0.03)
    assert acc.alpha == pytest.approx(0.05 / 5)  # error, latency, accuracy, agreement, slices
    assert {m.name for m in verdict.metrics} == {"error_rate", "latency_p99", "accuracy", "agreement"}
    assert verdict.samples["candidate"].requests == 3000 and verdict.samples["candidate"].labelled == 3000
    assert verdict.policy.digest == policy.digest
    assert verdict.window == Window(start=1000, end=1100, stage=SHADOW)
    assert verdict.reason.startswith("promote: on 2,9") and "labelled shadow requests" in verdict.reason
    assert all(s.metrics[0].passed is not False for s in verdict.slices)


def test_clearly_better_candidate_in_canary_is_promoted(policy):
    preds, fb = traffic(6000, "canary", weight=50, seed=1)
    verdict = analyse_frames(preds, fb, canary(50), policy)
    assert verdict.decision is Decision.promote, verdict.reason
    assert verdict.srm is not None and not verdict.srm.alarm and verdict.srm.p_value > 0.001
    assert verdict.samples["candidate"].routing_keys + verdict.samples["champion"].routing_keys == 6000


def test_clearly_worse_accuracy_rolls_back_with_the_numbers_in_the_reason(policy):
    preds, fb = traffic(1500, candidate_acc=0.70, seed=2)
    verdict = analyse_frames(preds, fb, SHADOW, policy)
    assert verdict.decision is Decision.rollback
    acc = metric(verdict, "accuracy")
    assert acc.passed is False and acc.upper < -0.02
    assert verdict.reason.startswith("rollback: accuracy of candidate − champion is −0.")
    assert "always-valid 99% bounds" in verdict.reason and "below the −0.02 margin" in verdict.reason
    assert "labelled shadow requests" in verdict.reason


def test_higher_error_rate_rolls_back_in_canary(policy):
    preds, fb = traffic(4000, "canary", weight=25, seed=3, candidate_acc=0.80, candidate_err=0.08)
    verdict = analyse_frames(preds, fb, canary(25), policy)
    assert verdict.decision is Decision.rollback, verdict.reason
    err = metric(verdict, "error_rate")
    assert err.passed is False and err.lower > 0.01
    assert verdict.reason.startswith("rollback: error rate of candidate − champion is +0.0")
    # The failed candidate requests stay in the candidate arm although the champion answered them.
    assert verdict.samples["candidate"].errors == (preds["arm"].eq("candidate") & preds["status"].ne("ok")).sum()


def test_slow_candidate_rolls_back(policy):
    preds, fb = traffic(2000, seed=4, candidate_slowdown=2.5)
    verdict = analyse_frames(preds, fb, SHADOW, policy)
    assert verdict.decision is Decision.rollback, verdict.reason
    lat = metric(verdict, "latency_p99")
    assert lat.passed is False and lat.lower > 0.01
    assert "slower than the latency limit" in verdict.reason and "champion p99" in verdict.reason


def test_a_sub_millisecond_slowdown_is_within_the_absolute_slack(policy):
    """2.5 x slower at a 0.4 ms median: 1.5 x the champion's p99 is ~1.5 ms, noise at that scale; the
    policy's `latency_p99_slack_ms` (5 ms) allows it. With no slack the same traffic rolls back."""
    preds, fb = traffic(2000, seed=4, candidate_slowdown=2.5, median_latency_ms=0.4)
    lat = metric(analyse_frames(preds, fb, SHADOW, policy), "latency_p99")
    assert lat.passed is True and "+5 ms over champion p99" in lat.detail
    strict = policy.model_copy(update={"guardrails": policy.guardrails.model_copy(update={"latency_p99_slack_ms": 0})})
    verdict = analyse_frames(preds, fb, SHADOW, strict)
    assert verdict.decision is Decision.rollback and metric(verdict, "latency_p99").passed is False


def test_too_few_samples_continue_and_then_are_inconclusive_when_the_window_closes(policy):
    preds, fb = traffic(200, seed=5, candidate_acc=0.81)
    open_ = analyse_frames(preds, fb, SHADOW, policy)
    assert open_.decision is Decision.continue_
    assert "of 300 labelled shadow requests" in open_.reason
    closed = analyse_frames(preds, fb, SHADOW, policy, window_closed=True)
    assert closed.decision is Decision.inconclusive
    assert closed.reason.startswith("inconclusive: the window closed with ")


def test_unbalanced_split_is_invalid(policy):
    preds, fb = traffic(2000, "canary", weight=50, seed=6, candidate_share=0.30)
    verdict = analyse_frames(preds, fb, canary(50), policy)
    assert verdict.decision is Decision.invalid
    assert verdict.srm.alarm and verdict.srm.p_value < 1e-10
    counts = [verdict.srm.counts["champion"], verdict.srm.counts["candidate"]]
    assert verdict.srm.p_value == pytest.approx(math.exp(-srm.log_bayes_factor(counts, [0.5, 0.5])))
    assert "sample ratio mismatch" in verdict.reason


def test_regression_in_one_region_rolls_back_naming_the_slice(policy):
    acc = {"north": 0.87, "south": 0.87, "east": 0.87, "west": 0.55}
    preds, fb = traffic(4000, seed=8, candidate_acc=acc)
    verdict = analyse_frames(preds, fb, SHADOW, policy)
    assert metric(verdict, "accuracy").passed is not False  # overall the candidate is not worse
    assert verdict.decision is Decision.rollback, verdict.reason
    assert "region=west" in verdict.reason and "Holm-adjusted p" in verdict.reason
    west = next(s for s in verdict.slices if s.value == "west")
    assert west.metrics[0].passed is False
    assert {s.value for s in verdict.slices} == set(REGIONS)


def test_small_slices_are_reported_but_not_decided(policy):
    preds, fb = traffic(240, seed=9, candidate_acc={"north": 0.9, "south": 0.9, "east": 0.9, "west": 0.3})
    verdict = analyse_frames(preds, fb, SHADOW, policy)
    assert len(verdict.slices) == 4
    assert all(s.metrics[0].passed is None and "too few" in s.metrics[0].detail for s in verdict.slices)


def test_outputs_in_any_single_value_shape_are_compared_alike(policy):
    shapes = [lambda y: y, lambda y: [y], lambda y: {"prediction": y}, lambda y: [float(y)], lambda y: str(y)]
    verdicts = [analyse_frames(*traffic(600, seed=10, output_shape=shape), SHADOW, policy) for shape in shapes]
    estimates = {round(metric(v, "accuracy").estimate, 12) for v in verdicts}
    assert len(estimates) == 1
    assert scalar('{"churned": [1]}') == scalar("1") == scalar(True) == 1.0
    assert scalar("[0.2, 0.8]") is None


def test_bad_input_names_what_is_wrong(policy):
    preds, fb = traffic(50)
    with pytest.raises(ValueError, match="lacks column.*latency_ms"):
        analyse_frames(preds.drop(columns=["latency_ms"]), fb, SHADOW, policy)
    with pytest.raises(ValueError, match="not a stage: 'canary'"):
        Stage.model_validate("canary")
    with pytest.raises(ValueError, match="a canary weight is a percentage between 1 and 99, got 100"):
        Stage.canary(step=1, weight=100)
    stats = frame_stats(*traffic(200, "canary", weight=25), policy, 25)
    with pytest.raises(ValueError, match="CanaryStats at 25 % decide that canary step only"):
        verdict_from_stats(stats, canary(50), policy, (0, 10))


def test_a_stage_keeps_its_step_and_its_weight_apart_and_reads_stored_legacy_names():
    step = Stage.canary(step=2, weight=25)
    assert (step.step, step.weight, str(step)) == (2, 25, "canary 2 (25 %)")
    assert Stage.model_validate(step.model_dump(mode="json")) == step
    assert Stage.model_validate("canary-25") == Stage(kind=StageKind.canary, weight=25)  # verdicts stored before
    assert Stage.model_validate("shadow") == SHADOW


def test_analyse_reads_the_release_window_from_the_database(rg_home, policy):
    from releasegate import storage

    preds, fb = traffic(3000, seed=12)
    other, _ = traffic(100, seed=13, candidate_acc=0.2)
    other["release_id"] = "rel-other"
    eng = storage.engine()
    with eng.begin() as conn:
        conn.execute(storage.predictions.insert(), preds.drop(columns=["id"]).to_dict("records"))
        conn.execute(storage.predictions.insert(), other.drop(columns=["id"]).to_dict("records"))
        conn.execute(storage.feedback.insert(), fb.drop(columns=["id"]).to_dict("records"))
    verdict = analyse("churn", "rel-1", SHADOW, 1000.0, 1020.0, policy, window_closed=True)
    in_window = preds[preds["time"] <= 1020.0]
    known = fb[fb["time"] <= 1020.0]  # a label given after the look is not evidence at that look
    expected = analyse_frames(in_window, known, SHADOW, policy, window=(1000.0, 1020.0), window_closed=True)
    assert verdict.samples == expected.samples
    assert verdict.samples["champion"].requests == in_window["request_id"].nunique()
    assert verdict.samples["champion"].labelled == known["request_id"].isin(in_window["request_id"]).sum()
    assert [m.estimate for m in verdict.metrics] == pytest.approx([m.estimate for m in expected.metrics])
    assert verdict.decision == expected.decision
    assert verdict.window == Window(start=1000.0, end=1020.0, stage=SHADOW)
    assert analyse("churn", "rel-1", canary(25), 1000.0, 1020.0, policy).samples["candidate"].requests == 0


def test_a_window_without_rows_yet_continues(policy):
    preds, fb = traffic(1)
    verdict = analyse_frames(preds.iloc[:0], fb.iloc[:0], canary(5), policy, window=(0.0, 1.0))
    assert verdict.decision is Decision.continue_
    assert verdict.samples["candidate"].requests == 0 and verdict.srm.p_value is None
    assert all(m.passed is None for m in verdict.metrics)


def test_a_check_that_cannot_clear_its_limit_within_the_extensions_rolls_back_after_a_full_window():
    pol = policies.parse({"name": "futility", "canary": {"max_window_seconds": 600}, "max_extensions": 2})
    # Candidate latency × 1.5: its p99 sits exactly on the limit, so no amount of traffic can show it within.
    preds, fb = traffic(
        4000, "canary", weight=50, seed=12, champion_acc=0.85, candidate_acc=0.85, candidate_slowdown=1.5
    )
    early = analyse_frames(preds, fb, canary(50), pol, window=(0.0, 300.0))
    assert early.decision is Decision.continue_ and not metric(early, "latency_p99").futile
    late = analyse_frames(preds, fb, canary(50), pol, window=(0.0, 600.0))
    assert metric(late, "latency_p99").futile and late.decision is Decision.rollback
    assert late.reason.startswith(
        "rollback: after a full window, at the current estimates not even the canary "
        "time still allowed would show extra share over the latency limit"
    )
    # Without extensions to skip, the policy's inconclusive rule decides at the window's end.
    no_extensions = pol.model_copy(update={"max_extensions": 0})
    closed = analyse_frames(preds, fb, canary(50), no_extensions, window=(0.0, 600.0), window_closed=True)
    assert closed.decision is Decision.inconclusive and not metric(closed, "latency_p99").futile
