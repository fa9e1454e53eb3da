"""Request bodies of both protocols → the columns each served version declares, checked against its signature.

A version gets exactly the columns its signature declares, so champion and candidate may differ:
columns it does not declare are ignored (as MLflow's scoring server does), a declared optional
column the caller omits is null. Parsing and checking are plain Python on the request path;
pandas is left to the batcher, which builds one DataFrame for many requests.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

import orjson

if TYPE_CHECKING:
    from mlflow.types import Schema as MlflowSchema

_KINDS = {  # MLflow DataType name -> (what the error message calls it, numpy dtype for the batch frame)
    "boolean": ("boolean", "bool"),
    "integer": ("integer", "int32"),
    "long": ("integer", "int64"),
    "float": ("number", "float32"),
    "double": ("number", "float64"),
    "string": ("string", "object"),
    "binary": ("binary", "object"),
    "datetime": ("datetime string", "object"),
}
INVOCATION_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class PayloadError(ValueError):
    """A request body the gateway cannot use; the message says what is wrong."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Column:
    name: str
    kind: str | None  # an MLflow DataType name; None: anything goes
    required: bool = True

    @property
    def dtype(self) -> str | None:
        return _KINDS[self.kind][1] if self.kind in _KINDS else None


@dataclass(frozen=True)
class Schema:
    """The column part of an MLflow input signature (None columns: the model has no signature)."""

    columns: tuple[Column, ...] | None

    @cached_property
    def names(self) -> list[str] | None:
        return [c.name for c in self.columns] if self.columns is not None else None

    @cached_property
    def validators(self) -> tuple[tuple[str, bool, Callable[[Any], bool]], ...]:
        """(name, required, accepts) per column: `accepts(value)` is the quick yes of `_type_ok` + not missing."""
        return tuple((c.name, c.required, _accepts(c.kind)) for c in self.columns or ())

    @classmethod
    def from_mlflow(cls, schema: MlflowSchema | None) -> Schema:
        if (
            schema is None
            or not getattr(schema, "inputs", None)
            or not schema.has_input_names()
            or schema.is_tensor_spec()
        ):
            return cls(None)
        cols = []
        for spec in schema.inputs:
            assert spec.name is not None  # MLflow names every input of a schema or none, and these are named
            kind = getattr(getattr(spec, "type", None), "name", None)
            cols.append(Column(spec.name, kind if kind in _KINDS else None, bool(getattr(spec, "required", True))))
        return cls(tuple(cols))


@dataclass
class Rows:
    """Input rows held by column: {name: [value per row]}."""

    columns: dict[str, list[Any]]
    n: int

    def record(self, i: int) -> dict[str, Any]:
        return {name: values[i] for name, values in self.columns.items()}


# What orjson itself reads and writes: a request whose integers all fit is one the log can always encode.
_JSON_INT_RANGE = (-(1 << 63), (1 << 64) - 1)
# The largest integer a float holds exactly: an integral float beyond it may not be the integer the caller sent
# (`-9223372036854775809` parses as the float -2**63).
_EXACT_FLOAT_INT = 1 << 53
# The largest integer a double column (and a numeric label) takes: the OpenAPI bound as JSON writes it,
# 1.7976931348623157e308, read as a decimal. The double's true maximum is a little larger, so an integer in
# between would be a value the document says is out of range yet accepted (schemathesis found one).
DOUBLE_INT_LIMIT = 17976931348623157 * 10**292
_LONG_INTEGER = re.compile(rb'(?<![0-9.eE+"-])-?[0-9]{309,}(?![0-9.eE"])')


def finite_double(value: object) -> bool:
    """A JSON number a double can hold within the documented bounds: a finite float, or an int inside them."""
    if type(value) is int:
        return -DOUBLE_INT_LIMIT <= value <= DOUBLE_INT_LIMIT
    return type(value) is float and math.isfinite(value)


def parse_json(raw: bytes, max_depth: int) -> object:
    """A request body as JSON, strictly: UTF-8, Unicode text only, integers within 64 bits, `max_depth` deep.

    NaN and Infinity literals are taken (clients send them), so the signature check can say which column
    may not be NaN. PayloadError (400) says what is wrong. Whatever this accepts, the prediction log can write.
    """
    if not raw:
        raise PayloadError("empty body: a JSON document is expected")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        return _parse_lenient(raw, err, max_depth)
    # orjson reads an integer beyond 64 bits as the nearest double, so one past the documented bound of a
    # double (1.7976931348623157e308 read as a decimal, 309 digits) would pass as that bound: refuse it.
    if len(raw) > 308:
        for literal in _LONG_INTEGER.findall(raw):
            if abs(int(literal)) > DOUBLE_INT_LIMIT:
                raise PayloadError("malformed JSON: a number beyond the range of a double")
    # orjson took it, so it is valid UTF-8 (integers past 64 bits became doubles); its depth is left to check, and no
    # document holds more nested containers than it has brackets: most need no walk at all.
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        _walk(value, max_depth, strings=False)
    return value


def _parse_lenient(raw: bytes, strict_error: orjson.JSONDecodeError, max_depth: int) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PayloadError(f"malformed JSON: the body is not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise PayloadError(f"malformed JSON: nested deeper than {max_depth} levels") from None
    except ValueError:
        raise PayloadError(f"malformed JSON: {strict_error}") from None
    _walk(value, max_depth, strings=True)
    return value


def _walk(value: object, max_depth: int, *, strings: bool) -> None:
    """PayloadError unless `value` nests at most `max_depth` deep (and with `strings`: Unicode text, 64-bit ints)."""
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    if strings:
        _leaf(value)
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if depth > max_depth:
            raise PayloadError(f"malformed JSON: nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            if strings:
                for key in item:
                    _leaf(key)
            children = item.values()
        else:
            children = item
        for child in children:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
            elif strings:
                _leaf(child)


def _leaf(value: object) -> None:
    if type(value) is str and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as err:
            code = ord(value[err.start])
            raise PayloadError(
                f"malformed JSON: a string holds a lone UTF-16 surrogate (\\u{code:04x}), which is not Unicode text"
            ) from None
    elif type(value) is int and not _JSON_INT_RANGE[0] <= value <= _JSON_INT_RANGE[1]:
        raise PayloadError("malformed JSON: an integer beyond 64 bits")


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


INT_RANGE = {"long": (-(1 << 63), (1 << 63) - 1), "integer": (-(1 << 31), (1 << 31) - 1)}
FLOAT32_MAX = 3.4028234663852886e38
# The v2 protocol's name for each MLflow column type (strings and datetimes travel as BYTES); looked up
# by a column's kind, which is None for a column of any type.
V2_DATATYPES: dict[str | None, str] = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
    "datetime": "BYTES",
}


def _type_ok(kind: str, value: object) -> bool:
    if kind in ("long", "integer"):
        if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_FLOAT_INT:
            value = int(value)
        low, high = INT_RANGE[kind]
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if kind in ("double", "float"):
        # Infinity is a float the model cannot use (and JSON cannot carry); the batch dtype must hold it too.
        # Compared, not converted: float() of an integer beyond the float range raises.
        if kind == "double" and type(value) is int:
            return finite_double(value)
        limit = FLOAT32_MAX if kind == "float" else sys.float_info.max
        return isinstance(value, (int, float)) and not isinstance(value, bool) and -limit <= value <= limit
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("string", "datetime"):
        return isinstance(value, str)
    return True


def _accepts(kind: str | None) -> Callable[[Any], bool]:
    """A quick test that says yes for every present, well-typed value JSON can carry (exact types only).

    `select` runs it on every value of every request; a no (or a value of another type, like numpy's)
    sends the request through the full check, which has the final say and the error message.
    """
    if kind == "double":
        return finite_double  # NaN, inf: no
    if kind == "float":
        return lambda v: (type(v) is float or type(v) is int) and -FLOAT32_MAX <= v <= FLOAT32_MAX  # NaN, inf: no
    if kind in INT_RANGE:
        low, high = INT_RANGE[kind]
        return lambda v: type(v) is int and low <= v <= high
    if kind == "boolean":
        return lambda v: v is True or v is False
    if kind in ("string", "datetime"):
        return lambda v: type(v) is str
    return lambda v: v is not None and v == v  # any kind: present and not NaN


def select(rows: Rows, schema: Schema, what: str) -> Rows:
    """The columns `schema` declares, from the caller's `rows`: others ignored, an omitted optional one null.

    PayloadError (422) names the column when a required one is missing or a value has the wrong type.
    """
    if schema.columns is None:  # no signature: the version takes what the caller sends
        return rows
    columns = rows.columns
    try:
        valid = all(all(map(accepts, columns[name])) for name, _, accepts in schema.validators)
    except KeyError:  # a declared column was not sent
        valid = False
    if valid:
        # Every declared value is present and well typed: only extra columns or the order may need fixing.
        names = schema.names  # not None: the schema has columns
        return rows if list(columns) == names else Rows({n: columns[n] for n in cast("list[str]", names)}, rows.n)
    return _select(rows, schema.columns, what)


def _select(rows: Rows, columns: tuple[Column, ...], what: str) -> Rows:
    missing = [c.name for c in columns if c.required and c.name not in rows.columns]
    if missing:
        declared = ", ".join(c.name if c.required else f"{c.name} (optional)" for c in columns)
        raise PayloadError(
            f"{what}: missing column(s) {', '.join(repr(c) for c in missing)} (expected {declared})", 422
        )
    selected = {}
    for col in columns:
        values = rows.columns.get(col.name)
        if values is None:  # an optional column the caller left out: null in every row, as pandas reads it
            selected[col.name] = [None] * rows.n
            continue
        for i, value in enumerate(values):
            if _is_missing(value):
                if col.required:
                    raise PayloadError(
                        f"{what}: column {col.name!r} row {i} is null/NaN, but the model requires a value", 422
                    )
                continue
            if col.kind is not None and not _type_ok(col.kind, value):
                raise PayloadError(
                    f"{what}: column {col.name!r} row {i} expects {_describe(col.kind)}, "
                    f"got {type(value).__name__} {value!r:.60}",
                    422,
                )
        selected[col.name] = values
    # Column order follows the signature, so the batch frame needs no reordering.
    return Rows(selected, rows.n)


def _describe(kind: str) -> str:
    if kind in INT_RANGE:
        low, high = INT_RANGE[kind]
        return f"an integer ({kind}, {low} to {high})"
    if kind in ("double", "float"):
        return f"a finite number ({kind})"
    return f"{_KINDS[kind][0]} ({kind})"


def _from_records(records: list[Any], where: str) -> Rows:
    if not records:
        raise PayloadError(f"{where} has no rows", 422)
    first = records[0]
    if not isinstance(first, dict):
        raise PayloadError(f"{where} must be a list of objects (column -> value)")
    names = list(first)
    keys = first.keys()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise PayloadError(f"{where}[{i}] is not an object")
        if rec.keys() != keys:
            missing = sorted(set(keys) - set(rec))
            extra = sorted(set(rec) - set(keys))
            raise PayloadError(f"{where}[{i}] has different columns from row 0: missing {missing}, extra {extra}", 422)
    return Rows({name: [rec[name] for rec in records] for name in names}, len(records))


def _from_lists(data: list[Any], names: list[str] | None, where: str) -> Rows:
    if names is None:
        raise PayloadError(f"{where} gives rows without column names, and the model has no input signature")
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != len(names):
            raise PayloadError(f"{where} row {i} must be a list of {len(names)} values ({', '.join(names)})", 422)
    if len(data) == 1:  # the common one-row request
        return Rows({name: [value] for name, value in zip(names, data[0])}, 1)
    if not data:
        return Rows({name: [] for name in names}, 0)
    return Rows({name: list(column) for name, column in zip(names, zip(*data))}, len(data))


def _from_columns(mapping: dict[str, Any], where: str) -> Rows:
    if not mapping:
        raise PayloadError(f"{where} has no columns")
    values = list(mapping.values())
    if not all(isinstance(v, list) for v in values):
        if any(isinstance(v, (list, dict)) for v in values):
            raise PayloadError(f"{where} mixes lists and single values")
        return Rows({k: [v] for k, v in mapping.items()}, 1)  # one row given as column -> value
    n = len(values[0])
    bad = [k for k, v in mapping.items() if len(v) != n]
    if bad:
        raise PayloadError(f"{where}: column(s) {bad} have a different length from {next(iter(mapping))!r} ({n})")
    return Rows(dict(mapping), n)


def parse_invocations(body: object, schema: Schema, max_rows: int | None = None) -> Rows:
    """An MLflow scoring payload: dataframe_split, dataframe_records, instances or inputs."""
    if not isinstance(body, dict):
        raise PayloadError("the body must be a JSON object with one of: " + ", ".join(INVOCATION_KEYS))
    given = [k for k in INVOCATION_KEYS if k in body]
    if len(given) != 1:
        raise PayloadError(
            f"the body must have exactly one of {', '.join(INVOCATION_KEYS)}; got "
            f"{', '.join(given) or ', '.join(map(str, body)) or 'none'}"
        )
    key = given[0]
    if len(body) > 1:  # e.g. MLflow's `params`: not supported, so not silently ignored either
        raise PayloadError(f"unexpected field(s) beside {key}: {', '.join(sorted(k for k in body if k != key))}")
    value = body[key]
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise PayloadError("dataframe_split must be an object with 'columns' and 'data' (a list of rows)")
        extra = set(value) - {"columns", "data", "index"}
        if extra:
            raise PayloadError(f"dataframe_split has unexpected field(s) {sorted(extra)}")
        columns = value.get("columns", schema.names)
        if columns is not None and (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)):
            raise PayloadError("dataframe_split.columns must be a list of column names")
        if len(set(columns or [])) != len(columns or []):
            raise PayloadError("dataframe_split.columns has duplicate names")
        index = value.get("index")
        if index is not None and not isinstance(index, list):
            raise PayloadError("dataframe_split.index must be a list (row labels, which the gateway does not use)")
        if index is not None and max_rows is not None and len(index) > max_rows:
            raise PayloadError(f"dataframe_split.index has {len(index)} labels; the limit is {max_rows} rows", 413)
        return _from_lists(value["data"], columns, "dataframe_split.data")
    if key == "dataframe_records":
        if not isinstance(value, list):
            raise PayloadError("dataframe_records must be a list of objects (column -> value)")
        return _from_records(value, "dataframe_records")
    if isinstance(value, dict):
        return _from_columns(value, key)
    if isinstance(value, list) and value:
        if isinstance(value[0], dict):
            return _from_records(value, key)
        if isinstance(value[0], list):
            return _from_lists(value, schema.names, key)
    raise PayloadError(f"{key} must be a non-empty list of rows or an object of columns")


def _flatten(data: list[Any], shape: list[int]) -> list[Any]:
    if data and isinstance(data[0], list):
        return [v for row in data for v in (row if isinstance(row, list) else [row])]
    return data


def parse_v2(body: object, schema: Schema, max_rows: int | None = None) -> Rows:
    """An Open Inference Protocol v2 request: one input per column, or one [rows, columns] tensor."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise PayloadError("the body must be an object with a non-empty 'inputs' list (Open Inference Protocol v2)")
    requested_outputs(body)  # a malformed `outputs` is refused before the model is called
    tensors = body["inputs"]
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("data"), list):
            raise PayloadError(f"inputs[{i}] must be an object with 'name', 'shape', 'datatype' and 'data' (a list)")
        shape = t.get("shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise PayloadError(f"inputs[{i}] ({t['name']}) needs a 'shape' of non-negative integers")
    names = schema.names
    if len(tensors) == 1 and len(tensors[0]["shape"]) == 2 and names and tensors[0]["name"] not in names:
        t = tensors[0]
        _check_datatype(t, None)  # one datatype for columns of several: each value is checked by its column
        n, k = t["shape"]
        flat = _flatten(t["data"], t["shape"])
        if k != len(names) or len(flat) != n * k:
            raise PayloadError(
                f"inputs[0] ({t['name']}) has shape {t['shape']} and {len(flat)} values; a "
                f"[rows, {len(names)}] tensor in column order {', '.join(names)} is expected",
                422,
            )
        return Rows({name: flat[j::k] for j, name in enumerate(names)}, n)
    columns: dict[str, list[Any]] = {}
    n = None
    declared = {c.name: c for c in schema.columns or ()}
    for t in tensors:
        _check_datatype(t, declared.get(t["name"]))
        flat = _flatten(t["data"], t["shape"])
        rows = t["shape"][0]
        if len(flat) != rows or any(d != 1 for d in t["shape"][1:]):
            raise PayloadError(
                f"input {t['name']!r}: shape {t['shape']} with {len(flat)} values; one value per "
                "row ([rows] or [rows, 1]) is expected",
                422,
            )
        if n is not None and rows != n:
            raise PayloadError(f"input {t['name']!r} has {rows} rows, the others {n}")
        if t["name"] in columns:
            raise PayloadError(f"input {t['name']!r} is given twice")
        n = rows
        columns[t["name"]] = flat
    if not n:
        raise PayloadError("the request has no rows", 422)
    return Rows(columns, n)


# The Open Inference Protocol's tensor datatypes, and the ones a column of each MLflow kind takes without loss:
# its own, and those whose every value it holds exactly (an INT32 tensor for a long column, an FP32 for a double).
V2_ALL_DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16",
    "BYTES",
)  # fmt: skip
_SMALL_INTS = ("UINT8", "UINT16", "INT8", "INT16")
V2_WIDENINGS: dict[str, frozenset[str]] = {
    "boolean": frozenset({"BOOL"}),
    "integer": frozenset({"INT32", *_SMALL_INTS}),
    "long": frozenset({"INT64", "INT32", "UINT32", *_SMALL_INTS}),
    "float": frozenset({"FP32", "FP16", *_SMALL_INTS}),
    "double": frozenset({"FP64", "FP32", "FP16", "INT32", "UINT32", *_SMALL_INTS}),
    "string": frozenset({"BYTES"}),
    "binary": frozenset({"BYTES"}),
    "datetime": frozenset({"BYTES"}),
}
# The binary tensor data extension: each datatype's little-endian numpy dtype (BYTES: 4-byte length, then bytes).
_BINARY_DTYPES = {
    "BOOL": "|b1", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
BINARY_HEADER = "inference-header-content-length"


def v2_request(raw: bytes, header_length: str | None, max_depth: int) -> object:
    """A v2 request body, with the binary tensor data extension: when the Inference-Header-Content-Length
    header is sent, that many bytes of JSON, then each input with a `binary_data_size` parameter's raw data in
    input order. Each such input is returned with its `data` decoded, so the rest of the path sees one form.
    """
    if header_length is None:
        return parse_json(raw, max_depth)
    if not header_length.isdigit() or not 0 < int(header_length) <= len(raw):
        raise PayloadError(
            f"Inference-Header-Content-Length must be the JSON header's size in bytes (1 to {len(raw)}), "
            f"got {header_length[:40]!r}"
        )
    split = int(header_length)
    body = parse_json(raw[:split], max_depth)
    tail = memoryview(raw)[split:]
    inputs = body.get("inputs") if isinstance(body, dict) else None
    at = 0
    for i, tensor in enumerate(inputs if isinstance(inputs, list) else ()):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            continue
        if type(size) is not int or size < 0 or at + size > len(tail):
            raise PayloadError(
                f"inputs[{i}]: binary_data_size {size!r} runs past the {len(tail) - at} bytes of binary data left"
            )
        if "data" in tensor:
            raise PayloadError(f"inputs[{i}] has both 'data' and binary data (binary_data_size)")
        tensor["data"] = _binary_values(tensor.get("datatype"), tail[at : at + size], i)
        at += size
    if at != len(tail):
        raise PayloadError(f"{len(tail) - at} bytes after the JSON header belong to no input's binary_data_size")
    return body


def _binary_values(datatype: object, data: memoryview, i: int) -> list[Any]:
    """One input's values from its raw bytes (row-major, little-endian; BYTES elements as UTF-8 text)."""
    if datatype == "BYTES":
        values, at = [], 0
        while at < len(data):
            if at + 4 > len(data):
                raise PayloadError(f"inputs[{i}]: a BYTES element's 4-byte length is cut off")
            size = int.from_bytes(data[at : at + 4], "little")
            if at + 4 + size > len(data):
                raise PayloadError(f"inputs[{i}]: a BYTES element of {size} bytes runs past its input's data")
            try:
                values.append(str(data[at + 4 : at + 4 + size], "utf-8"))
            except UnicodeDecodeError:
                raise PayloadError(f"inputs[{i}]: BYTES element {len(values)} is not UTF-8 text") from None
            at += 4 + size
        return values
    dtype = _BINARY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise PayloadError(
            f"inputs[{i}]: binary data of datatype {str(datatype)[:20]!r} cannot be read (one of "
            f"{', '.join(V2_ALL_DATATYPES[:-2])} or BYTES is expected)"
        )
    import numpy as np  # loaded already in the gateway (its batches are DataFrames)

    width = np.dtype(dtype).itemsize
    if len(data) % width:
        raise PayloadError(f"inputs[{i}]: {len(data)} bytes of {datatype} is not a whole number of {width}-byte values")
    array = np.frombuffer(data, dtype="<u1" if datatype == "BOOL" else dtype)
    if datatype == "BOOL":
        if (array > 1).any():
            raise PayloadError(f"inputs[{i}]: a BOOL value is a byte of 0 or 1")
        return [bool(v) for v in array.tolist()]
    return cast("list[Any]", array.tolist())


def _check_datatype(tensor: dict[str, Any], column: Column | None) -> None:
    """PayloadError unless the tensor's datatype is one of the protocol's and, for a declared column, one that
    column takes without loss (422, naming both)."""
    datatype = tensor.get("datatype")
    if datatype not in V2_ALL_DATATYPES:
        raise PayloadError(
            f"input {tensor['name']!r}: datatype {str(datatype)[:20]!r} is not one of the Open Inference Protocol's "
            f"({', '.join(V2_ALL_DATATYPES)})"
        )
    if column is not None and column.kind is not None and datatype not in V2_WIDENINGS[column.kind]:
        raise PayloadError(
            f"input {tensor['name']!r}: datatype {datatype} does not fit the model's {V2_DATATYPES[column.kind]} "
            f"column (it takes {', '.join(sorted(V2_WIDENINGS[column.kind]))})",
            422,
        )


@dataclass(frozen=True)
class OutputRequest:
    """The outputs a v2 request asks for (none named: all) and which of them in binary."""

    named: dict[str, bool | None]  # output name -> its `binary_data` parameter (None: not given)
    binary_all: bool  # the request's `binary_data_output` parameter

    def binary(self, name: str) -> bool:
        wanted = self.named.get(name)
        return self.binary_all if wanted is None else wanted


_ALL_AS_JSON = OutputRequest({}, False)


def requested_outputs(body: object) -> OutputRequest:
    """A v2 request's `outputs` and `parameters.binary_data_output`; PayloadError (400) if `outputs` is malformed."""
    if not isinstance(body, dict) or ("outputs" not in body and "parameters" not in body):
        return _ALL_AS_JSON
    parameters = body.get("parameters")
    binary_all = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    named: dict[str, bool | None] = {}
    requested = body.get("outputs")
    if requested is not None:
        if not isinstance(requested, list):
            raise PayloadError("'outputs' must be a list of objects with a 'name' (and optional 'parameters')")
        for i, output in enumerate(requested):
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise PayloadError(f"outputs[{i}] must be an object with a 'name' (a string)")
            flag = output["parameters"].get("binary_data") if isinstance(output.get("parameters"), dict) else None
            named[output["name"]] = flag if isinstance(flag, bool) else None
    return OutputRequest(named, binary_all)


def binary_output(output: dict[str, Any]) -> bytes | None:
    """An output tensor's data in the binary tensor data extension's form; None when a value does not fit its
    datatype (a null, say): that output is answered as JSON, which clients read either way."""
    datatype, data = output["datatype"], output["data"]
    if datatype == "BYTES":
        if not all(type(v) is str for v in data):
            return None
        try:
            encoded = [v.encode() for v in data]
        except UnicodeEncodeError:
            return None
        return b"".join(len(b).to_bytes(4, "little") + b for b in encoded)
    if datatype == "BOOL":
        return bytes(data) if all(type(v) is bool for v in data) else None
    import numpy as np  # loaded already in the gateway

    if datatype == "INT64" and all(type(v) is int and INT_RANGE["long"][0] <= v <= INT_RANGE["long"][1] for v in data):
        return np.array(data, dtype="<i8").tobytes()
    if datatype == "FP64" and all(type(v) is float or type(v) is int for v in data):
        return np.array(data, dtype="<f8").tobytes()
    return None


def v2_datatype(values: list[Any]) -> str:
    """The v2 datatype name for a list of JSON-ready output values."""
    first = next((v for v in values if v is not None), None)
    if isinstance(first, bool):
        return "BOOL"
    if isinstance(first, int):
        return "INT64"
    if isinstance(first, float):
        return "FP64"
    return "BYTES"
