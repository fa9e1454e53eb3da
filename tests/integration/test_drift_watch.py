"""drift_watch end to end with dag.test(): the demo champion in a real MLflow store, its route in the routes table,
and 40 minutes of its traffic (8 requests a second) written by the gateway's own log writer, the demo's drift knob
turned all the way from T0 = two minutes past a five-minute tick.

Time to alarm: a shift that starts at T0 is in the window of every run after it. Runs start on the five-minute
ticks, each reading the 15 minutes before its tick, so the second run after T0 (at most 10 minutes later) reads a
window at least a third shifted, and the third (at most 15) one at least two-thirds shifted. The test shows which
run flags it: the tick's distance from T0 plus the run's own seconds is the time to alarm, asserted to be at most
15 minutes (a run in a fresh process costs 9-60 s more, docs/benchmarks.md "Drift watch"). The alert webhook is a
receiver on a loopback port."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import orjson
import pendulum
import pytest

from releasegate import audit, incidents
from releasegate.contract import RETRAINING_ASSET

ROOT = Path(__file__).resolve().parents[2]
MODEL, QUIET_MODEL = "churn", "quiet-churn"
TICK = 300.0
RATE = 8  # requests a second: 7,200 in a 15-minute window, sampled down to the policy's 5,000
BASE = (time.time() // TICK) * TICK - 3600  # a five-minute tick an hour ago
T0 = BASE + 120  # the shift starts between two ticks
pytestmark = pytest.mark.integration


def log_traffic(model: str, version: str, start: float, end: float, drift: float, seed: int) -> None:
    """RATE one-row requests a second in [start, end), served by the champion, written by the gateway's log writer."""
    from releasegate import storage
    from releasegate.demo import data
    from releasegate.serving.logwriter import LogWriter
    from releasegate.serving.metrics import Metrics
    from releasegate.serving.routing import routing_key_hash, sample_bucket

    n = int((end - start) * RATE)
    records = data.generate(n, seed=seed, drift=drift)[data.FEATURES].to_dict("records")
    writer = LogWriter(storage.engine(), storage.predictions, Metrics(), batch_rows=2000).start()
    for i, record in enumerate(records):
        request_id = uuid.uuid4().hex
        writer.put(
            {
                "request_id": request_id,
                "time": start + i / RATE,
                "model": model,
                "version": version,
                "arm": "champion",
                "mode": "single",
                "release_id": None,
                "routing_key_hash": routing_key_hash(model, request_id, b"test"),
                "sample_bucket": sample_bucket(request_id),
                "served": True,
                "fallback": False,
                "inputs": orjson.dumps(record).decode(),
                "outputs": "0",
                "latency_ms": 2.0,
                "status": "ok",
                "error": None,
            }
        )
    writer.close()


def route(model: str, version: str) -> None:
    """The model's route as the gateway stores it: all traffic on `version`."""
    from releasegate import storage

    with storage.engine().begin() as conn:
        conn.execute(
            storage.routes.insert().values(
                model=model, champion_version=version, mode="single", candidate_weight=0, revision=1, updated_at=T0
            )
        )


class Receiver(BaseHTTPRequestHandler):
    posts: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        Receiver.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def world(tmp_path_factory, airflow_env):
    """Airflow's environment, the demo champion routed, quiet traffic until T0 and drifted traffic after it; a
    second routed model with too little traffic to test; an alert webhook on loopback."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("drift-watch")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        mp.setenv("RELEASEGATE_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/alerts")
        from airflow import settings as airflow_settings

        # dag.test() runs in this process: its ORM must be on the session's migrated database, whatever an
        # earlier module of this process pointed it at.
        airflow_settings.configure_vars()
        airflow_settings.reconfigure_orm()
        from releasegate import storage
        from releasegate.demo import models
        from releasegate.settings import get_settings

        versions = models.register_demo_models(get_settings(), model_name=MODEL)
        champion = versions["champion"]
        route(MODEL, champion)
        route(QUIET_MODEL, "1")
        log_traffic(MODEL, champion, BASE - 20 * 60, T0, drift=0.0, seed=601)
        log_traffic(MODEL, champion, T0, BASE + 20 * 60, drift=1.0, seed=602)
        log_traffic(QUIET_MODEL, "1", BASE - 2, BASE, drift=0.0, seed=603)  # 16 requests
        try:
            yield {"champion": champion, "home": home}
        finally:
            server.shutdown()
            storage.dispose_all()


def run_watch(tick: float):
    """One drift_watch run through dag.test(), as if scheduled at `tick`; returns the run and its watch results."""
    import sqlalchemy as sa
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["drift_watch"]
    run = dag.test(logical_date=pendulum.from_timestamp(tick, tz="UTC"))
    with create_session() as session:
        value = session.execute(
            sa.select(XComModel.value).where(
                XComModel.dag_id == "drift_watch",
                XComModel.run_id == run.run_id,
                XComModel.task_id == "watch",
                XComModel.key == "return_value",
            )
        ).scalar_one()
    results = json.loads(value) if isinstance(value, str) else value
    return run, {r["model"]: r for r in results}


def states(run) -> dict[str, set[str]]:
    """The states of each task's instances (flag_retraining has one per routed model)."""
    found: dict[str, set[str]] = {}
    for ti in run.get_task_instances():
        found.setdefault(ti.task_id, set()).add(str(ti.state))
    return found


def retraining_events() -> list[dict]:
    import sqlalchemy as sa
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            sa.select(AssetEvent.extra)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            # The session's Airflow database is shared: the other DAG emits on the same asset.
            .where(AssetModel.name == RETRAINING_ASSET, AssetEvent.source_dag_id == "drift_watch")
            .order_by(AssetEvent.id)
        ).all()
    return [r.extra for r in rows]


def alarms() -> list[dict]:
    return [e for e in audit.events(model=MODEL) if e["action"] == "drift_watch.alarm"]


def test_a_quiet_window_raises_no_alarm_and_a_model_with_too_little_traffic_is_skipped(world):
    run, results = run_watch(BASE)

    assert str(run.state) == "success", states(run)
    assert states(run) == {"watch": {"success"}, "flag_retraining": {"skipped"}, "alert": {"success"}}
    quiet = results[MODEL]
    assert quiet["version"] == world["champion"] and quiet["reasons"] == [] and not quiet["new_alarm"]
    assert quiet["requests"] == 15 * 60 * RATE
    # 7,200 requests sampled by hash bucket to at most the policy's 5,000
    assert 4500 <= quiet["input_drift"]["rows_current"] <= 5000
    assert quiet["input_drift"]["drifted_columns"] == []
    skipped = results[QUIET_MODEL]
    assert skipped["input_drift"] is None and skipped["requests"] == 16
    assert "fewer than the 200 a window needs: not tested" in skipped["note"]
    assert alarms() == [] and retraining_events() == [] and incidents.list_incidents() == []
    assert Receiver.posts == []


def test_a_model_that_cannot_be_watched_fails_the_run_and_the_others_are_watched_all_the_same(world):
    """A routed model with traffic but no version in the registry (so no reference data)."""
    from releasegate import storage

    route("unregistered", "1")
    log_traffic("unregistered", "1", BASE - TICK - 60, BASE - TICK, drift=0.0, seed=604)  # 480 requests
    try:
        run, results = run_watch(BASE - TICK)
    finally:
        with storage.engine().begin() as conn:
            conn.execute(storage.routes.delete().where(storage.routes.c.model == "unregistered"))

    assert states(run) == {"watch": {"success"}, "flag_retraining": {"skipped"}, "alert": {"failed"}}
    assert "not in the registry" in results["unregistered"]["error"]
    assert results[MODEL]["error"] is None and results[MODEL]["input_drift"]["drifted_columns"] == []
    assert alarms() == [] and incidents.list_incidents() == [] and Receiver.posts == []


def test_a_planted_shift_is_flagged_within_15_minutes_and_alarms_once_while_it_persists(world):
    ticks = [BASE + k * TICK for k in (1, 2, 3)]  # the three runs after T0
    for tick in ticks:
        run, results = run_watch(tick)
        if str(run.state) == "failed":
            break
        assert states(run)["flag_retraining"] == {"skipped"}
    else:
        pytest.fail("no run within 15 minutes of the shift raised the alarm")

    found = results[MODEL]
    time_to_alarm = tick - T0 + found["seconds"]
    print(
        f"alarm at tick +{(tick - BASE) / 60:.0f} min: {time_to_alarm / 60:.1f} min after the shift; watch took "
        f"{found['seconds']:.2f} s on {found['input_drift']['rows_current']} rows"
    )
    assert time_to_alarm <= 15 * 60
    # churn's flag emits the event; the quiet model's is skipped
    assert states(run) == {"watch": {"success"}, "flag_retraining": {"success", "skipped"}, "alert": {"failed"}}
    assert found["new_alarm"] and "region" in found["reasons"][0]
    [event] = retraining_events()
    assert event["model"] == MODEL and event["version"] == world["champion"] and event["source"] == "drift_watch"
    assert event["reasons"] == found["reasons"] and event["incident"] == found["incident"]
    [incident] = incidents.list_incidents()
    assert (incident.id, incident.source, incident.model) == (found["incident"], "drift_watch.alarm", MODEL)
    assert [a["details"]["reasons"] for a in alarms()] == [found["reasons"]]
    [post] = Receiver.posts
    assert post["text"].startswith("input drift: churn") and post["alarms"][0]["incident"] == incident.id

    # The shift persists: the next run adds to the same incident and raises nothing new.
    run, results = run_watch(tick + TICK)

    assert states(run) == {"watch": {"success"}, "flag_retraining": {"skipped"}, "alert": {"success"}}
    assert results[MODEL]["reasons"] and not results[MODEL]["new_alarm"]
    assert results[MODEL]["incident"] == incident.id
    assert [i.id for i in incidents.list_incidents()] == [incident.id]
    assert [e.event for e in incidents.get(incident.id).timeline] == ["opened", "repeated"]
    assert len(alarms()) == 2 and len(retraining_events()) == 1 and len(Receiver.posts) == 1


def test_a_watch_in_a_fresh_process_costs_seconds(world):
    """The cost of a scheduled run's task: a new process importing what it needs (pandas, scipy, MLflow), then a
    5,000-row window read, the reference fetched and both tested (the quiet window: nothing is written)."""
    code = (
        "import json, sys, time; start = time.perf_counter()\n"
        "from releasegate import drift_watch\n"
        f"results = drift_watch.watch(until={BASE})\n"
        "print(json.dumps({'seconds': time.perf_counter() - start,"
        " 'watch': {r.model: r.seconds for r in results}, 'rows': [r.input_drift['rows_current'] for r in results if r.input_drift]}))\n"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    wall = time.perf_counter() - started
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"fresh process: {wall:.1f} s wall, {measured['seconds']:.1f} s in Python, watch {measured['watch']}")
    assert len(measured["rows"]) == 1 and 4500 <= measured["rows"][0] <= 5000  # the quiet model skipped
    assert wall < 300  # a run ends before the next one is due
