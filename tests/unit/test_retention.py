"""Retention: each model's predictions, feedback and nightly reports go when older than it declares; the purge
works in batches beside a live log writer and audits its counts (a real SQLite log and a real MLflow store)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import orjson
import pytest
import sqlalchemy as sa

from releasegate import audit, registry, retention, storage
from releasegate.contract import RETENTION_TAG, AuditAction
from releasegate.retention import DAY, Retention, RetentionError
from tests.unit.mlflow_store import register

NOW = 1_790_000_000.0


def _log(eng: sa.Engine, model: str, ages_days: list[float], feedback: bool = True, prefix: str = "") -> None:
    rows = [
        {
            "request_id": f"{prefix}{model}-{i}",
            "time": NOW - age * DAY,
            "model": model,
            "version": "1",
            "arm": "champion",
            "mode": "single",
            "routing_key_hash": "0" * 16,
            "sample_bucket": i % 1000,
            "served": True,
            "inputs": orjson.dumps({"x": i}).decode(),
            "outputs": "1",
            "status": "ok",
        }
        for i, age in enumerate(ages_days)
    ]
    with eng.begin() as conn:
        conn.execute(storage.predictions.insert(), rows)
        if feedback:
            conn.execute(
                storage.feedback.insert(),
                [{"request_id": r["request_id"], "time": r["time"] + 60, "ground_truth": "1"} for r in rows],
            )


def _times(eng: sa.Engine, table: sa.Table, model: str | None = None) -> list[float]:
    query = sa.select(table.c.time)
    if model is not None:
        query = query.where(table.c.model == model)
    with eng.connect() as conn:
        return sorted(conn.execute(query).scalars())


def test_each_model_keeps_what_its_retention_declares_and_the_counts_are_audited(settings):
    eng = storage.engine()
    _log(eng, "churn", [1, 10, 29, 31, 100])
    _log(eng, "fraud", [1, 10, 29, 31, 100])
    declared = {"churn": Retention(predictions_days=30, feedback_days=30), "fraud": Retention()}

    purged = retention.purge(NOW, retention=declared.__getitem__, reports=False, batch=2, actor="test")

    by_model = {p.model: p for p in purged}
    assert (by_model["churn"].predictions, by_model["churn"].feedback) == (2, 2)
    assert (by_model["fraud"].predictions, by_model["fraud"].feedback) == (1, 0)  # 90 days; feedback 365
    assert min(_times(eng, storage.predictions, "churn")) >= NOW - 30 * DAY
    assert min(_times(eng, storage.predictions, "fraud")) >= NOW - 90 * DAY
    assert len(_times(eng, storage.predictions)) == 7
    assert len(_times(eng, storage.feedback)) == 8  # fraud's 100-day-old label stays: 365 days for feedback
    events = [e for e in audit.events() if e["action"] == AuditAction.data_purged]
    assert {e["model"]: (e["details"]["predictions"], e["details"]["feedback"]) for e in events} == {
        "churn": (2, 2),
        "fraud": (1, 0),
    }
    assert events[0]["details"]["retention"]["predictions_days"] == 30 and events[0]["actor"] == "test"
    assert audit.verify().ok

    again = retention.purge(NOW, retention=declared.__getitem__, reports=False)
    assert all(p.predictions == p.feedback == 0 for p in again)
    assert len([e for e in audit.events() if e["action"] == AuditAction.data_purged]) == 2  # nothing new to say


def test_feedback_whose_request_is_gone_goes_after_the_default_feedback_retention(settings):
    eng = storage.engine()
    with eng.begin() as conn:
        conn.execute(
            storage.feedback.insert(),
            [
                {"request_id": "lost-old", "time": NOW - 400 * DAY, "ground_truth": "0"},
                {"request_id": "lost-new", "time": NOW - 10 * DAY, "ground_truth": "0"},
            ],
        )
    retention.purge(NOW, retention=lambda m: Retention(), reports=False)
    with eng.connect() as conn:
        assert list(conn.execute(sa.select(storage.feedback.c.request_id)).scalars()) == ["lost-new"]


def test_a_purge_in_batches_leaves_the_log_writer_writing(settings):
    """A writer inserting new rows all through a purge of 20,000 old ones loses none and is never held for long."""
    eng = storage.engine()
    _log(eng, "churn", [200.0] * 20_000, feedback=False)
    stop, waits, written = threading.Event(), [], []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            with eng.begin() as conn:
                conn.execute(
                    storage.predictions.insert(),
                    {
                        "request_id": f"live-{i}",
                        "time": NOW,
                        "model": "churn",
                        "version": "1",
                        "arm": "champion",
                        "mode": "single",
                        "routing_key_hash": "1" * 16,
                        "sample_bucket": 0,
                        "served": True,
                        "status": "ok",
                    },
                )
            waits.append(time.monotonic() - started)
            written.append(i)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        purged = retention.purge(NOW, retention=lambda m: Retention(), reports=False, batch=1000)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert purged[0].predictions == 20_000 and purged[0].batches == 20
    with eng.connect() as conn:
        live = conn.execute(sa.select(sa.func.count()).where(storage.predictions.c.request_id.like("live-%"))).scalar()
    assert live == len(written) > 0, "every row the writer wrote during the purge is kept"
    print(f"writer: {len(written)} inserts during the purge, longest wait {max(waits) * 1000:.0f} ms")


def test_nightly_reports_older_than_the_retention_are_deleted_from_mlflow(store, classifier):
    version = register(store, classifier)
    registry.client(store).set_registered_model_tag("churn", RETENTION_TAG, '{"reports_days": 30}')
    for stamp in ("20260101T030000Z", "20261120T030000Z"):
        folder = store.home / "r" / stamp
        folder.mkdir(parents=True)
        (folder / "evaluation.json").write_text("{}")
        registry.log_artifact(
            "churn", version, folder, artifact_path=f"releasegate/reports/nightly/{stamp}", settings=store
        )

    now = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    purged = retention.purge(now, settings=store)

    assert [r.rsplit("/", 1)[1] for r in purged[0].reports] == ["20260101T030000Z"]
    run_id = registry.source_run("churn", version, store)
    left = [info.path for info in registry.client(store).list_artifacts(run_id, "releasegate/reports/nightly")]
    assert left == ["releasegate/reports/nightly/20261120T030000Z"]
    assert registry.client(store).list_artifacts(run_id, "model"), "the model itself is never touched"


def test_a_malformed_retention_tag_is_named():
    with pytest.raises(RetentionError, match=r"churn's releasegate.retention tag is not a retention: predictions_days"):
        Retention.from_tags("churn", {RETENTION_TAG: '{"predictions_days": -1}'})
    with pytest.raises(RetentionError, match="keep_forever"):
        Retention.from_tags("churn", {RETENTION_TAG: '{"keep_forever": true}'})
    assert Retention.from_tags("churn", {RETENTION_TAG: '{"feedback_days": 7}'}) == Retention(feedback_days=7)
