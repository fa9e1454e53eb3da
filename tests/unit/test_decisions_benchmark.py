"""The decision benchmark judges releases with the same analysis code as the DAG, on the same numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from releasegate import planning
from releasegate import policy as policies
from releasegate.analysis import analyse_frames, sequential, verdict_from_stats
from releasegate.analysis.experiment import ArmStats, ArmStatus, Experiment, RatioSummary, decide
from releasegate.contract import Stage, StageKind
from releasegate.verdict import Window

SHADOW = Stage.shadow()


def canary(weight: int) -> Stage:
    return Stage(kind=StageKind.canary, weight=weight)


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decisions", ROOT / "benchmarks" / "decisions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["decisions"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _logged(step) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The simulated step as the gateway would log it: one prediction row per request, feedback for each."""
    n = len(step.t)
    truth = (np.arange(n) % 3 == 0).astype(int)
    predicted = np.where(step.correct == 1.0, truth, 1 - truth)
    preds = pd.DataFrame(
        {
            "id": np.arange(n),
            "request_id": [f"r{i}" for i in range(n)],
            "time": step.t,
            "arm": np.where(step.cand, "candidate", "champion"),
            "routing_key_hash": [f"k{i}" for i in range(n)],
            "fallback": False,
            "outputs": [json.dumps([int(y)]) for y in predicted],
            "latency_ms": step.latency,
            "status": np.where(step.error, "error", "ok"),
            "inputs": [json.dumps({"region": ("north", "south", "east", "west")[r]}) for r in step.region],
        }
    )
    preds.loc[step.error, "outputs"] = None
    feedback = pd.DataFrame(
        {"request_id": preds["request_id"], "time": step.t + 1, "ground_truth": [json.dumps(int(y)) for y in truth]}
    )
    return preds, feedback


# A/A and a slice regression still undecided, an error regression rolled back, and a latency at the limit
# after a full window (futility).
@pytest.mark.parametrize(
    ("scenario_index", "seconds", "rate"), [(0, 60, 100), (2, 60, 100), (4, 60, 100), (3, 700, 10)]
)
def test_benchmark_statistics_give_the_verdict_analyse_frames_gives(bench, scenario_index, seconds, rate):
    policy = policies.load("default")
    scenario = bench.SCENARIOS[scenario_index]
    step = bench.Step(25)
    step.grow(np.random.default_rng(scenario_index), scenario, seconds, rate)
    preds, feedback = _logged(step)
    window = Window(start=0.0, end=seconds, stage=canary(25))
    from_rows = analyse_frames(preds, feedback, canary(25), policy, window)
    from_sums = verdict_from_stats(bench.simulated_stats(step, policy, len(step.t)), canary(25), policy, window)
    assert from_sums.decision == from_rows.decision
    assert from_sums.reason == from_rows.reason
    assert from_sums.samples == from_rows.samples
    assert from_sums.srm == from_rows.srm
    for a, b in zip(
        from_sums.metrics + [m for s in from_sums.slices for m in s.metrics],
        from_rows.metrics + [m for s in from_rows.slices for m in s.metrics],
        strict=True,
    ):
        assert (a.name, a.passed, a.n, a.futile) == (b.name, b.passed, b.n, b.futile)
        for x, y in ((a.estimate, b.estimate), (a.lower, b.lower), (a.upper, b.upper), (a.p_value, b.p_value)):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-12)


def test_benchmark_writes_the_figures_in_the_issue_shape(bench, tmp_path):
    out = tmp_path / "decisions.json"
    bench.main(["--releases", "2", "--rate", "60", "--workers", "1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert set(figures["methods"]) == {"releasegate", "flagger_style", "fixed_horizon"}
    for entry in figures["methods"].values():
        assert 0 <= entry["aa_false_rollback"] <= 1
        assert set(entry["scenarios"]) == {s.name for s in bench.SCENARIOS if s.regression}
        for scenario in entry["scenarios"].values():
            assert 0 <= scenario["miss_rate"] <= 1
            assert "median_samples_to_rollback" in scenario


def test_experiments_section_writes_the_figures_in_the_issue_shape(bench, tmp_path, monkeypatch):
    """Without gbstats' venv (as in CI): the method is skipped and the setup says so."""
    monkeypatch.setattr(bench, "GBSTATS_PYTHON", tmp_path / "absent" / "python")
    out = tmp_path / "experiments.json"
    bench.main(["--only-experiments", "--experiments", "2", "--workers", "1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert set(figures["experiments"]) == {"releasegate", "fixed_horizon"}
    assert figures["experiments_setup"]["gbstats"].startswith("skipped")
    assert "methods" not in figures  # the canary section was skipped
    for entry in figures["experiments"].values():
        assert set(entry) == {s.name for s in bench.EXP_SCENARIOS}
        for scenario in entry.values():
            assert 0 <= scenario["false_winner"] <= scenario["false_winner"] + scenario["correct_winner"] <= 1
            assert scenario["median_samples"] > 0
    assert (
        figures["experiments"]["fixed_horizon"]["A/A/A/A"]["median_samples"]
        >= figures["experiments_setup"]["fixed_horizon_samples"]
    )


@pytest.mark.skipif(
    not (ROOT / ".venv-gbstats" / "bin" / "python").exists(), reason="gbstats' own venv (docs/benchmarks.md) absent"
)
def test_gbstats_chance_to_win_follows_the_data(bench):
    """One call into GrowthBook's engine: a clear win, a tie and a clear loss on conversion; CPU equal."""
    n = np.full((1, 3, bench.EXP_ARMS), 10_000.0)
    conv = np.array([[[500.0, 600.0, 500.0, 400.0]]]).repeat(3, axis=1)
    data = {"n": n, "conv": conv, "cpu": n * 0.05, "cpu_sq": n * 0.0026}
    chances = bench.gbstats_chances(data, [0])
    assert chances.shape == (1, 3, bench.EXP_ARMS - 1, 2)
    win, tie, loss = chances[0, 0, :, 0]
    assert win > 0.99 and 0.4 < tie < 0.6 and loss < 0.01
    assert np.allclose(chances[0, :, :, 1], 0.5, atol=0.01)


def _arm_stats(bench, data, look: int, experiment_index: int, arm: int):
    metrics = {}
    for m in bench.experiment_metrics():
        s = {k: float(v[experiment_index]) for k, v in bench._metric_stats(data, m.name, look, arm).items()}
        n = int(s.pop("n"))
        metrics[m.name] = RatioSummary(n=n, **s) if "num" in s else sequential.Summary(n, s["total"], s["total_sq"])
    return ArmStats(name=str(arm), share=1 / bench.EXP_ARMS, metrics=metrics)


# +5 % conversion (arm 1 should win) and 2x CPU (arm 1 stopped on its CPU guard at once).
@pytest.mark.parametrize("scenario_index", [1, 3])
def test_benchmark_experiment_decisions_are_what_decide_says_on_the_same_sums(bench, scenario_index):
    fixed = planning.fixed_horizon(bench.experiment_design())
    step, looks, count = math.ceil(fixed / bench.EXP_LOOKS_PER_DESIGN), 40, 4
    data = bench.simulate_experiments(bench.EXP_SCENARIOS[scenario_index], count, step, looks, seed=0)
    got = bench.releasegate_experiments(data, step, t_opt=fixed)
    spec = Experiment(metrics=bench.experiment_metrics(), t_opt=fixed)
    for i in range(count):
        look = int(got.samples[i]) // step - 1
        arms = [_arm_stats(bench, data, look, i, a) for a in range(bench.EXP_ARMS)]
        result = decide(spec, arms[0], arms[1:])
        assert result.winner == (str(got.winner[i]) if got.winner[i] >= 0 else None)
        if scenario_index == 3:
            assert got.cpu_flagged[i] and result.arms[0].status is ArmStatus.stopped
            assert "cpu" in result.arms[0].reason
        else:
            assert result.winner == "1"
