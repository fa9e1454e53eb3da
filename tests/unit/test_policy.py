"""Release policies: typed YAML, errors that name the field."""

from __future__ import annotations

import pytest

from releasegate import policy


def test_default_policy_loads_with_the_documented_steps():
    default = policy.load("default")
    assert default.canary.steps == [5, 25, 50]
    assert default.alpha == 0.05 and default.srm_p_value == 0.001
    assert "default" in policy.available()
    assert len(default.digest) == 64


def test_unknown_field_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: typo\ncanary:\n  stepz: [5, 50]\n")
    with pytest.raises(policy.PolicyError, match=r"canary\.stepz"):
        policy.load(path)


def test_wrong_type_and_bad_steps_are_named(tmp_path):
    with pytest.raises(policy.PolicyError, match=r"alpha"):
        policy.parse({"name": "x", "alpha": "often"})
    with pytest.raises(policy.PolicyError, match=r"canary\.steps"):
        policy.parse({"name": "x", "canary": {"steps": [50, 5]}})


def test_missing_policy_lists_the_known_ones():
    with pytest.raises(policy.PolicyError, match="known: .*default"):
        policy.load("no-such-policy")


def test_digest_changes_with_any_threshold():
    base = policy.parse({"name": "x"})
    assert base.digest != policy.parse({"name": "x", "primary": {"margin": 0.03}}).digest


def test_the_drift_watch_defaults_and_its_bad_values_are_named():
    watch = policy.load("default").monitoring.watch
    assert (watch.schedule, watch.window_minutes, watch.max_rows, watch.min_rows) == ("*/5 * * * *", 15, 5000, 200)
    with pytest.raises(policy.PolicyError, match=r"monitoring\.watch\.schedule"):
        policy.parse({"name": "x", "monitoring": {"watch": {"schedule": "every five minutes"}}})
    with pytest.raises(policy.PolicyError, match=r"monitoring\.watch\.window_minutes"):
        policy.parse({"name": "x", "monitoring": {"watch": {"window_minutes": 0}}})
