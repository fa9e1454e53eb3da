"""The gateway's compiled fast path: ONNX only where it gives sklearn's own answers, sklearn otherwise."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from releasegate.demo import data, models
from releasegate.serving import compiled
from releasegate.serving.metrics import Metrics
from releasegate.serving.payloads import Column, Rows, Schema
from releasegate.serving.slots import Slot

SCHEMA = Schema(
    tuple(
        Column(
            c,
            "string"
            if c in data.CATEGORICAL
            else "double"
            if c in ("monthly_charges", "total_charges", "data_usage_gb")
            else "long",
        )
        for c in data.FEATURES
    )
)


@pytest.fixture(scope="module")
def frames():
    return data.generate(5000, seed=3), data.generate(3000, seed=4, drift=0.5)


def _fit(kind, train):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.build_pipeline(kind).fit(train[data.FEATURES], train[data.LABEL])


@pytest.mark.parametrize("kind", ["logistic_regression", "binned_logistic"])
def test_a_convertible_pipeline_answers_exactly_as_sklearn(frames, kind):
    train, live = frames
    pipe = _fit(kind, train)
    result = compiled.compile_sklearn(pipe, SCHEMA, lambda predict: None)
    assert result.predict is not None, result.reason
    got = result.predict(live[data.FEATURES].to_dict(orient="list"))
    assert got == pipe.predict(live[data.FEATURES]).tolist()  # 3,000 drifted rows, label for label


def test_an_unconvertible_pipeline_keeps_sklearn_and_says_why(frames):
    pipe = _fit("spline_logistic", frames[0])
    result = compiled.compile_sklearn(pipe, SCHEMA, lambda predict: None)
    assert result.predict is None and "SplineTransformer" in result.reason


def test_a_graph_that_disagrees_with_sklearn_is_not_used(frames):
    pipe = _fit("logistic_regression", frames[0])
    result = compiled.compile_sklearn(pipe, SCHEMA, lambda predict: "labels [1] against sklearn's [0]")
    assert result.predict is None and "disagrees" in result.reason


def test_no_column_signature_means_no_graph(frames):
    pipe = _fit("logistic_regression", frames[0])
    assert compiled.compile_sklearn(pipe, Schema(None), lambda p: None).predict is None
    assert compiled.compile_sklearn(None, SCHEMA, lambda p: None).reason == "not a plain sklearn predict"


def test_a_slot_serves_the_graph_and_falls_back_to_sklearn_for_missing_values(frames, tmp_path):
    """A real MLflow model directory, loaded as the gateway loads it; batches through the slot's batcher."""
    import mlflow.pyfunc
    import mlflow.sklearn

    train, live = frames
    pipe = _fit("logistic_regression", train)
    example = train[data.FEATURES].head(5)
    mlflow.sklearn.save_model(
        pipe,
        tmp_path / "model",
        input_example=example,
        signature=mlflow.models.infer_signature(example, pipe.predict(example)),
    )
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    schema = Schema.from_mlflow(pyfunc.metadata.get_input_schema())
    from concurrent.futures import ThreadPoolExecutor

    slot = Slot("m", "1", pyfunc, schema, Metrics(), ThreadPoolExecutor(2))
    slot.warm(Rows(example.to_dict(orient="list"), len(example)))
    assert slot.engine == "onnxruntime (skl2onnx)"

    rows = live[data.FEATURES].head(40).to_dict(orient="records")
    missing = dict(rows[0], total_charges=None)  # sklearn's pipeline decides what a missing value means

    async def serve():
        slot.start()
        answers = await asyncio.gather(*(slot.predict(Rows({k: [v] for k, v in row.items()}, 1), 30) for row in rows))
        with pytest.raises(Exception, match="NaN"):  # the sklearn path ran, not the graph
            await slot.predict(Rows({k: [v] for k, v in missing.items()}, 1), 30)
        slot.close()
        return answers

    answers = asyncio.run(serve())
    assert [a[0] for a in answers] == pipe.predict(live[data.FEATURES].head(40)).tolist()

    # A double beyond float32's range would be infinite in the graph: sklearn (float64) answers it instead.
    huge = dict(rows[1], total_charges=1e300)
    assert slot.call_fast([Rows({k: [v] for k, v in huge.items()}, 1)]) is None
    expected = pipe.predict(live[data.FEATURES].head(2).tail(1).assign(total_charges=1e300)).tolist()
    assert slot.call([Rows({k: [v] for k, v in huge.items()}, 1)]) == expected


def _slot_of(pipe, example, tmp_path, name: str, signature=None) -> Slot:
    """A real MLflow model directory, loaded and warmed as the gateway loads one."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow.pyfunc
    import mlflow.sklearn

    from releasegate.training import skops_trusted_types

    mlflow.sklearn.save_model(
        pipe,
        tmp_path / name,
        input_example=example,
        signature=signature or mlflow.models.infer_signature(example, pipe.predict(example)),
        serialization_format="skops",
        skops_trusted_types=skops_trusted_types(pipe),
    )
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / name))
    slot = Slot(
        "m", "1", pyfunc, Schema.from_mlflow(pyfunc.metadata.get_input_schema()), Metrics(), ThreadPoolExecutor(2)
    )
    slot.warm(Rows(example.to_dict(orient="list"), len(example)))
    return slot


def test_a_regressor_is_served_by_its_graph_within_float32_of_sklearn(frames, tmp_path):
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    train, live = frames
    pipe = Pipeline(
        [
            (
                "features",
                ColumnTransformer(
                    [
                        ("n", StandardScaler(), data.NUMERIC),
                        ("c", OneHotEncoder(handle_unknown="ignore"), data.CATEGORICAL),
                    ]
                ),
            ),
            ("model", Ridge()),
        ]
    ).fit(train[data.FEATURES], train["monthly_charges"] * 12.5)
    slot = _slot_of(pipe, train[data.FEATURES].head(20), tmp_path, "ridge")
    assert slot.engine == "onnxruntime (skl2onnx)"
    got = slot.call_fast([Rows(live[data.FEATURES].head(200).to_dict(orient="list"), 200)])
    want = pipe.predict(live[data.FEATURES].head(200))
    assert got == pytest.approx(want.tolist(), rel=1e-4)


def test_an_optional_column_left_out_takes_the_graph_only_where_sklearn_answers_it_the_same(frames, tmp_path):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec
    from mlflow.types.schema import Schema as MlflowSchema
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    train, live = frames
    numeric = ["age", "tenure_months", "monthly_charges"]
    signature = ModelSignature(
        MlflowSchema(
            [
                ColSpec("long", "age"),
                ColSpec("long", "tenure_months"),
                ColSpec("double", "monthly_charges", required=False),
            ]
        ),
        MlflowSchema([ColSpec("long")]),
    )
    imputed = Pipeline(
        [
            ("impute", ColumnTransformer([("i", SimpleImputer(strategy="median"), numeric)])),
            ("model", LogisticRegression(max_iter=500)),
        ]
    ).fit(train[numeric], train[data.LABEL])
    bare = LogisticRegression(max_iter=500).fit(train[numeric], train[data.LABEL])
    rows = live[numeric].head(50).to_dict(orient="list")
    rows["monthly_charges"] = [None] * 50
    with_imputer = _slot_of(imputed, train[numeric].head(5), tmp_path, "imputed", signature)
    answers = with_imputer.call_fast([Rows(rows, 50)])
    assert answers == with_imputer.call([Rows(rows, 50)])  # the graph answers the missing value as sklearn does
    without = _slot_of(bare, train[numeric].head(5), tmp_path, "bare", signature)
    assert without.call_fast([Rows(rows, 50)]) is None  # sklearn refuses NaN here: the slot goes its way


def test_a_request_that_arrives_while_the_batcher_wakes_shares_its_graph_call(frames, tmp_path):
    """At saturation the event loop reads several connections a turn: a request queued in the turn the batcher is
    woken for the one before it joins that call instead of paying one of its own."""
    train, live = frames
    slot = _slot_of(_fit("logistic_regression", train), train[data.FEATURES].head(5), tmp_path, "turns")
    assert slot.engine == "onnxruntime (skl2onnx)"
    graph, calls = slot._fast, []

    def counted(columns):
        calls.append(len(next(iter(columns.values()))))
        return graph(columns)

    slot._fast = counted
    first, second = (
        Rows({k: [v] for k, v in row.items()}, 1) for row in live[data.FEATURES].head(2).to_dict("records")
    )

    async def serve():
        slot.start()
        asked: list[asyncio.Task] = [asyncio.ensure_future(slot.predict(first, 30))]
        # Queued after the first request's task: it runs in the turn the first request's wake-up of the batcher
        # is answered in, as a second connection read in the same turn would.
        asyncio.get_running_loop().call_soon(lambda: asked.append(asyncio.ensure_future(slot.predict(second, 30))))
        while len(asked) < 2:
            await asyncio.sleep(0)
        answers = await asyncio.gather(*asked)
        slot.close()
        return answers

    answers = asyncio.run(serve())
    assert calls == [2]
    assert [a[0] for a in answers] == slot.call([Rows(live[data.FEATURES].head(2).to_dict(orient="list"), 2)])
