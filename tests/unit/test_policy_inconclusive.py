"""The policy's rule for an inconclusive window (extend up to a limit, hold for approval, roll back)."""

from __future__ import annotations

import pytest

from releasegate import policy as policies


def test_default_policy_extends_an_inconclusive_window_twice_then_rolls_back():
    pol = policies.load("default")
    assert pol.inconclusive is policies.Inconclusive.extend and pol.max_extensions == 2


@pytest.mark.parametrize("rule", ["extend", "approve", "rollback"])
def test_each_inconclusive_rule_loads(rule):
    assert policies.parse({"name": "p", "inconclusive": rule}).inconclusive == rule


@pytest.mark.parametrize(
    ("data", "field", "why"),
    [
        ({"inconclusive": "wait"}, "inconclusive", "'extend', 'approve' or 'rollback'"),
        ({"max_extensions": -1}, "max_extensions", "greater than or equal to 0"),
    ],
)
def test_a_wrong_inconclusive_setting_is_named_in_the_error(data, field, why):
    with pytest.raises(policies.PolicyError) as err:
        policies.parse({"name": "bad", **data}, source="bad.yaml")
    assert str(err.value).startswith(f"bad.yaml: {field}: ")
    assert why in str(err.value)


def test_a_policy_file_with_a_typo_in_the_rule_is_refused_naming_the_field(tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\ninconclusiv: rollback\n")
    with pytest.raises(policies.PolicyError, match=r"typo\.yaml: inconclusiv: Extra inputs are not permitted"):
        policies.load("typo", tmp_path)
