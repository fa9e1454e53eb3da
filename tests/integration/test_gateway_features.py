"""A model whose features live in Feast, served by the real gateway on loopback.

The demo's feature repository is built for real (parquet offline source, materialized into Feast's SQLite
online store, or into the Redis at 127.0.0.1:6379 under a project name of the test's own, torn down after);
the model is trained on Feast's point-in-time join and declares its feature service. A request carries only
the entity key and its own fields.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa
import yaml

from releasegate import storage
from releasegate.contract import FEAST_TAG, MissingFeatures
from tests.integration.conftest import free_port, gateway_process
from tests.require import require
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
MODEL = "churn-feast"
ADMIN = "rg-test-admin-key-0123456789abcdef"
REDIS = ("127.0.0.1", 6379)
REDIS_DB = 7


def _redis_missing() -> str | None:
    try:
        with socket.create_connection(REDIS, timeout=2):
            return None
    except OSError:
        return (
            "the Redis online store test needs a Redis server at 127.0.0.1:6379 (e.g. `apt-get install redis-server`)"
        )


class Served:
    def __init__(self, url: str, store, settings, log, version: str):
        self.url, self.store, self.settings, self.log_path, self.version = url, store, settings, log, version
        self.client = httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {ADMIN}"})

    def invoke(self, records: list[dict], request_id: str) -> httpx.Response:
        return self.client.post(
            f"/models/{MODEL}/invocations", json={"dataframe_records": records}, headers={"x-request-id": request_id}
        )

    def logged_inputs(self, request_id: str) -> list[dict]:
        table = storage.predictions
        query = sa.select(table.c.inputs).where(table.c.request_id == request_id).order_by(table.c.id)

        def read():
            with storage.engine(self.settings.db_url).connect() as conn:
                return [orjson.loads(r.inputs) for r in conn.execute(query)]

        return wait_until(read, timeout=20, what=f"the log rows of {request_id}")

    def declare(self, on_missing: MissingFeatures, defaults: dict | None = None) -> None:
        """Change the model's declaration; the gateway reads it with the next route change."""
        from releasegate import training
        from releasegate.demo import feature_repo

        training.declare_features(
            MODEL,
            feature_service=feature_repo.FEATURE_SERVICE,
            entities=[feature_repo.ENTITY],
            on_missing=on_missing,
            defaults=defaults,
        )
        resp = self.client.put(f"/admin/routes/{MODEL}", json={"champion_version": self.version}, timeout=180)
        assert resp.status_code == 200, resp.text

    def misses(self, reason: str, action: str) -> float:
        text = self.client.get("/metrics").text
        line = f'releasegate_gateway_feature_misses_total{{action="{action}",model="{MODEL}",reason="{reason}"}} '
        return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line)), 0.0)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def served(request, tmp_path_factory):
    """The demo's feature repository on one online store, a model trained on it, the gateway serving it."""
    from tests.conftest import _point_env_at

    online = None
    if request.param == "redis":
        require(_redis_missing())
        online = f"{REDIS[0]}:{REDIS[1]},db={REDIS_DB}"
    home = tmp_path_factory.mktemp(f"features-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        import mlflow

        from examples.train_with_feast import train_and_register
        from releasegate import signing
        from releasegate.demo import feature_repo
        from releasegate.settings import get_settings

        repo = home / "feature_repo"
        project = f"rg_test_{secrets.token_hex(4)}"  # Redis keys of this test's own
        store = feature_repo.build(repo, n=400, online=online, project=project)
        mp.setenv("RELEASEGATE_FEAST_REPO", str(repo))
        # Timeouts are not under test here: a lookup delayed by a busy machine must not turn into a 503.
        mp.setenv("RELEASEGATE_GATEWAY_FEATURE_TIMEOUT", "10")
        settings = get_settings()
        signing.ensure_keys(settings)
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        mlflow.set_registry_uri(settings.mlflow_tracking_uri)
        settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment("feast", artifact_location=settings.mlflow_artifact_root.as_uri())
        mlflow.set_experiment("feast")
        version = train_and_register(MODEL, repo)
        signing.sign_version(MODEL, version, settings)
        port = free_port()
        try:
            with gateway_process(home, port) as (_, log):
                served = Served(f"http://127.0.0.1:{port}", store, settings, log, version)
                try:
                    resp = served.client.put(f"/admin/routes/{MODEL}", json={"champion_version": version}, timeout=180)
                    assert resp.status_code == 200, resp.text
                    yield served
                finally:
                    served.client.close()
        finally:
            store.teardown()  # the online store's rows (Redis keys, SQLite tables) and the registry's objects
            storage.dispose_all()
            if online is not None:
                import redis

                left = redis.Redis(host=REDIS[0], port=REDIS[1], db=REDIS_DB)
                assert not [k for k in left.scan_iter(count=1000) if project.encode() in k]


def _request(customer_ids: list[int]) -> list[dict]:
    return [
        {"customer_id": cid, "age": 30 + cid % 40, "region": "east", "plan": "basic", "channel": "phone"}
        for cid in customer_ids
    ]


def test_a_request_with_only_its_entity_key_is_served_with_the_stores_features_and_they_are_logged(served):
    from releasegate.demo import feature_repo

    served.declare(MissingFeatures.reject)
    sent = _request([3, 17, 250, 3])  # a customer twice: read once, given to both rows
    resp = served.invoke(sent, "features-found")
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["predictions"]) == 4
    online = served.store.get_online_features(
        features=[f"{feature_repo.FEATURE_VIEW}:{name}" for name in feature_repo.FEATURES],
        entity_rows=[{"customer_id": r["customer_id"]} for r in sent],
    ).to_dict()
    logged = served.logged_inputs("features-found")
    assert len(logged) == 4
    for i, row in enumerate(logged):
        # What the model saw: the store's five values and the request's own fields (text pseudonymised).
        assert {name: row[name] for name in feature_repo.FEATURES} == {
            name: online[name][i] for name in feature_repo.FEATURES
        }
        assert row["age"] == sent[i]["age"] and "customer_id" not in row


def test_the_stores_own_read_answers_what_get_online_features_answers(served):
    """A plain feature service is read with the online store's own `online_read` (serving/features.py,
    `_Direct`), not through `get_online_features`: for keys repeated, unknown and in any order it answers, value
    for value, what Feast's own call does, on SQLite (in a thread) and on Redis (on the event loop)."""
    import asyncio

    from releasegate.demo import feature_repo
    from releasegate.serving.features import _Direct

    store = served.store
    service = store.get_feature_service(feature_repo.FEATURE_SERVICE)
    direct = _Direct.of(store, service, [feature_repo.ENTITY], feature_repo.FEATURES)
    assert direct is not None
    keys = {feature_repo.ENTITY: [250, 5, 5, 987_654, 17, 3]}
    expected = store.get_online_features(features=service, entity_rows=keys).to_dict()
    expected = {name: expected[name] for name in feature_repo.FEATURES}
    assert expected[feature_repo.FEATURES[0]][3] is None and expected[feature_repo.FEATURES[0]][0] is not None
    online = store._get_provider().online_store
    asked = direct.asked(keys)
    read = [(a, online.online_read(store.config, a.table, a.keys, list(a.names))) for a in asked]
    assert direct.values(6, read) == expected
    if store.provider.async_supported.online.read:

        async def read_async():  # one loop: Feast's asyncio client belongs to the loop that made it
            read = [(a, await online.online_read_async(store.config, a.table, a.keys, list(a.names))) for a in asked]
            return read, await direct.read_async(keys)  # the second: what the gateway calls

        read, values = asyncio.run(read_async())
        assert direct.values(6, read) == expected and values == expected


def test_a_missing_entity_is_rejected_naming_it_when_the_model_says_reject(served):
    served.declare(MissingFeatures.reject)
    before = served.misses("missing_entity", "reject")
    resp = served.invoke(_request([5, 999_999]), "features-missing")
    assert resp.status_code == 422, resp.text
    assert "customer_id=999999" in resp.json()["error"]
    assert served.misses("missing_entity", "reject") == before + 1


def test_a_missing_entity_gets_the_declared_defaults_when_the_model_says_defaults(served):
    from releasegate.demo import feature_repo

    defaults = {"tenure_months": 0, "monthly_charges": 50.0, "total_charges": 0.0, "support_calls": 0}
    defaults["data_usage_gb"] = 20.0
    served.declare(MissingFeatures.defaults, defaults)
    resp = served.invoke(_request([999_998]), "features-defaults")
    assert resp.status_code == 200, resp.text
    (row,) = served.logged_inputs("features-defaults")
    assert {name: row[name] for name in feature_repo.FEATURES} == defaults
    assert served.misses("missing_entity", "defaults") >= 1


def test_a_request_without_the_entity_key_is_refused_naming_it(served):
    served.declare(MissingFeatures.reject)
    resp = served.invoke([{"age": 40, "region": "east", "plan": "basic", "channel": "phone"}], "features-no-key")
    assert resp.status_code == 422 and "'customer_id'" in resp.json()["error"], resp.text


def test_the_declaration_is_refused_loudly_when_it_names_no_known_service(served):
    from releasegate import registry

    registry.client(served.settings).set_registered_model_tag(
        MODEL, FEAST_TAG, '{"feature_service": "nope", "entities": ["customer_id"]}'
    )
    resp = served.client.put(f"/admin/routes/{MODEL}", json={"champion_version": served.version}, timeout=180)
    assert resp.status_code == 200, resp.text
    resp = served.invoke(_request([3]), "features-unknown-service")
    assert resp.status_code == 503 and "no feature service 'nope'" in resp.json()["error"], resp.text
    served.declare(MissingFeatures.reject)


class _Blackhole:
    """A TCP front for Redis: the connections it accepts while `silent` are read and never answered (a store
    that hangs); those accepted afterwards are piped to the real Redis (the store back)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.server.getsockname()[1]
        self.silent = True
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.silent:
                self._held.append(conn)  # open, never answered
                continue
            upstream = socket.create_connection(REDIS)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                sock.close()

    def close(self) -> None:
        self.server.close()
        for conn in self._held:
            conn.close()


def test_a_store_that_hangs_costs_a_request_its_timeout_and_is_used_again_once_it_answers(
    served, tmp_path, monkeypatch
):
    """Redis behind a front that first holds every connection unanswered: a second gateway on the same registry
    and routes, its repository pointed at the front, answers each request with the model's declared defaults
    once `feature_timeout` passes. The hung lookup is given up with its requests (not left waiting forever), so
    once the store answers again the next lookups reach it and the requests get the store's values."""
    from releasegate.demo import feature_repo

    if served.store.config.online_store.type != "redis":
        pytest.skip("the lookup on the event loop (Feast's async API) is Redis's")
    front = _Blackhole()
    repo = tmp_path / "feature_repo"
    shutil.copytree(Path(served.store.repo_path), repo)
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    config["online_store"]["connection_string"] = config["online_store"]["connection_string"].replace(
        f"{REDIS[0]}:{REDIS[1]}", f"127.0.0.1:{front.port}"
    )
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    defaults = dict.fromkeys(feature_repo.FEATURES, -1)
    served.declare(MissingFeatures.defaults, defaults)
    monkeypatch.setenv("RELEASEGATE_FEAST_REPO", str(repo))
    monkeypatch.setenv("RELEASEGATE_GATEWAY_FEATURE_TIMEOUT", "1")
    home = tmp_path / "second"
    home.mkdir()
    port = free_port()
    headers = {"authorization": f"Bearer {ADMIN}"}
    try:
        with gateway_process(home, port), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            def features_of(request_id: str) -> dict:
                resp = client.post(
                    f"/models/{MODEL}/invocations",
                    json={"dataframe_records": _request([5])},
                    headers=headers | {"x-request-id": request_id},
                )
                assert resp.status_code == 200, resp.text
                (row,) = served.logged_inputs(request_id)
                return {name: row[name] for name in feature_repo.FEATURES}

            assert features_of("features-hung-0") == defaults
            assert features_of("features-hung-1") == defaults
            text = client.get("/metrics", headers=headers).text
            line = f'releasegate_gateway_feature_misses_total{{action="defaults",model="{MODEL}",reason="timeout"}} '
            assert next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line)) >= 2

            front.silent = False  # the store answers again
            stored = served.store.get_online_features(
                features=served.store.get_feature_service(feature_repo.FEATURE_SERVICE),
                entity_rows=[{feature_repo.ENTITY: 5}],
            ).to_dict()
            expected = {name: stored[name][0] for name in feature_repo.FEATURES}
            wait_until(
                lambda: features_of(f"features-back-{time.monotonic_ns()}") == expected,
                timeout=60,
                what="the store's values once it answers again",
            )
    finally:
        front.close()


def test_requests_behind_a_lookup_that_hangs_wait_at_most_their_timeout_and_a_broken_lookup_fails_them_at_once(
    served,
):
    """In process, on the gateway's own `Lookup` over the test's store, its read replaced: by one that hangs
    (two requests share it, a third is queued behind it) and by one whose answer cannot be split between its
    requests. Each request gets the declared defaults: at its own timeout (1 s; the third waits less, since
    its lookup is given up at its deadline, not a whole timeout after it starts), or at once. Before each
    request had its own timer; now one timer per lookup and the requests' deadlines must give the same bounds."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from releasegate.demo import feature_repo
    from releasegate.serving.config import GatewayConfig
    from releasegate.serving.features import FeastDeclaration, Lookup
    from releasegate.serving.metrics import Metrics
    from releasegate.serving.payloads import Rows

    if served.store.config.online_store.type != "sqlite":
        pytest.skip("the store's read is replaced: the same whatever the online store, run once")
    defaults = dict.fromkeys(feature_repo.FEATURES, -1)
    declared = FeastDeclaration(
        feature_service=feature_repo.FEATURE_SERVICE,
        entities=[feature_repo.ENTITY],
        on_missing=MissingFeatures.defaults,
        defaults=defaults,
    )
    service = served.store.get_feature_service(feature_repo.FEATURE_SERVICE)
    metrics = Metrics()
    lookup = Lookup(
        MODEL,
        declared,
        served.store,
        service,
        list(feature_repo.FEATURES),
        metrics,
        GatewayConfig(feature_timeout=1.0),
        ThreadPoolExecutor(1),
    )

    async def ask(after: float, customer: int) -> tuple[float, dict]:
        await asyncio.sleep(after)
        start = time.monotonic()
        rows = await lookup.merge(Rows({feature_repo.ENTITY: [customer], "age": [30]}, 1))
        return time.monotonic() - start, {name: rows.columns[name][0] for name in feature_repo.FEATURES}

    async def three() -> list[tuple[float, dict]]:
        return await asyncio.wait_for(asyncio.gather(ask(0, 5), ask(0, 6), ask(0.5, 7)), 30)

    async def hangs(keys):
        await asyncio.sleep(3600)

    lookup.lookup = hangs
    waits = asyncio.run(three())
    assert all(got == defaults for _, got in waits), waits
    # Without deadlines the third would wait for the hung lookup (0.5 s) and then a whole timeout of its own.
    assert all(waited < 1.0 + 0.4 for waited, _ in waits), waits

    async def broken(keys):
        return None  # no values to share out

    lookup.lookup = broken
    waits = asyncio.run(three())
    assert all(got == defaults and waited < 1.0 for waited, got in waits), waits
    counted = {
        reason: metrics.registry.get_sample_value(
            "releasegate_gateway_feature_misses_total", {"model": MODEL, "reason": reason, "action": "defaults"}
        )
        for reason in ("timeout", "error")
    }
    assert counted == {"timeout": 3.0, "error": 3.0}, counted


def test_validation_refuses_a_candidate_that_needs_a_feature_the_online_store_does_not_serve(served):
    """Two ways to need one: a column neither callers send nor the service serves, and a service whose view
    is kept offline only. The real validate step on the real Feast registry."""
    if served.store.config.online_store.type != "sqlite":
        pytest.skip("the registry checks are the same whatever the online store: run once")
    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import FeatureService, FeatureView, Field
    from feast.types import Int64

    from examples.train_with_feast import train_and_register
    from releasegate import validation
    from releasegate.demo import feature_repo

    served.declare(MissingFeatures.reject)
    repo = served.settings.feast_repo
    # A candidate trained on one more column than the champion, which nobody supplies.
    candidate = train_and_register(MODEL, repo, extra_column="loyalty_points")
    report = validation.validate_candidate(MODEL, candidate, served.version, "default", settings=served.settings)
    assert not report.passed
    assert any(
        "'loyalty_points'" in r and "does not serve it in feature service 'churn_account'" for r in report.reasons
    ), report.reasons

    # The same service, but one of its views is kept offline only.
    view = served.store.get_feature_view(feature_repo.FEATURE_VIEW)
    offline = FeatureView(
        name="customer_calls_offline",
        entities=[served.store.get_entity("customer")],
        ttl=view.ttl,
        schema=[Field(name="support_calls", dtype=Int64)],
        source=view.batch_source,
        online=False,
    )
    service = FeatureService(name="churn_with_offline", features=[view, offline])
    served.store.apply([offline, service])
    from releasegate import training

    training.declare_features(MODEL, feature_service="churn_with_offline", entities=[feature_repo.ENTITY])
    try:
        report = validation.validate_candidate(MODEL, served.version, None, "default", settings=served.settings)
        assert not report.passed
        assert any("online store does not serve: support_calls" in r for r in report.reasons), report.reasons
    finally:
        served.declare(MissingFeatures.reject)
