"""An experiment's evidence from the prediction log: which arm a request counts for, and each source's value."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from releasegate import experiments
from releasegate.experiments import Source


def calls(*rows: tuple) -> pd.DataFrame:
    columns = ["request_id", "time", "version", "arm", "served", "status", "latency_ms", "cpu_ms", "outputs"]
    return pd.DataFrame([dict(zip(columns, r, strict=True)) for r in rows], columns=columns)


def test_a_failed_arm_call_answered_by_the_control_is_the_arms_error():
    preds = calls(
        ("r1", 1.0, "1", "champion", True, "ok", 2.0, 0.1, "1"),
        ("r2", 1.1, "2", "candidate", True, "ok", 3.0, 0.3, "1"),
        ("r3", 1.2, "2", "candidate", False, "error", None, None, None),
        ("r3", 1.2, "1", "champion", True, "ok", 2.0, 0.1, "0"),  # the fallback
    )
    feedback = pd.DataFrame(
        {"request_id": ["r1", "r2"], "time": [2.0, 2.0], "ground_truth": ["1", "0"], "business_value": [25.0, -2.0]}
    )
    out = experiments.per_request(preds, feedback, "1", {Source.conversion, Source.accuracy}).set_index("request_id")
    assert out.loc["r3", "version"] == "2" and out.loc["r3", "error"] == 1.0
    assert out.loc["r1", "conversion"] == 1.0 and out.loc["r1", "revenue"] == 25.0
    assert out.loc["r2", "conversion"] == 0.0 and out.loc["r2", "revenue"] == -2.0  # a discount is no conversion
    assert out.loc["r3", "revenue"] == 0.0  # no feedback: nothing earned
    assert out.loc["r1", "accuracy"] == 1.0 and out.loc["r2", "accuracy"] == 0.0
    assert out.loc["r2", "cpu_ms"] == pytest.approx(0.3)


def test_arm_statistics_follow_the_declared_sources():
    design = experiments.load_design("quick")
    requests = pd.DataFrame(
        {
            "request_id": ["a", "b", "c", "d"],
            "version": ["1", "1", "2", "2"],
            "time": [1.0] * 4,
            "conversion": [1.0, 0.0, 1.0, 1.0],
            "revenue": [30.0, 0.0, 20.0, 40.0],
            "cpu_ms": [0.1, 0.2, 0.4, None],
            "error": [0.0, 0.0, 0.0, 0.0],
        }
    )
    stats = experiments.arm_stats(requests, "2", 33, design)
    assert stats.metrics["conversion"].n == 2 and stats.metrics["conversion"].total == 2.0
    ratio = stats.metrics["revenue_per_conversion"]
    assert ratio.num == 60.0 and ratio.den == 2.0  # Σ revenue / Σ conversions
    assert stats.metrics["cpu_ms_per_row"].n == 1  # a call without a CPU figure is left out, not zero


def test_the_forms_arms_and_weights_are_checked():
    assert experiments.parse_arms("3, 4", "") == [("3", 33), ("4", 33)]
    assert experiments.parse_arms("3,4", "20,30") == [("3", 20), ("4", 30)]
    with pytest.raises(experiments.DesignError, match="2 arms but 1 weights"):
        experiments.parse_arms("3,4", "20")
    with pytest.raises(experiments.DesignError, match="under 100"):
        experiments.parse_arms("3,4", "50,50")
    with pytest.raises(experiments.DesignError, match="1-5 arms"):
        experiments.parse_arms("2,3,4,5,6,7", "")


def test_a_design_without_one_deciding_metric_is_refused_with_the_reason(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "broken.yaml").write_text(
        "metrics:\n  - {name: cpu, source: cpu_ms, goal: decrease, mde: 1, role: guard, test: non_inferiority}\n"
    )
    with pytest.raises(experiments.DesignError, match="exactly one deciding metric"):
        experiments.load_design("broken", [tmp_path])
    with pytest.raises(experiments.DesignError, match="not found"):
        experiments.load_design("missing", [tmp_path])


def test_an_experiment_with_no_traffic_yet_is_collecting(rg_home):
    """Right after the route is set nothing is logged: the look says so rather than failing."""
    from releasegate import release

    design = experiments.load_design("quick")
    record = experiments.Record(
        name=design.name, design=design, arms=[experiments.ArmWeight(version="2", weight=30)], started_at=1.0
    )
    rel = release.open_release("churn", "2", "1", record.model_dump(mode="json"), airflow_run_id="r", actor="t")
    result = experiments.assess(rel, record, until=2.0)
    assert not result.decided and result.winner is None and "collecting" in result.reason


def test_cuped_keeps_the_difference_and_narrows_its_spread():
    """A covariate fixed before assignment (last month's spend) that predicts revenue: adjusting by it leaves the
    arm − control difference where it was, on average, and shrinks its standard error."""
    import numpy as np

    from releasegate.analysis.experiment import estimate_and_variance, stats_arrays

    design = experiments.Design.model_validate(
        {
            "name": "cuped",
            "sample_size": 10000,
            "cuped": {"covariate": "spend"},
            "metrics": [
                {"name": "revenue", "source": "revenue", "goal": "increase", "mde": 1, "role": "decide",
                 "test": "superiority"}
            ],
        }
    )  # fmt: skip
    raw, adjusted, raw_se, adjusted_se = [], [], [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = 4000
        spend = rng.gamma(2.0, 10.0, n)
        version = np.where(rng.random(n) < 0.5, "1", "2")
        revenue = 0.8 * spend + rng.normal(0, 5, n) + np.where(version == "2", 1.0, 0.0)
        requests = pd.DataFrame({"request_id": [f"r{i}" for i in range(n)], "version": version, "revenue": revenue})
        x = pd.Series(spend, index=requests["request_id"])
        for frame, diffs, ses in (
            (requests, raw, raw_se),
            (experiments.cuped_adjust(requests, x, design), adjusted, adjusted_se),
        ):
            arms = [experiments.arm_stats(frame, v, 50, design).metrics["revenue"] for v in ("1", "2")]
            (m0, v0), (m1, v1) = (estimate_and_variance(design.metrics[0].metric.kind, stats_arrays(a)) for a in arms)
            diffs.append(float(m1 - m0))
            ses.append(float(np.sqrt(v0 / arms[0].n + v1 / arms[1].n)))
    assert abs(np.mean(adjusted) - 1.0) < 0.1 and abs(np.mean(raw) - 1.0) < 0.4  # the effect, unbiased either way
    assert np.mean(adjusted_se) < 0.5 * np.mean(raw_se)  # most of the variance was the covariate's
    assert np.std(adjusted) < 0.5 * np.std(raw)


def test_cuped_reads_the_covariate_from_the_logged_inputs_and_skips_what_is_not_a_number():
    preds = pd.DataFrame(
        {
            "request_id": ["a", "a", "b", "c"],
            "inputs": ['{"spend": 12.5}', '{"spend": 99}', '{"spend": "e:k1:..."}', "not json"],
        }
    )
    x = experiments.covariates(preds, "spend")
    assert x["a"] == 12.5 and np.isnan(x["b"]) and np.isnan(x["c"])


def test_an_experiment_with_cuped_is_assessed_on_its_logged_inputs(rg_home):
    """The covariate comes from the logged request inputs; the look runs end to end on the stored rows."""
    from releasegate import release, storage
    from releasegate.contract import Mode

    design = experiments.load_design("quick").model_copy(update={"cuped": experiments.Cuped(covariate="tenure")})
    record = experiments.Record(
        name=design.name, design=design, arms=[experiments.ArmWeight(version="2", weight=50)], started_at=1.0
    )
    rel = release.open_release("churn", "2", "1", record.model_dump(mode="json"), airflow_run_id="r", actor="t")
    rng = np.random.default_rng(3)
    rows, feedback = [], []
    for i in range(800):
        version = "2" if i % 2 else "1"
        tenure = float(rng.integers(1, 60))
        rows.append(
            {
                "request_id": f"q{i}", "time": 2.0, "model": "churn", "version": version,
                "arm": "candidate" if version == "2" else "champion", "mode": Mode.experiment,
                "release_id": rel.release_id, "routing_key_hash": f"{i:016x}", "sample_bucket": i % 1000,
                "served": True, "fallback": False, "inputs": f'{{"tenure": {tenure}}}', "outputs": "1",
                "latency_ms": 2.0, "cpu_ms": 0.05, "status": "ok",
            }
        )  # fmt: skip
        value = tenure + (5.0 if version == "2" else 0.0) + float(rng.normal(0, 1))
        feedback.append({"request_id": f"q{i}", "time": 2.5, "ground_truth": "1", "business_value": value})
    with storage.engine().begin() as conn:
        conn.execute(storage.predictions.insert(), rows)
        conn.execute(storage.feedback.insert(), feedback)

    def revenue(with_cuped: bool):
        looked = (
            record if with_cuped else record.model_copy(update={"design": design.model_copy(update={"cuped": None})})
        )
        [arm] = experiments.assess(rel, looked, until=3.0).arms
        return next(m for m in arm.metrics if m.name == "revenue_per_request")

    adjusted, plain = revenue(True), revenue(False)
    assert adjusted.difference is not None and abs(adjusted.difference - 5.0) < 0.5
    assert (adjusted.upper - adjusted.lower) < 0.2 * (plain.upper - plain.lower)  # tenure explains most of it


@pytest.mark.parametrize("bad", ["\ud800", "x" * 100_000, "rel-ABC", "rel-0123456789ab; DROP TABLE releases"])
def test_a_malformed_experiment_id_is_refused_before_the_database_naming_it_briefly(rg_home, bad):
    """model_release's `experiment_id` is typed or sent by hand: a malformed one is a clear error, not a crash."""
    with pytest.raises(experiments.DesignError, match="is not an experiment id") as refused:
        experiments.won(bad)
    assert len(str(refused.value)) < 120


def test_only_a_concluded_experiment_has_a_winner_to_hand_on(rg_home):
    """An unknown id, a release's id and an experiment still running are each refused, saying which."""
    from releasegate import release

    with pytest.raises(release.ReleaseError, match="does not exist"):
        experiments.won("rel-0123456789ab")
    plain = release.open_release("churn", "2", "1", {"name": "default"}, airflow_run_id="r1", actor="t")
    with pytest.raises(experiments.DesignError, match="is a release, not an experiment"):
        experiments.won(plain.release_id)
    release.transition(plain.release_id, release.State.failed, actor="t", reason="test")
    design = experiments.load_design("quick")
    record = experiments.Record(name=design.name, design=design, arms=[experiments.ArmWeight(version="2", weight=30)])
    running = release.open_release("churn", "2", "1", record.model_dump(mode="json"), airflow_run_id="r2", actor="t")
    with pytest.raises(experiments.DesignError, match="only a concluded one has a winner"):
        experiments.won(running.release_id)


def test_the_plan_made_as_an_experiment_opens_reads_the_champions_last_hour(rg_home):
    """The deciding metric (conversion) planned at the champion's logged baseline and rate: the same figures
    `releasegate plan` gives for them, and a warning when the design's duration cannot hold the sample."""
    import time

    from releasegate import planning, storage
    from releasegate.contract import Mode

    design = experiments.load_design("default")
    arms = [experiments.ArmWeight(version="2", weight=25), experiments.ArmWeight(version="3", weight=25)]
    quiet = experiments.opening_plan("churn", "1", arms, design)
    assert quiet.fixed_requests is None and "the champion v1 has 0 requests" in quiet.note

    now = time.time()
    rows, feedback = [], []
    for i in range(600):
        rows.append(
            {
                "request_id": f"q{i}", "time": now - 1800 + i, "model": "churn", "version": "1",
                "arm": "champion", "mode": Mode.single, "release_id": None, "routing_key_hash": f"{i:016x}",
                "sample_bucket": i % 1000, "served": True, "fallback": False, "inputs": "{}", "outputs": "1",
                "latency_ms": 2.0, "cpu_ms": 0.05, "status": "ok",
            }
        )  # fmt: skip
        if i % 10 == 0:  # a tenth converts
            feedback.append(
                {"request_id": f"q{i}", "time": now - 1700 + i, "ground_truth": "1", "business_value": 30.0}
            )
    with storage.engine().begin() as conn:
        conn.execute(storage.predictions.insert(), rows)
        conn.execute(storage.feedback.insert(), feedback)

    made = experiments.opening_plan("churn", "1", arms, design, now=now)
    assert made.metric == "conversion" and made.baseline == pytest.approx(0.1)
    expected = planning.plan(
        planning.Design(kind="proportion", baseline=0.1, mde=0.005, alpha=0.05, weights=[50, 25, 25])
    )
    assert (made.fixed_requests, made.sequential_requests) == (expected.fixed_requests, expected.sequential_requests)
    assert made.rps is not None and 0.2 < made.rps < 0.5  # 600 requests over the last half hour
    assert "fixed horizon" in made.note and "likely to end undecided" in made.note  # ~10⁵ requests at 0.3/s
