"""The gateway's OpenAPI 3.1 document, built from the routes it serves right now.

Each served model gets its own inference paths whose request bodies list that model's columns
and types (from its MLflow signature), so a client generator or a fuzzer can make valid
requests, not only malformed ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from releasegate.serving.payloads import FLOAT32_MAX, INT_RANGE, V2_DATATYPES, Schema
from releasegate.serving.routing import RouteSpec

if TYPE_CHECKING:
    from releasegate.serving.gateway import Gateway

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_JSON = "application/json"


def _value(kind: str | None, required: bool) -> dict[str, Any]:
    schema: dict[str, Any]
    if kind in INT_RANGE:
        low, high = INT_RANGE[kind]
        schema = {"type": "integer", "minimum": low, "maximum": high}
    elif kind == "float":
        schema = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    elif kind == "double":
        schema = {"type": "number"}
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
                        "required": ["columns", "data"],
                        "properties": {
                            "columns": {"const": names},
                            "data": {"type": "array", "minItems": 1, "maxItems": max_rows, "items": row_list},
                        },
                    }
                },
            }
        )
        one_row = {
            "type": "object",
            "additionalProperties": False,
            "required": [c.name for c in schema.columns if c.required],
            "properties": {c.name: _value(c.kind, c.required) for c in schema.columns},
        }
        variants.append(
            {"type": "object", "additionalProperties": False, "required": ["inputs"], "properties": {"inputs": one_row}}
        )
    return {"oneOf": variants}


def _v2_body(schema: Schema) -> dict[str, Any]:
    tensors: dict[str, Any]
    if schema.columns is None:
        tensors = {"type": "object", "required": ["name", "shape", "datatype", "data"]}
    else:
        tensors = {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["name", "shape", "datatype", "data"],
                    "properties": {
                        "name": {"const": c.name},
                        "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
                        "datatype": {"const": V2_DATATYPES.get(c.kind, "BYTES")},
                        "data": {"type": "array", "items": _value(c.kind, c.required)},
                    },
                }
                for c in schema.columns
            ]
        }
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 64},
            "inputs": {"type": "array", "minItems": 1, "items": tensors},
        },
    }


def _op(
    summary: str,
    role: str | None,
    body: dict[str, Any] | None = None,
    ok: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": {_JSON: {"schema": ok or {"type": "object"}}}},
            "400": {"description": "Bad request: the body says what is wrong", "content": {_JSON: {"schema": _ERROR}}},
        },
    }
    if role is not None:
        op["security"] = [{"bearer": []}]
        op["description"] = f"Needs an API key of role '{role}' (or 'admin')."
        op["responses"]["401"] = {
            "description": "Missing, unknown or revoked key",
            "content": {_JSON: {"schema": _ERROR}},
        }
        op["responses"]["403"] = {
            "description": "The key's role may not do this",
            "content": {_JSON: {"schema": _ERROR}},
        }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {_JSON: {"schema": body}}}
    op.update(extra or {})
    return op


def document(gateway: Gateway) -> dict[str, Any]:
    """OpenAPI 3.1 for this gateway: generic endpoints plus per-model inference paths."""
    from releasegate import __version__

    max_rows = gateway.config.max_rows
    model_param = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
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
    feedback_item = {
        "type": "object",
        "additionalProperties": False,
        "required": ["request_id", "ground_truth"],
        "properties": {
            "request_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "ground_truth": {"type": ["integer", "number", "string", "boolean"]},
            "business_value": {"type": ["number", "null"]},
        },
    }
    paths: dict[str, dict[str, Any]] = {
        "/feedback": {
            "post": _op(
                "Ground truth for earlier requests",
                "feedback",
                {"oneOf": [feedback_item, {"type": "array", "minItems": 1, "maxItems": 100, "items": feedback_item}]},
            )
        },
        "/admin/routes": {"get": _op("Every route served", "admin")},
        "/admin/routes/{model}": {
            "get": _op("One model's route", "admin", extra={"parameters": model_param}),
            "put": _op(
                "Set a route: the versions are loaded, verified and warmed before it applies",
                "admin",
                RouteSpec.model_json_schema(),
                extra={"parameters": model_param},
            ),
        },
        "/healthz": {"get": _op("Liveness", None)},
        "/readyz": {"get": _op("Readiness: the stored routes are loaded", None)},
        "/v2": {"get": _op("Open Inference Protocol server metadata", None)},
        "/v2/health/live": {"get": _op("Open Inference Protocol liveness", None)},
        "/v2/health/ready": {"get": _op("Open Inference Protocol readiness", None)},
    }
    for model, active in sorted(gateway.routes.items()):
        schema = active.champion.schema
        paths[f"/models/{model}/invocations"] = {
            "post": _op(
                f"Predict with {model} (MLflow scoring payloads)",
                "predict",
                _invocations_body(schema, max_rows),
                answer,
            )
        }
        paths[f"/v2/models/{model}/infer"] = {
            "post": _op(f"Predict with {model} (Open Inference Protocol v2)", "predict", _v2_body(schema))
        }
        paths[f"/v2/models/{model}"] = {"get": _op(f"{model}: v2 model metadata", "predict")}
        paths[f"/v2/models/{model}/ready"] = {"get": _op(f"{model}: v2 model readiness", "predict")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "releasegate gateway", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
