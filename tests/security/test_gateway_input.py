"""Bad input gets a 4xx that says what is wrong, never a 5xx, and never reaches the model or kills the log writer."""

from __future__ import annotations

import json

import orjson
import pytest
import sqlalchemy as sa

from releasegate import storage
from releasegate.serving import routing
from tests.integration.test_gateway import MODEL, rows
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
INVOCATIONS = f"/models/{MODEL}/invocations"
V2 = f"/v2/models/{MODEL}/infer"


@pytest.fixture(autouse=True)
def champion_only(security_gateway):
    resp = security_gateway.put_route(champion_version=security_gateway.versions["champion"], mode="single")
    assert resp.status_code == 200, resp.text


def _calls(gw) -> float:
    return gw.metric("releasegate_gateway_model_calls_total", model=MODEL)


def _dropped(gw) -> float:
    return gw.metric("releasegate_gateway_log_dropped_rows_total", table="predictions")


def test_a_lone_surrogate_is_refused_and_the_log_writer_survives(security_gateway):
    gw = security_gateway
    writer, calls, dropped = gw.writer_pid(), _calls(gw), _dropped(gw)
    lone = b'{"dataframe_records": [{"age": 30, "income": 1.5, "region": "\\udfff"}]}'  # what orjson refuses
    for body in (lone, lone.replace(b"1.5", b"NaN")):  # also beside NaN, which only the lenient parser reads
        resp = gw.client.post(INVOCATIONS, content=body)
        assert resp.status_code == 400, resp.text
        assert "lone UTF-16 surrogate (\\udfff)" in resp.json()["error"]
    good = gw.client.post(INVOCATIONS, json={"dataframe_records": rows(1)}, headers={"x-request-id": "after-surrogate"})
    assert good.status_code == 200, good.text
    wait_until(
        lambda: gw.count(storage.predictions, storage.predictions.c.request_id == "after-surrogate") == 1,
        timeout=20,
        what="the next request logged",
    )
    assert gw.writer_pid() == writer  # the same writer process: it never saw the surrogate
    assert _calls(gw) == calls + 1 and _dropped(gw) == dropped


def test_json_nested_a_thousand_deep_is_a_400_not_a_500(security_gateway):
    gw = security_gateway
    for depth in (33, 300, 1000, 5000):
        for url in (INVOCATIONS, V2, "/feedback"):
            resp = gw.client.post(url, content=b"[" * depth + b"]" * depth)
            assert resp.status_code == 400, (url, depth, resp.text)
            assert "nested deeper than 32 levels" in resp.json()["error"]
    deep_cell = {"dataframe_records": [rows(1)[0] | {"region": json.loads("[" * 40 + "]" * 40)}]}
    assert gw.client.post(INVOCATIONS, json=deep_cell).status_code == 400


def test_a_surrogate_in_the_v2_id_is_a_400_and_a_control_character_never_reaches_the_log(security_gateway):
    """The protocol's id may be any string, so one with control characters is answered and echoed; the log, where
    a NUL would fail its batch's insert on PostgreSQL, holds it under `routing.logged_request_id`, which has none."""
    gw = security_gateway
    sent = rows(1)[0]
    inputs = [
        {"name": name, "shape": [1], "datatype": dtype, "data": [sent[name]]}
        for name, dtype in (("age", "INT64"), ("income", "FP64"), ("region", "BYTES"))
    ]
    body = json.dumps({"id": "\udfff", "inputs": inputs}).encode()  # json.dumps escapes it: \udfff
    resp = gw.client.post(V2, content=body)
    assert resp.status_code == 400 and "lone UTF-16 surrogate" in resp.json()["error"], resp.text
    for bad_id in (5, None):
        resp = gw.client.post(V2, json={"id": bad_id, "inputs": inputs})
        assert resp.status_code == 400, (bad_id, resp.text)
    for odd_id in ("a\x00b", ""):
        resp = gw.client.post(V2, json={"id": odd_id, "inputs": inputs})
        assert resp.status_code == 200 and resp.json()["id"] == odd_id, resp.text
        logged = resp.json()["request_id"]
        assert logged == routing.logged_request_id(odd_id) and "\x00" not in logged
        wait_until(lambda id=logged: gw.count(storage.predictions, storage.predictions.c.request_id == id) == 1)
    assert gw.client.post(V2, json={"id": "v2-ok", "inputs": inputs}).json()["id"] == "v2-ok"


def test_feedback_ground_truth_nested_past_the_limit_is_a_400_and_any_non_scalar_a_422(security_gateway):
    gw = security_gateway
    deep = b'{"request_id": "r", "ground_truth": ' + b"[" * 300 + b"1" + b"]" * 300 + b"}"
    resp = gw.client.post("/feedback", content=deep)
    assert resp.status_code == 400 and "nested deeper" in resp.json()["error"], resp.text
    for truth in ([[1]], {"label": 1}, [1, {"a": 2}], [], float("nan")):
        body = json.dumps({"request_id": "r", "ground_truth": truth}).encode()  # NaN as the literal NaN
        resp = gw.client.post("/feedback", content=body)
        assert resp.status_code == 422 and "ground_truth" in resp.json()["error"], (truth, resp.text)


def test_feedback_ground_truth_is_a_scalar_or_one_scalar_per_input_row(security_gateway):
    from releasegate.analysis.labels import per_row

    gw = security_gateway
    accepted = [1, 0.5, "yes", True, [1, 0, 1], ["a", "b"]]
    for i, truth in enumerate(accepted):
        resp = gw.client.post("/feedback", json={"request_id": f"labels-{i}", "ground_truth": truth})
        assert resp.status_code == 200, (truth, resp.text)
    table = storage.feedback
    wait_until(
        lambda: gw.count(table, table.c.request_id.like("labels-%")) == len(accepted), timeout=20, what="labels stored"
    )
    with storage.engine(gw.settings.db_url).connect() as conn:
        stored = dict(conn.execute(sa.select(table.c.request_id, table.c.ground_truth)).all())
    # What the analysis reads back: one label for a request, or one per row.
    assert per_row(stored["labels-4"]) == [1.0, 0.0, 1.0] and per_row(stored["labels-2"]) == ["yes"]
    document = gw.client.get("/openapi.json").json()
    item = document["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    truth_schema = item["properties"]["ground_truth"]["oneOf"]
    assert truth_schema[0]["type"] == ["string", "number", "boolean"]
    assert truth_schema[1]["type"] == "array" and truth_schema[1]["items"]["type"] == ["string", "number", "boolean"]


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_records": []},
        {"dataframe_split": {"columns": ["age", "income", "region"], "data": []}},
        {"instances": {"age": [], "income": [], "region": []}},
        {"inputs": {"age": [], "income": [], "region": []}},
    ],
    ids=["records", "split", "instances-columns", "inputs-columns"],
)
def test_a_request_without_rows_is_refused_before_the_model(security_gateway, body):
    gw = security_gateway
    calls = _calls(gw)
    resp = gw.client.post(INVOCATIONS, json=body)
    assert resp.status_code == 422 and "no rows" in resp.json()["error"], resp.text
    v2 = gw.client.post(V2, json={"inputs": [{"name": "age", "shape": [0], "datatype": "INT64", "data": []}]})
    assert v2.status_code == 422 and "no rows" in v2.json()["error"], v2.text
    assert _calls(gw) == calls  # the model was never called


@pytest.mark.parametrize(
    "literal", [b"-9223372036854775809", b"9223372036854775808", b"18446744073709551616", b"1e19", b"1" + b"0" * 400]
)
def test_an_int64_column_refuses_integers_beyond_int64(security_gateway, literal):
    gw = security_gateway
    body = b'{"dataframe_records": [{"age": ' + literal + b', "income": 1.5, "region": "north"}]}'
    resp = gw.client.post(INVOCATIONS, content=body)
    assert resp.status_code in (400, 422), resp.text
    error = resp.json()["error"]
    assert "column 'age' row 0 expects an integer (long" in error or "integer beyond 64 bits" in error
    edge = b'{"dataframe_records": [{"age": -9223372036854775808, "income": 1e308, "region": "north"}]}'
    assert gw.client.post(INVOCATIONS, content=edge).status_code == 200  # the edges themselves are values


def test_a_double_column_refuses_numbers_beyond_the_float_range_with_a_422(security_gateway):
    gw = security_gateway
    for income in (b"1e400", b"-1" + b"0" * 400 + b".5", b"Infinity", b"1" + b"0" * 330):
        body = b'{"dataframe_records": [{"age": 30, "income": ' + income + b', "region": "north"}]}'
        resp = gw.client.post(INVOCATIONS, content=body)
        assert resp.status_code in (400, 422), (income, resp.text)


def test_every_status_the_gateway_answers_is_in_its_openapi_document(security_gateway):
    gw = security_gateway
    paths = gw.client.get("/openapi.json").json()["paths"]
    for path in (INVOCATIONS, V2):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "403", "404", "413", "422", "500", "503", "504"}
        assert responses["503"]["headers"]["Retry-After"]["required"] is True
    assert set(paths["/feedback"]["post"]["responses"]) == {"200", "400", "401", "403", "413", "422", "503"}
    assert {"404", "413", "422"} <= set(paths["/admin/routes/{model}"]["put"]["responses"])
    # The statuses themselves, answered: 404, 413 and 422 as the issue found them undocumented.
    answered = {
        gw.client.post("/models/nope/invocations", json={"dataframe_records": rows(1)}).status_code,
        gw.client.post(INVOCATIONS, json={"dataframe_records": rows(1) * 1001}).status_code,
        gw.client.post(INVOCATIONS, json={"dataframe_records": [{"age": 1}]}).status_code,
        gw.client.post("/feedback", json=[{"request_id": "x", "ground_truth": 1}] * 101).status_code,
    }
    assert answered == {404, 413, 422}
    assert orjson.loads(gw.client.get("/openapi.json").content)["openapi"] == "3.1.0"
