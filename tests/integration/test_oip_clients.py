"""The Open Inference Protocol as its official clients speak it: tritonclient[http] and the KServe SDK, with their
defaults (binary tensor data both ways), against the gateway as a real process serving the demo models from a
real MLflow registry. The clients run in their own environment (.venv-clients, made by `make venv`): kserve's
pins cannot be resolved together with Airflow's.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import sqlalchemy as sa

from releasegate import storage
from releasegate.serving import routing
from tests.integration.conftest import ROOT, free_port, gateway_process
from tests.integration.test_gateway import logged_form
from tests.require import require
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
MODEL = "churn"
ADMIN = "rg-test-admin-key-0123456789abcdef"
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
LONG_ID = "oip-long-" + "x" * 300  # the protocol sets no bound on a request id; ours (X-Request-Id) is 64


class Served:
    def __init__(self, url: str, versions: dict[str, str], rows: list[dict], expected: dict[str, list], settings):
        self.url, self.versions, self.rows, self.expected, self.settings = url, versions, rows, expected, settings
        self.client = httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {ADMIN}"})

    def run(self, script: str) -> dict:
        """One client script's outcomes, each call's {"ok", "value"} or {"ok": false, "status", "error"}."""
        datatypes = {t["name"]: t["datatype"] for t in self.client.get(f"/v2/models/{MODEL}").json()["inputs"]}
        job = {
            "url": self.url,
            "key": ADMIN,
            "model": MODEL,
            "versions": self.versions,
            "rows": self.rows,
            "datatypes": datatypes,
            "long_id": LONG_ID,
        }
        done = subprocess.run(
            [str(CLIENTS_PYTHON), str(ROOT / "tests" / "clients" / script)],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def logged(self, request_id: str) -> list:
        table = storage.predictions
        query = sa.select(table).where(table.c.request_id == request_id)

        def rows() -> list:
            with storage.engine(self.settings.db_url).connect() as conn:
                return conn.execute(query).all()

        return wait_until(rows, timeout=30, what=f"the log's rows of {request_id[:40]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo's champion and its better candidate, both signed, on a canary route at half the traffic."""
    require(None if CLIENTS_PYTHON.exists() else f"{CLIENTS_PYTHON} is missing: `make venv` makes it")
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("oip")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        from releasegate import registry, signing
        from releasegate.demo import data, models
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        registered = models.register_demo_models(settings, model_name=MODEL)
        versions = {"champion": registered["champion"], "candidate": registered["good"]}
        for version in versions.values():
            signing.sign_version(MODEL, version, settings)
        frame = data.generate(60, seed=11).drop(columns=[data.LABEL])
        rows = json.loads(frame.to_json(orient="records"))
        # Each version's own answers, from a verified copy (MLflow's models:/ load writes into a local store's
        # model directory, which the signature then no longer covers).
        expected = {
            v: [int(p) for p in registry.load_pyfunc(signing.fetch_verified(MODEL, v, settings)).predict(frame)]
            for v in versions.values()
        }
        # The two versions answer these rows differently, so an answer shows which one gave it.
        assert expected[versions["champion"]] != expected[versions["candidate"]]
        gw = Served(f"http://127.0.0.1:{port}", versions, rows, expected, settings)
        try:
            with gateway_process(home, port):
                route = {
                    "champion_version": versions["champion"],
                    "candidate_version": versions["candidate"],
                    "mode": "canary",
                    "candidate_weight": 50,
                    "release_id": "rel-oip",
                }
                resp = gw.client.put(f"/admin/routes/{MODEL}", json=route, timeout=180)  # loads: slow when busy
                assert resp.status_code == 200, resp.text
                yield gw
        finally:
            gw.client.close()
            storage.dispose_all()


def _answer(outcome: dict) -> object:
    assert outcome["ok"], outcome
    return outcome["value"]


def test_tritonclient_with_its_defaults_health_metadata_and_binary_inference(served):
    out = served.run("triton_calls.py")
    champion, candidate = served.versions["champion"], served.versions["candidate"]
    assert _answer(out["server_live"]) is True and _answer(out["server_ready"]) is True
    assert "binary_tensor_data" in _answer(out["server_metadata"])["extensions"]
    assert _answer(out["model_ready"]) is True and _answer(out["model_ready_version"]) is True
    assert _answer(out["model_ready_other_version"]) is False  # not served: the client reads a 404 as not ready
    metadata = _answer(out["model_metadata_version"])
    assert [t["name"] for t in metadata["inputs"]] == list(served.rows[0])

    # The client's default request: every input in binary, every output asked for in binary.
    routed = _answer(out["infer"])
    assert routed["version"] in (champion, candidate)
    assert routed["predict"] == served.expected[routed["version"]] and routed["binary_output"]
    # A version asked for by number answers, whatever the canary's split.
    assert _answer(out["infer_champion_version"])["predict"] == served.expected[champion]
    pinned = _answer(out["infer_candidate_version"])
    assert pinned["version"] == candidate and pinned["predict"] == served.expected[candidate]
    assert out["infer_other_version"]["status"] == "404"
    assert f"served: {champion}, {candidate}" in out["infer_other_version"]["error"]

    # The same request in JSON both ways (binary_data=False), as a client without the extension sends it.
    as_json = _answer(out["infer_json"])
    assert as_json["predict"] == served.expected[as_json["response"]["model_version"]]
    assert "data" in as_json["response"]["outputs"][0]

    # A declared datatype the column cannot hold is refused, naming both.
    refused = out["infer_wrong_datatype"]
    assert refused["status"] == "422" and "'age'" in refused["error"] and "BOOL" in refused["error"]

    # The binary inputs were logged as the model saw them; a pinned call is no exposure of the release.
    logged = served.logged(pinned["id"])
    assert len(logged) == len(served.rows)
    assert [json.loads(r.inputs) for r in logged] == logged_form(served.settings, served.rows)
    assert {(r.version, r.arm, r.mode, r.release_id, r.served) for r in logged} == {
        (candidate, "candidate", "single", None, True)
    }


def test_any_request_id_is_echoed_and_its_feedback_joins_the_logged_prediction(served):
    out = served.run("triton_calls.py")
    assert _answer(out["infer_long_id"])["id"] == LONG_ID
    logged_as = routing.logged_request_id(LONG_ID)
    assert logged_as.startswith("oip-long-xxxxxxx#") and len(logged_as) <= 64
    assert len(served.logged(logged_as)) >= len(served.rows)

    resp = served.client.post("/feedback", json={"request_id": LONG_ID, "ground_truth": [0] * len(served.rows)})
    assert resp.status_code == 200, resp.text
    table = storage.feedback

    def stored() -> list:
        with storage.engine(served.settings.db_url).connect() as conn:
            return conn.execute(sa.select(table.c.request_id).where(table.c.request_id == logged_as)).all()

    wait_until(stored, timeout=30, what="the feedback row under the logged id")


def test_kserve_sdk_with_its_defaults(served):
    out = served.run("kserve_calls.py")
    assert _answer(out["server_live"]) is True and _answer(out["server_ready"]) is True
    assert _answer(out["model_ready"]) is True
    answer = _answer(out["infer"])
    assert answer["predict"] in list(served.expected.values())
    assert _answer(out["infer_long_id"])["id"] == LONG_ID


def test_every_answer_off_the_inference_paths_is_json(served):
    for path in ("/v2/models", "/v2/models/", "/no/such/path", f"/v2/models/{MODEL}/versions/999/ready"):
        resp = served.client.get(path, follow_redirects=False)
        assert resp.status_code == 404, (path, resp.status_code)
        assert resp.headers["content-type"] == "application/json" and "error" in resp.json(), path
