"""The database's migrations, on SQLite files of this test's own."""

from __future__ import annotations

import sqlalchemy as sa

from releasegate import storage


def _indexes(eng: sa.Engine) -> set[str]:
    return {index["name"] for index in sa.inspect(eng).get_indexes("predictions")}


def _row(request_id: str) -> dict:
    return {
        "request_id": request_id,
        "time": 1.0,
        "model": "churn",
        "version": "1",
        "arm": "champion",
        "mode": "single",
        "routing_key_hash": "0123456789abcdef",
        "sample_bucket": 7,
        "served": True,
        "fallback": False,
        "status": "ok",
    }


def test_a_database_logged_before_0007_loses_the_unread_hash_index_and_keeps_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    old = sa.create_engine(url)
    storage.migrate(old, "0006")
    assert "ix_predictions_routing_key_hash" in _indexes(old)
    with old.begin() as conn:
        conn.execute(storage.predictions.insert(), [_row("r-1"), _row("r-2")])
    old.dispose()

    eng = storage.engine(url)  # migrated to head
    try:
        assert "ix_predictions_routing_key_hash" not in _indexes(eng)
        assert {"ix_predictions_model_time", "ix_predictions_release", "ix_predictions_request"} <= _indexes(eng)
        with eng.connect() as conn:
            logged = conn.execute(sa.select(storage.predictions.c.request_id).order_by("id")).scalars().all()
        assert logged == ["r-1", "r-2"]
    finally:
        storage.dispose_all()


def test_a_new_database_has_no_index_on_the_hash(tmp_path):
    eng = storage.engine(f"sqlite:///{tmp_path}/new.db")
    try:
        assert "ix_predictions_routing_key_hash" not in _indexes(eng)
    finally:
        storage.dispose_all()
