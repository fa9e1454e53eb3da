"""Calls the gateway the way a KServe SDK user would (InferenceRESTClient, protocol v2, its defaults); prints
the outcomes.

Run in the clients' own environment (.venv-clients) by tests/integration/test_oip_clients.py, with the
same job on stdin as triton_calls.py and the same shape of answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP64": np.float64, "FP32": np.float32, "BOOL": np.bool_}


def request(model: str, rows: list[dict], datatypes: dict[str, str], request_id: str | None = None) -> InferRequest:
    inputs = []
    for name, datatype in datatypes.items():
        values = [r[name] for r in rows]
        if datatype == "BYTES":
            array = np.array([str(v).encode() for v in values], dtype=np.object_)
        else:
            array = np.array(values, dtype=NUMPY[datatype])
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)  # binary_data=True: the SDK's default
        inputs.append(tensor)
    return InferRequest(model_name=model, infer_inputs=inputs, request_id=request_id)


async def main() -> None:
    job = json.load(sys.stdin)
    url, model, rows, datatypes = job["url"], job["model"], job["rows"], job["datatypes"]
    headers = {"Authorization": f"Bearer {job['key']}"}
    out: dict[str, Any] = {}

    async def call(name: str, coro) -> None:
        try:
            out[name] = {"ok": True, "value": await coro}
        except httpx.HTTPStatusError as err:
            out[name] = {"ok": False, "status": err.response.status_code, "error": err.response.text}
        except Exception as err:  # a client-side failure to read the answer: what a user would see
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}

    async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:

        async def predict(request_id: str | None = None) -> dict:
            response = await client.infer(
                url, request(model, rows, datatypes, request_id), model, headers=dict(headers)
            )
            return {"predict": response.outputs[0].as_numpy().tolist(), "id": response.id}

        await call("server_live", client.is_server_live(url, headers=headers))
        await call("server_ready", client.is_server_ready(url, headers=headers))
        await call("model_ready", client.is_model_ready(url, model, headers=headers))
        await call("infer", predict())
        await call("infer_long_id", predict(job["long_id"]))
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    asyncio.run(main())
