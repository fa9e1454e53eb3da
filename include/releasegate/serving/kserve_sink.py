"""The KServe logger sink: request/response CloudEvents in, the gateway's `predictions` rows out.

KServe's logger (`spec.predictor.logger`, mode `all`) posts every request and every 200 response of
a predictor as a binary-mode CloudEvent (ce-id = the request id, ce-type ...inference.request /
...inference.response, ce-time = when the agent sent it). The sink pairs them by (id, version) and
writes one `predictions` row per input row, labelled from the `routes` table as the gateway labels
its own: arm, mode, release, served. The version comes from the logger URL's query
(`/events?model=churn&version=3`), which each revision carries in its own spec.

What KServe does not give, and what the sink does instead:
- latency: the logger records none. It is the response event's time minus the request event's,
  both stamped by the same agent in the same pod (no clock skew), so it covers the model server
  and the agent's queue but not the network to the caller. Mesh metrics would be exact but are
  histograms per workload: they cannot be joined to a request, its label or its slice.
- errors: the logger sends no event for a non-200 answer, so a request with no response after
  `pending_seconds` is written as an `error` row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Required, TypedDict

import orjson
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from releasegate import storage
from releasegate.contract import Arm, CallStatus, Mode
from releasegate.serving import routing
from releasegate.serving.logwriter import LogWriter, PredictionEntry, Row, expand_predictions
from releasegate.serving.metrics import Metrics
from releasegate.serving.payloads import PayloadError, Rows, Schema, parse_invocations, parse_v2

if TYPE_CHECKING:
    from releasegate.settings import Settings

log = logging.getLogger(__name__)
REQUEST = "org.kubeflow.serving.inference.request"
RESPONSE = "org.kubeflow.serving.inference.response"
_ANY = Schema(None)


class EventError(ValueError):
    """A CloudEvent the sink cannot use (400); the message says what is wrong."""


class _Half(TypedDict, total=False):
    """One event of a request/response pair, held until the other arrives."""

    time: Required[float]  # the event's ce-time
    received: Required[float]
    model: Required[str]
    rows: Rows  # a request's
    routing_key: str | None  # a request's
    body: object  # a response's JSON


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    ground_truth: object
    business_value: float | None = None


def _event_time(value: str | None, received: float) -> float:
    if not value:
        return received
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as err:
        raise EventError(f"ce-time {value!r} is not an RFC 3339 time") from err


def parse_inputs(body: object) -> Rows:
    """A logged request body: Open Inference Protocol v2 (MLServer's) or an MLflow/v1 payload."""
    if (
        isinstance(body, dict)
        and isinstance(body.get("inputs"), list)
        and body["inputs"]
        and isinstance(body["inputs"][0], dict)
        and "datatype" in body["inputs"][0]
    ):
        return parse_v2(body, _ANY)
    return parse_invocations(body, _ANY)


def parse_outputs(body: object, n: int) -> list[Any]:
    """One output per input row from a logged response body (v2 `outputs[0].data`, or v1 `predictions`)."""
    if isinstance(body, dict) and isinstance(body.get("outputs"), list) and body["outputs"]:
        data = body["outputs"][0].get("data")
    elif isinstance(body, dict):
        data = body.get("predictions")
    else:
        data = body
    if isinstance(data, list) and data and isinstance(data[0], list) and len(data) == n:
        data = [row[0] if len(row) == 1 else row for row in data]
    if not isinstance(data, list) or len(data) != n:
        raise EventError(f"the response has {len(data) if isinstance(data, list) else 'no'} outputs for {n} input rows")
    return data


class Sink:
    """Pairs logger events and hands finished pairs to the predictions writer."""

    def __init__(self, engine: sa.Engine, *, pending_seconds: float = 30.0, route_ttl: float = 2.0):
        self.engine = engine
        self.metrics = Metrics()
        self.pending_seconds = pending_seconds
        self.route_ttl = route_ttl
        self.predictions: LogWriter[PredictionEntry] = LogWriter(
            engine, storage.predictions, self.metrics, expand=expand_predictions
        )
        self.feedback_log: LogWriter[list[Row]] = LogWriter(
            engine, storage.feedback, self.metrics, expand=lambda rows: rows
        )
        self._pending: dict[tuple[str, str], _Half] = {}  # (request id, version) -> the half seen first
        self._routes: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.unpaired = 0

    def route(self, model: str) -> dict[str, Any] | None:
        cached = self._routes.get(model)
        if cached and time.monotonic() - cached[0] < self.route_ttl:
            return cached[1]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(storage.routes).where(storage.routes.c.model == model)).first()
        value = dict(row._mapping) if row else None
        self._routes[model] = (time.monotonic(), value)
        return value

    def accept(
        self, headers: Mapping[str, str], query: Mapping[str, str], body: bytes, received: float | None = None
    ) -> str:
        """Take one CloudEvent; returns "pending" or "written"."""
        received = time.time() if received is None else received
        kind, request_id = headers.get("ce-type"), headers.get("ce-id")
        if kind not in (REQUEST, RESPONSE):
            raise EventError(f"ce-type must be {REQUEST} or {RESPONSE}, got {kind!r} (binary-mode CloudEvents only)")
        if not request_id or len(request_id) > 64:
            raise EventError("ce-id (the request id) must be 1-64 characters")
        model, version = query.get("model"), query.get("version")
        if not model or not version:
            raise EventError("the logger URL must carry ?model=...&version=... (the kserve backend renders it so)")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            raise EventError(f"the event's data is not JSON: {err}") from err
        half: _Half = {"time": _event_time(headers.get("ce-time"), received), "received": received, "model": model}
        if kind == REQUEST:
            try:
                half["rows"] = parse_inputs(payload)
            except PayloadError as err:
                raise EventError(f"the logged request has no usable rows: {err}") from err
            half["routing_key"] = _routing_key(headers.get("ce-metadata"))
        else:
            half["body"] = payload
        key = (request_id, version)
        other = self._pending.pop(key, None)
        if other is None or ("rows" in other) == ("rows" in half):
            self._pending[key] = half
            return "pending"
        request, response = (half, other) if "rows" in half else (other, half)
        outputs = parse_outputs(response["body"], request["rows"].n)
        self._write(model, version, request_id, request, outputs, response["time"])
        return "written"

    def expire(self, now: float | None = None) -> int:
        """Write requests whose response never came as errors; drop responses whose request never came."""
        now = time.time() if now is None else now
        expired = [k for k, v in self._pending.items() if now - v["received"] > self.pending_seconds]
        for request_id, version in expired:
            half = self._pending.pop((request_id, version))
            if "rows" in half:
                self._write(half["model"], version, request_id, half, None, None)
            else:
                self.unpaired += 1
        return len(expired)

    def _write(
        self,
        model: str,
        version: str,
        request_id: str,
        request: _Half,
        outputs: list[Any] | None,
        answered: float | None,
    ) -> None:
        route = self.route(model) or {}
        arm = Arm.candidate if version == route.get("candidate_version") else Arm.champion
        mode = Mode(route.get("mode") or Mode.single)
        served = not (arm is Arm.candidate and mode is Mode.shadow)
        status = CallStatus.ok if outputs is not None else CallStatus.error
        base = {
            "request_id": request_id,
            "time": request["time"],
            "model": model,
            "version": version,
            "arm": arm,
            "mode": mode,
            "release_id": route.get("release_id"),
            "routing_key_hash": routing.routing_key_hash(model, request["routing_key"] or request_id),
            "sample_bucket": routing.sample_bucket(request_id),
            "served": served,
            "fallback": False,
            "latency_ms": None if answered is None else max(0.0, (answered - request["time"]) * 1000),
            "status": status,
            "error": None
            if outputs is not None
            else f"no response logged within {self.pending_seconds:g}s (KServe logs none for a non-200 answer)",
        }
        self.predictions.put((base, request["rows"], outputs), rows=request["rows"].n)

    def feedback(self, items: object) -> int:
        items = items if isinstance(items, list) else [items]
        if not items:
            raise EventError("no feedback items")
        rows, now = [], time.time()
        for i, item in enumerate(items):
            try:
                fb = Feedback.model_validate(item)
            except ValidationError as err:
                first = err.errors()[0]
                raise EventError(
                    f"feedback item {i}: {'.'.join(map(str, first['loc'])) or 'item'}: {first['msg']}"
                ) from err
            if fb.ground_truth is None:
                raise EventError(f"feedback item {i}: ground_truth is required")
            rows.append(
                {
                    "request_id": fb.request_id,
                    "time": now,
                    "ground_truth": orjson.dumps(fb.ground_truth).decode(),
                    "business_value": fb.business_value,
                }
            )
        self.feedback_log.put(rows, rows=len(rows))
        return len(rows)


def _routing_key(metadata: str | None) -> str | None:
    """The first routing-key header value KServe copied into the event's `metadata` (logger.metadataHeaders)."""
    if not metadata:
        return None
    try:
        headers = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        return None
    for name, values in (headers or {}).items():
        if name.lower() == "x-routing-key" and values:
            return str(values[0])
    return None


def create_app(
    settings: Settings | None = None, *, pending_seconds: float = 30.0, sweep_seconds: float = 1.0
) -> Starlette:
    """The sink's ASGI app: POST /events (CloudEvents), POST /feedback, /healthz, /metrics."""
    from releasegate.settings import get_settings

    settings = settings or get_settings()
    sink = Sink(storage.engine(settings.db_url), pending_seconds=pending_seconds)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(sweep_seconds)
            sink.expire()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sink.predictions.start()
        sink.feedback_log.start()
        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            sink.expire(now=float("inf"))  # what is still open at shutdown: answered or not, write it down
            await asyncio.to_thread(sink.predictions.close)
            await asyncio.to_thread(sink.feedback_log.close)

    async def events(request: Request) -> Response:
        body = await request.body()
        try:
            state = sink.accept(request.headers, request.query_params, body)
        except EventError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse({"accepted": state}, status_code=202 if state == "pending" else 200)

    async def feedback(request: Request) -> Response:
        try:
            accepted = sink.feedback(orjson.loads(await request.body()))
        except orjson.JSONDecodeError as err:
            return JSONResponse({"error": f"the body is not JSON: {err}"}, status_code=400)
        except EventError as err:
            return JSONResponse({"error": str(err)}, status_code=422)
        return JSONResponse({"accepted": accepted})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def metrics(request: Request) -> Response:
        return Response(sink.metrics.render(), media_type=sink.metrics.content_type)

    app = Starlette(
        routes=[
            Route("/events", events, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
    app.state.sink = sink
    return app


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m releasegate.serving.kserve_sink", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    # No access log: two events per model call would drown everything else.
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
