"""A release end to end on a model whose features come from Feast's Redis online store.

The demo's feature repository is built for real (parquet offline source, materialized into the Redis at
127.0.0.1:6379, in a database and under a Feast project of this test's own, torn down after). A champion
(logistic regression) and a better candidate (logistic regression on binned features) are both trained on
Feast's point-in-time join, as examples/train_with_feast.py trains, registered in a real MLflow store
(SQLite) with their feature service declared. The signed champion is served by a real gateway process on
loopback; `releasegate traffic --data` replays other customers' rows, each carrying only `customer_id` and
the request's own fields, their labels posted as feedback. One real `model_release` run (`airflow dags
test`) must then promote the candidate, its logged inputs holding the store's values.

The online store holds each customer's values as of the labels' time (`feature_repo.build(as_of=...)`): the
labels the traffic posts are the outcomes of the values the models are given.

The policy is the default one cut short (one canary step, no slices) with a wide latency allowance: this
test is about the features reaching the models and the analysis, not about latency on a busy machine.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
import yaml

from releasegate import audit, registry, release, storage
from releasegate.contract import Arm, AuditAction
from releasegate.verdict import Decision
from tests.integration.conftest import ROOT, Stack, free_port
from tests.integration.test_gateway_features import REDIS, _redis_missing
from tests.integration.test_model_release import run_release
from tests.require import require
from tests.waiting import gateway_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
MODEL = "churn-feast-release"
REDIS_DB = 8  # test_gateway_features uses 7
POLICY = "feast-quick"
CUSTOMERS = 5_000
TRAINED = 4_000  # customers whose labels train both versions; the others are the live traffic


def _write_policy(folder: Path) -> None:
    policy = yaml.safe_load((ROOT / "include/policies/default.yaml").read_text())
    policy.update(name=POLICY, slices=[])
    policy["canary"]["steps"] = [50]
    policy["guardrails"]["latency_p99_slack_ms"] = 200
    folder.mkdir()
    (folder / f"{POLICY}.yaml").write_text(yaml.safe_dump(policy))


@pytest.fixture(scope="module")
def feast_stack(tmp_path_factory, airflow_env):
    """The feature repository on Redis, champion and candidate registered, the gateway serving the champion and
    traffic with labels flowing; yields (stack, store, traffic rows)."""
    import pandas as pd

    from tests.conftest import _point_env_at

    require(_redis_missing())
    home = tmp_path_factory.mktemp("feast-release")
    port = free_port()
    online = f"{REDIS[0]}:{REDIS[1]},db={REDIS_DB}"
    project = f"rg_release_{secrets.token_hex(4)}"  # Redis keys of this test's own
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        mp.setenv("RELEASEGATE_GATEWAY_URL", f"http://127.0.0.1:{port}")
        mp.setenv("RELEASEGATE_POLICIES_DIR", str(home / "policies"))
        mp.setenv("RELEASEGATE_FEAST_REPO", str(home / "feature_repo"))
        # Timeouts are not under test here: a lookup delayed by a busy machine must not turn into a 503.
        mp.setenv("RELEASEGATE_GATEWAY_FEATURE_TIMEOUT", "10")
        _write_policy(home / "policies")
        import mlflow

        from examples.train_with_feast import train_and_register
        from releasegate import signing
        from releasegate.backends.local import LocalBackend
        from releasegate.demo import data, feature_repo
        from releasegate.settings import get_settings

        repo = home / "feature_repo"
        store = feature_repo.build(repo, n=CUSTOMERS, online=online, project=project, as_of=feature_repo.LABEL_TIME)
        stack = None
        try:
            labelled = pd.read_parquet(repo / "labelled.parquet")
            labelled.iloc[:TRAINED].to_parquet(repo / "labelled.parquet")  # what train_and_register reads
            traffic = labelled.iloc[TRAINED:][[feature_repo.ENTITY, *feature_repo.REQUEST_FIELDS, data.LABEL]]
            traffic.to_parquet(home / "traffic.parquet")

            settings = get_settings()
            signing.ensure_keys(settings)
            mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
            mlflow.set_registry_uri(settings.mlflow_tracking_uri)
            settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
            mlflow.create_experiment("feast", artifact_location=settings.mlflow_artifact_root.as_uri())
            mlflow.set_experiment("feast")
            champion = train_and_register(MODEL, repo, kind="logistic_regression")
            candidate = train_and_register(MODEL, repo, kind="binned_logistic")
            registry.set_alias(MODEL, "champion", champion)
            signing.sign_version(MODEL, champion)

            stack = Stack(home, dict(os.environ))
            stack.versions = {"champion": champion, "candidate": candidate}
            gateway = stack.start("gateway", [sys.executable, "-m", "releasegate.serving", "--port", str(port)])
            gateway_ready(settings.gateway_url, gateway, lambda: stack.log("gateway"), timeout=120)
            LocalBackend(settings=settings).set_route(MODEL, champion)
            traffic_args = ["--data", str(home / "traffic.parquet"), "--label", data.LABEL, "--rps", "200"]
            stack.start(
                "traffic",
                ["nice", "-n", "5", sys.executable, "-m", "releasegate.cli", "traffic", "--model", MODEL]
                + traffic_args
                + ["--duration", "0", "--feedback-delay", "1", "--api-key", settings.admin_api_key],
            )
            yield stack, store, traffic
        finally:
            if stack is not None:
                stack.stop("traffic")
                stack.stop("gateway")
            store.teardown()  # the online store's rows (Redis keys) and the registry's objects
            storage.dispose_all()
            import redis

            left = redis.Redis(host=REDIS[0], port=REDIS[1], db=REDIS_DB)
            assert not [k for k in left.scan_iter(count=1000) if project.encode() in k]


def test_a_better_candidate_whose_features_come_from_feast_is_promoted_on_the_stores_values(feast_stack):
    from releasegate.demo import feature_repo

    stack, store, traffic = feast_stack
    candidate, champion = stack.versions["candidate"], stack.versions["champion"]
    run_release(candidate, policy=POLICY, model=MODEL)
    rel = next(r for r in release.list_releases(MODEL) if r.candidate_version == candidate)
    assert rel.state is release.State.promoted, (rel.reasons, stack.log("gateway"), stack.log("traffic"))
    assert [v.window.stage.weight for v in rel.verdicts[1:]] == [50] and rel.verdicts[0].window.stage.is_shadow
    assert rel.verdicts[0].decision is rel.verdicts[-1].decision is Decision.promote, rel.reasons
    assert rel.verdicts[0].samples[Arm.champion].labelled > 0
    assert registry.get_alias(MODEL, "champion") == candidate and registry.get_alias(MODEL, "previous") == champion

    # Validation passed on the declared features: the service the online store serves, the holdout's contract,
    # the offline comparison on the features the point-in-time join gave.
    [validated] = [e for e in audit.events(release_id=rel.release_id) if e["action"] == AuditAction.validation]
    report = validated["details"]
    assert report["passed"] and report["reasons"] == [], report["reasons"]
    assert report["features"]["feature_service"] == feature_repo.FEATURE_SERVICE
    assert sorted(report["features"]["online"]) == sorted(feature_repo.FEATURES) and not report["features"]["offline"]
    assert report["contract"]["success"] and report["evaluation"]["passed"], report

    # What both arms saw in the release: for each logged request, the store's five values of the customer it
    # named (the traffic sent only the key and its own fields; `age` tells which customer's row it was).
    online = store.get_online_features(
        features=store.get_feature_service(feature_repo.FEATURE_SERVICE),
        entity_rows=[{feature_repo.ENTITY: int(c)} for c in traffic[feature_repo.ENTITY]],
    ).to_dict()
    ages: dict[tuple, set[int]] = {}
    for i, age in enumerate(traffic["age"]):
        ages.setdefault(tuple(online[name][i] for name in feature_repo.FEATURES), set()).add(int(age))
    table = storage.predictions
    query = sa.select(table.c.arm, table.c.inputs).where(table.c.release_id == rel.release_id)
    with storage.engine().connect() as conn:
        logged = [(arm, orjson.loads(inputs)) for arm, inputs in conn.execute(query)]
    assert {arm for arm, _ in logged} == {Arm.champion.value, Arm.candidate.value}
    unknown = [
        row for _, row in logged if row["age"] not in ages.get(tuple(row[n] for n in feature_repo.FEATURES), set())
    ]
    assert not unknown, f"{len(unknown)} of {len(logged)} logged rows hold values the store does not: {unknown[:3]}"
    assert all(feature_repo.ENTITY not in row for _, row in logged)
