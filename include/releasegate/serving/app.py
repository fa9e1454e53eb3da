"""The gateway's HTTP API (Starlette): inference in two protocols, feedback, admin routes, health, metrics."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from releasegate.serving import payloads, routing
from releasegate.serving.auth import AuthError, Caller, Role
from releasegate.serving.config import GatewayConfig
from releasegate.serving.features import FeaturesUnavailable
from releasegate.serving.gateway import Active, Answer, Gateway, NotFound, Unavailable
from releasegate.serving.metrics import Metrics
from releasegate.serving.payloads import PayloadError, Rows, Schema
from releasegate.serving.routing import RouteSpec
from releasegate.serving.slots import CallTimeout, LoadError, ModelCallError, QueueFull, Slot

if TYPE_CHECKING:
    from releasegate.settings import Settings

log = logging.getLogger(__name__)
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

# An endpoint's work once its key is checked (the caller, None for an endpoint without a role), and the
# Starlette endpoint `_endpoint` makes of it.
_Handler: TypeAlias = Callable[[Request, Gateway, Caller | None], Awaitable[Response]]
_Endpoint: TypeAlias = Callable[[Request], Awaitable[Response]]
# How long a client should wait before retrying a 503 (over the in-flight limit, a full queue, still loading).
RETRY_AFTER = "1"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_JSON_OPTS)


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": message} | ({"code": code} if code else {}),
        status_code=status,
        headers={"retry-after": RETRY_AFTER} if status == 503 else None,
    )


def _gateway(request: Request) -> Gateway:
    return cast("Gateway", request.app.state.gateway)


class OverLimit(Exception):
    """More requests in flight than RELEASEGATE_GATEWAY_MAX_IN_FLIGHT (503, Retry-After)."""


def _declared_size(declared: str | None, limit: int) -> None:
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadError(f"payload of {int(declared):,} bytes exceeds the limit of {limit:,} bytes", 413)


async def _read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The raw body from the ASGI `receive`, refusing more than `limit` bytes before reading them all."""
    _declared_size(declared, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadError(f"payload exceeds the limit of {limit:,} bytes", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _body(request: Request, gateway: Gateway) -> object:
    """The parsed JSON body of a Starlette request."""
    config = gateway.config
    raw = await _read_body(request.receive, request.headers.get("content-length"), config.max_body_bytes)
    return payloads.parse_json(raw, config.max_json_depth)


def _failure(err: Exception) -> tuple[int, str]:
    """The status and message a handler's exception answers with (500 for one that is not ours: a bug)."""
    if isinstance(err, (AuthError, PayloadError, LoadError)):
        return err.status, str(err)
    if isinstance(err, NotFound):
        return 404, str(err)
    if isinstance(err, (Unavailable, QueueFull, FeaturesUnavailable)):
        return 503, str(err)
    if isinstance(err, OverLimit):
        return 503, "too many requests in flight; retry shortly"
    if isinstance(err, CallTimeout):
        return 504, str(err)
    if isinstance(err, ModelCallError):
        return 500, str(err)
    log.error("unexpected error answering a request", exc_info=err)
    return 500, f"internal error: {type(err).__name__}"


def _endpoint(name: str, role: Role | None, *, limited: bool = False) -> Callable[[_Handler], _Endpoint]:
    """Wrap a handler with the key check and the translation of errors into {"error": ...} answers.

    A `limited` endpoint counts towards RELEASEGATE_GATEWAY_MAX_IN_FLIGHT, as inference does.
    """

    def wrap(handler: _Handler) -> _Endpoint:
        async def endpoint(request: Request) -> Response:
            gateway = _gateway(request)
            in_flight = gateway.metrics.in_flight_of(name)
            in_flight.n += 1
            admitted = False
            try:
                caller = None if role is None else gateway.keys.require(request.headers.get("authorization"), role)
                if limited:
                    if gateway.in_flight >= gateway.config.max_in_flight:
                        raise OverLimit
                    gateway.in_flight += 1
                    admitted = True
                response = await handler(request, gateway, caller)
            except ClientDisconnect:
                response = Response(status_code=499)  # nobody to answer; counted, not logged as a crash
            except Exception as err:
                response = _error(*_failure(err), code=getattr(err, "code", None))
            finally:
                in_flight.n -= 1
                if admitted:
                    gateway.in_flight -= 1
            gateway.metrics.http_response(name, response.status_code)
            return response

        return endpoint

    return wrap


# Generated request ids: 80 random bits per process, then a counter (32 hex characters, like a uuid4's
# hex, and as unique), without a random read per request.
_ID_PREFIX: str
_ID_COUNTER: itertools.count[int]


def _new_id_prefix() -> None:
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = os.urandom(10).hex(), itertools.count()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)  # forked workers must not repeat each other's ids


def _request_id(header: str | None, body: object) -> tuple[str, str]:
    """The request's id as the answer echoes it, and as it is logged (`routing.logged_request_id`).

    X-Request-Id is ours: 1-64 characters without control characters, else 400. A v2 body's `id` is the
    protocol's, any string: echoed as sent, logged under its `logged_request_id`.
    """
    if header is None and isinstance(body, dict) and "id" in body:
        rid = body["id"]
        if not isinstance(rid, str):
            raise PayloadError("the body's id must be a string (the request id)")
        return rid, routing.logged_request_id(rid)
    if header is None:
        rid = f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"
    elif not routing.valid_request_id(header):
        raise PayloadError("the request id (X-Request-Id) must be 1-64 characters, no control characters")
    else:
        rid = header
    return rid, rid


def _invocations_answer(model: str, ids: tuple[str, str], answer: Answer, body: object) -> tuple[Any, bytes]:
    return {
        "predictions": answer.outputs,
        "request_id": ids[1],
        "model_version": answer.version,
        "arm": answer.arm,
    }, b""


def _v2_outputs(values: list[Any]) -> list[dict[str, Any]]:
    if values and isinstance(values[0], dict):
        return [
            {
                "name": str(k),
                "shape": [len(values)],
                "datatype": payloads.v2_datatype([v[k] for v in values]),
                "data": [v[k] for v in values],
            }
            for k in values[0]
        ]
    if values and isinstance(values[0], list):
        flat = [x for v in values for x in v]
        return [
            {
                "name": "predict",
                "shape": [len(values), len(values[0])],
                "datatype": payloads.v2_datatype(flat),
                "data": flat,
            }
        ]
    return [{"name": "predict", "shape": [len(values)], "datatype": payloads.v2_datatype(values), "data": values}]


def _v2_answer(model: str, ids: tuple[str, str], answer: Answer, body: object) -> tuple[Any, bytes]:
    """The v2 answer: the outputs asked for (all when the request names none), each in binary when asked
    (the binary tensor data extension: `binary_data_output`, or an output's `binary_data`) and encodable."""
    outputs = _v2_outputs(answer.outputs)
    binary = payloads.requested_outputs(body)
    if binary.named:
        names = [o["name"] for o in outputs]
        missing = [name for name in binary.named if name not in names]
        if missing:
            raise PayloadError(f"output(s) {', '.join(map(repr, missing))} not among the model's: {', '.join(names)}")
        outputs = [o for o in outputs if o["name"] in binary.named]
    tail = []
    for output in outputs:
        raw = payloads.binary_output(output) if binary.binary(output["name"]) else None
        if raw is not None:
            output["parameters"] = {"binary_data_size": len(raw)}
            del output["data"]
            tail.append(raw)
    content = {
        "model_name": model,
        "model_version": answer.version,
        "id": ids[0],
        "request_id": ids[1],
        "arm": answer.arm,
        "outputs": outputs,
    }
    return content, b"".join(tail)


# A request's body from its bytes (the headers may say how to read them, and the size limit of JSON's depth);
# its rows (checked against the champion's schema); the answer's body (JSON, then any binary data).
_Reader: TypeAlias = Callable[[bytes, "_Headers", int], object]
_Parser: TypeAlias = Callable[[object, Schema, int], Rows]
_Builder: TypeAlias = Callable[[str, tuple[str, str], Answer, object], tuple[Any, bytes]]


def _read_json(raw: bytes, headers: _Headers, max_depth: int) -> object:
    return payloads.parse_json(raw, max_depth)


def _read_v2(raw: bytes, headers: _Headers, max_depth: int) -> object:
    return payloads.v2_request(raw, headers.inference_header, max_depth)


# The inference endpoints: (path pattern, metrics endpoint name, reader, payload parser, answer builder). A
# pattern's groups are the model and, for the v2 protocol's version endpoint, the version asked for.
_INFERENCE: tuple[tuple[re.Pattern[str], str, _Reader, _Parser, _Builder], ...] = (
    (
        re.compile(r"/models/(.*)/invocations"),
        "invocations",
        _read_json,
        payloads.parse_invocations,
        _invocations_answer,
    ),
    (re.compile(r"/v2/models/(.*)/versions/([^/]+)/infer"), "v2_infer", _read_v2, payloads.parse_v2, _v2_answer),
    (re.compile(r"/v2/models/(.*)/infer"), "v2_infer", _read_v2, payloads.parse_v2, _v2_answer),
)


class _Headers:
    """The few request headers inference reads, picked out of the ASGI scope in one pass."""

    __slots__ = ("authorization", "content_length", "inference_header", "request_id", "routing_key")

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self.authorization = self.content_length = self.request_id = self.routing_key = None
        self.inference_header = None
        for name, value in raw:
            if name == b"authorization":
                self.authorization = value.decode("latin-1")
            elif name == b"content-length":
                self.content_length = value.decode("latin-1")
            elif name == b"x-request-id":
                self.request_id = value.decode("latin-1")
            elif name == b"x-routing-key":
                self.routing_key = value.decode("latin-1")
            elif name == b"inference-header-content-length":
                self.inference_header = value.decode("latin-1")


_JSON_HEADERS = [(b"content-type", b"application/json")]
_BINARY_HEADERS = [(b"content-type", b"application/octet-stream")]
_RETRY_HEADERS = [(b"retry-after", RETRY_AFTER.encode())]


class InferenceApp:
    """The gateway's ASGI app: inference requests served directly, everything else by the Starlette app.

    Why not a Starlette route for inference: Starlette's middleware stack, Request and Response cost
    ~20 µs a request on this machine (a raw ASGI echo answers ~31,700 requests/s on uvicorn, the same
    echo in Starlette ~20,000), which at the gateway's rates was a fifth of its time. The key check,
    limits, errors and metrics are the same code as every other endpoint's (`_failure`).
    """

    def __init__(self, app: Starlette, gateway: Gateway):
        self.app = app
        self.gateway = gateway
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            for pattern, name, read, parse, build in _INFERENCE:
                match = pattern.fullmatch(path)
                if match is None:
                    continue
                headers = _JSON_HEADERS
                if scope["method"] == "POST":
                    version = match.group(2) if pattern.groups > 1 else None
                    status, content, tail = await self._infer(
                        scope, receive, match.group(1), version, name, read, parse, build
                    )
                    if status == 503:
                        headers = headers + _RETRY_HEADERS
                else:
                    status, content, tail = 405, {"error": f"{scope['method']} is not allowed here; use POST"}, b""
                    headers = headers + [(b"allow", b"POST")]
                body = orjson.dumps(content, option=_JSON_OPTS) if content is not None else b""
                if tail:  # binary outputs after the JSON (the v2 protocol's binary tensor data extension)
                    headers = _BINARY_HEADERS + [(b"inference-header-content-length", str(len(body)).encode())]
                    body += tail
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": headers + [(b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _infer(
        self,
        scope: Scope,
        receive: Receive,
        model: str,
        version: str | None,
        name: str,
        read: _Reader,
        parse: _Parser,
        build: _Builder,
    ) -> tuple[int, Any, bytes]:
        gateway = self.gateway
        config = gateway.config
        in_flight = gateway.metrics.in_flight_of(name)
        in_flight.n += 1
        admitted = False
        tail = b""
        try:
            headers = _Headers(scope["headers"])
            caller = gateway.keys.require(headers.authorization, Role.predict)
            if gateway.in_flight >= config.max_in_flight:
                raise OverLimit
            gateway.in_flight += 1
            admitted = True
            active = gateway.active(model)
            raw = await _read_body(receive, headers.content_length, config.max_body_bytes)
            body = read(raw, headers, config.max_json_depth)
            rows = parse(body, active.champion.schema, config.max_rows)  # lists without names: the champion's columns
            if rows.n > config.max_rows:
                raise PayloadError(f"{rows.n} rows in one request; the limit is {config.max_rows}", 413)
            if not rows.n:
                raise PayloadError("the request has no rows", 422)
            ids = _request_id(headers.request_id, body)
            if version is None:
                answer = await gateway.infer(active, rows, ids[1], headers.routing_key or ids[1], caller.key_id)
            else:
                answer = await gateway.infer_version(active, rows, version, ids[1], caller.key_id)
            content, tail = build(model, ids, answer, body)
            status = 200
        except ClientDisconnect:
            status, content = 499, None  # nobody to answer; counted, not logged as a crash
        except Exception as err:
            status, message = _failure(err)
            content = {"error": message}
        finally:
            in_flight.n -= 1
            if admitted:
                gateway.in_flight -= 1
        gateway.metrics.http_response(name, status)
        return status, content, tail


@_endpoint("feedback", Role.feedback, limited=True)
async def feedback(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    accepted = gateway.feedback(await _body(request, gateway))
    return JSONResponse({"accepted": accepted})


@_endpoint("alerts", Role.alerts)
async def alerts(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    """Alertmanager's webhook: incidents, and emergency rollbacks for actionable alerts (serving/alerts.py)."""
    from releasegate.serving.alerts import RollbackNotTriggered

    body = await _body(request, gateway)
    actor = f"alertmanager:{caller.key_id}" if caller else "alertmanager"
    try:
        done = await asyncio.to_thread(gateway.alerts.receive, body, actor)
    except RollbackNotTriggered as err:
        return _error(503, str(err))
    return JSONResponse({"alerts": done})


@_endpoint("admin_routes", Role.admin)
async def list_routes(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    return JSONResponse(
        {
            "routes": [a.route.model_dump() for _, a in sorted(gateway.routes.items())],
            # Why a stored route is not served: only an admin sees load errors (they name files and keys).
            "failed": [
                {"model": model, "revision": revision, "error": error}
                for model, (revision, error, _) in sorted(gateway.failures.items())
            ],
        }
    )


async def _get_route(request: Request, gateway: Gateway) -> Response:
    return JSONResponse(gateway.route(request.path_params["model"]).model_dump())


async def _put_route(request: Request, gateway: Gateway, caller: Caller) -> Response:
    model = request.path_params["model"]
    if not routing.valid_model_name(model):
        raise PayloadError(
            f"the model name {model[:200]!r} must have 1-200 characters, no control characters and no leading "
            "or trailing spaces",
            422,
        )
    body = await _body(request, gateway)
    try:
        spec = RouteSpec.model_validate(body)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise PayloadError(f"invalid route for {model}: {problems}", 422) from None
    route = await gateway.put_route(model, spec, caller)
    await gateway.applied_everywhere(model, route.revision)  # with several workers, each polls for it
    return JSONResponse(route.model_dump())


@_endpoint("admin_route", Role.admin)
async def admin_route(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    # One route for both methods, so that a 405 for any other lists them both.
    if request.method == "PUT":
        return await _put_route(request, gateway, cast("Caller", caller))  # the admin role's: checked
    return await _get_route(request, gateway)


def _v2_tensors(slot: Slot) -> list[dict[str, Any]]:
    if slot.schema.columns is None:
        return [{"name": "input", "datatype": "BYTES", "shape": [-1]}]
    return [
        {"name": c.name, "datatype": payloads.V2_DATATYPES.get(c.kind, "BYTES"), "shape": [-1]}
        for c in slot.schema.columns
    ]


def _v2_metadata(model: str, active: Active, slot: Slot) -> dict[str, Any]:
    return {
        "name": model,
        "versions": [s.version for s in active.slots],
        "platform": "mlflow_pyfunc",
        "inputs": _v2_tensors(slot),
        "outputs": slot.outputs,
        "parameters": {"version": slot.version, "mode": active.route.mode, "revision": active.route.revision},
    }


@_endpoint("v2_model_metadata", Role.predict)
async def v2_model_metadata(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    model = request.path_params["model"]
    active = gateway.active(model)
    return JSONResponse(_v2_metadata(model, active, active.champion))


@_endpoint("v2_model_version_metadata", Role.predict)
async def v2_model_version_metadata(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    model, version = request.path_params["model"], request.path_params["version"]
    active = gateway.active(model)
    slot = next((s for s in active.slots if s.version == version), None)
    if slot is None:
        raise NotFound(f"{model} v{version} is not served (served: {', '.join(s.version for s in active.slots)})")
    return JSONResponse(_v2_metadata(model, active, slot))


@_endpoint("v2_model_ready", Role.predict)
async def v2_model_ready(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    model = request.path_params["model"]
    try:
        active = gateway.active(model)
    except Unavailable as err:
        return JSONResponse(
            {"name": model, "ready": False, "error": str(err)}, status_code=503, headers={"retry-after": RETRY_AFTER}
        )
    return JSONResponse({"name": model, "ready": True, "version": active.champion.version})


@_endpoint("v2_model_version_ready", Role.predict)
async def v2_model_version_ready(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    """A served version is ready (its route serves it, loaded and verified); one not served is a 404."""
    model, version = request.path_params["model"], request.path_params["version"]
    active = gateway.active(model)
    served = [s.version for s in active.slots]
    if version not in served:
        raise NotFound(f"version {version!r} of {model!r} is not served (served: {', '.join(served)})")
    return JSONResponse({"name": model, "ready": True, "version": version})


# The Open Inference Protocol extensions served (named as Triton names them, which clients check).
EXTENSIONS = ["binary_tensor_data"]


@_endpoint("v2_server", None)
async def v2_server(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    from releasegate import __version__

    return JSONResponse({"name": "releasegate", "version": __version__, "extensions": EXTENSIONS})


@_endpoint("v2_live", None)
async def v2_live(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    return JSONResponse({"live": True})


def _ready(gateway: Gateway) -> Response:
    # Ready or not, and nothing else: which models failed to load, and why, is for an admin (GET /admin/routes).
    if gateway.ready():
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False}, status_code=503, headers={"retry-after": RETRY_AFTER})


@_endpoint("v2_ready", None)
async def v2_ready(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    return _ready(gateway)


@_endpoint("openapi", Role.predict)
async def openapi(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    from releasegate.serving.openapi import document

    return JSONResponse(document(gateway))


@_endpoint("healthz", None)
async def healthz(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    return JSONResponse({"status": "ok"})


@_endpoint("readyz", None)
async def readyz(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    return _ready(gateway)


@_endpoint("metrics", Role.metrics)
async def metrics(request: Request, gateway: Gateway, caller: Caller | None) -> Response:
    m = gateway.metrics
    return Response(m.render(), media_type=m.content_type)


async def _http_error(request: Request, err: Exception) -> Response:
    """Starlette's own answers (no such path, a method not allowed) as JSON errors, like every other answer."""
    assert isinstance(err, HTTPException)  # registered for it alone
    response = _error(err.status_code, err.detail)
    response.headers.update(err.headers or {})
    return response


def create_app(settings: Settings | None = None, config: GatewayConfig | None = None) -> InferenceApp:
    """The gateway as an ASGI app; its lifespan starts the poller and log writers and flushes them at the end."""
    if settings is None:
        from releasegate.settings import get_settings

        settings = get_settings()
    gateway = Gateway(settings, config or GatewayConfig.from_env(), Metrics())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
        routes=[
            HttpRoute("/v2/models/{model:path}/versions/{version}/ready", v2_model_version_ready, methods=["GET"]),
            HttpRoute("/v2/models/{model:path}/versions/{version}", v2_model_version_metadata, methods=["GET"]),
            HttpRoute("/v2/models/{model:path}/ready", v2_model_ready, methods=["GET"]),
            HttpRoute("/v2/models/{model:path}", v2_model_metadata, methods=["GET"]),
            HttpRoute("/v2/health/live", v2_live, methods=["GET"]),
            HttpRoute("/v2/health/ready", v2_ready, methods=["GET"]),
            HttpRoute("/v2", v2_server, methods=["GET"]),
            HttpRoute("/openapi.json", openapi, methods=["GET"]),
            HttpRoute("/feedback", feedback, methods=["POST"]),
            HttpRoute("/alerts", alerts, methods=["POST"]),
            HttpRoute("/admin/routes", list_routes, methods=["GET"]),
            HttpRoute("/admin/routes/{model:path}", admin_route, methods=["GET", "PUT"]),
            HttpRoute("/healthz", healthz, methods=["GET"]),
            HttpRoute("/readyz", readyz, methods=["GET"]),
            HttpRoute("/metrics", metrics, methods=["GET"]),
        ],
    )
    # No redirect to the path with a slash added: `GET /v2/models` answered 307 to `/v2/models/`, a model named ''.
    app.router.redirect_slashes = False
    app.state.gateway = gateway
    return InferenceApp(app, gateway)
