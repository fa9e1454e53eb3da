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
    sa.Column("mode", sa.String(10), nullable=False, default="single"),  # single | shadow | canary | experiment
    sa.Column("candidate_weight", sa.Integer, nullable=False, default=0),  # 0-100
    sa.Column("release_id", sa.String(64)),  # the release's or the experiment's id
    sa.Column("arms", sa.JSON),  # an experiment's arms besides the champion: [{version, weight, stopped}]
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
    sa.Column("arm", sa.String(10), nullable=False),  # champion | candidate (an experiment's arms: by version)
    sa.Column("mode", sa.String(10), nullable=False),
    sa.Column("release_id", sa.String(64)),
    sa.Column("routing_key_hash", sa.String(32), nullable=False),
    sa.Column("sample_bucket", sa.SmallInteger, nullable=False),  # 0-999, from the request id
    sa.Column("served", sa.Boolean, nullable=False),
    sa.Column("fallback", sa.Boolean, nullable=False, default=False),
    sa.Column("inputs", sa.Text),  # JSON object: column -> value
    sa.Column("outputs", sa.Text),  # JSON: the prediction for this row
    sa.Column("latency_ms", sa.Float),
    sa.Column("cpu_ms", sa.Float),  # CPU time of the model call, per row (its batch's CPU time / rows)
    # ok | error | timeout | retried (batch failed, retry answered) | skipped (candidate's circuit open)
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("key_id", sa.String(32)),  # the API key that called (auth.Caller.key_id)
    sa.Index("ix_predictions_model_time", "model", "time"),
    sa.Index("ix_predictions_release", "release_id", "time"),
    sa.Index("ix_predictions_request", "request_id"),
    # No index on routing_key_hash: a data subject's rows are found by a scan either way (subjects.py ORs the hash
    # with a search of the inputs), and SQLite paid ~10 µs a logged row to keep one (migration 0007).
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

# The KServe logger sink's request/response pairing (releasegate.serving.kserve_sink). One row per
# (request id, version) while its two events arrive, maybe at different sink replicas; a pair is
# claimed once (state pending -> paired, or -> expired after the pending window) in the transaction
# that writes its `predictions` rows. The claimed row stays a while as a tombstone, so a late or
# repeated event cannot write a second row.
sink_pairs = sa.Table(
    "sink_pairs",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(50), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("state", sa.String(10), nullable=False),  # pending | paired | expired
    sa.Column("received", sa.Float, nullable=False),  # when the first of the two events reached a sink
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("request_time", sa.Float),  # the request event's ce-time
    sa.Column("request_body", sa.Text),  # JSON, as logged
    sa.Column("routing_key", sa.Text),
    sa.Column("response_time", sa.Float),
    sa.Column("response_body", sa.Text),
    sa.Index("ix_sink_pairs_state_received", "state", "received"),
    sa.Index("ix_sink_pairs_updated", "updated_at"),
)

# Incidents (releasegate.incidents): one row per incident, its timeline in incident_events (append-only).
incidents = sa.Table(
    "incidents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("state", sa.String(20), nullable=False),  # open | acknowledged | resolved | closed
    sa.Column("severity", sa.String(10), nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("source", sa.String(64), nullable=False),  # what opened it: an audit action, or `alert`
    sa.Column("model", sa.String(200), index=True),
    sa.Column("release_id", sa.String(64)),
    sa.Column("alert", sa.Text),  # JSON: the alert that opened it
    sa.Column("owner", sa.String(200)),
    sa.Column("resolution", sa.Text),
    sa.Column("review_url", sa.Text),
    sa.Column("dedup_key", sa.String(300), nullable=False),  # model and source: a repeat joins the active one
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_incidents_dedup_state", "dedup_key", "state"),
)

incident_events = sa.Table(
    "incident_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id"), nullable=False, index=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("event", sa.String(20), nullable=False),  # opened | repeated | acknowledged | resolved | ...
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False),  # JSON
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


def migrate(eng: sa.Engine, revision: str = "heads") -> None:
    """Bring the schema to the newest migration, or as far as `revision` (Alembic, scripts in
    releasegate/migrations)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    # Alembic's config is a ConfigParser: a `%` (a password's, or a URL-encoded `sslrootcert=` path's) is doubled.
    cfg.set_main_option("sqlalchemy.url", eng.url.render_as_string(hide_password=False).replace("%", "%%"))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        # Every head: migrations written side by side may each revise the same parent until they are chained.
        command.upgrade(cfg, revision)


def dispose_all() -> None:
    """Close every pooled connection (tests and forked processes)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()
