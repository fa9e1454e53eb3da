"""Calls the gateway the way a Triton client user would, with tritonclient's HTTP defaults; prints the outcomes.

Run in the clients' own environment (.venv-clients) by tests/integration/test_oip_clients.py, which
passes on stdin {"url", "key", "model", "versions": {arm: version}, "rows": [records], "datatypes": {column:
v2 datatype}, "long_id"}
and checks the JSON this prints: {call: {"ok": true, "value": ...} or {"ok": false, "error": ...}}.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP64": np.float64, "FP32": np.float32, "BOOL": np.bool_}


def tensors(rows: list[dict], datatypes: dict[str, str], *, json: bool = False, **override: str) -> list:
    """One input per column, each set from a numpy array as the client's examples do: binary, the client's
    default, unless `json` (binary_data=False, as a client without the extension sends)."""
    inputs = []
    for name, datatype in datatypes.items():
        datatype = override.get(name, datatype)
        values = [r[name] for r in rows]
        if datatype == "BYTES":
            array = np.array([str(v).encode() for v in values], dtype=np.object_)
        else:
            array = np.array(values, dtype=NUMPY[datatype])
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        if json:
            tensor.set_data_from_numpy(array, binary_data=False)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def main() -> None:
    job = json.load(sys.stdin)
    client = httpclient.InferenceServerClient(url=job["url"].removeprefix("http://"))
    key = job["key"]

    def headers() -> dict[str, str]:  # a fresh dict a call: the client adds Inference-Header-Content-Length to it
        return {"Authorization": f"Bearer {key}"}

    model, rows, datatypes = job["model"], job["rows"], job["datatypes"]
    version = job["versions"]["champion"]
    out: dict[str, Any] = {}

    def call(name: str, fn) -> None:
        try:
            out[name] = {"ok": True, "value": fn()}
        except InferenceServerException as err:
            out[name] = {"ok": False, "status": err.status(), "error": err.message()}
        except Exception as err:  # a client-side failure to read the answer: what a user would see
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}

    call("server_live", lambda: client.is_server_live(headers=headers()))
    call("server_ready", lambda: client.is_server_ready(headers=headers()))
    call("server_metadata", lambda: client.get_server_metadata(headers=headers()))
    call("model_ready", lambda: client.is_model_ready(model, headers=headers()))
    call("model_ready_version", lambda: client.is_model_ready(model, model_version=version, headers=headers()))
    call("model_ready_other_version", lambda: client.is_model_ready(model, model_version="999", headers=headers()))
    call("model_metadata", lambda: client.get_model_metadata(model, headers=headers()))
    call("model_metadata_version", lambda: client.get_model_metadata(model, model_version=version, headers=headers()))

    def predict(version: str = "", request_id: str = "") -> dict:
        result = client.infer(
            model, tensors(rows, datatypes), model_version=version, request_id=request_id, headers=headers()
        )
        answer = result.get_response()
        return {
            "predict": result.as_numpy("predict").tolist(),
            "id": answer["id"],
            "version": answer["model_version"],
            "binary_output": "binary_data_size" in answer["outputs"][0].get("parameters", {}),
        }

    call("infer", predict)
    for arm, pinned in job["versions"].items():
        call(f"infer_{arm}_version", lambda v=pinned: predict(v))
    call("infer_other_version", lambda: predict("999"))

    def as_json() -> dict:
        result = client.infer(
            model,
            tensors(rows, datatypes, json=True),
            outputs=[httpclient.InferRequestedOutput("predict", binary_data=False)],
            headers=headers(),
        )
        return {"predict": result.as_numpy("predict").tolist(), "response": result.get_response()}

    call("infer_json", as_json)
    call("infer_long_id", lambda: predict(request_id=job["long_id"]))
    first_int = next(name for name, datatype in datatypes.items() if datatype == "INT64")
    call(
        "infer_wrong_datatype",
        lambda: client.infer(model, tensors(rows, datatypes, **{first_int: "BOOL"}), headers=headers()),
    )
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
