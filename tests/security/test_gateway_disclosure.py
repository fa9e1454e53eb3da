"""Hole 10, unauthenticated information: what the gateway tells a caller it did not give a key to, or about other models.

At 674b38f anyone who could reach the gateway read /metrics (every model, version and route) and /openapi.json
(every model and its input schema) without a key, /readyz listed every route with its load error (file names,
signature failures), and a 404 for an unknown model listed every served model. The attack: an anonymous caller,
and then a caller with a predict key, try to learn which models are served and why one is not.
"""

from __future__ import annotations

import time

import httpx
import pytest

from releasegate import storage
from releasegate.serving import auth
from tests.integration.test_gateway import MODEL, rows
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
HIDDEN = "gw-hidden"  # a model whose route fails to load, then loads


def _get(gw, path: str, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(gw.url + path, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def predict_key(security_gateway) -> str:
    """A predict key the gateway knows: a client's, which may call its model and nothing more."""
    gw = security_gateway
    _, key = auth.create_key("predict", gw.settings)

    def known() -> bool:  # the poller has read it: a key the gateway does not know is a 401
        body = {"dataframe_records": rows(1)}
        headers = {"authorization": f"Bearer {key}"}
        return httpx.post(f"{gw.url}/models/{MODEL}/invocations", json=body, headers=headers).status_code != 401

    wait_until(known, timeout=30, what="the key known")
    return key


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json"])
@pytest.mark.parametrize("key", [None, "rg_0123456789abcdef_not-a-key-we-issued"])
def test_metrics_and_the_openapi_document_need_a_key(security_gateway, path, key):
    resp = _get(security_gateway, path, key)
    assert resp.status_code == 401, resp.text[:500]
    assert MODEL not in resp.text


def test_a_404_for_an_unknown_model_names_no_served_model(security_gateway, predict_key):
    gw = security_gateway
    served = [route["model"] for route in gw.client.get("/admin/routes").json()["routes"]]
    assert MODEL in served
    headers = {"authorization": f"Bearer {predict_key}"}
    probes = [
        httpx.post(f"{gw.url}/models/no-such-model/invocations", json={"dataframe_records": rows(1)}, headers=headers),
        httpx.post(f"{gw.url}/v2/models/no-such-model/infer", json={"inputs": []}, headers=headers),
        httpx.get(f"{gw.url}/v2/models/no-such-model", headers=headers),
        httpx.get(f"{gw.url}/v2/models/no-such-model/ready", headers=headers),
    ]
    for resp in probes:
        assert resp.status_code == 404, (resp.request.url, resp.text)
        assert not [name for name in served if name in resp.text], (resp.request.url, resp.text)


@pytest.fixture
def hidden_versions(security_gateway) -> dict[str, str]:
    """HIDDEN v1 (the gateway tests' tampered files: it fails verification) and v2 (the champion's files)."""
    from releasegate import registry

    client = registry.client(security_gateway.settings)
    client.create_registered_model(HIDDEN)
    versions = {}
    for role in ("tampered", "champion"):
        source = client.get_model_version(MODEL, security_gateway.versions[role])
        versions[role] = str(client.create_model_version(HIDDEN, source.source, run_id=source.run_id).version)
    return versions


def test_readiness_and_a_models_errors_name_no_model_and_no_load_error(security_gateway, hidden_versions, predict_key):
    gw = security_gateway
    with storage.engine(gw.settings.db_url).begin() as conn:  # as another replica, or the pipeline, stores it
        conn.execute(
            storage.routes.insert().values(
                model=HIDDEN,
                champion_version=hidden_versions["tampered"],
                candidate_version=None,
                mode="single",
                candidate_weight=0,
                revision=1,
                updated_at=time.time(),
            )
        )
    try:
        wait_until(lambda: _get(gw, "/readyz").status_code == 503, timeout=30, what="the failed route seen")
        for path in ("/readyz", "/v2/health/ready"):
            resp = _get(gw, path)
            assert resp.status_code == 503 and resp.json() == {"ready": False}, (path, resp.text)
        # A key holder asking for that model learns that it is not ready, not why: the error is an admin's.
        resp = httpx.post(
            f"{gw.url}/models/{HIDDEN}/invocations",
            json={"dataframe_records": rows(1)},
            headers={"authorization": f"Bearer {predict_key}"},
        )
        assert resp.status_code == 503, resp.text
        assert "signature" not in resp.text and "model.sig" not in resp.text, resp.text
    finally:
        resp = gw.client.put(f"/admin/routes/{HIDDEN}", json={"champion_version": hidden_versions["champion"]})
        assert resp.status_code == 200, resp.text
    resp = wait_until(lambda: (r := _get(gw, "/readyz")).status_code == 200 and r, timeout=30, what="ready again")
    assert resp.json() == {"ready": True}
