"""No value breaks the gateway or its prediction log: a property test (hypothesis) over arbitrary JSON and Unicode.

Issue 12 asks that the log path never dies on a value: the gateway parses strictly before it accepts a request
(lone surrogates, nesting depth, integers beyond 64 bits), and the log's child process counts and skips whatever it
still cannot read. Checked here on the real gateway process of tests/security/conftest.py, through both inference
paths (MLflow's /invocations and KServe v2's /infer) and /feedback, with bodies hypothesis builds as raw bytes:

- arbitrary JSON: nulls, booleans, integers up to far beyond 64 bits, floats with their extremes, Infinity and NaN,
  text of every Unicode category including lone surrogates (sent as `\\udfff` escapes, which httpx's own JSON
  encoding cannot carry, or as the invalid UTF-8 bytes they encode to) and control characters; now and then nested
  past the depth limit, or with a few stray bytes spliced in;
- structurally valid bodies of each layout the path reads, for the model's real input columns (the route's v2
  metadata), whose cells are often well typed and otherwise arbitrary, so that many requests reach the model;
- feedback items naming request ids that exist (logged predictions) or not, with arbitrary ground truth.

Per example: never a 5xx. Per path, once the log has caught up (waited for, with a deadline), the accounting the
code implements: the gateway calls the model once per accepted request (`Gateway.infer` in single mode, counted by
`releasegate_gateway_model_calls_total`), the batcher counts the rows it predicts
(`releasegate_gateway_batch_rows_sum`), and `_log_call` hands the log one entry per call holding one row per input
row, each of which is either written to `predictions` or counted in `releasegate_gateway_log_dropped_rows_total`.
So: model calls == 200 answers, rows predicted == the rows of the 200 answers, and rows in `predictions` for this
test's requests (an x-request-id prefix per path) + rows counted as dropped == rows predicted. Feedback likewise:
rows added to `feedback` + rows dropped == the items the 200 answers accepted. With the database up, the rows
dropped must moreover be none: strict parsing is there so that whatever the gateway accepts, its log can store (this
test found a `business_value` of 2**63 or more accepted, then refused by SQLite). And the gateway, with the same
log writer child, is still alive and /healthz answers 200.

EXAMPLES per path: 2,000 under CI (CI=true, set by .ci/run), 200 otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from releasegate import storage
from releasegate.serving.payloads import INVOCATION_KEYS
from tests.integration.test_gateway import MODEL, rows
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
EXAMPLES = 2000 if os.environ.get("CI") else 200
INVOCATIONS = f"/models/{MODEL}/invocations"
V2 = f"/v2/models/{MODEL}/infer"
RUN = secrets.token_hex(3)  # request ids of this run: one prefix per path, no LIKE wildcard in it

# --- values ---------------------------------------------------------------------------------------------------

# Every Unicode category (lone surrogates included, which hypothesis leaves out by default and draws rarely even
# when asked), with surrogates, control characters and ASCII drawn often.
_CHARS = st.one_of(
    st.characters(exclude_categories=()),
    st.characters(categories=["Cs"]),
    st.characters(categories=["Cc"]),
    st.characters(max_codepoint=0x7F),
)
TEXT = st.text(_CHARS, max_size=8)
_EDGE_INTS = [0, -1, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64 - 1, 2**64]
INTS = st.one_of(st.integers(), st.sampled_from([*_EDGE_INTS, 10**400, -(10**400)]))
_EDGE_FLOATS = [sys.float_info.max, -sys.float_info.max, 5e-324, -0.0, 3.4028235e38, float("inf"), float("nan")]
FLOATS = st.one_of(st.floats(allow_nan=False), st.sampled_from(_EDGE_FLOATS))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
# Few leaves: a large body tests nothing a small one does not, and costs time to build and send.
JSON = st.recursive(
    SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(TEXT, kids, max_size=3)), max_leaves=6
)


def _nest(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


NOT_TEXT = JSON.filter(lambda value: not isinstance(value, str))
DEEP = st.builds(_nest, JSON, st.integers(28, 40))  # around the gateway's limit of 32 levels
ANY = st.one_of(JSON, JSON, JSON, DEEP)


# Text as a well-formed body carries it: any Unicode but lone surrogates (NUL, controls, emoji and all).
CLEAN_TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cc"])), max_size=8)
_TYPED = {
    "INT64": st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), 2**63 - 1, 0, 30.0, 2.0**53])),
    "INT32": st.integers(-(2**31), 2**31 - 1),
    "FP64": st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(2**63), 2**64 - 1),
        st.sampled_from([sys.float_info.max, -sys.float_info.max, 5e-324, -0.0]),
    ),
    "FP32": st.floats(width=32, allow_nan=False, allow_infinity=False),
    "BOOL": st.booleans(),
}


def _cell(datatype: str, wild: bool) -> st.SearchStrategy[Any]:
    """A value for a column of this v2 datatype: one of its type (any of them), or when `wild` often anything."""
    typed = _TYPED.get(datatype, CLEAN_TEXT)
    return st.one_of(typed, typed, SCALARS, JSON) if wild else typed


def _encode(draw: Callable[[st.SearchStrategy[Any]], Any], value: object) -> tuple[bytes, bool]:
    """`value` as the bytes of a request body: JSON with \\u escapes, or raw UTF-8 (a lone surrogate as the invalid
    bytes it encodes to), now and then with stray bytes spliced in; and whether they were (then the body may still
    be JSON, but say something else: another request id, say)."""
    how = draw(st.sampled_from(["escaped"] * 4 + ["raw"] * 3 + ["spliced"]))
    if how == "escaped":
        return json.dumps(value).encode(), False  # ensure_ascii: "\udfff" for a lone surrogate, NaN and Infinity
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "spliced":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at:]
    return raw, how == "spliced"


# --- bodies of each path --------------------------------------------------------------------------------------

_INVOCATION_LAYOUTS = [
    "dataframe_records",
    "dataframe_split",
    "dataframe_split_unnamed",
    "instances_records",
    "instances_columns",
    "instances_lists",
    "inputs_columns",
    "inputs_one_row",
]


def _table(draw, columns: list[tuple[str, str]]) -> tuple[dict[str, list[Any]], int, bool]:
    """Column -> values for a few rows (now and then none): the model's columns and maybe extra ones. Half the
    tables are `wild`: a column may be left out, and names and values may be anything."""
    wild = draw(st.booleans())
    n = draw(st.sampled_from([0, 1, 1, 1, 2, 3, 5] if wild else [1, 1, 1, 2, 3, 5]))
    kept = [(name, dtype) for name, dtype in columns if not wild or draw(st.integers(0, 9))]
    names = {name for name, _ in columns}
    extra = draw(st.lists((TEXT if wild else CLEAN_TEXT).filter(lambda k: k not in names), max_size=2, unique=True))
    table = {name: [draw(_cell(dtype, wild)) for _ in range(n)] for name, dtype in kept}
    table.update({name: [draw(SCALARS if wild else CLEAN_TEXT) for _ in range(n)] for name in extra})
    return table, n, wild


def _invocation_body(draw, columns: list[tuple[str, str]]) -> object:
    table, n, _ = _table(draw, columns)
    records = [{name: values[i] for name, values in table.items()} for i in range(n)]
    in_order = [[table.get(name, [None] * n)[i] for name, _ in columns] for i in range(n)]
    layout = draw(st.sampled_from(_INVOCATION_LAYOUTS))
    if layout == "dataframe_records":
        return {"dataframe_records": records}
    if layout == "dataframe_split":
        return {"dataframe_split": {"columns": list(table), "data": [list(r.values()) for r in records]}}
    if layout == "dataframe_split_unnamed":
        return {"dataframe_split": {"data": in_order}}
    if layout == "instances_records":
        return {"instances": records}
    if layout == "instances_columns":
        return {"instances": table}
    if layout == "instances_lists":
        return {"instances": in_order}
    if layout == "inputs_columns":
        return {"inputs": table}
    return {"inputs": records[0] if records else {}}


def _v2_body(draw, columns: list[tuple[str, str]], request_id: str) -> object:
    table, n, wild = _table(draw, columns)
    datatypes = dict(columns)
    layout = draw(st.sampled_from(["columns", "columns", "columns_2d", "tensor"]))
    if layout == "tensor":  # one [rows, columns] tensor in the signature's column order
        data = [[table.get(name, [None] * n)[i] for name, _ in columns] for i in range(n)]
        flat = draw(st.booleans())
        inputs = [
            {
                "name": "input-0",
                "shape": [n, len(columns)],
                "datatype": "BYTES",
                "data": [v for row in data for v in row] if flat else data,
            }
        ]
    else:
        two_d = layout == "columns_2d"
        inputs = [
            {
                "name": name,
                "shape": [n, 1] if two_d else [n],
                "datatype": datatypes.get(name, "BYTES"),
                "data": [[v] for v in values] if two_d else values,
            }
            for name, values in table.items()
        ]
    for tensor in inputs:  # in a wild table, now and then a shape or a datatype that is anything
        if wild and not draw(st.integers(0, 9)):
            tensor["shape"] = draw(st.one_of(st.lists(st.one_of(INTS, st.booleans()), max_size=3), JSON))
        if wild and not draw(st.integers(0, 9)):
            tensor["datatype"] = draw(SCALARS)
    body: dict[str, Any] = {"inputs": inputs}
    id_kind = draw(st.sampled_from(["none", "none", "ours", "suffix", "any"]))
    if id_kind == "ours":
        body["id"] = request_id
    elif id_kind == "suffix":  # ours with anything after it: control characters, surrogates, too long
        body["id"] = request_id + draw(st.text(_CHARS, max_size=70))
    elif id_kind == "any":
        body["id"] = draw(JSON)
    if not draw(st.integers(0, 4)):
        body["parameters"] = draw(JSON)
    return body


# --- the gateway's own accounting ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def champion_only(security_gateway):
    resp = security_gateway.put_route(champion_version=security_gateway.versions["champion"], mode="single")
    assert resp.status_code == 200, resp.text


class Counters:
    """The gateway's counters this test reads, and the rows of a log table that are this test's (`mine`)."""

    def __init__(self, gw, table: sa.Table, mine: sa.ColumnElement[bool]):
        self.gw, self.table, self.mine = gw, table, mine
        self.start = self.now()

    def now(self) -> dict[str, float]:
        gw, name = self.gw, self.table.name
        version = gw.versions["champion"]
        return {
            "calls": gw.metric("releasegate_gateway_model_calls_total", model=MODEL),
            "predicted": gw.metric("releasegate_gateway_batch_rows_sum", model=MODEL, version=version),
            "written": gw.metric("releasegate_gateway_log_written_rows_total", table=name),
            "dropped": gw.metric("releasegate_gateway_log_dropped_rows_total", table=name),
            "rows": gw.count(self.table, self.mine),
        }

    def delta(self) -> dict[str, float]:
        now = self.now()
        return {key: now[key] - self.start[key] for key in now}

    def dropped_by_reason(self) -> str:
        text = self.gw.client.get("/metrics").text
        return "\n".join(
            line for line in text.splitlines() if line.startswith("releasegate_gateway_log_dropped_rows_total{")
        )


def _log_settled(gw, table: str) -> bool:
    """Nothing waiting for the log writer of `table`: no queued entry and no entry unwritten (lag 0)."""
    return (
        gw.metric("releasegate_gateway_log_queue_depth", table=table) == 0
        and gw.metric("releasegate_gateway_log_lag_seconds", table=table) == 0
    )


def _caught_up(gw, counters: Counters, expected: float, what: str) -> dict[str, float]:
    """The counters' changes once the log's writer has taken every entry and counts (written or dropped) the
    `expected` rows. (Not its lag gauge: a drop must fail the assertions that name it, not this wait.)"""

    def caught_up() -> dict[str, float] | None:
        if gw.metric("releasegate_gateway_log_queue_depth", table=counters.table.name):
            return None
        delta = counters.delta()
        return delta if delta["written"] + delta["dropped"] >= expected and delta["rows"] >= delta["written"] else None

    try:
        return wait_until(caught_up, timeout=60, what=f"{expected:g} {what} written or counted as dropped")
    except AssertionError as err:
        table = counters.table.name
        state = {
            "delta": counters.delta(),
            "queue": gw.metric("releasegate_gateway_log_queue_depth", table=table),
            "lag": gw.metric("releasegate_gateway_log_lag_seconds", table=table),
        }
        raise AssertionError(f"{err}\n{state}\n{counters.dropped_by_reason()}\n{gw.log()}") from None


def _still_serving(gw, writer: int) -> None:
    assert gw.proc.poll() is None, "the gateway process died:\n" + gw.log()
    assert gw.client.get("/healthz").status_code == 200
    assert gw.writer_pid() == writer, "the prediction log's writer process was replaced:\n" + gw.log()


def _columns(gw) -> list[tuple[str, str]]:
    """The champion's input columns and their v2 datatypes, as the route's metadata states them."""
    meta = gw.client.get(f"/v2/models/{MODEL}")
    assert meta.status_code == 200, meta.text
    columns = [(t["name"], t["datatype"]) for t in meta.json()["inputs"]]
    assert [name for name, _ in columns] == list(rows(1)[0]), columns  # age, income, region
    return columns


def _settle_before(gw) -> None:
    """Wait for the previous tests' rows to be written, so that the counters' changes are this test's."""
    for table in ("predictions", "feedback"):
        wait_until(lambda t=table: _log_settled(gw, t), timeout=60, what=f"the {table} log settled before the test")


def _summary(path: str, examples: int, statuses: Counter, seconds: float, **figures: float) -> None:
    counts = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
    extra = "".join(f", {key} {int(value)}" for key, value in figures.items())
    print(f"\n[property] {path}: {examples} examples in {seconds:.1f} s; statuses {{{counts}}}{extra}")


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [INVOCATIONS, V2], ids=["invocations", "v2"])
def test_no_body_gets_a_5xx_and_every_row_the_model_predicts_is_logged_or_counted_as_dropped(security_gateway, path):
    gw = security_gateway
    columns = _columns(gw)
    v2 = path == V2
    prefix = f"hp-{RUN}-{'v2' if v2 else 'inv'}-"
    _settle_before(gw)
    writer = gw.writer_pid()
    counters = Counters(gw, storage.predictions, storage.predictions.c.request_id.like(f"{prefix}%"))
    statuses: Counter[int] = Counter()
    answered = {"requests": 0, "rows": 0}
    sent = iter(range(10**9))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one_request(data):
        draw = data.draw
        request_id = f"{prefix}{next(sent)}"
        headers = {"content-type": "application/json", "x-request-id": request_id}
        kind = draw(st.integers(0, 9))
        if kind < 6:
            body = _v2_body(draw, columns, request_id) if v2 else _invocation_body(draw, columns)
        elif kind < 9:  # anything under the key the path reads
            body = {"inputs": draw(ANY)} if v2 else {draw(st.sampled_from(INVOCATION_KEYS)): draw(ANY)}
        else:
            body = draw(ANY)
        raw, spliced = _encode(draw, body)
        # Without the header a v2 body's own id is the request id: left out only when that id is ours or no string,
        # and the body's bytes are as encoded (a spliced byte may make another id of it).
        if v2 and kind < 6 and "id" in body and not spliced:
            own = body["id"]
            if (type(own) is not str or own.startswith(prefix)) and draw(st.booleans()):
                headers.pop("x-request-id")
        resp = gw.client.post(path, content=raw, headers=headers)
        statuses[resp.status_code] += 1
        assert resp.status_code < 500, (raw[:500], resp.status_code, resp.text[:500])
        if resp.status_code == 200:
            answer = resp.json()
            assert answer["request_id"].startswith(prefix), answer  # so its rows are counted below
            answered["requests"] += 1
            answered["rows"] += answer["outputs"][0]["shape"][0] if v2 else len(answer["predictions"])

    started = time.monotonic()
    one_request()
    seconds = time.monotonic() - started
    delta = _caught_up(gw, counters, answered["rows"], "predicted rows")
    _summary(path, sum(statuses.values()), statuses, seconds, **delta)
    assert answered["requests"], statuses  # some requests reached the model: the property says something
    assert delta["calls"] == answered["requests"], (delta, answered)
    assert delta["predicted"] == answered["rows"], (delta, answered)
    assert delta["rows"] + delta["dropped"] == delta["predicted"], (delta, counters.dropped_by_reason())
    assert delta["written"] == delta["rows"], delta  # every row the writer counts as written is in the table
    # And with the database up, none is dropped: a drop would be a value the gateway accepted but cannot store.
    assert delta["dropped"] == 0, counters.dropped_by_reason()
    _still_serving(gw, writer)


def test_no_feedback_gets_a_5xx_and_every_accepted_label_is_stored_or_counted_as_dropped(security_gateway):
    gw = security_gateway
    prefix = f"hp-{RUN}-fb-"
    known = [f"{prefix}known-{i}" for i in range(3)]  # request ids the prediction log holds
    for request_id in known:
        resp = gw.client.post(INVOCATIONS, json={"dataframe_records": rows(2)}, headers={"x-request-id": request_id})
        assert resp.status_code == 200, resp.text
    _settle_before(gw)
    writer = gw.writer_pid()
    # This test's labels: every row added from now on (nothing else sends feedback meanwhile). Not by request id:
    # a spliced byte may turn one into another that is still valid, and its label is then stored under it.
    table = storage.feedback
    with storage.engine(gw.settings.db_url).connect() as conn:
        last = conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0))).scalar_one()
    counters = Counters(gw, table, table.c.id > last)
    statuses: Counter[int] = Counter()
    accepted = {"items": 0}
    printable = st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=8)
    request_ids = st.one_of(
        st.sampled_from(known),  # logged predictions
        st.sampled_from(known),
        st.builds(lambda suffix: prefix + suffix, printable),  # none logged
        st.builds(lambda suffix: prefix + suffix, st.text(_CHARS, max_size=70)),  # anything after the prefix
        NOT_TEXT,  # not a request id (a string would be one, outside this test's prefix)
    )
    labels = st.one_of(st.booleans(), INTS, FLOATS, CLEAN_TEXT)
    truths = st.one_of(labels, labels, labels, st.lists(labels, max_size=4), SCALARS, JSON)
    values = st.one_of(st.none(), FLOATS, INTS, JSON)

    @st.composite
    def items(draw) -> dict[str, Any]:
        item = {"request_id": draw(request_ids), "ground_truth": draw(truths)}
        if draw(st.booleans()):
            item["business_value"] = draw(values)
        if not draw(st.integers(0, 9)):  # a field feedback does not have, or one left out
            item[draw(st.sampled_from(["extra", *item]))] = draw(NOT_TEXT)
        if not draw(st.integers(0, 9)):
            del item[draw(st.sampled_from(list(item)))]
        return item

    item = items()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one_request(data):
        draw = data.draw
        kind = draw(st.integers(0, 9))
        if kind < 4:
            body = draw(item)
        elif kind < 7:
            body = draw(st.lists(item, max_size=3))
        else:
            body = draw(ANY)
        raw, spliced = _encode(draw, body)
        resp = gw.client.post("/feedback", content=raw, headers={"content-type": "application/json"})
        statuses[resp.status_code] += 1
        assert resp.status_code < 500, (raw[:500], resp.status_code, resp.text[:500])
        if resp.status_code == 200:
            got = resp.json()["accepted"]
            assert spliced or got == (len(body) if isinstance(body, list) else 1), (body, got)
            accepted["items"] += got

    started = time.monotonic()
    one_request()
    seconds = time.monotonic() - started
    delta = _caught_up(gw, counters, accepted["items"], "accepted labels")
    _summary("/feedback", sum(statuses.values()), statuses, seconds, **delta)
    assert accepted["items"], statuses
    assert delta["calls"] == 0, delta  # feedback never calls the model
    assert delta["rows"] + delta["dropped"] == accepted["items"], (delta, counters.dropped_by_reason())
    assert delta["written"] == delta["rows"], delta
    assert delta["dropped"] == 0, counters.dropped_by_reason()
    _still_serving(gw, writer)
