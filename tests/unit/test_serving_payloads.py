"""Each served version gets exactly the columns its signature declares, from whatever the caller sent."""

from __future__ import annotations

import math
import re

import pytest

from releasegate.serving.payloads import Column, PayloadError, Rows, Schema, parse_invocations, select

CHAMPION = Schema((Column("age", "long"), Column("income", "double"), Column("region", "string")))
NARROW = Schema((Column("age", "long"), Column("income", "double")))  # a candidate that dropped region
WIDE = Schema(CHAMPION.columns + (Column("tenure", "double", required=False),))  # one that added an optional column


def _sent(**columns) -> Rows:
    return Rows({name: list(values) for name, values in columns.items()}, len(next(iter(columns.values()))))


def test_exactly_the_declared_columns_pass_through_uncopied():
    sent = _sent(age=[30, 41], income=[1.5, 2.0], region=["north", "west"])
    assert select(sent, CHAMPION, "gw v1") is sent


def test_columns_in_another_order_follow_the_signature():
    sent = _sent(region=["north"], income=[1.5], age=[30])
    rows = select(sent, CHAMPION, "gw v1")
    assert list(rows.columns) == ["age", "income", "region"] and rows.columns["age"] is sent.columns["age"]


def test_columns_a_version_does_not_declare_are_ignored():
    sent = _sent(age=[30], income=[1.5], region=["north"], zip=["12345"])
    rows = select(sent, CHAMPION, "gw v1")
    assert rows.columns == {"age": [30], "income": [1.5], "region": ["north"]} and rows.n == 1
    assert sent.columns["zip"] == ["12345"]  # the caller's rows are left as they were (they are logged)


def test_a_candidate_that_dropped_a_column_gets_the_others_from_the_same_request():
    sent = _sent(age=[30, 41], income=[1.5, 2.0], region=["north", "west"])
    assert select(sent, NARROW, "gw v2").columns == {"age": [30, 41], "income": [1.5, 2.0]}


def test_an_optional_column_the_caller_omits_arrives_as_null():
    sent = _sent(age=[30, 41], income=[1.5, 2.0], region=["north", "west"])
    rows = select(sent, WIDE, "gw v3")
    assert list(rows.columns) == ["age", "income", "region", "tenure"] and rows.columns["tenure"] == [None, None]


def test_an_optional_column_takes_values_and_nulls_when_sent():
    sent = _sent(age=[30, 41, 52], income=[1.5, 2.0, 3.0], region=["a", "b", "c"], tenure=[12.0, None, math.nan])
    assert select(sent, WIDE, "gw v3").columns["tenure"] is sent.columns["tenure"]


def test_a_missing_required_column_is_a_422_naming_it():
    sent = _sent(age=[30], tenure=[3.0])
    with pytest.raises(PayloadError) as caught:
        select(sent, WIDE, "gw v3")
    assert caught.value.status == 422
    assert str(caught.value) == (
        "gw v3: missing column(s) 'income', 'region' (expected age, income, region, tenure (optional))"
    )


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("age", "old", "column 'age' row 1 expects an integer"),
        ("age", 2.5, "column 'age' row 1 expects an integer"),
        ("income", None, "column 'income' row 1 is null/NaN, but the model requires a value"),
        ("tenure", "long", "column 'tenure' row 1 expects a finite number (double)"),
    ],
)
def test_a_wrongly_typed_or_missing_value_is_a_422_naming_the_column(column, value, message):
    values = {"age": [30, 41], "income": [1.5, 2.0], "region": ["a", "b"], "tenure": [1.0, 2.0], "zip": ["1", "2"]}
    values[column][1] = value
    with pytest.raises(PayloadError, match=re.escape(message)) as caught:
        select(Rows(values, 2), WIDE, "gw v3")
    assert caught.value.status == 422


def test_an_ignored_column_is_not_type_checked():
    sent = _sent(age=[30], income=[1.5], region=["north"])
    assert (
        select(_sent(age=[30], income=[1.5], region=["north"], zip=[None]), CHAMPION, "gw v1").columns == sent.columns
    )


def test_a_version_without_a_signature_gets_every_column():
    sent = _sent(age=[30], anything=[[1, 2]])
    assert select(sent, Schema(None), "gw v4") is sent


def test_a_parsed_request_with_an_extra_column_serves_both_arms():
    body = {"dataframe_records": [{"age": 30, "income": 1.5, "region": "north", "zip": "123"}]}
    sent = parse_invocations(body, CHAMPION)
    assert list(select(sent, CHAMPION, "gw v1").columns) == ["age", "income", "region"]
    assert list(select(sent, NARROW, "gw v2").columns) == ["age", "income"]
    assert select(sent, WIDE, "gw v3").columns["tenure"] == [None]


@pytest.mark.parametrize(
    ("value", "taken"),
    [
        (17976931348623157 * 10**292, True),  # the documented maximum, 1.7976931348623157e308, as an integer
        (-(17976931348623157 * 10**292) - 1, False),  # past it, though a double would round it to its maximum
        (1.7976931348623157e308, True),
        (10**400, False),
        (math.inf, False),
        (math.nan, False),
        (True, False),
    ],
)
def test_a_double_takes_numbers_within_the_bounds_the_openapi_document_states(value, taken):
    """schemathesis sent (documented minimum − 1) as an integer; the gateway took it, against its own document."""
    from releasegate.serving.payloads import finite_double

    assert finite_double(value) is taken
    sent = _sent(age=[1], income=[value], region=["x"])
    if taken:
        assert select(sent, CHAMPION, "gw v1").columns["income"] == [value]
    else:
        with pytest.raises(PayloadError, match="income"):
            select(sent, CHAMPION, "gw v1")


def test_an_integer_literal_past_the_documented_double_bound_is_refused_though_orjson_would_round_it():
    """orjson reads (documented minimum − 1) as the double's minimum; schemathesis under CI sent it as a label."""
    from releasegate.serving.payloads import DOUBLE_INT_LIMIT, parse_json

    with pytest.raises(PayloadError, match="beyond the range of a double"):
        parse_json(b'{"ground_truth": [%d]}' % (-DOUBLE_INT_LIMIT - 1), 32)
    assert parse_json(b'{"ground_truth": [%d]}' % DOUBLE_INT_LIMIT, 32) == {"ground_truth": [1.7976931348623157e308]}
    assert parse_json(b'{"id": "%s"}' % (b"9" * 400), 32) == {"id": "9" * 400}  # digits in a string are text


def test_a_dataframe_split_index_is_a_list_within_the_row_limit_or_refused():
    """Found by schemathesis: an index that was not a list, or longer than the document's maxItems, was taken."""
    body = {"dataframe_split": {"columns": ["age", "income", "region"], "data": [[30, 1.5, "north"]]}}
    assert parse_invocations({"dataframe_split": body["dataframe_split"] | {"index": [7]}}, CHAMPION, 10).n == 1
    with pytest.raises(PayloadError, match="index must be a list") as err:
        parse_invocations({"dataframe_split": body["dataframe_split"] | {"index": -3.9e16}}, CHAMPION, 10)
    assert err.value.status == 400
    with pytest.raises(PayloadError, match="index has 11 labels; the limit is 10 rows") as err:
        parse_invocations({"dataframe_split": body["dataframe_split"] | {"index": [None] * 11}}, CHAMPION, 10)
    assert err.value.status == 413
