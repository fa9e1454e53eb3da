"""nightly_evaluation end to end with dag.test(): demo models in a real MLflow store, demo traffic written
through the gateway's own log writer, one quiet day, one drifted day and one day without traffic."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pendulum
import pytest

from releasegate import audit, registry, signing
from releasegate.contract import RETRAINING_ASSET

ROOT = Path(__file__).resolve().parents[2]
MODEL = "churn"
DAY = 86_400
NOW = time.time()
QUIET_DAY = NOW - 6 * DAY  # traffic like the training data
DRIFTED_DAY = NOW - 3 * DAY  # the demo's drift knob turned all the way
EMPTY_DAY = NOW - 9 * DAY
pytestmark = pytest.mark.integration


def log_traffic(
    versions: dict, start: float, drift: float, seed: int, n: int = 2000, labelled: int = 600, shadowed: int = 400
) -> None:
    """`n` one-row requests over the hour before `start` + 1 h: served by the champion, the first `shadowed` also
    mirrored to the good candidate, the first `labelled` with feedback; written by the gateway's log writers."""
    from releasegate import storage
    from releasegate.demo import data
    from releasegate.serving.logwriter import LogWriter
    from releasegate.serving.metrics import Metrics
    from releasegate.serving.routing import routing_key_hash, sample_bucket

    frame = data.generate(n, seed=seed, drift=drift)
    features = frame[data.FEATURES]
    answers = {}
    for role in ("champion", "good"):
        answers[role] = list(registry.load_pyfunc(signing.fetch_verified(MODEL, versions[role])).predict(features))
    metrics, engine = Metrics(), storage.engine()
    predictions = LogWriter(engine, storage.predictions, metrics, batch_rows=1000).start()
    feedback = LogWriter(engine, storage.feedback, metrics, batch_rows=1000).start()
    records = features.to_dict("records")
    for i, record in enumerate(records):
        request_id = uuid.uuid4().hex
        base = {
            "request_id": request_id,
            "time": start + i * 3600 / n,
            "model": MODEL,
            "mode": "shadow" if i < shadowed else "single",
            "release_id": None,
            "routing_key_hash": routing_key_hash(MODEL, request_id, b"test"),
            "sample_bucket": sample_bucket(request_id),
            "fallback": False,
            "inputs": orjson.dumps(record).decode(),
            "latency_ms": 2.0,
            "status": "ok",
            "error": None,
        }
        predictions.put(
            base
            | {
                "version": versions["champion"],
                "arm": "champion",
                "served": True,
                "outputs": orjson.dumps(int(answers["champion"][i])).decode(),
            }
        )
        if i < shadowed:
            predictions.put(
                base
                | {
                    "version": versions["good"],
                    "arm": "candidate",
                    "served": False,
                    "outputs": orjson.dumps(int(answers["good"][i])).decode(),
                }
            )
        if i < labelled:
            feedback.put(
                {
                    "request_id": request_id,
                    "time": base["time"] + 1,
                    "ground_truth": orjson.dumps(int(frame[data.LABEL].iloc[i])).decode(),
                    "business_value": None,
                }
            )
    predictions.close()
    feedback.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, airflow_env):
    """Airflow's environment, demo models registered, a quiet day and a drifted day of traffic logged."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("nightly")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        from airflow import settings as airflow_settings

        # dag.test() runs in this process: its ORM must be on the session's migrated database, whatever an
        # earlier module of this process pointed it at.
        airflow_settings.configure_vars()
        airflow_settings.reconfigure_orm()
        from releasegate import storage
        from releasegate.demo import models
        from releasegate.settings import get_settings

        signing.ensure_keys(get_settings())
        versions = models.register_demo_models(get_settings(), model_name=MODEL)
        for version in versions.values():  # the nightly evaluation loads a champion only from verified bytes
            signing.sign_version(MODEL, version)
        log_traffic(versions, QUIET_DAY, drift=0.0, seed=501)
        log_traffic(versions, DRIFTED_DAY, drift=1.0, seed=502)
        try:
            yield versions
        finally:
            storage.dispose_all()


def run_nightly(day: float):
    """One nightly_evaluation run through dag.test(), as if scheduled 2 h after `day` began; returns the run."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["nightly_evaluation"]
    return dag.test(logical_date=pendulum.from_timestamp(day + 2 * 3600, tz="UTC"))


def states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def retraining_events() -> list[dict]:
    import sqlalchemy as sa
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            sa.select(AssetEvent.extra)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            # The session's Airflow database is shared: the other DAG emits on the same asset.
            .where(AssetModel.name == RETRAINING_ASSET, AssetEvent.source_dag_id == "nightly_evaluation")
            .order_by(AssetEvent.id)
        ).all()
    return [r.extra for r in rows]


def test_a_quiet_day_raises_no_alarm(world):
    run = run_nightly(QUIET_DAY)

    assert str(run.state) == "success", states(run)
    assert states(run)["flag_retraining"] == "skipped"
    [event] = [e for e in audit.events(model=MODEL) if e["action"] == "nightly.evaluated"]
    result = event["details"]
    assert result["version"] == world["champion"] and result["reasons"] == []
    assert result["requests"] == 2000 and result["input_drift"]["drifted_columns"] == []
    assert result["contract"]["success"] is True
    assert result["quality"]["rows_current"] == 600 and result["quality"]["metrics"]["accuracy"] > 0.75
    assert result["prediction_drift"]["rows_current"] == 400
    stored = registry.client().list_artifacts(registry.source_run(MODEL, world["champion"]), result["artifacts"])
    assert {Path(a.path).name for a in stored} >= {
        "input_drift.html",
        "input_drift.json",
        "prediction_drift.html",
        "quality.html",
        "quality.json",
        "contract.json",
        "evaluation.json",
    }
    assert retraining_events() == []


def test_a_drifted_day_flags_retraining_and_fails_the_run(world):
    """And its purge runs all the same: under a five-day retention the quiet day's rows and report go."""
    import sqlalchemy as sa

    from releasegate import storage
    from releasegate.contract import RETENTION_TAG

    registry.client().set_registered_model_tag(
        MODEL, RETENTION_TAG, '{"predictions_days": 5, "feedback_days": 5, "reports_days": 5}'
    )
    p, f, cutoff = storage.predictions, storage.feedback, NOW - 5 * DAY

    def counts() -> tuple[int, int, int]:
        with storage.engine().connect() as conn:
            return (
                conn.execute(sa.select(sa.func.count()).where(p.c.time < cutoff)).scalar_one(),
                conn.execute(sa.select(sa.func.count()).where(f.c.time < cutoff)).scalar_one(),
                conn.execute(sa.select(sa.func.count()).select_from(p)).scalar_one(),
            )

    old_rows, old_labels, rows = counts()
    assert old_rows >= 2000 and old_labels == 600  # the quiet day's
    run = run_nightly(DRIFTED_DAY)

    assert str(run.state) == "failed"
    assert states(run) == {
        "champions": "success",
        "evaluate": "success",
        "flag_retraining": "success",
        "alert": "failed",
        "purge": "success",
    }
    assert counts() == (0, 0, rows - old_rows)  # the quiet day's rows and labels purged, the drifted day's kept
    [purged] = [e["details"] for e in audit.events(model=MODEL) if e["action"] == "data.purged"]
    assert (purged["predictions"], purged["feedback"]) == (old_rows, old_labels)
    assert [r.rsplit("/", 1)[1] for r in purged["reports"]] == [
        datetime.fromtimestamp(QUIET_DAY + 2 * 3600, UTC).strftime("%Y%m%dT%H%M%SZ")
    ]
    [extra] = retraining_events()
    assert extra["model"] == MODEL and extra["version"] == world["champion"]
    assert any(r.startswith("input drift in") for r in extra["reasons"])
    assert "region" in extra["reasons"][0] and extra["reports"].startswith("releasegate/reports/nightly/")
    alerts = [e for e in audit.events(model=MODEL) if e["action"] == "nightly.alert"]
    assert len(alerts) == 1 and alerts[0]["details"]["reasons"] == extra["reasons"]


def test_a_day_without_traffic_ends_cleanly_saying_so(world):
    run = run_nightly(EMPTY_DAY)

    assert str(run.state) == "success", states(run)
    [event] = [e for e in audit.events(model=MODEL) if e["action"] == "nightly.no_traffic"]
    assert event["version"] == world["champion"]
