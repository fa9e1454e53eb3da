"""Personal data on PostgreSQL, end to end: a real gateway logs a customer's requests under a classification
(a pseudonymised, an encrypted and a dropped column, each holding a marker value), then the customer's data is
exported (`releasegate subject export`), erased (the `data_subject_request` DAG through `airflow dags test`), and
the log purged past its retention. A `pg_dump` of the database never holds a marker, nor the customer's key.

Every connection to PostgreSQL here is TLS, verified (`sslmode=verify-full`): the module turns TLS on in the
machine's PostgreSQL server (a throwaway CA, `ALTER SYSTEM`, a reload) and back off when it ends.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from releasegate import audit, retention, storage
from releasegate.contract import CLASSIFICATION_TAG, RETENTION_TAG, AuditAction
from releasegate.serving import routing
from tests import forkserver
from tests.integration.conftest import free_port, gateway_process
from tests.require import require
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

MODEL = "onboarding"
ADMIN = "rg-test-admin-key-0123456789abcdef"
PG_ADMIN = os.environ.get("RELEASEGATE_SYSTEM_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SUBJECT = "CUST-MARKER-4711"  # the customer's routing key, and their id in the pseudonymised `customer` column
EMIRATES_ID = "784-1987-1234567-1"  # in `emirates_id`, classified encrypt
EMAIL = "marker.person@example.ae"  # in `email`, classified drop
MARKERS = [SUBJECT, EMIRATES_ID, EMAIL]
CLASSES = {"columns": {"customer": "pseudonymise", "emirates_id": "encrypt", "email": "drop"}}


def _register(settings) -> str:
    """One signed version of a model that reads age and income and ignores the identity columns it is sent."""
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from releasegate import registry, signing

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.create_experiment("subjects", artifact_location=settings.mlflow_artifact_root.as_uri())
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 70, 200).astype("int64"),
            "income": rng.normal(50_000, 15_000, 200).round(2),
            "customer": [f"C-{i}" for i in range(200)],
            "emirates_id": [f"784-2000-{i:07d}-1" for i in range(200)],
            "email": [f"person{i}@example.org" for i in range(200)],
        }
    )
    pipe = make_pipeline(
        ColumnTransformer([("numbers", "passthrough", ["age", "income"])], remainder="drop"), LogisticRegression()
    ).fit(frame, (frame["income"] > 50_000).astype("int64"))
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.sklearn.log_model(
            pipe,
            name="model",
            registered_model_name=MODEL,
            input_example=frame.head(2),
            pip_requirements=["scikit-learn"],
        )
    version = str(info.registered_model_version)
    signing.sign_version(MODEL, version, settings)
    registry.client(settings).set_registered_model_tag(MODEL, CLASSIFICATION_TAG, json.dumps(CLASSES))
    return version


def _row(i: int, customer: str, emirates_id: str, email: str) -> dict:
    return {
        "age": 30 + i,
        "income": 40_000.0 + 1000 * i,
        "customer": customer,
        "emirates_id": emirates_id,
        "email": email,
    }


TLS_DIR = Path("/var/lib/postgresql/releasegate-test-tls")  # where the server (user postgres) can read it


def _server_can_take_tls() -> str | None:
    if os.geteuid() != 0:
        return "turning TLS on in PostgreSQL needs root (to hand the server its key)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user: PostgreSQL is not on this machine"
    return None if TLS_DIR.parent.is_dir() else f"{TLS_DIR.parent} does not exist"


@pytest.fixture(scope="module")
def pg_tls(tmp_path_factory) -> Path:
    """PostgreSQL serving TLS with a certificate for 127.0.0.1 from a throwaway CA; yields the CA's file."""
    import psycopg

    from tests.integration.test_gateway_tls import _cert, _key, _write

    require(_server_can_take_tls())
    ca_dir = tmp_path_factory.mktemp("pg-ca")
    ca_key = _key()
    _write(ca_dir / "ca", _cert("releasegate-test-ca", ca_key, "releasegate-test-ca", ca_key, ca=True))
    TLS_DIR.mkdir(mode=0o700, exist_ok=True)
    server_key = _key()
    server_cert = _cert("127.0.0.1", server_key, "releasegate-test-ca", ca_key, ca=False, server=True)
    _write(TLS_DIR / "server", server_cert, server_key)
    postgres = pwd.getpwnam("postgres")
    for path in (TLS_DIR, TLS_DIR / "server.crt", TLS_DIR / "server.key"):
        os.chown(path, postgres.pw_uid, postgres.pw_gid)
    (TLS_DIR / "server.key").chmod(0o600)

    def configure(*statements: str) -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            for statement in statements:
                conn.execute(statement)
            conn.execute("SELECT pg_reload_conf()")

    configure(
        f"ALTER SYSTEM SET ssl_cert_file = '{TLS_DIR / 'server.crt'}'",
        f"ALTER SYSTEM SET ssl_key_file = '{TLS_DIR / 'server.key'}'",
        "ALTER SYSTEM SET ssl = on",
    )
    verified = f"{PG_ADMIN}?sslmode=verify-full&sslrootcert={ca_dir / 'ca.crt'}"

    def answers_over_tls() -> bool:
        try:
            with psycopg.connect(verified, connect_timeout=5) as conn:
                return bool(conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0])
        except psycopg.OperationalError:
            return False  # the reload is asynchronous

    try:
        wait_until(answers_over_tls, timeout=30, every=0.2, what="PostgreSQL serving TLS")
        yield ca_dir / "ca.crt"
    finally:
        configure("ALTER SYSTEM RESET ssl", "ALTER SYSTEM RESET ssl_cert_file", "ALTER SYSTEM RESET ssl_key_file")


@pytest.fixture(scope="module")
def served(tmp_path_factory, airflow_env, pg_tls):
    """The model served by a gateway logging to a fresh PostgreSQL database; the subject's and others' traffic sent."""
    import psycopg

    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("subjects")
    database = f"rg_subjects_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        server = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql:", "postgresql+psycopg:")
        mp.setenv("RELEASEGATE_DB_URL", f"{server}/{database}?sslmode=verify-full&sslrootcert={pg_tls}")
        from releasegate import signing
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        version = _register(settings)
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"authorization": f"Bearer {ADMIN}"}
        )
        try:
            with gateway_process(home, port, timeout=120) as (_, log):
                resp = client.put(f"/admin/routes/{MODEL}", json={"champion_version": version}, timeout=180)
                assert resp.status_code == 200, resp.text
                ids = _send_traffic(client)
                wait_until(lambda: _count(settings) >= ids["rows"], timeout=60, what="every row logged")
                yield {"settings": settings, "database": database, "home": home, "ids": ids, "log": log}
        finally:
            client.close()
            storage.dispose_all()


def _send_traffic(client: httpx.Client) -> dict:
    """Five requests of two rows routed by the subject's key, one more carrying their id only in `customer`, and
    twenty of other customers; a label for each."""
    subject_ids, other_ids = [], []
    for i in range(5):
        rows = [_row(i, SUBJECT, EMIRATES_ID, EMAIL), _row(i + 1, SUBJECT, EMIRATES_ID, EMAIL)]
        rid = f"subject-{i}"
        resp = client.post(
            f"/models/{MODEL}/invocations",
            json={"dataframe_records": rows},
            headers={"x-request-id": rid, "x-routing-key": SUBJECT},
        )
        assert resp.status_code == 200, resp.text
        subject_ids.append(rid)
    resp = client.post(
        f"/models/{MODEL}/invocations",
        json={"dataframe_records": [_row(9, SUBJECT, EMIRATES_ID, EMAIL)]},
        headers={"x-request-id": "subject-by-column"},  # routed by the request id: found by the column's token
    )
    assert resp.status_code == 200, resp.text
    subject_ids.append("subject-by-column")
    for i in range(20):
        rid = f"other-{i}"
        resp = client.post(
            f"/models/{MODEL}/invocations",
            json={"dataframe_records": [_row(i, f"C-{i}", f"784-1990-{i:07d}-2", f"someone{i}@example.org")]},
            headers={"x-request-id": rid, "x-routing-key": f"C-{i}"},
        )
        assert resp.status_code == 200, resp.text
        other_ids.append(rid)
    labels = [{"request_id": rid, "ground_truth": 1, "business_value": 3.5} for rid in subject_ids + other_ids]
    assert client.post("/feedback", json=labels).status_code == 200
    return {"subject": subject_ids, "other": other_ids, "rows": 5 * 2 + 1 + 20}


def _count(settings, table: sa.Table = storage.predictions, *where) -> int:
    with storage.engine(settings.db_url).connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()


def _pg_dump(database: str) -> bytes:
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{database}"
    return subprocess.run(["pg_dump", "--data-only", url], capture_output=True, check=True, timeout=120).stdout


def _subject_rows(settings) -> int:
    secret = routing.routing_secret(settings)
    p = storage.predictions
    return _count(settings, p, p.c.routing_key_hash == routing.routing_key_hash(MODEL, SUBJECT, secret))


def test_the_database_holds_each_marker_only_in_its_declared_form(served):
    settings = served["settings"]
    wait_until(lambda: _count(settings, storage.feedback) >= 26, timeout=30, what="every label stored")
    with storage.engine(settings.db_url).connect() as conn:
        logged = [
            orjson.loads(r)
            for r in conn.execute(
                sa.select(storage.predictions.c.inputs).where(storage.predictions.c.request_id.like("subject-%"))
            ).scalars()
        ]
    assert len(logged) == 11
    assert all(set(row) == {"age", "income", "customer", "emirates_id"} for row in logged)  # email: dropped
    assert all(row["customer"].startswith("p:") and row["emirates_id"].startswith("e:") for row in logged)
    import psycopg

    with psycopg.connect(PG_ADMIN, connect_timeout=5) as conn:
        sessions = conn.execute(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = %s",
            (served["database"],),
        ).fetchall()
    assert sessions and all(ssl for (ssl,) in sessions), "the gateway and the log writer reach PostgreSQL over TLS"
    dump = _pg_dump(served["database"])
    assert b"subject-0" in dump, "the dump holds the log (a request id is found in it)"
    assert [m for m in MARKERS if m.encode() in dump] == []
    assert [m for m in MARKERS if m.encode() in served["log"].read_bytes()] == []  # nor does the gateway's own log


def test_export_gives_the_subject_their_rows_decrypted_and_audits_without_the_key(served, tmp_path):
    from releasegate.cli import main

    out = tmp_path / "export.json"
    result = CliRunner().invoke(
        main, ["subject", "export", "--key", SUBJECT, "--reference", "DSR-2026-001", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    document = json.loads(out.read_text())
    assert sorted({r["request_id"] for r in document["predictions"]}) == sorted(served["ids"]["subject"])
    assert len(document["predictions"]) == 11 and len(document["feedback"]) == 6
    assert {r["inputs"]["emirates_id"] for r in document["predictions"]} == {EMIRATES_ID}  # decrypted for them
    assert all("email" not in r["inputs"] for r in document["predictions"])  # never kept, so never exported
    event = [e for e in audit.events() if e["action"] == AuditAction.subject_exported][-1]
    assert event["details"]["predictions"] == 11 and event["details"]["reference"] == "DSR-2026-001"
    assert SUBJECT not in json.dumps(event) and event["details"]["subject"] == document["subject"]


def test_the_dag_erases_every_row_of_the_subject_and_nothing_else(served):
    settings = served["settings"]
    others_before = _count(settings, storage.predictions, storage.predictions.c.request_id.like("other-%"))
    assert _subject_rows(settings) == 10
    conf = {"subject_key": SUBJECT, "request_type": "erase", "reference": "DSR-2026-002"}
    out = forkserver.run(
        ["airflow", "dags", "test", "data_subject_request", "-c", json.dumps(conf)], env=dict(os.environ), timeout=600
    )
    assert "state=success" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]

    p, f = storage.predictions, storage.feedback
    assert _subject_rows(settings) == 0
    assert _count(settings, p, p.c.request_id.like("subject-%")) == 0  # the one routed by its id too
    assert _count(settings, f, f.c.request_id.like("subject-%")) == 0
    assert _count(settings, p, p.c.request_id.like("other-%")) == others_before == 20
    assert _count(settings, f, f.c.request_id.like("other-%")) == 20
    event = [e for e in audit.events() if e["action"] == AuditAction.subject_erased][-1]
    assert (event["details"]["predictions"], event["details"]["feedback"]) == (11, 6)
    assert event["actor"].startswith("airflow") and event["details"]["reference"] == "DSR-2026-002"
    dump = _pg_dump(served["database"])
    assert [m for m in MARKERS if m.encode() in dump] == []
    assert audit.verify().ok


def test_a_purge_leaves_nothing_older_than_the_retention(served):
    from releasegate import registry

    settings = served["settings"]
    registry.client(settings).set_registered_model_tag(MODEL, RETENTION_TAG, '{"predictions_days": 1}')
    with storage.engine(settings.db_url).connect() as conn:
        newest = conn.execute(sa.select(sa.func.max(storage.predictions.c.time))).scalar_one()
    purged = retention.purge(newest + 1.5 * retention.DAY, actor="test")  # a day and a half from now

    done = next(p for p in purged if p.model == MODEL)
    assert done.predictions == 20 and done.feedback == 0  # feedback: 365 days
    assert _count(settings, storage.predictions, storage.predictions.c.time < done.predictions_before) == 0
    assert _count(settings, storage.feedback) == 20
    event = [e for e in audit.events(model=MODEL) if e["action"] == AuditAction.data_purged][-1]
    assert event["details"]["predictions"] == 20 and event["details"]["retention"]["predictions_days"] == 1
