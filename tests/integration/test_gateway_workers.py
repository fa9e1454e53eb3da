"""The gateway as two worker processes behind one loopback port, serving signed models from a real MLflow store.

Which worker answered is read from the request id the gateway makes for a request without `X-Request-Id`:
its first 20 hex digits are random per process (app.py), so two distinct prefixes are two processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from releasegate import storage
from releasegate.serving import gateway as gateway_module
from tests.integration.conftest import free_port
from tests.waiting import gateway_ready, wait_until

pytestmark = pytest.mark.integration
MODEL = "wk"
ADMIN = "rg-test-admin-key-0123456789abcdef"
WORKERS = 2
POLL = 0.2
METRICS_REFRESH = gateway_module._METRICS_REFRESH  # how often a worker adds its tallies to the shared files
SLOW_AGE = 78  # the slow champion sleeps on this age


class SlowOnCue:
    """A model that takes a second for a row with age 78 and answers 0 at once otherwise."""

    def predict(self, context, model_input, params=None):
        if (model_input["age"] == SLOW_AGE).any():
            time.sleep(1.0)
        return [0] * len(model_input)


def _register(settings) -> dict[str, str]:
    """A champion and a candidate (sklearn) and a slow pyfunc, all signed."""
    import cloudpickle
    import mlflow
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from releasegate import signing

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.create_experiment("workers-test", artifact_location=settings.mlflow_artifact_root.as_uri())
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"age": rng.integers(18, 70, 300).astype("int64"), "income": rng.normal(5e4, 1.5e4, 300)})
    label = (frame["income"] > 5e4).astype("int64")
    versions = {}
    for role, c in (("champion", 1.0), ("candidate", 0.001)):
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.sklearn.log_model(
                LogisticRegression(C=c).fit(frame, label),
                name="model",
                registered_model_name=MODEL,
                input_example=frame.head(3),
                pip_requirements=["scikit-learn"],
            )
        versions[role] = str(info.registered_model_version)
    cloudpickle.register_pickle_by_value(sys.modules[SlowOnCue.__module__])
    python_model = type("SlowOnCue", (mlflow.pyfunc.PythonModel,), {"predict": SlowOnCue.predict})
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model(),
            registered_model_name=MODEL,
            input_example=frame.head(3),
            pip_requirements=["mlflow"],
        )
    versions["slow"] = str(info.registered_model_version)
    for version in versions.values():
        signing.sign_version(MODEL, version, settings)
    return versions


class Workers:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, versions: dict[str, str], settings):
        self.url, self.proc, self.log_path, self.versions, self.settings = url, proc, log, versions, settings
        self.headers = {"authorization": f"Bearer {ADMIN}"}

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]

    def put_route(self, **body) -> httpx.Response:
        body.setdefault("candidate_version", None)
        return httpx.put(f"{self.url}/admin/routes/{MODEL}", json=body, headers=self.headers, timeout=180)

    def invoke(self, age: int | None = None) -> httpx.Response:
        """One request on a connection of its own (so the workers take turns accepting), with no request id."""
        row = {"age": age if age is not None else 30, "income": 52_000.0}
        return httpx.post(
            f"{self.url}/models/{MODEL}/invocations",
            json={"dataframe_records": [row]},
            headers=self.headers,
            timeout=30,
        )

    def metric(self, name: str, **labels: str) -> float:
        """A sample of /metrics (0 when absent), from whichever worker answers."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        found = re.search(rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$", text, re.M) if labels else None
        if not labels:
            found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def settled(self, name: str, **labels: str) -> float:
        """A sample once it has not changed for longer than the workers' metrics refresh interval."""
        last, since = self.metric(name, **labels), time.monotonic()
        deadline = since + 30
        while time.monotonic() - since <= 2 * METRICS_REFRESH:
            assert time.monotonic() < deadline, f"{name} still changing after 30 s"
            value = self.metric(name, **labels)
            if value != last:
                last, since = value, time.monotonic()
            time.sleep(0.05)
        return last

    def logged(self, request_ids: list[str]) -> list:
        table = storage.predictions
        with storage.engine(self.settings.db_url).connect() as conn:
            return conn.execute(sa.select(table).where(table.c.request_id.in_(request_ids))).all()

    def worker_pids(self) -> set[int]:
        """The supervisor's worker processes (uvicorn spawns them through multiprocessing)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return {int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()}


def worker_of(request_id: str) -> str:
    return request_id[:20]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("workers")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        mp.delenv("RELEASEGATE_GATEWAY_WORKERS")  # the flag below says how many
        mp.setenv("RELEASEGATE_GATEWAY_POLL_INTERVAL", str(POLL))
        from releasegate import signing
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        versions = _register(settings)
        log = home / "gateway.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "releasegate.serving", "--port", str(port), "--workers", str(WORKERS)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
                start_new_session=True,
            )
        gw = Workers(f"http://127.0.0.1:{port}", proc, log, versions, settings)
        try:
            gateway_ready(gw.url, proc, gw.log, timeout=180)
            resp = gw.put_route(champion_version=versions["champion"])
            assert resp.status_code == 200, resp.text
            # Both workers accept once each has loaded the stored routes.
            wait_until(
                lambda: len({worker_of(gw.invoke().json()["request_id"]) for _ in range(10)}) == WORKERS,
                timeout=120,
                what="answers from both workers",
            )
            yield gw
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            storage.dispose_all()


def test_requests_spread_over_the_workers_and_metrics_add_up_across_them(workers):
    champion = workers.versions["champion"]
    calls = dict(arm="champion", model=MODEL, version=champion)
    # The fixture's requests counted by every worker first (each adds its tally at the next refresh).
    before = workers.settled("releasegate_gateway_http_responses_total", endpoint="invocations", status="200")
    calls_before = workers.settled("releasegate_gateway_model_calls_total", **calls)
    n = 60
    responses = [workers.invoke() for _ in range(n)]
    assert [r.status_code for r in responses] == [200] * n
    ids = [r.json()["request_id"] for r in responses]
    per_worker = Counter(worker_of(rid) for rid in ids)
    assert len(per_worker) == WORKERS, per_worker  # every worker answered some
    # Each scrape is answered by one worker, and counts every worker's requests: the others' within the
    # metrics refresh interval (each worker tallies its requests between refreshes).
    wait_until(
        lambda: (
            workers.metric("releasegate_gateway_http_responses_total", endpoint="invocations", status="200")
            == before + n
        ),
        timeout=10,
        what="every worker's responses counted",
    )
    for _ in range(6):
        total = workers.metric("releasegate_gateway_http_responses_total", endpoint="invocations", status="200")
        assert total == before + n
        assert workers.metric("releasegate_gateway_model_calls_total", **calls) == calls_before + n
    assert workers.metric("releasegate_gateway_route_revision", model=MODEL) >= 1
    # Every request logged exactly once, whichever worker's log writer wrote it.
    wait_until(lambda: len(workers.logged(ids)) >= n, timeout=30, what="every request logged")
    assert wait_until(lambda: workers.metric("releasegate_gateway_log_queue_depth", table="predictions") == 0)
    logged = workers.logged(ids)
    assert sorted(r.request_id for r in logged) == sorted(ids)
    assert workers.metric("releasegate_gateway_log_written_rows_total", table="predictions") >= n


def test_a_route_put_answers_once_every_worker_serves_it(workers):
    v = workers.versions
    resp = workers.put_route(
        champion_version=v["champion"], candidate_version=v["candidate"], mode="canary", candidate_weight=100
    )
    assert resp.status_code == 200, resp.text
    answers = [workers.invoke().json() for _ in range(30)]
    assert {a["arm"] for a in answers} == {"candidate"}, Counter(a["arm"] for a in answers)
    assert len({worker_of(a["request_id"]) for a in answers}) == WORKERS
    assert workers.metric("releasegate_gateway_route_revision", model=MODEL) == resp.json()["revision"]


def test_a_route_written_by_another_replica_reaches_every_worker_within_the_poll_interval(workers):
    v = workers.versions
    assert workers.put_route(champion_version=v["champion"], mode="single").status_code == 200
    table = storage.routes
    with storage.engine(workers.settings.db_url).begin() as conn:
        revision = conn.execute(sa.select(table.c.revision).where(table.c.model == MODEL)).scalar_one() + 1
        conn.execute(
            table.update()
            .where(table.c.model == MODEL)
            .values(
                champion_version=v["candidate"],
                candidate_version=None,
                mode="single",
                candidate_weight=0,
                revision=revision,
                updated_at=time.time(),
            )
        )
    written = time.monotonic()
    # Both versions are loaded in both workers already: each applies it at its next poll.
    wait_until(
        lambda: workers.metric("releasegate_gateway_route_revision", model=MODEL) == revision,
        timeout=30,
        every=0.02,
        what="the lowest revision any worker serves",
    )
    took = time.monotonic() - written
    answers = [workers.invoke().json() for _ in range(30)]
    assert {a["model_version"] for a in answers} == {v["candidate"]}
    assert len({worker_of(a["request_id"]) for a in answers}) == WORKERS
    assert took < 10 * POLL, f"every worker applied it after {took:.2f} s"  # a generous bound on a busy machine


def test_sigterm_to_the_parent_drains_every_worker(workers):
    """SIGTERM to the supervisor alone (as `docker stop` sends it): each worker answers what it holds, flushes
    its log and exits, and so does the supervisor."""
    v = workers.versions
    assert workers.put_route(champion_version=v["slow"], mode="single").status_code == 200
    pids = workers.worker_pids()
    assert len(pids) == WORKERS
    slow = 12
    with ThreadPoolExecutor(slow) as pool:
        futures = [pool.submit(workers.invoke, SLOW_AGE) for _ in range(slow)]
        # SIGTERM while both workers hold requests: the in-flight gauge adds up the workers'.
        wait_until(
            lambda: workers.metric("releasegate_gateway_requests_in_flight", endpoint="invocations") >= slow // 2,
            timeout=30,
            every=0.02,
            what="requests held in flight",
        )
        os.kill(workers.proc.pid, signal.SIGTERM)
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result())
            except httpx.TransportError:  # sent after SIGTERM: never accepted
                outcomes.append(None)
    answered = [o for o in outcomes if o is not None]
    assert [a.status_code for a in answered] == [200] * len(answered), [a.text for a in answered]
    assert len(answered) >= slow // 2
    ids = [a.json()["request_id"] for a in answered]
    assert len({worker_of(rid) for rid in ids}) == WORKERS  # both held requests, both answered them
    assert workers.proc.wait(timeout=60) == 0, workers.log()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "a worker outlived the supervisor"
    logged = workers.logged(ids)  # flushed before the workers exited: no waiting here
    assert sorted(r.request_id for r in logged) == sorted(ids)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{workers.url}/healthz", timeout=2)
