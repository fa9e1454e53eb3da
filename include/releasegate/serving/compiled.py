"""The compiled fast path: an sklearn model converted to ONNX (skl2onnx) and run by onnxruntime.

Why: the gateway's cost per request was the model's, not the server's. One `predict` of the
demo's sklearn pipeline (ColumnTransformer, OneHotEncoder, scaler, logistic regression) costs
3-5 ms whether it gets 1 row or 16, almost all of it sklearn's per-call checks and pandas column
indexing, and it holds the GIL. The same pipeline as an ONNX graph answers 16 rows in ~25 us
and releases the GIL while it runs. skl2onnx and onnxruntime are the maintained tools for
exactly this; nothing here re-implements a transformer.

Safety: the graph is built in memory from the model that was just loaded from the verified
directory (never from a file of its own), and it serves only if its labels equal sklearn's own
`predict` on the parity rows (the input example and the warm-up rows). A model skl2onnx cannot
convert (a transformer without a converter, such as SplineTransformer), a pyfunc that is not a
plain sklearn `predict`, or a parity mismatch keeps the sklearn path; `reason` says which.
Numeric inputs go in as float32 (skl2onnx's converters mix float32 one-hot outputs with the
numeric branch), so probabilities differ from sklearn's by ~1e-7; a label can only differ for
a row that sits that close to the decision boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from releasegate.serving.payloads import Schema

_NUMERIC = {"boolean", "integer", "long", "float", "double"}


@dataclass
class Compiled:
    """`predict(columns)` on the rows' column lists, or `predict is None` and `reason` says why not."""

    predict: Callable[[dict[str, list]], list] | None
    reason: str


def raw_sklearn(pyfunc) -> Any | None:
    """The sklearn estimator behind a pyfunc whose predict is the estimator's own `predict`, else None."""
    flavors = pyfunc.metadata.flavors
    if "sklearn" not in flavors or flavors.get("python_function", {}).get("predict_fn", "predict") != "predict":
        return None
    try:
        return pyfunc.get_raw_model()
    except NotImplementedError:
        return None


def compile_sklearn(estimator, schema: Schema, parity: Callable[[Callable], str | None]) -> Compiled:
    """Convert `estimator` for the input `schema`; `parity(predict)` returns None when it agrees, else why not."""
    if estimator is None:
        return Compiled(None, "not a plain sklearn predict")
    if not schema.columns or any(c.kind not in _NUMERIC | {"string"} for c in schema.columns):
        return Compiled(None, "no column signature of numbers and strings to type the ONNX inputs")
    try:
        import numpy as np
        import onnxruntime
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    except ImportError as err:
        return Compiled(None, f"skl2onnx/onnxruntime not installed ({err.name})")
    numeric = [c.kind in _NUMERIC for c in schema.columns]
    inputs = [(c.name, FloatTensorType([None, 1]) if num else StringTensorType([None, 1]))
              for c, num in zip(schema.columns, numeric)]
    try:
        graph = to_onnx(estimator, initial_types=inputs, options={"zipmap": False})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # batches are small; threads cost more
        session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # skl2onnx raises several types for "no converter / shape calculator for X"
        return Compiled(None, f"skl2onnx cannot convert it: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    label = session.get_outputs()[0].name
    names = [c.name for c in schema.columns]

    def predict(columns: dict[str, list]) -> list:
        feed = {}
        for name, num in zip(names, numeric):
            values = columns[name]
            if num:
                feed[name] = np.asarray(values, dtype=np.float32).reshape(-1, 1)
            else:
                column = np.empty((len(values), 1), dtype=object)
                column[:, 0] = values
                feed[name] = column
        return session.run([label], feed)[0].ravel().tolist()

    problem = parity(predict)
    if problem:
        return Compiled(None, f"the ONNX graph disagrees with sklearn: {problem}")
    return Compiled(predict, "onnxruntime (skl2onnx)")
