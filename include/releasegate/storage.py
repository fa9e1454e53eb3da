"""releasegate's own tables (docs/architecture.md, "releasegate's database"), the engine, and migrations.

Times are Unix epoch seconds (UTC) as floats: cheap to compare and window on, in
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import event

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

metadata = sa.MetaData()

routes = sa.Table(
    "routes",
    metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("champion_version", sa.String(50), nullable=False),
    sa.Column("candidate_version", sa.String(50)),
    sa.Column("mode", sa.String(10), nullable=False, default="single"),  # single | shadow | canary
    sa.Column("candidate_weight", sa.Integer, nullable=False, default=0),  # 0-100
    sa.Column("release_id", sa.String(64)),
    sa.Column("revision", sa.Integer, nullable=False, default=1),
    sa.Column("updated_at", sa.Float, nullable=False),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(50), nullable=False),
    sa.Column("arm", sa.String(10), nullable=False),  # champion | candidate
    sa.Column("mode", sa.String(10), nullable=False),
    sa.Column("release_id", sa.String(64)),
    sa.Column("routing_key_hash", sa.String(32), nullable=False),
    sa.Column("sample_bucket", sa.SmallInteger, nullable=False),  # 0-999, from the request id
    sa.Column("served", sa.Boolean, nullable=False),
    sa.Column("fallback", sa.Boolean, nullable=False, default=False),
    sa.Column("inputs", sa.Text),  # JSON object: column -> value
    sa.Column("outputs", sa.Text),  # JSON: the prediction for this row
    sa.Column("latency_ms", sa.Float),
    sa.Column("status", sa.String(10), nullable=False),  # ok | error | timeout | retried (batch failed, retry answered)
    sa.Column("error", sa.Text),
    sa.Index("ix_predictions_model_time", "model", "time"),
    sa.Index("ix_predictions_release", "release_id", "time"),
    sa.Index("ix_predictions_request", "request_id"),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("ground_truth", sa.Text, nullable=False),  # JSON: label or value
    sa.Column("business_value", sa.Float),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("model", sa.String(200)),
    sa.Column("version", sa.String(50)),
    sa.Column("release_id", sa.String(64), index=True),
    sa.Column("details", sa.Text, nullable=False),  # canonical JSON
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

releases = sa.Table(
    "releases",
    metadata,
    sa.Column("release_id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False, index=True),
    sa.Column("candidate_version", sa.String(50), nullable=False),
    sa.Column("champion_version", sa.String(50)),
    sa.Column("policy", sa.Text, nullable=False),  # resolved policy, JSON
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("verdicts", sa.Text, nullable=False, default="[]"),  # JSON list of Verdicts
    sa.Column("decision", sa.String(20)),
    sa.Column("reasons", sa.Text, nullable=False, default="[]"),  # JSON list of sentences
    sa.Column("airflow_run_id", sa.String(250)),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("role", sa.String(20), nullable=False),  # predict | feedback | admin
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the gateway's log writer and the DAG's readers work at the same time.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def engine(url: str | None = None) -> sa.Engine:
    """A process-wide engine for `url` (default: the settings' database), migrated to head."""
    if url is None:
        from releasegate.settings import get_settings

        url = get_settings().db_url
    with _lock:
        if url not in _engines:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
                eng = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
                event.listen(eng, "connect", _sqlite_pragmas)
            else:
                eng = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            migrate(eng)
            _engines[url] = eng
        return _engines[url]


def migrate(eng: sa.Engine) -> None:
    """Bring the schema to the newest migration (Alembic, scripts in releasegate/migrations)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", eng.url.render_as_string(hide_password=False))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def dispose_all() -> None:
    """Close every pooled connection (tests and forked processes)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()
