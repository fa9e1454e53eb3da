"""KServe path: only the models post events to the logger sink, only the feedback account posts labels.

A forged prediction or label steers a promotion, so the sink is not open to the cluster. KServe's
logger cannot send a header (its CRD has a URL and nothing to authenticate with), so the caller is
told apart by its mesh identity: Istio requires mTLS at the sink's sidecar and admits only the
predictors' service accounts to /events and the feedback accounts to /feedback; the sink checks the
identity the sidecar appends to X-Forwarded-Client-Cert again, and counts what it refuses.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from releasegate import k8s, storage
from releasegate.serving.kserve_sink import create_app
from tests.require import require

K8S = k8s.K8sSettings(namespace="models", service_account="churn-predictor")
SINK = "By=spiffe://cluster.local/ns/models/sa/releasegate-sink"
PREDICTOR = f"{SINK};URI=spiffe://cluster.local/ns/models/sa/churn-predictor"
FEEDBACK = f"{SINK};URI=spiffe://cluster.local/ns/models/sa/releasegate-feedback"
OTHER = f"{SINK};URI=spiffe://cluster.local/ns/batch/sa/default"
V2_REQUEST = {"inputs": [{"name": "tenure", "shape": [1], "datatype": "FP64", "data": [3.0]}]}


def _event(kind: str, request_id: str, xfcc: str | None) -> dict:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": request_id,
        "ce-type": f"org.kubeflow.serving.inference.{kind}",
        "ce-time": "2026-01-01T00:00:00Z",
        "content-type": "application/json",
    }
    if xfcc is not None:
        headers["x-forwarded-client-cert"] = xfcc
    return headers


def _count(client, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_unauthenticated_post_to_the_sink_is_refused(settings):
    from starlette.testclient import TestClient

    refusals = [
        # (endpoint, caller, status): no mesh identity, another workload, a model posting labels, ...
        ("/events", None, 401),
        ("/events", OTHER, 403),
        ("/events", FEEDBACK, 403),
        ("/feedback", None, 401),
        ("/feedback", PREDICTOR, 403),
        ("/feedback", OTHER, 403),
        # ... and a caller that writes an allowed identity into the header itself: its sidecar appends the true one.
        ("/events", f"{PREDICTOR},{OTHER}", 403),
        ("/feedback", f"{FEEDBACK},{OTHER}", 403),
    ]
    with TestClient(create_app(settings, k8s_settings=K8S, sweep_seconds=0.05)) as client:
        for i, (endpoint, caller, status) in enumerate(refusals):
            if endpoint == "/events":
                response = client.post(
                    "/events?model=churn&version=2", headers=_event("request", f"forged-{i}", caller), json=V2_REQUEST
                )
            else:
                headers = {} if caller is None else {"x-forwarded-client-cert": caller}
                response = client.post("/feedback", json=[{"request_id": "r", "ground_truth": 1}], headers=headers)
            assert response.status_code == status, (endpoint, caller, response.text)
        assert (
            _count(client, "releasegate_sink_refused_requests_total", endpoint="/events", reason="unauthenticated") == 1
        )
        assert _count(client, "releasegate_sink_refused_requests_total", endpoint="/events", reason="forbidden") == 3
        assert _count(client, "releasegate_sink_refused_requests_total", endpoint="/feedback", reason="forbidden") == 3
        # The accounts the settings name are taken.
        taken = client.post(
            "/events?model=churn&version=2", headers=_event("request", "real", PREDICTOR), json=V2_REQUEST
        )
        labels = client.post(
            "/feedback", json=[{"request_id": "real", "ground_truth": 1}], headers={"x-forwarded-client-cert": FEEDBACK}
        )
        assert (taken.status_code, labels.status_code) == (202, 200)
        deadline = time.monotonic() + 30
        while client.app.state.sink.queued():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with storage.engine(settings.db_url).connect() as conn:
        pairs = conn.execute(sa.select(storage.sink_pairs.c.request_id)).scalars().all()
        labelled = conn.execute(sa.select(storage.feedback.c.request_id)).scalars().all()
    assert pairs == ["real"] and labelled == ["real"]  # nothing forged reached the database


@pytest.fixture
def schemas():
    require(None if k8s.schemas_available(K8S.schemas_dir) else f"CRD schemas not found in {K8S.schemas_dir}")
    return K8S.schemas_dir


def test_the_mesh_admits_only_the_models_and_the_feedback_accounts(schemas):
    deployment, _, peer_auth, policy = k8s.sink_manifests(
        "models", "registry.example.com/releasegate:1.0", settings=K8S
    )
    for doc in (peer_auth, policy):
        k8s.validate(doc, schemas)
    selector = {"matchLabels": {"app.kubernetes.io/name": "releasegate-sink"}}
    assert peer_auth["spec"] == {"selector": selector, "mtls": {"mode": "STRICT"}}  # no plaintext caller at all
    assert policy["spec"]["selector"] == selector and policy["spec"]["action"] == "ALLOW"
    assert policy["spec"]["rules"] == [
        {
            "from": [{"source": {"principals": ["cluster.local/ns/models/sa/churn-predictor"]}}],
            "to": [{"operation": {"methods": ["POST"], "paths": ["/events"]}}],
        },
        {
            "from": [{"source": {"principals": ["cluster.local/ns/models/sa/releasegate-feedback"]}}],
            "to": [{"operation": {"methods": ["POST"], "paths": ["/feedback"]}}],
        },
        {"to": [{"operation": {"methods": ["GET"], "paths": ["/healthz", "/metrics"]}}]},
    ]
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    # The sink's own check reads the same accounts from its environment.
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"] if "value" in e}
    assert env["RELEASEGATE_K8S_SINK_EVENT_ACCOUNTS"] == "models/churn-predictor"
    assert env["RELEASEGATE_K8S_SINK_FEEDBACK_ACCOUNTS"] == "models/releasegate-feedback"
    # The predictors run in the mesh, so their logger's posts carry that identity.
    served = k8s.Served("3", "s3://m/model", "sha256:" + "a" * 64, "s3://m/releasegate/model.sig")
    isvc = k8s.inference_service("churn", served, K8S)
    assert isvc["metadata"]["annotations"]["sidecar.istio.io/inject"] == "true"
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "churn-predictor"


def test_a_service_account_setting_must_name_namespace_and_account(monkeypatch):
    monkeypatch.setenv("RELEASEGATE_K8S_SINK_EVENT_ACCOUNTS", "models/a, models/b")
    assert k8s.K8sSettings.from_env().sink_event_accounts == ["models/a", "models/b"]
    monkeypatch.setenv("RELEASEGATE_K8S_SINK_FEEDBACK_ACCOUNTS", "just-a-name")
    with pytest.raises(k8s.ManifestError, match="a service account must be `namespace/name`, got 'just-a-name'"):
        k8s.K8sSettings.from_env()
