"""The demo's synthetic churn data: deterministic, realistic ranges, a drift knob, two concepts."""

from __future__ import annotations

import pandas as pd
import pytest

from releasegate.demo import data


def test_same_seed_gives_the_same_customers_and_another_seed_does_not():
    pd.testing.assert_frame_equal(data.generate(500, seed=3), data.generate(500, seed=3))
    assert not data.generate(500, seed=3).equals(data.generate(500, seed=4))


def test_columns_types_and_values_are_those_of_the_contract():
    df = data.generate(5000, seed=0)
    assert list(df.columns) == data.FEATURES + [data.LABEL]
    assert df.notna().all().all()
    assert set(df["region"]) == {"north", "south", "east", "west"}
    assert set(df["plan"]) == {"basic", "standard", "premium"}
    assert set(df["channel"]) == {"web", "store", "phone"}
    assert set(df[data.LABEL]) == {0, 1}
    for column in ("age", "tenure_months", "support_calls", data.LABEL):
        assert df[column].dtype == "int64", column
    assert df["age"].between(18, 90).all() and (df["monthly_charges"] > 0).all()
    assert 0.22 <= df[data.LABEL].mean() <= 0.32


def test_drift_knob_moves_charges_up_and_the_region_mix_south():
    calm, drifted = data.generate(20_000, seed=5), data.generate(20_000, seed=5, drift=1.0)
    half = data.generate(20_000, seed=5, drift=0.5)
    # The price rise grows in proportion to the knob.
    rise = [d["monthly_charges"].mean() - calm["monthly_charges"].mean() for d in (half, drifted)]
    assert 3 < rise[0] < 7 and 8 < rise[1] < 12
    south = [d["region"].eq("south").mean() for d in (calm, half, drifted)]
    assert south[0] < 0.3 < south[1] < south[2]
    assert drifted["tenure_months"].mean() < calm["tenure_months"].mean()


def test_stale_concept_keeps_the_features_but_changes_who_churns():
    current, stale = data.generate(5000, seed=9), data.generate(5000, seed=9, concept="stale")
    pd.testing.assert_frame_equal(current[data.FEATURES], stale[data.FEATURES])
    assert (current[data.LABEL] != stale[data.LABEL]).mean() > 0.3
    assert 0.22 <= stale[data.LABEL].mean() <= 0.32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be a positive integer"),
        ({"n": 10, "drift": 1.5}, "drift must be in"),
        ({"n": 10, "concept": "future"}, "concept must be one of current, stale"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.generate(**kwargs)
