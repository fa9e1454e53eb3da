"""The compiled fast path: an sklearn model converted to ONNX (skl2onnx) and run by onnxruntime.

Why: the gateway's cost per request was the model's, not the server's. One `predict` of the
demo's sklearn pipeline (ColumnTransformer, OneHotEncoder, scaler, logistic regression) costs
3-5 ms whether it gets 1 row or 16, almost all of it sklearn's per-call checks and pandas column
indexing, and it holds the GIL. The same pipeline as an ONNX graph answers 16 rows in ~25 us
and releases the GIL while it runs. skl2onnx and onnxruntime are the maintained tools for
exactly this; nothing here re-implements a transformer.

Safety: the graph is built in memory from the model that was just loaded from the verified
directory (never from a file of its own), and it serves only if its labels equal sklearn's own
`predict` on the parity rows (the input example and the warm-up rows; a regressor's values within a
relative 1e-4, since the graph computes in float32). A model skl2onnx cannot
convert (a transformer without a converter, such as SplineTransformer), a pyfunc that is not a
plain sklearn `predict`, or a parity mismatch keeps the sklearn path; `reason` says which.
Numeric inputs go in as float32 (skl2onnx's converters mix float32 one-hot outputs with the
numeric branch), so probabilities differ from sklearn's by ~1e-7; a label can only differ for
a row that sits that close to the decision boundary. A missing number goes in as NaN, which is
how pandas hands it to sklearn; whether the graph may see one at all is the slot's parity check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from releasegate.serving.payloads import Schema

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

NUMERIC = frozenset({"boolean", "integer", "long", "float", "double"})
# A predict on the rows' column lists ({name: [value per row]}): one answer per row.
Predict: TypeAlias = Callable[[dict[str, list[Any]]], list[Any]]


@dataclass
class Compiled:
    """`predict(columns)` on the rows' column lists, or `predict is None` and `reason` says why not."""

    predict: Predict | None
    reason: str


class BeyondFloat32(ValueError):
    """A value of a double column the float32 graph cannot hold: the caller predicts with sklearn instead."""


def raw_sklearn(pyfunc: PyFuncModel) -> Any | None:
    """The sklearn estimator behind a pyfunc whose predict is the estimator's own `predict`, else None."""
    flavors = pyfunc.metadata.flavors
    if "sklearn" not in flavors or flavors.get("python_function", {}).get("predict_fn", "predict") != "predict":
        return None
    try:
        return pyfunc.get_raw_model()  # type: ignore[no-untyped-call]  # mlflow leaves it unannotated
    except NotImplementedError:
        return None


def compile_sklearn(estimator: Any, schema: Schema, parity: Callable[[Predict], str | None]) -> Compiled:
    """Convert `estimator` for the input `schema`; `parity(predict)` returns None when it agrees, else why not."""
    if estimator is None:
        return Compiled(None, "not a plain sklearn predict")
    if not schema.columns or any(c.kind not in NUMERIC | {"string"} for c in schema.columns):
        return Compiled(None, "no column signature of numbers and strings to type the ONNX inputs")
    try:
        import numpy as np
        import onnxruntime
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    except ImportError as err:
        return Compiled(None, f"skl2onnx/onnxruntime not installed ({err.name})")
    numeric = [c.kind in NUMERIC for c in schema.columns]
    inputs = [
        (c.name, FloatTensorType([None, 1]) if num else StringTensorType([None, 1]))
        for c, num in zip(schema.columns, numeric)
    ]
    from sklearn.base import is_classifier

    try:
        # A classifier's probabilities as a plain tensor, not a list of dicts; a regressor has no such option.
        options = {"zipmap": False} if is_classifier(estimator) else None
        graph = to_onnx(estimator, initial_types=inputs, options=options)
        session_options = onnxruntime.SessionOptions()
        # Batches are small; threads cost more than they save.
        session_options.intra_op_num_threads = session_options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            graph.SerializeToString(), session_options, providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # skl2onnx raises several types for "no converter / shape calculator for X"
        return Compiled(None, f"skl2onnx cannot convert it: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    label = session.get_outputs()[0].name
    names = [c.name for c in schema.columns]

    def predict(columns: dict[str, list[Any]]) -> list[Any]:
        feed = {}
        name = ""
        try:
            with np.errstate(over="raise"):  # once a call: entering it costs a column's conversion
                for name, num in zip(names, numeric):
                    values = columns[name]
                    if num:
                        if None in values:
                            values = [np.nan if v is None else v for v in values]
                        feed[name] = np.asarray(values, dtype=np.float32).reshape(-1, 1)
                    else:
                        column = np.empty((len(values), 1), dtype=object)
                        column[:, 0] = values
                        feed[name] = column
        except (FloatingPointError, OverflowError):
            # The graph computes in float32; sklearn, in float64, decides what such a value means.
            raise BeyondFloat32(name) from None
        labels: list[Any] = session.run([label], feed)[0].ravel().tolist()
        return labels

    problem = parity(predict)
    if problem:
        return Compiled(None, f"the ONNX graph disagrees with sklearn: {problem}")
    return Compiled(predict, "onnxruntime (skl2onnx)")
