"""The gateway as a real process on loopback, serving signed sklearn models from a real MLflow store."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa

from releasegate import storage
from releasegate.serving import auth, routing
from tests.integration.conftest import gateway_process
from tests.ports import free_port
from tests.waiting import gateway_ready, wait_until

pytestmark = pytest.mark.integration
MODEL = "gw"
SLOW = "gw-slow"  # a second model, slow to load
ADMIN = "rg-test-admin-key-0123456789abcdef"
REGIONS = ["north", "south", "east", "west"]
FLAKY_RATE = 0.1


class Erratic:
    """A candidate that fails on cue: age 77 raises, 78 is too slow, 79 answers with the wrong shape."""

    def predict(self, context, model_input, params=None):
        age = model_input["age"]
        if (age == 77).any():
            raise RuntimeError("erratic model refuses age 77")
        if (age == 78).any():
            time.sleep(2)
        if (age == 79).any():
            return [1] * (len(model_input) + 1)
        return [1] * len(model_input)


class Flaky:
    """A model failing FLAKY_RATE of its calls at random; never its first, which is the gateway's warm-up."""

    def load_context(self, context):
        self.calls = 0  # logging the model called predict, and saved the count with it

    def predict(self, context, model_input, params=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 1 and random.random() < FLAKY_RATE:
            raise RuntimeError("flaky model failed this call")
        return [1] * len(model_input)


class SlowToLoad:
    """A model whose loading (its first predict: the gateway's warm-up) waits until the file named by
    $GW_TEST_LOAD_GATE exists; without the variable it does not wait."""

    def load_context(self, context):
        self.warm = False  # logging the model called predict, and saved `warm` with it

    def predict(self, context, model_input, params=None):
        gate, deadline = os.environ.get("GW_TEST_LOAD_GATE"), time.time() + 120
        while gate and not getattr(self, "warm", True) and not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.05)
        self.warm = True
        return [0] * len(model_input)


def _frame(n: int, seed: int):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 70, n).astype("int64"),
            "income": rng.normal(50_000, 15_000, n).round(2),
            "region": rng.choice(REGIONS, n),
        }
    )
    label = ((frame["income"] > 50_000) ^ (frame["region"] == "west")).astype("int64")
    return frame, label


def _register(settings) -> dict[str, str]:
    """v1 champion, v2 candidate, v3 erratic candidate (all signed); v4 unsigned; v5 signed then tampered;
    v6 flaky, v7 narrow (no region), v8 wide (an optional tenure), all signed; and gw-slow v1, signed."""
    import cloudpickle
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec
    from mlflow.types import Schema as MlflowSchema
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from releasegate import signing

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)

    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # registered_model_name= registers there
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.create_experiment("gateway-test", artifact_location=settings.mlflow_artifact_root.as_uri())
    frame, label = _frame(500, seed=1)
    example = frame.head(3)

    def sklearn_version(estimator) -> str:
        pre = ColumnTransformer(
            [("num", StandardScaler(), ["age", "income"]), ("cat", OneHotEncoder(handle_unknown="ignore"), ["region"])]
        )
        pipe = make_pipeline(pre, estimator).fit(frame, label)
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.sklearn.log_model(
                pipe,
                name="model",
                registered_model_name=MODEL,
                input_example=example,
                pip_requirements=["scikit-learn"],
            )
        return str(info.registered_model_version)

    versions = {
        "champion": sklearn_version(LogisticRegression()),
        "candidate": sklearn_version(LogisticRegression(C=0.001)),
    }
    cloudpickle.register_pickle_by_value(sys.modules[Erratic.__module__])

    def pyfunc_version(cls, model: str = MODEL) -> str:
        methods = {name: value for name, value in vars(cls).items() if not name.startswith("__")}
        python_model = type(cls.__name__, (mlflow.pyfunc.PythonModel,), methods)
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model(),
                registered_model_name=model,
                input_example=example,
                pip_requirements=["mlflow"],
            )
        return str(info.registered_model_version)

    versions["erratic"] = pyfunc_version(Erratic)
    versions["unsigned"] = sklearn_version(LogisticRegression(C=0.5))
    versions["tampered"] = sklearn_version(LogisticRegression(C=0.1))
    versions["flaky"] = pyfunc_version(Flaky)
    with mlflow.start_run(experiment_id=experiment):  # a candidate that no longer uses region
        narrow = make_pipeline(StandardScaler(), LogisticRegression()).fit(frame[["age", "income"]], label)
        info = mlflow.sklearn.log_model(
            narrow,
            name="model",
            registered_model_name=MODEL,
            input_example=example[["age", "income"]],
            pip_requirements=["scikit-learn"],
        )
    versions["narrow"] = str(info.registered_model_version)
    with mlflow.start_run(experiment_id=experiment):  # a candidate that also reads tenure, where callers send it
        wide_frame = frame.assign(tenure=[None if i % 4 == 0 else float(i % 60) for i in range(len(frame))])
        pre = ColumnTransformer(
            [
                ("num", StandardScaler(), ["age", "income"]),
                ("tenure", make_pipeline(SimpleImputer(), StandardScaler()), ["tenure"]),
                ("cat", OneHotEncoder(handle_unknown="ignore"), ["region"]),
            ]
        )
        wide = make_pipeline(pre, LogisticRegression()).fit(wide_frame, label)
        signature = ModelSignature(
            inputs=MlflowSchema(
                [
                    ColSpec("long", "age"),
                    ColSpec("double", "income"),
                    ColSpec("string", "region"),
                    ColSpec("double", "tenure", required=False),
                ]
            ),
            outputs=MlflowSchema([ColSpec("long")]),
        )
        info = mlflow.sklearn.log_model(
            wide,
            name="model",
            registered_model_name=MODEL,
            signature=signature,
            input_example=example.assign(tenure=[3.0, 14.0, 40.0]),
            pip_requirements=["scikit-learn"],
            skops_trusted_types=["numpy.dtype"],
        )  # the imputer's, in skops' format
    versions["wide"] = str(info.registered_model_version)
    versions["slow"] = pyfunc_version(SlowToLoad, model=SLOW)
    for role in ("champion", "candidate", "erratic", "tampered", "flaky", "narrow", "wide"):
        signing.sign_version(MODEL, versions[role], settings)
    signing.sign_version(SLOW, versions["slow"], settings)
    artifacts = mlflow.get_logged_model(
        mlflow.MlflowClient().get_model_version(MODEL, versions["tampered"]).source.removeprefix("models:/")
    )
    serialized = next(Path(artifacts.artifact_location.removeprefix("file://")).rglob("model.*"))  # .skops/.pkl
    serialized.write_bytes(serialized.read_bytes() + b"\0")
    return versions


class Gateway:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, versions: dict, settings):
        self.url, self.proc, self.log_path, self.versions, self.settings = url, proc, log, versions, settings
        self.client = httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"})

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def put_route(self, **body) -> httpx.Response:
        body.setdefault("candidate_version", None)
        return self.client.put(f"/admin/routes/{MODEL}", json=body)

    def invoke(self, rows: list[dict], **headers) -> httpx.Response:
        return self.client.post(f"/models/{MODEL}/invocations", json={"dataframe_records": rows}, headers=headers)

    def predictions(self, request_ids, expected: int, timeout: float = 10) -> list:
        """Logged rows of these requests, once at least `expected` of them are written."""
        table = storage.predictions
        query = sa.select(table).where(table.c.request_id.in_(list(request_ids))).order_by(table.c.id)
        deadline = time.time() + timeout
        while True:
            with storage.engine(self.settings.db_url).connect() as conn:
                rows = conn.execute(query).all()
            if len(rows) >= expected or time.time() > deadline:
                return rows
            time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("gateway")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        mp.setenv("RELEASEGATE_GATEWAY_POLL_INTERVAL", "0.2")
        mp.setenv("RELEASEGATE_GATEWAY_CANDIDATE_TIMEOUT", "0.5")
        # An erratic candidate's failures here come in bursts: a short cool-down keeps the tests quick.
        mp.setenv("RELEASEGATE_GATEWAY_BREAKER_COOLDOWN", "1")
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            mp.delenv(name, raising=False)  # the gateway's own defaults, whatever runs the tests
        from releasegate import signing
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        versions = _register(settings)
        try:
            with gateway_process(home, port) as (proc, log):
                gw = Gateway(f"http://127.0.0.1:{port}", proc, log, versions, settings)
                try:
                    # The first load imports MLflow and sklearn in the gateway: slow on a busy machine.
                    resp = gw.client.put(
                        f"/admin/routes/{MODEL}", json={"champion_version": versions["champion"]}, timeout=180
                    )
                    assert resp.status_code == 200, resp.text
                    yield gw
                finally:
                    gw.client.close()
        finally:
            storage.dispose_all()


def rows(n: int, seed: int = 2) -> list[dict]:
    return _frame(n, seed)[0].to_dict(orient="records")


def logged_form(settings, records: list[dict]) -> list[dict]:
    """The records as the log holds them under the default classification: text pseudonymised, numbers as sent."""
    from releasegate.privacy import Classification, Protector
    from releasegate.serving.payloads import Rows

    columns = {name: [r[name] for r in records] for name in records[0]}
    logged = Protector.of(settings).rows(Rows(columns, len(records)), Classification()).columns
    return [{name: values[i] for name, values in logged.items()} for i in range(len(records))]


def test_single_mode_answers_both_protocols_and_logs_every_row(gateway):
    sent = rows(3)
    resp = gateway.client.post(
        f"/models/{MODEL}/invocations",
        headers={"x-request-id": "single-split"},
        json={"dataframe_split": {"columns": list(sent[0]), "data": [list(r.values()) for r in sent]}},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["request_id"] == "single-split" and body["arm"] == "champion"
    assert body["model_version"] == gateway.versions["champion"] and len(body["predictions"]) == 3

    v2 = {
        "inputs": [
            {"name": name, "shape": [2], "datatype": dtype, "data": [r[name] for r in sent[:2]]}
            for name, dtype in (("age", "INT64"), ("income", "FP64"), ("region", "BYTES"))
        ]
    }
    resp = gateway.client.post(f"/v2/models/{MODEL}/infer", json=v2)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["model_name"] == MODEL and out["arm"] == "champion"
    assert out["outputs"][0]["shape"] == [2] and out["outputs"][0]["data"] == body["predictions"][:2]

    logged = gateway.predictions(["single-split", out["request_id"]], expected=5)
    assert len(logged) == 5
    first = [r for r in logged if r.request_id == "single-split"]
    assert [orjson.loads(r.inputs) for r in first] == logged_form(gateway.settings, sent)
    assert all(orjson.loads(r.inputs)["region"].startswith("p:") for r in logged)  # text: pseudonymised by default
    assert [orjson.loads(r.outputs) for r in first] == body["predictions"]
    assert all(r.served and not r.fallback and r.status == "ok" and r.mode == "single" for r in logged)
    assert {r.key_id for r in logged} == {auth.ADMIN_KEY_ID}  # who called: the admin key of the environment
    assert first[0].sample_bucket == routing.sample_bucket("single-split")
    assert first[0].routing_key_hash == routing.routing_key_hash(
        MODEL, "single-split", routing.routing_secret(gateway.settings)
    )


def test_a_models_classification_decides_what_the_log_holds_of_each_column(gateway):
    """The registered-model tag, read when the route is applied: a dropped column is not logged, an encrypted one
    only as ciphertext the deployment's key opens, a public one as sent; a malformed tag is refused (422) and the
    route served before stays."""
    from releasegate import registry
    from releasegate.contract import CLASSIFICATION_TAG
    from releasegate.privacy import Protector

    client = registry.client(gateway.settings)
    champion = gateway.versions["champion"]
    client.set_registered_model_tag(
        MODEL, CLASSIFICATION_TAG, '{"columns": {"age": "drop", "income": "encrypt"}, "strings": "public"}'
    )
    try:
        assert gateway.put_route(champion_version=champion, mode="single").status_code == 200
        sent = rows(3, seed=31)
        ids = [f"classified-{i}" for i in range(len(sent))]
        for rid, row in zip(ids, sent):
            assert gateway.invoke([row], **{"x-request-id": rid}).status_code == 200
        logged = {r.request_id: orjson.loads(r.inputs) for r in gateway.predictions(ids, expected=len(ids))}
        protector = Protector.of(gateway.settings)
        for rid, row in zip(ids, sent):
            assert set(logged[rid]) == {"income", "region"} and logged[rid]["region"] == row["region"]
            assert (
                logged[rid]["income"].startswith("e:k1:") and protector.decrypt(logged[rid]["income"]) == row["income"]
            )

        client.set_registered_model_tag(MODEL, CLASSIFICATION_TAG, '{"columns": {"age": "hide"}}')
        refused = gateway.put_route(champion_version=champion, mode="single")
        assert refused.status_code == 422 and CLASSIFICATION_TAG in refused.json()["error"], refused.text
        assert gateway.client.get(f"/admin/routes/{MODEL}").json()["champion_version"] == champion
    finally:
        client.delete_registered_model_tag(MODEL, CLASSIFICATION_TAG)
        assert gateway.put_route(champion_version=champion, mode="single").status_code == 200


def test_shadow_writes_two_rows_per_request_and_serves_only_the_champion(gateway):
    v = gateway.versions
    resp = gateway.put_route(
        champion_version=v["champion"], candidate_version=v["candidate"], mode="shadow", release_id="rel-shadow"
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["mode"] == "shadow"
    ids = []
    for i, row in enumerate(rows(20, seed=3)):
        resp = gateway.invoke([row], **{"x-request-id": f"shadow-{i}"})
        assert resp.json()["arm"] == "champion" and resp.json()["model_version"] == v["champion"]
        ids.append(f"shadow-{i}")
    logged = gateway.predictions(ids, expected=40)
    assert len(logged) == 40
    for rid in ids:
        pair = {r.arm: r for r in logged if r.request_id == rid}
        assert pair["champion"].served and not pair["candidate"].served
        assert pair["candidate"].version == v["candidate"] and pair["candidate"].status == "ok"
        assert pair["candidate"].release_id == "rel-shadow" and pair["candidate"].mode == "shadow"


def test_canary_split_follows_the_weight_and_is_sticky(gateway):
    v = gateway.versions
    resp = gateway.put_route(
        champion_version=v["champion"],
        candidate_version=v["candidate"],
        mode="canary",
        candidate_weight=30,
        release_id="rel-canary",
    )
    assert resp.status_code == 200, resp.text
    sample = rows(1)
    arms = {}
    secret = routing.routing_secret(gateway.settings)  # the gateway's, made in its home
    for i in range(300):
        key = f"customer-{i}"
        arm = gateway.invoke(sample, **{"x-routing-key": key}).json()["arm"]
        assert arm == ("candidate" if routing.bucket(MODEL, key, secret) < 30 else "champion")
        arms[key] = arm
    share = sum(a == "candidate" for a in arms.values()) / len(arms)
    assert 0.2 < share < 0.4
    again = [gateway.invoke(sample, **{"x-routing-key": f"customer-{i}"}).json()["arm"] for i in range(20)]
    assert again == [arms[f"customer-{i}"] for i in range(20)]


@pytest.mark.parametrize(
    "age, status, error",
    [
        (77, "error", "erratic model refuses age 77"),
        (78, "timeout", "took longer than 0.5s"),
        (79, "error", "returned 2 predictions for 1 rows"),
    ],
)
def test_failing_candidate_falls_back_to_the_champion(gateway, age, status, error):
    v = gateway.versions
    resp = gateway.put_route(
        champion_version=v["champion"], candidate_version=v["erratic"], mode="canary", candidate_weight=100
    )
    assert resp.status_code == 200, resp.text
    row = rows(1)[0] | {"age": age}
    resp = gateway.invoke([row], **{"x-request-id": f"erratic-{age}"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["arm"] == "champion" and resp.json()["model_version"] == v["champion"]
    logged = {r.arm: r for r in gateway.predictions([f"erratic-{age}"], expected=2)}
    assert logged["candidate"].status == status and error in logged["candidate"].error
    assert not logged["candidate"].served and logged["candidate"].outputs is None
    assert logged["champion"].served and logged["champion"].fallback
    # After a timeout the slow call still holds the candidate's batcher until it ends: wait for an answer of its.
    wait_until(
        lambda: gateway.invoke([rows(1)[0] | {"age": 30}]).json()["arm"] == "candidate",
        timeout=30,
        what="the candidate answering again",
    )
    assert "releasegate_gateway_fallbacks_total" in gateway.client.get("/metrics").text


def test_feedback_is_stored(gateway):
    resp = gateway.client.post(
        "/feedback",
        json=[
            {"request_id": "single-split", "ground_truth": 1},
            {"request_id": "shadow-1", "ground_truth": 0, "business_value": 12.5},
        ],
    )
    assert resp.status_code == 200 and resp.json() == {"accepted": 2}
    table = storage.feedback
    deadline = time.time() + 10
    while True:
        with storage.engine(gateway.settings.db_url).connect() as conn:
            stored = conn.execute(sa.select(table).order_by(table.c.id)).all()
        if len(stored) >= 2 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert [(r.request_id, orjson.loads(r.ground_truth), r.business_value) for r in stored] == [
        ("single-split", 1, None),
        ("shadow-1", 0, 12.5),
    ]
    bad = gateway.client.post("/feedback", json={"request_id": "x"})
    assert bad.status_code == 422 and "ground_truth is required" in bad.json()["error"]


def test_feedback_is_stored_in_the_form_its_requests_model_declares(gateway):
    """A model whose classification encrypts labels and drops business values: its requests' feedback is stored
    so; feedback for a request this gateway never served gets the strictest classes of the models it serves
    (fail closed); the label opens with the deployment's key, as a verdict reads it."""
    from releasegate import registry
    from releasegate.contract import CLASSIFICATION_TAG
    from releasegate.privacy import Protector, open_truths

    client = registry.client(gateway.settings)
    champion = gateway.versions["champion"]
    tag = '{"feedback": {"ground_truth": "encrypt", "business_value": "drop"}}'
    client.set_registered_model_tag(MODEL, CLASSIFICATION_TAG, tag)
    try:
        assert gateway.put_route(champion_version=champion, mode="single").status_code == 200
        assert gateway.invoke(rows(1, seed=41), **{"x-request-id": "labelled-encrypted"}).status_code == 200
        sent = [
            {"request_id": "labelled-encrypted", "ground_truth": 1, "business_value": 30.0},
            {"request_id": "never-served-here", "ground_truth": "churned", "business_value": 7.5},
        ]
        assert gateway.client.post("/feedback", json=sent).json() == {"accepted": 2}
        table = storage.feedback
        ids = [item["request_id"] for item in sent]

        def stored() -> list:
            with storage.engine(gateway.settings.db_url).connect() as conn:
                found = conn.execute(sa.select(table).where(table.c.request_id.in_(ids)).order_by(table.c.id)).all()
            return found if len(found) == 2 else []

        logged = wait_until(stored, timeout=10, every=0.1, what="both feedback items stored")
        assert all(r.ground_truth.startswith('"e:k1:') and r.business_value is None for r in logged), logged
        assert open_truths([r.ground_truth for r in logged], Protector.of(gateway.settings)) == ["1", '"churned"']
    finally:
        client.delete_registered_model_tag(MODEL, CLASSIFICATION_TAG)
        assert gateway.put_route(champion_version=champion, mode="single").status_code == 200


@pytest.mark.parametrize("role, status", [("unsigned", 422), ("tampered", 422), ("missing", 404)])
def test_unverifiable_version_is_refused_and_the_old_route_keeps_serving(gateway, role, status):
    from releasegate.backends import DeploymentError, SignatureRefused
    from releasegate.backends.local import LocalBackend
    from releasegate.contract import ErrorCode

    v = gateway.versions
    assert gateway.put_route(champion_version=v["champion"], mode="single").status_code == 200
    before = gateway.client.get(f"/admin/routes/{MODEL}").json()
    version = v.get(role, "99")
    resp = gateway.put_route(champion_version=v["champion"], candidate_version=version, mode="shadow")
    assert resp.status_code == status, resp.text
    assert f"{MODEL} v{version}" in resp.json()["error"]
    if role != "missing":
        assert "signature verification failed" in resp.json()["error"]
        assert resp.json()["code"] == ErrorCode.signature_refused  # what the backend tells a refusal by
        with pytest.raises(SignatureRefused, match="signature"):
            LocalBackend(gateway.url, ADMIN).set_route(MODEL, v["champion"], version, "shadow", 0)
    else:
        with pytest.raises(DeploymentError) as missing:
            LocalBackend(gateway.url, ADMIN).set_route(MODEL, v["champion"], version, "shadow", 0)
        assert not isinstance(missing.value, SignatureRefused)
    applied = LocalBackend(gateway.url, ADMIN).get_route(MODEL)
    assert (applied.champion_version, applied.candidate_version, applied.mode, applied.revision) == (
        before["champion_version"],
        before["candidate_version"],
        before["mode"],
        before["revision"],
    )
    assert gateway.invoke(rows(1)).json()["model_version"] == v["champion"]


def test_keys_and_roles_are_enforced(gateway):
    _, predict_key = auth.create_key("predict", gateway.settings)
    feedback_id, feedback_key = auth.create_key("feedback", gateway.settings)
    url = f"{gateway.url}/models/{MODEL}/invocations"
    body = {"dataframe_records": rows(1)}

    def post(target, key=None, **kw):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.post(target, headers=headers, timeout=10, **kw)

    # The gateway's poller picks new keys up.
    wait_until(lambda: post(url, predict_key, json=body).status_code != 401, timeout=30, what="the new key known")

    assert post(url, json=body).status_code == 401
    assert post(url, "rg_0000_wrong", json=body).status_code == 401
    assert post(url, predict_key, json=body).status_code == 200
    assert post(url, feedback_key, json=body).status_code == 403
    assert post(f"{gateway.url}/feedback", feedback_key, json={"request_id": "a", "ground_truth": 1}).status_code == 200
    denied = httpx.get(f"{gateway.url}/admin/routes", headers={"authorization": f"Bearer {predict_key}"})
    assert denied.status_code == 403 and "needs 'admin'" in denied.json()["error"]
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    assert httpx.get(f"{gateway.url}/metrics").status_code == 401
    assert post(url, predict_key, json=body).json()["model_version"]  # predict keys: logged under their id

    auth.revoke_key(feedback_id, gateway.settings)
    revoked = wait_until(
        lambda: (
            (
                r := post(f"{gateway.url}/feedback", feedback_key, json={"request_id": "a", "ground_truth": 1})
            ).status_code
            == 401
            and r
        ),
        timeout=30,
        what="the revocation seen",
    )
    assert revoked.status_code == 401 and "revoked" in revoked.json()["error"]


def test_malformed_input_gets_a_4xx_saying_what_is_wrong(gateway):
    good = rows(1)[0]
    url = f"/models/{MODEL}/invocations"
    cases = [
        (gateway.client.post(url, content=b"{not json"), 400, "malformed JSON"),
        (gateway.client.post("/models/nope/invocations", json={"dataframe_records": [good]}), 404, "'nope'"),
        (gateway.client.post(url, json={"records": [good]}), 400, "dataframe_split"),
        (gateway.invoke([{"age": 30, "income": 1.0}]), 422, "missing column(s) 'region'"),
        (gateway.invoke([good | {"age": "old"}]), 422, "column 'age' row 0 expects an integer"),
        (
            gateway.client.post(url, content=b'{"dataframe_records": [{"age": 3, "income": NaN, "region": "x"}]}'),
            422,
            "column 'income' row 0 is null/NaN",
        ),
        (gateway.invoke([good] * 1001), 413, "1001 rows"),
        (gateway.client.post(url, content=b" " * (1 << 20 + 1)), 413, "exceeds the limit"),
        (
            gateway.client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{"name": "age", "data": [1]}]}),
            400,
            "shape",
        ),
    ]
    for resp, status, message in cases:
        assert resp.status_code == status and message in resp.json()["error"], (status, message, resp.text)


def _ignored_columns(gateway) -> float:
    found = re.search(
        rf'^releasegate_gateway_ignored_columns_total{{model="{MODEL}"}} (\S+)$',
        gateway.client.get("/metrics").text,
        re.M,
    )
    return float(found.group(1)) if found else 0.0


def test_the_champion_ignores_a_column_it_does_not_declare(gateway):
    assert gateway.put_route(champion_version=gateway.versions["champion"], mode="single").status_code == 200
    good = rows(1, seed=20)[0]
    before = _ignored_columns(gateway)
    plain = gateway.invoke([good])
    extra = gateway.invoke([good | {"zip": "12345"}], **{"x-request-id": "extra-zip"})
    assert extra.status_code == 200, extra.text
    assert extra.json()["predictions"] == plain.json()["predictions"]
    [logged] = gateway.predictions(["extra-zip"], expected=1)
    assert (
        logged.status == "ok" and orjson.loads(logged.inputs) == logged_form(gateway.settings, [good])[0]
    )  # ignored: not logged either
    assert _ignored_columns(gateway) == before + 1


def test_a_candidate_that_dropped_a_column_serves_while_callers_still_send_it(gateway):
    v = gateway.versions
    before = _ignored_columns(gateway)
    sent = rows(10, seed=21)
    for mode, weight in (("shadow", 0), ("canary", 100)):
        resp = gateway.put_route(
            champion_version=v["champion"], candidate_version=v["narrow"], mode=mode, candidate_weight=weight
        )
        assert resp.status_code == 200, resp.text
        ids = [f"narrow-{mode}-{i}" for i in range(len(sent))]
        for rid, row in zip(ids, sent):
            resp = gateway.invoke([row], **{"x-request-id": rid})
            assert resp.status_code == 200, resp.text
            assert resp.json()["arm"] == ("champion" if mode == "shadow" else "candidate")
        logged = gateway.predictions(ids, expected=2 * len(ids) if mode == "shadow" else len(ids))
        candidate = [r for r in logged if r.arm == "candidate"]
        assert len(candidate) == len(ids) and {(r.version, r.status) for r in candidate} == {(v["narrow"], "ok")}
        assert [orjson.loads(r.inputs) for r in candidate] == logged_form(
            gateway.settings, sent
        )  # region too: the champion declares it
    # The champion's columns are the request's contract, whichever arm answers.
    resp = gateway.invoke([{"age": 30, "income": 1.0}])
    assert resp.status_code == 422 and "missing column(s) 'region'" in resp.json()["error"]
    assert _ignored_columns(gateway) == before


def test_a_candidate_with_a_new_optional_column_serves_whether_callers_send_it_or_not(gateway):
    v = gateway.versions
    before = _ignored_columns(gateway)
    plain = rows(10, seed=22)
    sent = {"omitted": plain, "sent": [row | {"tenure": float(6 * i)} for i, row in enumerate(plain)]}
    for mode, weight in (("shadow", 0), ("canary", 100)):
        resp = gateway.put_route(
            champion_version=v["champion"], candidate_version=v["wide"], mode=mode, candidate_weight=weight
        )
        assert resp.status_code == 200, resp.text
        for kind, batch in sent.items():
            ids = [f"wide-{mode}-{kind}-{i}" for i in range(len(batch))]
            for rid, row in zip(ids, batch):
                resp = gateway.invoke([row], **{"x-request-id": rid})
                assert resp.status_code == 200, resp.text
                assert resp.json()["arm"] == ("champion" if mode == "shadow" else "candidate")
            logged = gateway.predictions(ids, expected=2 * len(ids) if mode == "shadow" else len(ids))
            candidate = [r for r in logged if r.arm == "candidate"]
            assert len(candidate) == len(ids) and {(r.version, r.status) for r in candidate} == {(v["wide"], "ok")}
            # Logged as sent, by both arms: tenure where the caller gave it, nothing where it did not.
            expected = logged_form(gateway.settings, batch)
            assert all(orjson.loads(r.inputs) == expected[ids.index(r.request_id)] for r in logged)
    assert _ignored_columns(gateway) == before  # tenure is the candidate's: used, not ignored


def test_route_written_by_another_replica_is_picked_up(gateway):
    v = gateway.versions
    assert gateway.put_route(champion_version=v["champion"], mode="single").status_code == 200
    table = storage.routes
    with storage.engine(gateway.settings.db_url).begin() as conn:
        conn.execute(
            table.update()
            .where(table.c.model == MODEL)
            .values(champion_version=v["candidate"], revision=table.c.revision + 1, updated_at=time.time())
        )
    deadline = time.time() + 20
    while gateway.invoke(rows(1)).json()["model_version"] != v["candidate"]:
        assert time.time() < deadline, gateway.log()
        time.sleep(0.1)
    assert gateway.client.get(f"/admin/routes/{MODEL}").json()["champion_version"] == v["candidate"]


@pytest.fixture(scope="module")
def keys(gateway):
    """One live key per role, plus a revoked one, seen by the gateway."""
    made = {role: auth.create_key(role, gateway.settings)[1] for role in auth.ROLES}
    revoked_id, made["revoked"] = auth.create_key("admin", gateway.settings)
    auth.revoke_key(revoked_id, gateway.settings)
    made |= {"missing": None, "wrong": "rg_0123456789abcdef_not-a-key-we-issued", "malformed": "Basic abc"}

    def known(key: str) -> bool:  # the poller has seen it: a key it does not know is a 401
        return httpx.get(f"{gateway.url}/admin/routes", headers={"authorization": f"Bearer {key}"}).status_code != 401

    wait_until(lambda: known(made["admin"]) and not known(made["revoked"]), timeout=30, what="the keys seen")
    return made


def _v2_body(sent: list[dict]) -> dict:
    return {
        "inputs": [
            {"name": name, "shape": [len(sent)], "datatype": dtype, "data": [r[name] for r in sent]}
            for name, dtype in (("age", "INT64"), ("income", "FP64"), ("region", "BYTES"))
        ]
    }


PROTECTED = [  # method, path, body, the role it needs (admin may do everything)
    ("POST", f"/models/{MODEL}/invocations", {"dataframe_records": rows(1)}, "predict"),
    ("POST", f"/v2/models/{MODEL}/infer", _v2_body(rows(1)), "predict"),
    ("GET", f"/v2/models/{MODEL}", None, "predict"),
    ("GET", f"/v2/models/{MODEL}/ready", None, "predict"),
    ("POST", "/feedback", {"request_id": "matrix", "ground_truth": 1}, "feedback"),
    ("GET", "/admin/routes", None, "admin"),
    ("GET", f"/admin/routes/{MODEL}", None, "admin"),
    ("PUT", f"/admin/routes/{MODEL}", "champion-single", "admin"),
    ("GET", "/metrics", None, "metrics"),
    ("POST", "/alerts", {"version": "4", "status": "firing", "alerts": []}, "alerts"),
    ("GET", "/openapi.json", None, "predict"),
]
PUBLIC = ["/healthz", "/readyz", "/v2", "/v2/health/live", "/v2/health/ready"]
KEY_KINDS = ["missing", "wrong", "malformed", "revoked", "predict", "feedback", "metrics", "alerts", "admin"]


@pytest.mark.parametrize("key_kind", KEY_KINDS)
@pytest.mark.parametrize("method, path, body, role", PROTECTED, ids=[f"{m} {p}" for m, p, _, _ in PROTECTED])
def test_role_matrix(gateway, keys, method, path, body, role, key_kind):
    if body == "champion-single":
        body = {"champion_version": gateway.versions["champion"], "mode": "single"}
    key = keys[key_kind]
    headers = {"authorization": key if key_kind == "malformed" else f"Bearer {key}"} if key else {}
    resp = httpx.request(method, gateway.url + path, json=body, headers=headers, timeout=30)
    if key_kind in ("missing", "wrong", "malformed", "revoked"):
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"].startswith(("missing API key", "unknown or revoked", "malformed Authorization"))
    elif key_kind in (role, "admin"):
        assert resp.status_code == 200, resp.text
    else:
        assert resp.status_code == 403, resp.text
        assert f"needs '{role}' or 'admin'" in resp.json()["error"]


@pytest.mark.parametrize("path", PUBLIC)
def test_health_and_readiness_need_no_key_and_say_nothing_more(gateway, path):
    resp = httpx.get(gateway.url + path, timeout=10)
    assert resp.status_code == 200
    assert MODEL not in resp.text  # which models are served (and why one is not) is for keys that may know


def test_every_mlflow_payload_and_v2_answer_alike_with_version_and_arm(gateway, keys):
    v = gateway.versions
    assert gateway.put_route(champion_version=v["champion"], mode="single").status_code == 200
    sent = rows(3, seed=11)
    names = list(sent[0])
    payloads = {
        "dataframe_records": {"dataframe_records": sent},
        "dataframe_split": {"dataframe_split": {"columns": names, "data": [[r[n] for n in names] for r in sent]}},
        "instances": {"instances": sent},
        "inputs": {"inputs": {n: [r[n] for r in sent] for n in names}},
    }
    answers = {}
    for kind, body in payloads.items():
        resp = gateway.client.post(f"/models/{MODEL}/invocations", json=body)
        assert resp.status_code == 200, (kind, resp.text)
        out = resp.json()
        assert (out["model_version"], out["arm"]) == (v["champion"], "champion"), kind
        answers[kind] = out["predictions"]
    v2 = gateway.client.post(f"/v2/models/{MODEL}/infer", json=_v2_body(sent) | {"id": "v2-req"}).json()
    assert v2["id"] == "v2-req" and v2["model_version"] == v["champion"] and v2["arm"] == "champion"
    answers["v2"] = v2["outputs"][0]["data"]
    assert len({orjson.dumps(a) for a in answers.values()}) == 1, answers

    meta = gateway.client.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == [v["champion"]] and meta["platform"] == "mlflow_pyfunc"
    assert meta["inputs"] == [
        {"name": "age", "datatype": "INT64", "shape": [-1]},
        {"name": "income", "datatype": "FP64", "shape": [-1]},
        {"name": "region", "datatype": "BYTES", "shape": [-1]},
    ]
    assert meta["outputs"][0]["datatype"] == "INT64"
    assert gateway.client.get(f"/v2/models/{MODEL}/versions/{v['champion']}").json()["name"] == MODEL
    wrong = gateway.client.get(f"/v2/models/{MODEL}/versions/{v['candidate']}")
    assert wrong.status_code == 404 and "is not served" in wrong.json()["error"]
    assert gateway.client.get(f"/v2/models/{MODEL}/ready").json() == {
        "name": MODEL,
        "ready": True,
        "version": v["champion"],
    }
    assert gateway.client.get("/v2/models/nope/ready").status_code == 404
    assert gateway.client.get("/v2/health/ready").json() == {"ready": True}
    assert gateway.client.get("/v2").json()["name"] == "releasegate"


def test_out_of_range_and_non_finite_values_get_a_422(gateway):
    good = rows(1)[0]
    url = f"/models/{MODEL}/invocations"
    cases = [
        (gateway.invoke([good | {"age": 2**70}]), "column 'age' row 0 expects an integer (long"),
        (
            gateway.client.post(url, content=b'{"dataframe_records": [{"age": 3, "income": 1e999, "region": "x"}]}'),
            "column 'income' row 0 expects a finite number",
        ),
        (
            gateway.client.post(url, content=b'{"dataframe_records": [{"age": 3, "income": Infinity, "region": "x"}]}'),
            "column 'income' row 0 expects a finite number",
        ),
        (gateway.invoke([good | {"region": 5}]), "column 'region' row 0 expects string"),
    ]
    for resp, message in cases:
        assert resp.status_code == 422 and message in resp.json()["error"], (message, resp.text)


def test_route_with_an_unusable_model_name_or_version_is_refused(gateway):
    cases = [  # both found by the schemathesis run below, as 500s, before the gateway checked them
        (gateway.client.put("/admin/routes/%1C", json={"champion_version": "1"}), "control characters"),
        (gateway.put_route(champion_version="\U0010388a"), "champion_version: String should match pattern"),
    ]
    for resp, message in cases:
        assert resp.status_code == 422 and message in resp.json()["error"], resp.text


def test_metrics_cover_calls_latency_batches_shadow_and_the_log(gateway):
    v = gateway.versions["champion"]
    assert gateway.put_route(champion_version=v, mode="single").status_code == 200
    assert gateway.invoke(rows(1)).status_code == 200
    text = gateway.client.get("/metrics").text
    for needle in (
        f'releasegate_gateway_model_calls_total{{arm="champion",model="{MODEL}",version="{v}"}}',
        f'releasegate_gateway_model_latency_seconds_bucket{{arm="champion",le="0.005",model="{MODEL}"',
        f'releasegate_gateway_batch_rows_bucket{{le="1.0",model="{MODEL}",version="{v}"}}',
        "# TYPE releasegate_gateway_model_errors_total counter",
        "releasegate_gateway_shadow_dropped_total",
        "releasegate_gateway_shadow_queue_depth",
        'releasegate_gateway_log_lag_seconds{table="predictions"}',
        'releasegate_gateway_log_written_rows_total{table="predictions"}',
        "releasegate_gateway_log_dropped_rows_total",
        'releasegate_gateway_http_responses_total{endpoint="invocations",status="200"}',
    ):
        assert needle in text, needle


class Load:
    """Background clients that keep invoking the gateway and record every outcome."""

    def __init__(self, url: str, clients: int = 2):
        import threading

        self.url, self.stop, self.outcomes = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"}) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    resp = client.post(
                        f"/models/{MODEL}/invocations",
                        json={"dataframe_records": rows(1, seed=n)},
                        headers={"x-routing-key": f"load-{i}-{n}"},
                    )
                    body = resp.json()
                    self.outcomes.append(
                        (resp.status_code, body.get("model_version"), body.get("arm"), body.get("error"))
                    )
                except Exception as err:  # a refused or dropped connection is a lost request
                    self.outcomes.append((None, None, None, repr(err)))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_twenty_route_changes_under_load_lose_no_request(gateway):
    v = gateway.versions
    champion, candidate = v["champion"], v["candidate"]
    cycle = [
        dict(champion_version=champion, mode="single"),
        dict(champion_version=champion, candidate_version=candidate, mode="shadow"),
        dict(champion_version=champion, candidate_version=candidate, mode="canary", candidate_weight=5),
        dict(champion_version=champion, candidate_version=candidate, mode="canary", candidate_weight=25),
        dict(champion_version=champion, candidate_version=candidate, mode="canary", candidate_weight=50),
        dict(champion_version=candidate, mode="single"),  # promote
        dict(champion_version=champion, mode="single"),
    ]  # roll back (the old champion reloads)
    changes = (cycle * 3)[:20]
    with Load(gateway.url) as load:
        time.sleep(0.5)
        for spec in changes:
            resp = gateway.put_route(**spec)
            assert resp.status_code == 200, resp.text
            time.sleep(0.2)
    failed = [o for o in load.outcomes if o[0] != 200]
    assert not failed, failed[:5]
    assert len(load.outcomes) > 100
    assert {o[1] for o in load.outcomes} == {champion, candidate}
    assert {o[2] for o in load.outcomes} == {"champion", "candidate"}


def test_a_second_replica_follows_the_database_and_serves_the_old_split_until_ready(gateway, tmp_path):
    v = gateway.versions
    assert gateway.put_route(champion_version=v["champion"], mode="single").status_code == 200
    port = free_port()
    log = tmp_path / "replica.log"
    with open(log, "w") as out:
        replica = subprocess.Popen(
            [sys.executable, "-m", "releasegate.serving", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # Its first load imports MLflow and sklearn: slow on a busy machine.
        gateway_ready(url, replica, log.read_text, timeout=180)
        with Load(url, clients=1) as load:
            time.sleep(0.3)
            changed = time.time()
            route = gateway.put_route(
                champion_version=v["champion"], candidate_version=v["candidate"], mode="canary", candidate_weight=100
            ).json()
            while (
                httpx.get(f"{url}/admin/routes/{MODEL}", headers={"authorization": f"Bearer {ADMIN}"}).json()[
                    "revision"
                ]
                != route["revision"]
            ):
                assert time.time() - changed < 15, log.read_text()[-3000:]
                time.sleep(0.05)
            picked_up = time.time() - changed
            time.sleep(0.3)
        served = [o for o in load.outcomes]
        assert all(o[0] == 200 for o in served), [o for o in served if o[0] != 200][:5]
        # Answers switch from the old split to the new one once, never back and forth.
        arms = [o[2] for o in served]
        first_candidate = arms.index("candidate")
        assert set(arms[:first_candidate]) == {"champion"} and set(arms[first_candidate:]) == {"candidate"}
        # Poll interval 0.2 s here, plus loading, verifying and warming the candidate.
        assert picked_up < 10
        assert "loaded gw v%s (signature verified, warmed;" % v["candidate"] in log.read_text()
    finally:
        os.killpg(replica.pid, signal.SIGTERM)
        replica.wait(timeout=30)


def test_predictions_are_not_blocked_while_the_log_database_is_locked(gateway):
    import sqlite3

    assert gateway.put_route(champion_version=gateway.versions["champion"], mode="single").status_code == 200
    db = sqlite3.connect(gateway.settings.db_url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
    ids = [f"locked-{i}" for i in range(40)]
    try:
        db.execute("BEGIN EXCLUSIVE")  # another process holds the write lock: no log row can be written
        started = time.perf_counter()
        for rid in ids:
            resp = gateway.invoke(rows(1), **{"x-request-id": rid})
            assert resp.status_code == 200, resp.text
        assert time.perf_counter() - started < 10
        time.sleep(1)
        metrics = gateway.client.get("/metrics").text
        lag = float(
            re.search(r'^releasegate_gateway_log_lag_seconds{table="predictions"} (\S+)$', metrics, re.M).group(1)
        )
        assert lag > 0.5  # the writer is waiting on the lock, and says so
        assert len(gateway.predictions(ids, expected=0, timeout=0)) == 0
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert len(gateway.predictions(ids, expected=40, timeout=20)) == 40


def _concurrently(gateway, bodies: dict[str, list[dict]], clients: int = 8) -> dict[str, httpx.Response]:
    """Each request id's rows, POSTed from `clients` threads at once so that the gateway's micro-batches form."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local, opened = threading.local(), []

    def call(item):
        rid, body = item
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=gateway.url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"})
            opened.append(local.client)
        return rid, local.client.post(
            f"/models/{MODEL}/invocations", json={"dataframe_records": body}, headers={"x-request-id": rid}
        )

    try:
        with ThreadPoolExecutor(clients) as pool:
            return dict(pool.map(call, bodies.items()))
    finally:
        for client in opened:
            client.close()


def test_a_flaky_models_log_shows_its_call_failure_rate_though_retries_answer_its_callers(gateway):
    """Each row whose call failed is counted, though a retry of its own answered the caller.

    Rows of one batch share its call, so their failures go together: with at most 8 one-row requests a batch
    (8 clients) the logged share's standard deviation is at most sqrt(0.1 * 0.9 * 8 / 3000) = 0.016, and the
    tolerance of 0.05 is three of them. The `error` rows alone (whose own retry failed too) are ~0.01: outside.
    """
    from collections import Counter

    v = gateway.versions
    assert gateway.put_route(champion_version=v["flaky"], mode="single").status_code == 200
    sample = rows(1, seed=23)
    bodies = {f"flaky-{i}": sample for i in range(3000)}
    answers = _concurrently(gateway, bodies)
    logged = {r.request_id: r for r in gateway.predictions(bodies, expected=len(bodies), timeout=30)}
    assert len(logged) == len(bodies)
    statuses = Counter(r.status for r in logged.values())
    assert abs(1 - statuses["ok"] / len(logged) - FLAKY_RATE) < 0.05, statuses
    assert statuses["retried"] > 0 and set(statuses) <= {"ok", "retried", "error"}, statuses
    for rid, resp in answers.items():
        row = logged[rid]
        assert resp.status_code == (500 if row.status == "error" else 200), (row.status, resp.text)
        if row.status == "retried":  # answered by its own call after the batch's failed
            assert row.error == f"{MODEL} v{v['flaky']} predict failed: RuntimeError: flaky model failed this call"
            assert [orjson.loads(row.outputs)] == resp.json()["predictions"]
    errors = {
        kind: float(n)
        for kind, n in re.findall(
            rf'^releasegate_gateway_model_errors_total{{arm="champion",kind="(\w+)",model="{MODEL}",'
            rf'version="{v["flaky"]}"}} (\S+)$',
            gateway.client.get("/metrics").text,
            re.M,
        )
    }
    assert errors == {kind: statuses[kind] for kind in ("error", "retried") if statuses[kind]}


def test_a_poison_request_fails_alone_and_its_batch_neighbours_are_logged_as_retried(gateway):
    v = gateway.versions
    assert gateway.put_route(champion_version=v["erratic"], mode="single").status_code == 200
    sample = rows(1, seed=24)[0]
    bodies = {f"poison-{i}": [sample | {"age": 77 if i % 25 == 0 else 30}] for i in range(500)}  # 77 raises
    answers = _concurrently(gateway, bodies)
    logged = {r.request_id: r for r in gateway.predictions(bodies, expected=len(bodies))}
    poisoned = {rid for rid, body in bodies.items() if body[0]["age"] == 77}
    for rid in poisoned:
        assert answers[rid].status_code == 500 and "refuses age 77" in answers[rid].json()["error"]
        assert logged[rid].status == "error"
    neighbours = [logged[rid] for rid in bodies if rid not in poisoned]
    assert all(answers[r.request_id].status_code == 200 for r in neighbours)
    assert {r.status for r in neighbours} == {"ok", "retried"}  # some shared a batch with a poison
    assert all("refuses age 77" in r.error for r in neighbours if r.status == "retried")


def test_a_restarted_gateway_serves_each_model_as_soon_as_its_own_route_is_loaded(gateway, tmp_path):
    """A slow model's route, stored first, no longer holds back the routes stored after it."""
    v = gateway.versions
    db_url = f"sqlite:///{tmp_path}/restarted.db"  # a routes table of its own, the slow route first
    with storage.engine(db_url).begin() as conn:
        for model, version in ((SLOW, v["slow"]), (MODEL, v["champion"])):
            conn.execute(
                storage.routes.insert().values(
                    model=model,
                    champion_version=version,
                    mode="single",
                    candidate_weight=0,
                    revision=1,
                    updated_at=time.time(),
                )
            )
    gate = tmp_path / "gate"  # the slow model's warm-up waits until this file exists
    port = free_port()
    log = tmp_path / "restarted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "releasegate.serving", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, RELEASEGATE_DB_URL=db_url, GW_TEST_LOAD_GATE=str(gate)),
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers={"authorization": f"Bearer {ADMIN}"})

    def invoke(model: str) -> httpx.Response | None:
        try:
            return client.post(f"/models/{model}/invocations", json={"dataframe_records": rows(1)})
        except httpx.TransportError:  # not listening yet
            return None

    try:
        deadline = time.time() + 180  # its first load imports MLflow and sklearn: slow on a busy machine
        while (fast := invoke(MODEL)) is None or fast.status_code != 200:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert fast.json()["model_version"] == v["champion"]
        slow = invoke(SLOW)
        assert slow.status_code == 503 and "routes still loading" in slow.json()["error"], slow.text
        assert client.get("/readyz").status_code == 503  # until every stored route has been tried
        gate.touch()
        deadline = time.time() + 60
        while client.get("/readyz").status_code != 200:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        assert invoke(SLOW).json()["model_version"] == v["slow"]
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_gateway_gives_each_predict_call_one_openmp_thread(gateway):
    assert (
        "OpenMP/BLAS threads per predict call: OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1, MKL_NUM_THREADS=1"
        in gateway.log_path.read_text()
    )
    # The process's own environment, as every library it loads later reads it: its log writer child inherits it.
    pid = gateway.proc.pid
    child = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0]
    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    assert {b"OMP_NUM_THREADS=1", b"OPENBLAS_NUM_THREADS=1", b"MKL_NUM_THREADS=1"} <= set(environ)


# What schemathesis expects by default, plus what this gateway answers besides (see the test's docstring).
_REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
FUZZ_EXAMPLES = 500 if os.environ.get("CI") else 40  # per operation: half valid requests, half invalid


def _role_of(operation) -> str | None:
    """The role an operation's key needs, as the document states it (None: no key)."""
    found = re.search(r"role '(\w+)'", operation.definition.raw.get("description", ""))
    return found.group(1) if found else None


def _undeclared_columns_only(document: dict, path: str, body: object, declared: set[str]) -> bool:
    """Is a body the document calls invalid valid once its rows lose the columns the model does not declare?"""
    import jsonschema

    if not isinstance(body, dict) or not path.endswith("/invocations"):
        return False
    stripped = dict(body)
    for key in ("dataframe_records", "instances"):
        value = body.get(key)
        if isinstance(value, list) and all(isinstance(row, dict) for row in value):
            stripped[key] = [{k: v for k, v in row.items() if k in declared} for row in value]
    if stripped == body:
        return False
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator(schema).is_valid(stripped)


def test_fuzzing_the_openapi_document_finds_no_failure(gateway, keys):
    """schemathesis with every check it has (`--checks all`), on every documented operation, valid and invalid
    requests alike, each sent with a key of the role the operation needs: FUZZ_EXAMPLES per operation.

    Two expectations differ from schemathesis' defaults, both for statuses the document lists: a request too large
    is refused with 413 (rows, feedback items), and a route whose candidate is the champion's own version is a
    422 that JSON Schema cannot express (it compares two fields). And one leniency the gateway documents: a row
    may carry columns the model does not declare, which are ignored (and counted); the document names only the
    declared ones, so an "invalid" body whose one violation is such a column is rightly answered 200.
    """
    from collections import Counter

    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.config import SchemathesisConfig
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation import GenerationMode

    v = gateway.versions
    assert gateway.put_route(champion_version=v["champion"], mode="single").status_code == 200
    config = SchemathesisConfig.from_dict(
        {
            "checks": {"negative_data_rejection": {"expected-statuses": _REJECTED}},
            "operations": [
                {
                    "include-path": "/admin/routes/{model}",
                    "include-method": "PUT",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*_ACCEPTED, "422"]}},
                }
            ],
        }
    )
    schema = schemathesis.openapi.from_url(
        f"{gateway.url}/openapi.json", headers={"authorization": f"Bearer {keys['predict']}"}, config=config
    )
    load_all_checks()
    checks = CHECKS.get_all()
    document = gateway.client.get("/openapi.json").json()
    declared = set(rows(1)[0])
    counts, inference, problems = Counter(), Counter(), []
    session = requests.Session()  # schemathesis serializes each case (valid or not) for requests
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {f"POST /models/{MODEL}/invocations", "GET /metrics", "POST /feedback"}

    def run(operation, mode: GenerationMode) -> None:
        role = _role_of(operation)
        headers = {"authorization": f"Bearer {keys[role]}"} if role else {}

        @settings(
            max_examples=FUZZ_EXAMPLES // 2,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            resp = case.call(base_url=gateway.url, session=session, headers=headers, timeout=30)
            counts[f"{resp.status_code // 100}xx"] += 1
            try:
                case.validate_response(
                    resp, checks=checks, headers=headers, transport_kwargs={"base_url": gateway.url, "session": session}
                )
            except FailureGroup as failures:
                if not (
                    mode is GenerationMode.NEGATIVE
                    and resp.status_code == 200
                    and _undeclared_columns_only(document, case.operation.path, case.body, declared)
                ):
                    problems.append((operation.label, mode.value, case.body, resp.status_code, str(failures)[:1500]))
            if mode is GenerationMode.POSITIVE and case.operation.path.endswith("/invocations"):
                inference[f"{resp.status_code // 100}xx"] += 1

        fuzz()

    for operation in operations:
        run(operation, GenerationMode.POSITIVE)
        if operation.body or any(True for _ in operation.iter_parameters()):  # else nothing to make invalid
            run(operation, GenerationMode.NEGATIVE)
    session.close()
    print(
        f"\nschemathesis, every check, {len(operations)} operations, {FUZZ_EXAMPLES} examples each: "
        f"{sum(counts.values())} requests in {time.monotonic() - started:.0f} s, {dict(sorted(counts.items()))}; "
        f"valid /invocations requests: {dict(inference)}"
    )
    assert not problems, "\n\n".join(map(str, problems[:5]))
    assert counts["5xx"] == 0
    assert inference["2xx"] >= FUZZ_EXAMPLES // 10  # valid inference requests were generated and answered
    assert gateway.proc.poll() is None and gateway.client.get("/healthz").status_code == 200


def test_sigterm_answers_in_flight_requests_and_flushes_the_log(gateway):
    from concurrent.futures import ThreadPoolExecutor

    v = gateway.versions
    assert gateway.put_route(champion_version=v["champion"], mode="single").status_code == 200
    ids = [f"flush-{i}" for i in range(50)]
    for rid in ids:
        assert gateway.invoke(rows(1), **{"x-request-id": rid}).status_code == 200
    # In flight at SIGTERM: requests the erratic candidate holds past its 0.5 s timeout (age 78 sleeps).
    assert (
        gateway.put_route(
            champion_version=v["champion"], candidate_version=v["erratic"], mode="canary", candidate_weight=100
        ).status_code
        == 200
    )
    slow = [f"in-flight-{i}" for i in range(8)]

    def call(rid):
        with httpx.Client(base_url=gateway.url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"}) as c:
            return c.post(
                f"/models/{MODEL}/invocations",
                json={"dataframe_records": [rows(1)[0] | {"age": 78}]},
                headers={"x-request-id": rid},
            )

    with ThreadPoolExecutor(len(slow)) as pool:
        futures = [pool.submit(call, rid) for rid in slow]
        deadline = time.time() + 30
        while True:  # SIGTERM while the gateway holds at least half of them
            found = re.search(
                r'^releasegate_gateway_requests_in_flight{endpoint="invocations"} (\S+)$',
                gateway.client.get("/metrics").text,
                re.M,
            )
            held = int(float(found.group(1))) if found else 0
            if held >= len(slow) // 2:
                break
            assert time.time() < deadline, "requests not held in flight"
            time.sleep(0.02)
        os.killpg(gateway.proc.pid, signal.SIGTERM)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # Sent after SIGTERM, or on a connection the shutdown closed before reading it: not accepted.
                outcomes.append(None)
    answered = [o for o in outcomes if o is not None]
    assert [a.status_code for a in answered] == [200] * len(answered), [a.text for a in answered]
    assert len(answered) >= held and {a.json()["arm"] for a in answered} == {"champion"}
    assert gateway.proc.wait(timeout=30) in (0, -signal.SIGTERM), gateway.log()  # uvicorn re-raises the signal
    with pytest.raises(httpx.ConnectError):  # stopped accepting
        httpx.get(f"{gateway.url}/healthz", timeout=2)
    assert len(gateway.predictions(ids, expected=50, timeout=0)) == 50
    ids_answered = [a.json()["request_id"] for a in answered]
    logged = gateway.predictions(ids_answered, expected=0, timeout=0)  # each: the candidate's timeout + the champion
    assert sorted((r.arm, r.status) for r in logged) == (
        [("candidate", "timeout")] * len(answered) + [("champion", "ok")] * len(answered)
    )
