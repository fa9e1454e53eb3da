"""`releasegate trigger` against a real Airflow: API server, scheduler and dag-processor on PostgreSQL.

The DAGs run here are small stand-ins written by this test, shaped like model_release (an
`open_release` step and a `finish` step returning the release summary, one with a real
Human-in-the-loop approval), so each outcome takes seconds; the real model_release is
triggered the same way by the system tests (tests/system/).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from releasegate import airflow_client as af
from tests.ports import free_port
from tests.require import require

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("RELEASEGATE_SYSTEM_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
RELEASE_DAG = "trigger_cli_release"
APPROVAL_DAG = "trigger_cli_approval"

DAGS = """
import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

FORM = {"model_name": Param("churn", type="string"), "version": Param("", type="string"),
        "policy": Param("default", type="string"),
        "outcome": Param("promoted", type="string", enum=["promoted", "rolled_back", "rejected", "crash"])}


@task
def open_release() -> dict:
    p = get_current_context()["params"]
    return {"result": "opened", "release_id": "rel-0123456789ab", "model": p["model_name"],
            "candidate": p["version"], "champion": "1", "policy": p["policy"], "policy_digest": "0" * 64}


def summary(release: dict, state: str, reason: str) -> dict:
    # What pipeline.finish returns (releasegate.results.Summary), as its XCom.
    return {"result": "summary", "release_id": release["release_id"], "model": release["model"],
            "candidate": release["candidate"], "champion": release["champion"], "state": state, "decision": None,
            "reasons": [reason], "verdicts": [], "policy": release["policy"], "started_at": 0.0, "ended_at": 1.0,
            "duration_seconds": 1.0}


@dag(dag_id="%(release)s", schedule=None, start_date=pendulum.datetime(2026, 1, 1), params=FORM, catchup=False)
def release_like():
    @task(task_id="finish")
    def finish(release: dict) -> dict:
        outcome = get_current_context()["params"]["outcome"]
        if outcome == "crash":
            raise RuntimeError("the pipeline broke")
        return summary(release, outcome, f"the verdict said {outcome}")

    finish(open_release())


@dag(dag_id="%(approval)s", schedule=None, start_date=pendulum.datetime(2026, 1, 1), params=FORM, catchup=False)
def approval_like():
    @task(task_id="finish", trigger_rule=TriggerRule.ALL_DONE)
    def finish(release: dict) -> dict:
        answer = get_current_context()["ti"].xcom_pull(task_ids="decide") or {}
        state = "promoted" if answer.get("chosen_options") == ["Approve"] else "rolled_back"
        return summary(release, state, f"a person chose {state}")

    release = open_release()
    decide = ApprovalOperator(task_id="decide", subject="Promote churn v2 (champion v1)?",
                              body="Release `rel-0123456789ab`: the evidence")
    release >> decide >> finish(release)


release_like()
approval_like()
""" % {"release": RELEASE_DAG, "approval": APPROVAL_DAG}


class MiniAirflow:
    """Airflow's API server, scheduler and dag-processor (LocalExecutor) on a fresh PostgreSQL database."""

    def __init__(self, home: Path):
        import psycopg

        self.home = home
        self.db = f"rg_trigger_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        dags = home / "dags"
        dags.mkdir()
        (dags / "trigger_cli_dags.py").write_text(DAGS)
        (home / "passwords.json").write_text(json.dumps({"ci": self.password}))
        pg_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RELEASEGATE_"))}
        env.update(
            {
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"{pg_url}/{self.db}",
                # Airflow derives asyncpg for its async engine, which is not installed; psycopg 3 does async too.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"{pg_url.replace('+psycopg2', '+psycopg')}/{self.db}",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "ci:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                "AIRFLOW__API__BASE_URL": f"{self.url}/",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 240) -> None:
        migrate = subprocess.run(
            ["airflow", "db", "migrate"], env=self.env, capture_output=True, text=True, timeout=600
        )
        assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-3000:]
        for name, argv in {
            "api-server": ["airflow", "api-server", "--host", "127.0.0.1", "--port", str(self.port)],
            "scheduler": ["airflow", "scheduler"],
            "dag-processor": ["airflow", "dag-processor"],
        }.items():
            log = open(self.home / f"{name}.log", "w")
            self.procs[name] = subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited:\n{self.log(name)}"
            try:
                with af.AirflowClient(self.url, username="ci", password=self.password, timeout=5) as client:
                    if all(client.request("GET", f"/dags/{d}").status_code == 200 for d in (RELEASE_DAG, APPROVAL_DAG)):
                        return
            except af.AirflowError:
                pass
            assert time.monotonic() < deadline, "Airflow did not list the test DAGs:\n" + self.log("dag-processor")
            time.sleep(1)

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        import psycopg

        for proc in self.procs.values():  # all at once: each takes seconds to shut down
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:  # the group outlives its leader (the scheduler's and api-server's children)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def cli(self, *args: str, password: str | None = None) -> subprocess.Popen:
        """A `releasegate` command as CI runs it: credentials from the environment."""
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "RELEASEGATE_AIRFLOW_URL": self.url,
            "RELEASEGATE_AIRFLOW_USER": "ci",
            "RELEASEGATE_AIRFLOW_PASSWORD": password or self.password,
        }
        return subprocess.Popen(
            [sys.executable, "-m", "releasegate.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def trigger(self, *args: str, password: str | None = None) -> subprocess.Popen:
        return self.cli(
            "trigger",
            "--model",
            "churn",
            "--version",
            "2",
            "--poll-seconds",
            "1",
            "--timeout",
            "240",
            *args,
            password=password,
        )


@pytest.fixture(scope="module")
def airflow_api(tmp_path_factory):
    from tests.system.stack import postgres_problem

    problem = postgres_problem(PG_ADMIN)
    if problem:
        require(problem)
    airflow = MiniAirflow(tmp_path_factory.mktemp("airflow-api"))
    try:
        airflow.start()
        yield airflow
    finally:
        airflow.stop()


def finished(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_bad_password_exits_2_with_a_clear_message(airflow_api):
    code, _out, err = finished(airflow_api.trigger("--dag-id", RELEASE_DAG, "--wait", password="not-the-password"))
    assert code == 2
    assert "refused the credentials of user 'ci'" in err


def test_paused_dag_is_refused_unless_asked_to_unpause(airflow_api):
    code, _, err = finished(airflow_api.trigger("--dag-id", APPROVAL_DAG))
    assert code == 2 and "is paused" in err


def test_wait_streams_the_steps_and_exits_with_the_release_outcome(airflow_api):
    runs = {
        outcome: airflow_api.trigger(
            "--dag-id", RELEASE_DAG, "--unpause", "--wait", "--conf-json", json.dumps({"outcome": outcome})
        )
        for outcome in ("promoted", "rolled_back", "crash")
    }
    results = {outcome: finished(proc) for outcome, proc in runs.items()}

    code, out, err = results["promoted"]
    assert code == 0, out + err
    steps = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert steps == ["open_release", "finish"]
    assert "release rel-0123456789ab: churn v2 over v1 (policy default)" in out
    assert "outcome: rel-0123456789ab promoted: the verdict said promoted (exit 0)" in out

    code, out, err = results["rolled_back"]
    assert code == 1 and "rel-0123456789ab rolled_back: the verdict said rolled_back" in out, out + err

    code, out, err = results["crash"]
    assert code == 2, out + err
    assert "failed tasks: finish" in out and "finish" in out.split("outcome:")[0]


def test_a_run_waiting_for_approval_says_where_to_answer_and_follows_the_answer(airflow_api):
    proc = airflow_api.trigger("--dag-id", APPROVAL_DAG, "--unpause", "--wait")
    lines = []
    for line in proc.stdout:  # read as the CI log would show it, until the request appears
        lines.append(line)
        if "answer in the Airflow UI" in line:
            break
    text = "".join(lines)
    assert "decide" in text and "waiting for approval: Promote churn v2 (champion v1)?" in text, text
    run_id = re.search(rf"triggered {APPROVAL_DAG} run (\S+): http", text).group(1)
    assert f"/dags/{APPROVAL_DAG}/runs/{run_id}/tasks/decide/required_actions" in text
    code, _, err = finished(airflow_api.cli("approve", "rel-999999999999", "--dag-id", APPROVAL_DAG))
    assert code == 2 and "no approval of trigger_cli_approval waits for 'rel-999999999999'" in err
    code, out, err = finished(
        airflow_api.cli("approve", "rel-0123456789ab", "--model", "churn", "--dag-id", APPROVAL_DAG)
    )
    assert code == 0 and out.strip() == f"{run_id}: Approve (answered by ci)", out + err
    code, out, err = finished(proc)
    assert code == 0, text + out + err
    assert "rel-0123456789ab promoted: a person chose promoted" in out
