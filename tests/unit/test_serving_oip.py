"""The Open Inference Protocol's binary tensor data extension and datatype checks, on bytes as the official
clients lay them out (tritonclient and the KServe SDK: JSON header, then each input's raw little-endian data)."""

from __future__ import annotations

import json
import struct

import pytest

from releasegate.serving import routing
from releasegate.serving.payloads import (
    Column,
    PayloadError,
    Schema,
    binary_output,
    parse_v2,
    requested_outputs,
    v2_request,
)

SCHEMA = Schema((Column("age", "long"), Column("income", "double"), Column("region", "string")))


def _bytes_tensor(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def _binary_request(tensors: list[tuple[str, str, bytes, int]], **extra) -> tuple[bytes, str]:
    """(body, Inference-Header-Content-Length) for inputs of (name, datatype, raw data, rows)."""
    header = {
        "inputs": [
            {"name": n, "shape": [rows], "datatype": d, "parameters": {"binary_data_size": len(raw)}}
            for n, d, raw, rows in tensors
        ],
        **extra,
    }
    head = json.dumps(header).encode()
    return head + b"".join(raw for _, _, raw, _ in tensors), str(len(head))


def _request(**extra) -> tuple[bytes, str]:
    return _binary_request(
        [
            ("age", "INT64", struct.pack("<2q", 30, 41), 2),
            ("income", "FP64", struct.pack("<2d", 1.5, 2.25), 2),
            ("region", "BYTES", _bytes_tensor(["north", "wést"]), 2),
        ],
        **extra,
    )


def test_binary_inputs_read_as_the_values_the_client_sent():
    rows = parse_v2(v2_request(*_request(), max_depth=32), SCHEMA)
    assert rows.n == 2
    assert rows.columns == {"age": [30, 41], "income": [1.5, 2.25], "region": ["north", "wést"]}
    assert [type(v) for v in rows.columns["age"]] == [int, int]  # plain ints, as the JSON path gives


def test_binary_and_json_inputs_mix_in_one_request():
    body, length = _binary_request([("age", "INT32", struct.pack("<i", 7), 1)])
    header = json.loads(body[: int(length)])
    header["inputs"].append({"name": "region", "shape": [1], "datatype": "BYTES", "data": ["north"]})
    head = json.dumps(header).encode()
    parsed = v2_request(head + struct.pack("<i", 7), str(len(head)), 32)
    assert [t["data"] for t in parsed["inputs"]] == [[7], ["north"]]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda body, n: (body, "x"), "Inference-Header-Content-Length must be"),
        (lambda body, n: (body, str(len(body) + 1)), "Inference-Header-Content-Length must be"),
        (lambda body, n: (body[:-1], n), "runs past"),
        (lambda body, n: (body + b"\0", n), "belong to no input"),
        (lambda body, n: (body[: int(n)], n), "runs past"),
    ],
)
def test_binary_data_that_does_not_add_up_is_a_400_saying_what(mutate, message):
    body, length = mutate(*_request())
    with pytest.raises(PayloadError, match=message) as err:
        v2_request(body, length, 32)
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (("region", "BYTES", struct.pack("<I", 2) + b"\xff\xfe", 1), "not UTF-8 text"),
        (("region", "BYTES", struct.pack("<I", 9) + b"ab", 1), "runs past its input's data"),
        (("region", "BYTES", b"\1\0", 1), "4-byte length is cut off"),
        (("age", "INT64", b"\0" * 7, 1), "not a whole number of 8-byte values"),
        (("age", "BOOL", b"\2", 1), "a byte of 0 or 1"),
        (("age", "BF16", b"\0\0", 1), "cannot be read"),
    ],
)
def test_binary_tensors_that_cannot_be_read_are_refused(tensor, message):
    with pytest.raises(PayloadError, match=message):
        v2_request(*_binary_request([tensor]), max_depth=32)


def test_an_input_with_both_json_data_and_binary_data_is_refused():
    body, length = _binary_request([("age", "INT64", struct.pack("<q", 1), 1)])
    header = json.loads(body[: int(length)])
    header["inputs"][0]["data"] = [1]
    head = json.dumps(header).encode()
    with pytest.raises(PayloadError, match="both 'data' and binary data"):
        v2_request(head + struct.pack("<q", 1), str(len(head)), 32)


def _json(datatype: str, column: str = "age", data: list | None = None) -> dict:
    inputs = {
        "age": {"name": "age", "shape": [1], "datatype": "INT64", "data": [30]},
        "income": {"name": "income", "shape": [1], "datatype": "FP64", "data": [1.5]},
        "region": {"name": "region", "shape": [1], "datatype": "BYTES", "data": ["north"]},
    }
    inputs[column] = {"name": column, "shape": [1], "datatype": datatype, "data": data or inputs[column]["data"]}
    return {"inputs": list(inputs.values())}


@pytest.mark.parametrize(
    ("column", "datatype", "data"),
    [("age", "INT32", None), ("age", "UINT16", None), ("income", "FP32", None), ("income", "INT32", [3])],
)
def test_a_datatype_the_column_holds_without_loss_is_taken(column, datatype, data):
    assert parse_v2(_json(datatype, column, data), SCHEMA).n == 1


@pytest.mark.parametrize(
    ("column", "datatype", "data"),
    [("age", "BOOL", [1]), ("age", "FP64", [30.0]), ("age", "UINT64", None), ("income", "INT64", [3]),
     ("region", "INT64", [3])],
)  # fmt: skip
def test_a_datatype_the_column_cannot_hold_is_a_422_naming_both(column, datatype, data):
    with pytest.raises(PayloadError, match=rf"input '{column}': datatype {datatype} does not fit") as err:
        parse_v2(_json(datatype, column, data), SCHEMA)
    assert err.value.status == 422


def test_a_datatype_the_protocol_does_not_have_is_a_400():
    with pytest.raises(PayloadError, match="not one of the Open Inference Protocol's") as err:
        parse_v2(_json("INTEGER"), SCHEMA)
    assert err.value.status == 400


def test_outputs_come_back_in_binary_when_asked_and_as_json_when_they_cannot():
    assert requested_outputs({"inputs": [], "parameters": {"binary_data_output": True}}).binary("predict")
    asked = requested_outputs({"outputs": [{"name": "predict", "parameters": {"binary_data": False}}]})
    assert not asked.binary("predict") and list(asked.named) == ["predict"]
    assert binary_output({"datatype": "INT64", "data": [1, -2]}) == struct.pack("<2q", 1, -2)
    assert binary_output({"datatype": "FP64", "data": [0.5, 1]}) == struct.pack("<2d", 0.5, 1.0)
    assert binary_output({"datatype": "BYTES", "data": ["yes", "né"]}) == _bytes_tensor(["yes", "né"])
    assert binary_output({"datatype": "BOOL", "data": [True, False]}) == b"\1\0"
    assert binary_output({"datatype": "INT64", "data": [1, None]}) is None  # a null: answered as JSON
    with pytest.raises(PayloadError, match=r"outputs\[0\] must be an object"):
        requested_outputs({"outputs": ["predict"]})


def test_a_request_id_past_ours_is_logged_under_a_stable_readable_digest():
    assert routing.logged_request_id("req-1") == "req-1"
    long_id = "customer-42/" + "x" * 300
    logged = routing.logged_request_id(long_id)
    assert routing.valid_request_id(logged) and logged.startswith("customer-42/xxxx#")
    assert logged == routing.logged_request_id(long_id) != routing.logged_request_id(long_id + "y")
    assert routing.valid_request_id(routing.logged_request_id("a\0b\nc"))
    assert routing.logged_request_id("a\0b\nc").startswith("abc#")
