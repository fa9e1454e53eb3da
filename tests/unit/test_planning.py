"""`releasegate plan`: the fixed-horizon size against statsmodels, the sequential size against simulation, and the
traffic rate read from the prediction log."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from click.testing import CliRunner

from releasegate import planning, storage
from releasegate.analysis import sequential
from releasegate.cli import main


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.5, 0.25, 0.25]])
def test_the_fixed_horizon_size_is_statsmodels_two_sample_z_test(weights):
    from statsmodels.stats.power import NormalIndPower

    design = planning.Design(kind="mean", baseline=10.0, sd=4.0, mde=0.5, weights=weights)
    control = NormalIndPower().solve_power(
        effect_size=0.5 / 4.0,
        alpha=0.05 / (len(weights) - 1),
        power=0.8,
        ratio=weights[-1] / weights[0],
        alternative="two-sided",
    )
    assert planning.fixed_horizon(design) == pytest.approx(control / weights[0], rel=0.001)


def test_the_sequential_sizes_are_met_in_simulation():
    """Contrasts with the design's variance at the design's effect: by the planned size the always-valid bound has
    cleared zero in at least `power` of the runs, by the median size in about half or more."""
    design = planning.Design(kind="proportion", baseline=0.2, mde=0.04, alpha=0.05, power=0.8)
    result = planning.plan(design)
    assert result.sequential_median_requests < result.sequential_requests
    rng = np.random.default_rng(11)
    sd, runs, n = np.sqrt(design.variance()), 400, result.sequential_requests
    cleared_by = []
    for _ in range(runs):
        lower, _ = sequential.running_bounds(rng.normal(design.mde, sd, n), design.alpha_each, result.fixed_requests)
        crossed = np.flatnonzero(lower > 0)
        cleared_by.append(crossed[0] + 1 if len(crossed) else n + 1)
    cleared_by = np.array(cleared_by)
    assert (cleared_by <= n).mean() >= design.power - 0.03
    assert (cleared_by <= result.sequential_median_requests).mean() >= 0.45


def test_plan_reads_the_models_traffic_rate_from_its_log(rg_home):
    now = time.time()
    rows = [
        {
            "request_id": f"r{i}",
            "time": now - 100 + i * 0.2,
            "model": "churn",
            "version": "1",
            "arm": "champion",
            "mode": "single",
            "routing_key_hash": "h",
            "sample_bucket": i % 1000,
            "served": True,
            "status": "ok",
        }
        for i in range(500)
    ]
    with storage.engine().begin() as conn:
        conn.execute(storage.predictions.insert(), rows)
    assert planning.traffic_rate("churn") == pytest.approx(5.0, rel=0.05)
    assert planning.traffic_rate("other") is None
    out = CliRunner().invoke(
        main, ["plan", "--model", "churn", "--baseline", "0.05", "--mde", "0.1", "--relative", "--weights", "50,25,25"]
    )
    assert out.exit_code == 0, out.output
    assert "3 arms (shares 50%, 25%, 25%)" in out.output and "each of 2 comparisons: 0.025" in out.output
    fixed = planning.fixed_horizon(planning.Design(kind="proportion", baseline=0.05, mde=0.1 * 0.05, weights=[2, 1, 1]))
    rate = re.search(rf"{fixed:,} requests  ≈ [\d.]+ h at ([\d.]+) requests/s", out.output)
    assert rate and float(rate.group(1)) == pytest.approx(5.0, rel=0.05), out.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "1.5", "--mde", "0.01"], "between 0 and 1"),
        (["--metric", "mean", "--baseline", "3", "--mde", "0.5"], "needs its standard deviation"),
        (["--baseline", "0.05", "--mde", "0.01", "--weights", "50,0"], "positive share"),
    ],
)
def test_a_design_that_makes_no_sense_is_refused_naming_why(args, message):
    out = CliRunner().invoke(main, ["plan", *args])
    assert out.exit_code == 2 and message in out.output, out.output
