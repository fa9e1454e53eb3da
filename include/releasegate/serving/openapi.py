"""The gateway's OpenAPI 3.1 document, built from the routes it serves right now.

Each served model gets its own inference paths whose request bodies list that model's columns
and types (from its MLflow signature), so a client generator or a fuzzer can make valid
requests, not only malformed ones. Every status an operation can answer is listed with its
body (and a 503's Retry-After), so the document is the whole contract: the schemathesis test
checks the gateway against it with every check it has.

Where the gateway takes more than JSON Schema can say (a v2 tensor's shape must match its data),
the document describes one canonical form of the request and says so.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

from releasegate.contract import Mode
from releasegate.serving.auth import Role
from releasegate.serving.payloads import FLOAT32_MAX, INT_RANGE, V2_ALL_DATATYPES, V2_DATATYPES, Schema
from releasegate.serving.routing import MAX_ARMS, MODEL_NAME_PATTERN, REQUEST_ID_PATTERN, VERSION_PATTERN

if TYPE_CHECKING:
    from releasegate.serving.gateway import Gateway

_JSON = "application/json"
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
}
_REQUEST_ID = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": REQUEST_ID_PATTERN}
# The Open Inference Protocol's request id (a v2 body's `id`, and so a feedback item's): any string, echoed as
# sent, logged under routing.logged_request_id.
_ANY_ID = {
    "type": "string",
    "description": "Any string; ids past 64 characters or with control characters are "
    "logged (and joined with feedback) under a digest of them",
}
_STATUSES = {
    400: "Malformed: not JSON (or nested too deep, or not Unicode text), or not the shape of a request",
    401: "Missing, unknown or revoked key",
    403: "The key's role may not call this",
    404: "No such model, route or version",
    413: "Too large: the body, the rows in one request, or the feedback items in one request",
    422: "Well-formed but unusable: a missing column, a wrong type, a value out of range, no rows",
    500: "The model failed (or, for a route change, a dependency: the registry or the database)",
    503: "Not now: over the in-flight limit, the model's queue full, its route still loading or not loadable",
    504: "The champion did not answer within RELEASEGATE_GATEWAY_CHAMPION_TIMEOUT",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}


def _value(kind: str | None, required: bool) -> dict[str, Any]:
    schema: dict[str, Any]
    if kind in INT_RANGE:
        low, high = INT_RANGE[kind]
        schema = {"type": "integer", "minimum": low, "maximum": high}
    elif kind == "float":
        schema = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    elif kind == "double":
        schema = {"type": "number", "minimum": -sys.float_info.max, "maximum": sys.float_info.max}
    elif kind == "boolean":
        schema = {"type": "boolean"}
    elif kind in ("string", "binary", "datetime"):
        schema = {"type": "string"}
    else:
        return {}
    if not required:
        schema["type"] = [schema["type"], "null"]
    return schema


def _row(schema: Schema) -> dict[str, Any]:
    if schema.columns is None:
        return {"type": "object", "minProperties": 1}
    # Columns the model does not declare are ignored at run time; the document names only those it uses.
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [c.name for c in schema.columns if c.required],
        "properties": {c.name: _value(c.kind, c.required) for c in schema.columns},
    }


def _invocations_body(schema: Schema, max_rows: int) -> dict[str, Any]:
    rows = {"type": "array", "minItems": 1, "maxItems": max_rows, "items": _row(schema)}
    records = {
        "type": "object",
        "additionalProperties": False,
        "required": ["dataframe_records"],
        "properties": {"dataframe_records": rows},
    }
    instances = {
        "type": "object",
        "additionalProperties": False,
        "required": ["instances"],
        "properties": {"instances": rows},
    }
    variants: list[dict[str, Any]] = [records, instances]
    if schema.columns is not None:
        names = [c.name for c in schema.columns]
        row_list = {
            "type": "array",
            "prefixItems": [_value(c.kind, c.required) for c in schema.columns],
            "items": False,
            "minItems": len(names),
            "maxItems": len(names),
        }
        variants.append(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["dataframe_split"],
                "properties": {
                    "dataframe_split": {
                        "type": "object",
                        "additionalProperties": False,
                        # Without `columns`, the data's columns are the signature's, in its order.
                        "required": ["data"],
                        "properties": {
                            "columns": {"const": names},
                            "data": {"type": "array", "minItems": 1, "maxItems": max_rows, "items": row_list},
                            # Row labels, unused; null as pandas' `orient="split"` writers may send it.
                            "index": {"type": ["array", "null"], "maxItems": max_rows},
                        },
                    }
                },
            }
        )
        variants.append(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["inputs"],
                "properties": {"inputs": _row(schema) | {"minProperties": 1}},
            }
        )
    return {"oneOf": variants}


def _v2_body(schema: Schema) -> dict[str, Any]:
    inputs: dict[str, Any]
    if schema.columns is None:
        tensor = {
            "type": "object",
            "required": ["name", "shape", "datatype", "data"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "prefixItems": [{"const": 1}], "items": False, "minItems": 1},
                "datatype": {"enum": list(V2_ALL_DATATYPES)},
                "data": {"type": "array", "minItems": 1, "maxItems": 1},
            },
        }
        inputs = {"type": "array", "minItems": 1, "maxItems": 1, "items": tensor}
    else:
        # The canonical request: one row, one tensor per column in the signature's order (an optional column
        # may be null). The gateway also takes tensors of [rows] or [rows, 1] in any order, and one [rows,
        # columns] tensor; a shape's agreement with its data is more than JSON Schema can say.
        inputs = {
            "type": "array",
            "prefixItems": [
                {
                    "type": "object",
                    "required": ["name", "shape", "datatype", "data"],
                    "properties": {
                        "name": {"const": c.name},
                        "shape": {"const": [1]},
                        "datatype": {"const": V2_DATATYPES.get(c.kind, "BYTES")},
                        "data": {"type": "array", "minItems": 1, "maxItems": 1, "items": _value(c.kind, c.required)},
                    },
                }
                for c in schema.columns
            ],
            "items": False,
            "minItems": len(schema.columns),
        }
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {"id": _ANY_ID, "inputs": inputs},
    }


def _route_body() -> dict[str, Any]:
    """RouteSpec as the mode decides it: a candidate for shadow and canary only, a weight for canary only, arms
    (and the experiment's id) for an experiment only.

    The rules left out (422): the candidate may not be the champion's version; an experiment's versions differ and
    its arms' weights add up to less than 100.
    """
    version = {"type": "string", "minLength": 1, "maxLength": 50, "pattern": VERSION_PATTERN}
    common = {"champion_version": version, "release_id": {"type": ["string", "null"], "maxLength": 64}}
    single = {
        "type": "object",
        "additionalProperties": False,
        "required": ["champion_version"],
        "properties": common
        | {
            "mode": {"const": Mode.single.value},
            "candidate_version": {"type": "null"},
            "candidate_weight": {"const": 0},
        },
    }
    shadow = {
        "type": "object",
        "additionalProperties": False,
        "required": ["champion_version", "candidate_version", "mode"],
        "properties": common
        | {"mode": {"const": Mode.shadow.value}, "candidate_version": version, "candidate_weight": {"const": 0}},
    }
    canary = {
        "type": "object",
        "additionalProperties": False,
        "required": ["champion_version", "candidate_version", "mode"],
        "properties": common
        | {
            "mode": {"const": Mode.canary.value},
            "candidate_version": version,
            "candidate_weight": {"type": "integer", "minimum": 0, "maximum": 100},
        },
    }
    arm = {
        "type": "object",
        "additionalProperties": False,
        "required": ["version", "weight"],
        "properties": {
            "version": version,
            "weight": {"type": "integer", "minimum": 1, "maximum": 99},
            "stopped": {"type": "boolean"},
        },
    }
    experiment = {
        "type": "object",
        "additionalProperties": False,
        "required": ["champion_version", "mode", "arms", "release_id"],
        "properties": common
        | {
            "mode": {"const": Mode.experiment.value},
            "release_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "candidate_version": {"type": "null"},
            "candidate_weight": {"const": 0},
            "arms": {"type": "array", "minItems": 1, "maxItems": MAX_ARMS, "items": arm},
        },
    }
    for each in (single, shadow, canary):
        each["properties"] = cast("dict[str, Any]", each["properties"]) | {"arms": {"type": "null"}}
    return {"oneOf": [single, shadow, canary, experiment]}


def _op(
    summary: str,
    role: Role | None,
    errors: tuple[int, ...] = (),
    *,
    body: dict[str, Any] | None = None,
    ok: dict[str, Any] | None = None,
    ok_type: str = _JSON,
    unavailable: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An operation with every status it answers: 200, the `errors`, and 401/403 where a key is needed."""
    statuses = sorted(set(errors) | ({401, 403} if role is not None else set()))
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {ok_type: {"schema": ok or {"type": "object"}}}},
    }
    for status in statuses:
        response: dict[str, Any] = {
            "description": _STATUSES[status],
            "content": {_JSON: {"schema": unavailable if status == 503 and unavailable else _ERROR}},
        }
        if status == 503:
            response["headers"] = _RETRY_AFTER
        responses[str(status)] = response
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if role is not None:
        op["security"] = [{"bearer": []}]
        op["description"] = f"Needs an API key of role '{role}' (or 'admin')."
    if body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": body}}}
    if parameters:
        op["parameters"] = parameters
    return op


_READY = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
_INFERENCE_ERRORS = (400, 404, 413, 422, 500, 503, 504)


def document(gateway: Gateway) -> dict[str, Any]:
    """OpenAPI 3.1 for this gateway: generic endpoints plus per-model inference paths."""
    from releasegate import __version__

    max_rows = gateway.config.max_rows
    model_param = [
        {
            "name": "model",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": MODEL_NAME_PATTERN},
        }
    ]
    answer = {
        "type": "object",
        "required": ["predictions", "request_id", "model_version", "arm"],
        "properties": {
            "predictions": {"type": "array"},
            "request_id": {"type": "string"},
            "model_version": {"type": "string"},
            "arm": {"enum": ["champion", "candidate"]},
        },
    }
    finite = {"minimum": -sys.float_info.max, "maximum": sys.float_info.max}
    scalar = {"type": ["string", "number", "boolean"]} | finite
    feedback_item = {
        "type": "object",
        "additionalProperties": False,
        "required": ["request_id", "ground_truth"],
        "properties": {
            "request_id": _ANY_ID,
            # What the analysis reads: one label for the request, or one per input row.
            "ground_truth": {
                "oneOf": [scalar, {"type": "array", "minItems": 1, "maxItems": max_rows, "items": scalar}]
            },
            "business_value": {"type": ["number", "null"]} | finite,
        },
    }
    route = {"type": "object"}
    paths: dict[str, dict[str, Any]] = {
        "/feedback": {
            "post": _op(
                "Ground truth for earlier requests",
                Role.feedback,
                (400, 413, 422, 503),
                body={
                    "oneOf": [feedback_item, {"type": "array", "minItems": 1, "maxItems": 100, "items": feedback_item}]
                },
                ok={"type": "object", "required": ["accepted"], "properties": {"accepted": {"type": "integer"}}},
            )
        },
        "/admin/routes": {
            "get": _op(
                "Every route served, and the stored routes that failed to load (with why)",
                Role.admin,
                ok={"type": "object", "required": ["routes", "failed"]},
            )
        },
        "/admin/routes/{model}": {
            "get": _op("One model's route", Role.admin, (404,), ok=route, parameters=model_param),
            "put": _op(
                "Set a route: the versions are loaded, verified and warmed before it applies",
                Role.admin,
                (400, 404, 413, 422, 500),
                body=_route_body(),
                ok=route,
                parameters=model_param,
            ),
        },
        "/healthz": {"get": _op("Liveness", None)},
        "/readyz": {"get": _op("Readiness: the stored routes are loaded", None, (503,), ok=_READY, unavailable=_READY)},
        "/metrics": {"get": _op("Prometheus metrics", Role.metrics, ok={"type": "string"}, ok_type="text/plain")},
        "/openapi.json": {"get": _op("This document", Role.predict)},
        "/v2": {"get": _op("Open Inference Protocol server metadata", None)},
        "/v2/health/live": {"get": _op("Open Inference Protocol liveness", None)},
        "/v2/health/ready": {
            "get": _op("Open Inference Protocol readiness", None, (503,), ok=_READY, unavailable=_READY)
        },
    }
    version_param = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}]
    for model, active in sorted(gateway.routes.items()):
        schema = active.champion.schema
        paths[f"/models/{model}/invocations"] = {
            "post": _op(
                f"Predict with {model} (MLflow scoring payloads)",
                Role.predict,
                _INFERENCE_ERRORS,
                body=_invocations_body(schema, max_rows),
                ok=answer,
            )
        }
        paths[f"/v2/models/{model}/infer"] = {
            "post": _op(
                f"Predict with {model} (Open Inference Protocol v2)",
                Role.predict,
                _INFERENCE_ERRORS,
                body=_v2_body(schema),
            )
        }
        paths[f"/v2/models/{model}/versions/{{version}}/infer"] = {
            "post": _op(
                f"Predict with one served version of {model}, whatever the route's split (not a release exposure)",
                Role.predict,
                _INFERENCE_ERRORS,
                body=_v2_body(schema),
                parameters=version_param,
            )
        }
        paths[f"/v2/models/{model}/versions/{{version}}/ready"] = {
            "get": _op(
                f"{model}: one version's readiness (404: not served)",
                Role.predict,
                (404, 503),
                parameters=version_param,
            )
        }
        paths[f"/v2/models/{model}"] = {"get": _op(f"{model}: v2 model metadata", Role.predict, (404, 503))}
        paths[f"/v2/models/{model}/versions/{{version}}"] = {
            "get": _op(f"{model}: one served version's v2 metadata", Role.predict, (404, 503), parameters=version_param)
        }
        paths[f"/v2/models/{model}/ready"] = {
            "get": _op(f"{model}: v2 model readiness", Role.predict, (404, 503), unavailable={"type": "object"})
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "releasegate gateway", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
