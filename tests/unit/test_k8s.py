"""KServe / Istio manifests (rendered, validated against the pinned CRD schemas), the logger sink, SRM per request."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pandas as pd
import pytest

from releasegate import k8s
from releasegate.contract import Stage, StageKind
from releasegate.verdict import Decision
from tests.require import require
from tests.waiting import wait_until

SHADOW = Stage.shadow()


def canary(weight: int) -> Stage:
    return Stage(kind=StageKind.canary, weight=weight)


SETTINGS = k8s.K8sSettings(namespace="models", sink_url="http://releasegate-sink.models.svc.cluster.local/events")
CANDIDATE = k8s.Served(
    "3", "s3://mlflow/1/abc/artifacts/model", "sha256:" + "a" * 64, "s3://mlflow/1/abc/artifacts/releasegate/model.sig"
)
# An experiment's arms besides the control: v3 at 30 %, v4 stopped (its 10 % back to the control).
EXPERIMENT = [k8s.ArmRoute.of("churn", "3", 30), k8s.ArmRoute.of("churn", "4", 10, stopped=True)]
# What the sink's Istio sidecar appends to X-Forwarded-Client-Cert for a predictor's and a feedback caller's mTLS.
PREDICTOR_PEER = {
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/models/sa/releasegate-sink;"
    "URI=spiffe://cluster.local/ns/models/sa/default"
}
FEEDBACK_PEER = {
    "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/models/sa/releasegate-sink;"
    "URI=spiffe://cluster.local/ns/models/sa/releasegate-feedback"
}


@pytest.fixture
def schemas():
    """The pinned CRD copies: a skip with the reason where they are absent, a failure when CI is set."""
    directory = SETTINGS.schemas_dir
    require(
        None
        if k8s.schemas_available(directory)
        else f"CRD schemas not found in {directory} (see ../shared/k8s-schemas/README.md); CI must validate manifests"
    )
    return directory


def every_manifest() -> list[dict]:
    return [
        k8s.inference_service("churn", CANDIDATE, SETTINGS),
        k8s.inference_service(
            "churn", CANDIDATE, SETTINGS, canary_traffic_percent=25, release_id="rel-1", champion_version="2"
        ),
        k8s.inference_service("churn", CANDIDATE, SETTINGS, canary_traffic_percent=0, release_id="rel-1"),
        k8s.inference_service("churn", CANDIDATE, SETTINGS, shadow=True, release_id="rel-1"),
        k8s.virtual_service("churn", SETTINGS),
        k8s.virtual_service("churn", SETTINGS, mirror_percent=100, release_id="rel-1"),
        k8s.virtual_service("churn", SETTINGS, release_id="exp-1", experiment=EXPERIMENT),
        k8s.inference_service("churn", CANDIDATE, SETTINGS, experiment_arm=True, release_id="exp-1"),
        k8s.destination_rule("churn", SETTINGS),
        k8s.arms_filter("churn", SETTINGS, "exp-1", EXPERIMENT),
        *k8s.sink_manifests("models", "registry.example.com/releasegate:1.0"),
    ]


def test_every_rendered_manifest_validates_against_the_pinned_schemas(schemas):
    docs = every_manifest()
    assert [d["kind"] for d in docs] == ["InferenceService"] * 4 + ["VirtualService"] * 3 + ["InferenceService"] + [
        "DestinationRule",
        "EnvoyFilter",
        "Deployment",
        "Service",
        "PeerAuthentication",
        "AuthorizationPolicy",
    ]
    for doc in docs:
        k8s.validate(doc, schemas)


def test_manifests_carry_the_release(schemas):
    canary = k8s.inference_service(
        "churn", CANDIDATE, SETTINGS, canary_traffic_percent=25, release_id="rel-1", champion_version="2"
    )
    predictor = canary["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 25
    assert predictor["model"] == {
        "modelFormat": {"name": "mlflow"},
        "protocolVersion": "v2",
        "storageUri": CANDIDATE.storage_uri,
        "volumeMounts": [{"name": "releasegate-model", "mountPath": "/mnt/models", "readOnly": True}],
    }
    # releasegate's storage initializer fills that volume from the same URI and verifies it against the digest.
    [init] = predictor["initContainers"]
    assert init["name"] == "storage-initializer" and init["command"][-1] == "releasegate.serving.verify_dir"
    args = dict(zip(init["args"][::2], init["args"][1::2], strict=True))
    assert args == {
        "--storage-uri": CANDIDATE.storage_uri,
        "--bundle-uri": CANDIDATE.bundle_uri,
        "--expect-digest": CANDIDATE.digest,
        "--model-dir": "/mnt/models",
        "--trust-dir": "/etc/releasegate/trust",
    }
    # The logger URL names model and version, so each revision's events say which version answered.
    assert predictor["logger"]["url"].endswith("/events?model=churn&version=3") and predictor["logger"]["mode"] == "all"
    assert canary["metadata"]["annotations"]["releasegate.io/signature-digest"] == CANDIDATE.digest
    assert "canaryTrafficPercent" not in k8s.inference_service("churn", CANDIDATE, SETTINGS)["spec"]["predictor"]
    shadow = k8s.inference_service("churn", CANDIDATE, SETTINGS, shadow=True)
    assert shadow["metadata"]["name"] == "churn-shadow"
    assert shadow["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    mirrored = k8s.virtual_service("churn", SETTINGS, mirror_percent=100)["spec"]["http"][0]
    assert mirrored["mirror"]["host"] == "churn-shadow-predictor.models.svc.cluster.local"
    assert mirrored["mirrorPercentage"] == {"value": 100.0}
    assert "mirror" not in k8s.virtual_service("churn", SETTINGS)["spec"]["http"][0]


def test_an_experiments_virtual_service_splits_the_host_by_the_arms_weights(schemas):
    vs = k8s.virtual_service("churn", SETTINGS, release_id="exp-1", experiment=EXPERIMENT)
    [weighted] = [r for r in vs["spec"]["http"] if r["name"] == "predict"]
    split = [(d["headers"]["request"]["set"]["Host"], d["weight"], d["destination"]["host"]) for d in weighted["route"]]
    gateway = SETTINGS.local_gateway
    assert split == [
        ("churn-predictor.models.svc.cluster.local", 70, gateway),  # the control, with the stopped arm's 10 %
        ("churn-arm-3-predictor.models.svc.cluster.local", 30, gateway),
        ("churn-arm-4-predictor.models.svc.cluster.local", 0, gateway),
    ]
    assert k8s.experiment_arms(vs) == [
        {"version": "3", "weight": 30, "stopped": False},
        {"version": "4", "weight": 10, "stopped": True},
    ]
    assert k8s.experiment_arms(k8s.virtual_service("churn", SETTINGS)) == []
    arm = k8s.inference_service("churn", CANDIDATE, SETTINGS, experiment_arm=True)
    assert arm["metadata"]["name"] == "churn-arm-3" and "canaryTrafficPercent" not in arm["spec"]["predictor"]
    with pytest.raises(k8s.ManifestError, match="leaving the control some traffic"):
        k8s.virtual_service(
            "churn", SETTINGS, experiment=[k8s.ArmRoute.of("churn", "3", 60), k8s.ArmRoute.of("churn", "4", 40)]
        )
    with pytest.raises(k8s.ManifestError, match="at most 47 characters"):
        k8s.arm_name("c" * 46, "12")


# -- an experiment's sticky assignment on KServe: the ingress gateway's Lua filter (tests/envoy_lua.py) -------


def _arm_of_every_key(filter_doc: dict, vs: dict, keys: list[str]) -> list[str | None]:
    """The predictor Host each routing key's request reaches through the filter and the VirtualService."""
    from tests.envoy_lua import LuaFilter, routed_host

    lua = LuaFilter(filter_doc)
    host = SETTINGS.host.format(model="churn")
    return [routed_host(vs, lua.request({":authority": host, "X-Routing-Key": key})) for key in keys]


def _fnv_fmix(text: str) -> int:
    """What arms.lua computes, in Python's exact integers: FNV-1a, then MurmurHash3's 32-bit finalizer."""
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) % 2**32
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) % 2**32
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def test_an_experiment_keeps_each_customer_on_one_arm_at_the_ingress_gateway():
    """Istio's weights draw each request; the EnvoyFilter's Lua names the arm from the routing key's bucket, and
    the VirtualService routes on it: the same customer reaches the same arm every time, in the weights' shares."""
    arms = [k8s.ArmRoute.of("churn", "3", 30), k8s.ArmRoute.of("churn", "4", 20)]
    vs = k8s.virtual_service("churn", SETTINGS, release_id="exp-1", experiment=arms)
    sticky = k8s.arms_filter("churn", SETTINGS, "exp-1", arms)
    keys = [f"customer-{i}" for i in range(6000)]
    first = _arm_of_every_key(sticky, vs, keys)
    assert first == _arm_of_every_key(sticky, vs, keys)  # sticky: again, each key lands where it did
    control, three, four = (f"{n}-predictor.models.svc.cluster.local" for n in ("churn", "churn-arm-3", "churn-arm-4"))
    shares = {host: first.count(host) / len(keys) for host in (control, three, four)}
    assert sum(shares.values()) == 1.0  # no request falls to the weighted draw
    # 6,000 keys: a share's standard error is under 0.7 points; 3 points is over 4 of them.
    assert shares == pytest.approx({control: 0.5, three: 0.3, four: 0.2}, abs=0.03)
    # The bucket is the same hash in LuaJIT's doubles as in exact integers (arm 3: buckets 0-29, arm 4: 30-49).
    expected = [
        three if b < 30 else four if b < 50 else control for b in (_fnv_fmix(f"churn#exp-1:{k}") % 100 for k in keys)
    ]
    assert first == expected


def test_the_assignment_is_salted_per_experiment_and_stopping_an_arm_moves_only_its_customers():
    arms = [k8s.ArmRoute.of("churn", "3", 50)]
    keys = [f"customer-{i}" for i in range(4000)]
    vs = k8s.virtual_service("churn", SETTINGS, release_id="exp-1", experiment=arms)
    one = _arm_of_every_key(k8s.arms_filter("churn", SETTINGS, "exp-1", arms), vs, keys)
    two = _arm_of_every_key(k8s.arms_filter("churn", SETTINGS, "exp-2", arms), vs, keys)
    treated = "churn-arm-3-predictor.models.svc.cluster.local"
    in_one = {k for k, host in zip(keys, one, strict=True) if host == treated}
    again = sum(1 for k, host in zip(keys, two, strict=True) if host == treated and k in in_one) / len(in_one)
    # Independent experiments: half of one's treated customers are treated again, not all of them.
    assert again == pytest.approx(0.5, abs=0.05)

    three_four = [k8s.ArmRoute.of("churn", "3", 30), k8s.ArmRoute.of("churn", "4", 20)]
    stopped = [k8s.ArmRoute.of("churn", "3", 30), k8s.ArmRoute.of("churn", "4", 20, stopped=True)]
    before = _arm_of_every_key(
        k8s.arms_filter("churn", SETTINGS, "exp-1", three_four),
        k8s.virtual_service("churn", SETTINGS, release_id="exp-1", experiment=three_four),
        keys,
    )
    after = _arm_of_every_key(
        k8s.arms_filter("churn", SETTINGS, "exp-1", stopped),
        k8s.virtual_service("churn", SETTINGS, release_id="exp-1", experiment=stopped),
        keys,
    )
    control, four = "churn-predictor.models.svc.cluster.local", "churn-arm-4-predictor.models.svc.cluster.local"
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert moved and all((b, a) == (four, control) for b, a in moved)  # only arm 4's customers, to the control
    assert four not in after


def test_a_caller_cannot_choose_its_arm_and_other_hosts_pass_untouched():
    from tests.envoy_lua import LuaFilter

    lua = LuaFilter(k8s.arms_filter("churn", SETTINGS, "exp-1", [k8s.ArmRoute.of("churn", "3", 1)]))
    host = SETTINGS.host.format(model="churn")
    forged = [lua.request({":authority": host, "x-routing-key": f"c{i}", k8s.ARM_HEADER: "3"}) for i in range(200)]
    assert {h[k8s.ARM_HEADER] for h in forged} == {"3", k8s.CONTROL}
    assert sum(h[k8s.ARM_HEADER] == "3" for h in forged) < 20  # its 1 %, not the 100 % the callers asked for
    # The entry host with a port and in capitals is the model's; another model's host is left as it came.
    assert lua.request({":authority": host.upper() + ":443", "x-routing-key": "c1"})[k8s.ARM_HEADER]
    other = lua.request({":authority": "fraud.models.example.com", k8s.ARM_HEADER: "3"})
    assert other[k8s.ARM_HEADER] == "3"
    # Without a routing key, Envoy's request id: each request drawn on its own.
    drawn = {lua.request({":authority": host, "x-request-id": f"r{i}"})[k8s.ARM_HEADER] for i in range(2000)}
    assert drawn == {"3", k8s.CONTROL}


def test_the_filters_settings_reach_the_lua_as_literals_that_cannot_break_out():
    from lupa import luajit21

    odd = 'a"b\\c\n]]--\u00e9 end'
    runtime = luajit21.LuaRuntime(encoding=None)
    assert runtime.eval(k8s._lua(odd)) == odd.encode()
    assert runtime.eval(k8s._lua({"arms": [{"weight": 12, "stopped": True}]}))[b"arms"][1][b"stopped"] is True
    settings = k8s.K8sSettings(ingress_selector="istio=ingressgateway,app=edge", ingress_namespace="edge")
    doc = k8s.arms_filter("churn", settings, "exp-1", EXPERIMENT)
    assert doc["metadata"]["namespace"] == "edge"
    assert doc["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway", "app": "edge"}
    with pytest.raises(ValueError, match="key=value"):
        k8s.K8sSettings(ingress_selector="ingressgateway")


def test_a_misspelled_or_mistyped_field_is_refused(schemas):
    doc = k8s.inference_service("churn", CANDIDATE, SETTINGS, canary_traffic_percent=5)
    doc["spec"]["predictor"]["canaryTrafficPercnt"] = doc["spec"]["predictor"].pop("canaryTrafficPercent")
    with pytest.raises(k8s.ManifestError, match="canaryTrafficPercnt"):
        k8s.validate(doc, schemas)
    vs = k8s.virtual_service("churn", SETTINGS, mirror_percent=100)
    vs["spec"]["http"][0]["mirrorPercentage"] = {"value": "all"}
    with pytest.raises(k8s.ManifestError, match="mirrorPercentage"):
        k8s.validate(vs, schemas)
    deployment = k8s.sink_manifests("models", "img:1")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(k8s.ManifestError, match="imagePullPolcy: unknown field of V1Container"):
        k8s.validate(deployment)
    service = k8s.sink_manifests("models", "img:1")[1]
    del service["spec"]["ports"][0]["port"]
    with pytest.raises(k8s.ManifestError, match="port"):
        k8s.validate(service)


def test_a_predictor_that_could_not_verify_is_never_rendered():
    for unsigned in (
        k8s.Served("3", CANDIDATE.storage_uri, "", CANDIDATE.bundle_uri),
        k8s.Served("3", CANDIDATE.storage_uri, CANDIDATE.digest, ""),
    ):
        with pytest.raises(k8s.ManifestError, match="churn v3 has no signature bundle to verify against"):
            k8s.inference_service("churn", unsigned, SETTINGS)


def test_model_names_map_to_kubernetes_names_or_say_why_not():
    assert k8s.k8s_name("Churn_Model.v2") == "churn-model-v2"
    with pytest.raises(k8s.ManifestError, match="not a valid InferenceService name"):
        k8s.k8s_name("2churn")
    with pytest.raises(k8s.ManifestError, match="at most"):
        k8s.k8s_name("c" * 60)


def test_storage_uri_rewrite():
    settings = SETTINGS.model_copy(update={"storage_rewrite": ("file:///srv/mlartifacts", "s3://mlflow")})
    assert k8s.storage_uri("file:///srv/mlartifacts/1/x/artifacts/model", settings) == "s3://mlflow/1/x/artifacts/model"
    assert k8s.storage_uri("gs://other/model", settings) == "gs://other/model"


# -- SRM in the unit the backend assigns ----------------------------------------------------------------------


def _per_request_canary(weight: int, keys: int = 300, per_key: int = 12, seed: int = 7) -> pd.DataFrame:
    """A Knative-style canary: every request of every customer draws its arm anew."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    t = 1_000.0
    for k in range(keys):
        for _ in range(per_key):
            t += 0.01
            arm = "candidate" if rng.random() < weight / 100 else "champion"
            rows.append(
                {
                    "id": len(rows),
                    "request_id": f"r{len(rows)}",
                    "time": t,
                    "arm": arm,
                    "routing_key_hash": f"k{k}",
                    "fallback": False,
                    "outputs": "1",
                    "latency_ms": 5.0,
                    "status": "ok",
                    "inputs": json.dumps({"region": "north"}),
                }
            )
    return pd.DataFrame(rows)


def test_srm_counts_requests_when_the_backend_assigns_per_request():
    from releasegate import policy as policies
    from releasegate.analysis import analyse_frames, srm

    pol = policies.load("default")
    preds = _per_request_canary(25)
    feedback = pd.DataFrame(columns=["request_id", "time", "ground_truth"])
    # Counted in routing keys, almost every customer shows up in both arms: a false sample-ratio alarm.
    by_key = analyse_frames(preds, feedback, canary(25), pol)
    assert by_key.srm.alarm and by_key.decision is Decision.invalid
    by_request = analyse_frames(preds, feedback, canary(25), pol, srm_unit=srm.Unit.requests)
    assert not by_request.srm.alarm and by_request.decision is not Decision.invalid
    assert sum(by_request.srm.counts.values()) == len(preds)


# -- the logger sink ------------------------------------------------------------------------------------------


def _event(kind: str, request_id: str, when: float, metadata: dict | None = None) -> dict:
    return {
        "ce-specversion": "1.0",
        "ce-id": request_id,
        "ce-source": "http://localhost:9081/",
        "ce-type": f"org.kubeflow.serving.inference.{kind}",
        "ce-inferenceservicename": "churn",
        "ce-namespace": "models",
        "ce-component": "predictor",
        "ce-endpoint": "",
        "ce-time": datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z"),
        "ce-metadata": json.dumps(metadata or {}),
        "content-type": "application/json",
        **PREDICTOR_PEER,
    }


V2_REQUEST = {
    "inputs": [
        {"name": "tenure", "shape": [2], "datatype": "FP64", "data": [3.0, 40.0]},
        {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["north", "south"]},
    ]
}
V2_RESPONSE = {
    "model_name": "churn",
    "outputs": [{"name": "predict", "shape": [2, 1], "datatype": "INT64", "data": [1, 0]}],
}


def _rows(engine) -> list[dict]:
    import sqlalchemy as sa

    from releasegate import storage

    with engine.connect() as conn:
        return [
            dict(r._mapping) for r in conn.execute(sa.select(storage.predictions).order_by(storage.predictions.c.id))
        ]


def test_sink_writes_the_gateways_prediction_rows_from_logger_events(settings):
    from starlette.testclient import TestClient

    from releasegate import storage
    from releasegate.backends import Applied
    from releasegate.backends.kserve import _record_route
    from releasegate.contract import Mode
    from releasegate.privacy import Protector
    from releasegate.serving import routing
    from releasegate.serving.kserve_sink import create_app

    _record_route(
        Applied(
            model="churn",
            champion_version="2",
            candidate_version="3",
            mode=Mode.shadow,
            candidate_weight=0,
            release_id="rel-1",
        )
    )
    app = create_app(settings, pending_seconds=0.5, sweep_seconds=0.1)
    t0 = time.time()
    with TestClient(app) as client:
        for version, delay in (("2", 0.004), ("3", 0.009)):
            # The response may arrive first: the agent's workers send in any order.
            answered = client.post(
                f"/events?model=churn&version={version}",
                headers=_event("response", "req-1", t0 + delay),
                content=json.dumps(V2_RESPONSE),
            )
            assert answered.status_code == 202
            request = client.post(
                f"/events?model=churn&version={version}",
                headers=_event("request", "req-1", t0, {"X-Routing-Key": ["customer-7"]}),
                content=json.dumps(V2_REQUEST),
            )
            assert request.status_code == 202 and request.json() == {"accepted": True}
        # A request whose response never comes (KServe logs none for a non-200 answer) becomes an error row.
        client.post(
            "/events?model=churn&version=2", headers=_event("request", "req-2", t0), content=json.dumps(V2_REQUEST)
        )
        assert client.post(
            "/feedback", json=[{"request_id": "req-1", "ground_truth": [1, 0]}], headers=FEEDBACK_PEER
        ).json() == {"accepted": 1}
        bad = client.post("/events?model=churn", headers=_event("request", "req-3", t0), content=json.dumps(V2_REQUEST))
        assert bad.status_code == 400 and "version" in bad.json()["error"]
        bad = client.post(
            "/events?model=churn&version=2", headers=_event("request", "req-3", t0), content=json.dumps({"rows": []})
        )
        assert bad.status_code == 400 and "no usable rows" in bad.json()["error"]
        bad = client.post("/feedback", json=[{"request_id": "req-1"}], headers=FEEDBACK_PEER)
        assert bad.status_code == 422 and "ground_truth" in bad.json()["error"]
        # req-2's response never comes: once its pending window (0.5 s) is past, the sweep writes its error rows.
        wait_until(
            lambda: sum(r["request_id"] == "req-2" for r in _rows(storage.engine(settings.db_url))) == 2,
            timeout=60,
            what="req-2's error rows",
        )
    rows = _rows(storage.engine(settings.db_url))
    ok = [r for r in rows if r["request_id"] == "req-1"]
    assert [(r["version"], r["arm"], r["served"], r["mode"], r["release_id"]) for r in ok] == [
        ("2", "champion", True, "shadow", "rel-1")
    ] * 2 + [("3", "candidate", False, "shadow", "rel-1")] * 2
    pseudonym = Protector.of(settings).pseudonym  # as the gateway logs it: text pseudonymised unless declared public
    assert [json.loads(r["inputs"]) for r in ok[:2]] == [
        {"tenure": 3.0, "region": pseudonym("north")},
        {"tenure": 40.0, "region": pseudonym("south")},
    ]
    assert [json.loads(r["outputs"]) for r in ok[:2]] == [1, 0]
    assert ok[0]["latency_ms"] == pytest.approx(4.0, abs=0.01) and ok[2]["latency_ms"] == pytest.approx(9.0, abs=0.01)
    assert ok[0]["time"] == pytest.approx(t0, abs=1e-3)
    assert ok[0]["routing_key_hash"] == routing.routing_key_hash(
        "churn", "customer-7", routing.routing_secret(settings)
    )
    assert ok[0]["sample_bucket"] == routing.sample_bucket("req-1")
    errors = [r for r in rows if r["request_id"] == "req-2"]
    assert len(errors) == 2 and all(r["status"] == "error" and "no response" in r["error"] for r in errors)


def test_the_backend_is_a_setting_of_the_model(settings, monkeypatch):
    from releasegate import pipeline, registry
    from releasegate.backends import DeploymentError

    client = registry.client(settings)
    client.create_registered_model("plain")
    client.create_registered_model("onk8s", tags={"releasegate.backend": "kserve"})
    client.create_registered_model("typo", tags={"releasegate.backend": "k8s"})
    assert pipeline.backend_kind("plain") == "local"
    assert pipeline.backend_kind("onk8s") == "kserve"
    with pytest.raises(DeploymentError, match="unknown backend 'k8s' for model 'typo'"):
        pipeline.backend_kind("typo")
    monkeypatch.setenv("RELEASEGATE_BACKEND", "kserve")
    assert pipeline.backend_kind("plain") == "kserve"
