"""The production-shaped stack as separate processes on loopback, on PostgreSQL.

`SERVICES` is the one place each process is specified (argv, the environment that matters, its
port); `Stack` starts them from it, and `tests/unit/test_compose.py` checks docker-compose.yaml
against it. A `{name}` in a template stands for a value that differs between here and compose
(ports, hosts, database URLs, paths); everything else must be the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.ports import free_port
from tests.webhook_sink import webhook_sink

ROOT = Path(__file__).resolve().parents[2]
MODEL = "churn"
PG_ADMIN_URL_ENV = "RELEASEGATE_SYSTEM_PG"  # where the system tests create their databases
PG_ADMIN_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
HOW_TO_RUN = (
    "The system tests need a PostgreSQL server they may create databases on: 127.0.0.1:5432, user postgres, "
    "trust auth (e.g. `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`), or set "
    f"{PG_ADMIN_URL_ENV}=postgresql://USER@HOST:PORT/postgres. Then: .venv/bin/pytest -m system tests/system"
)
# Simple auth manager users (Airflow's predefined roles: viewer, user, op, admin); passwords are made per run.
AIRFLOW_USERS = {"admin": "admin", "operator": "op", "viewer": "viewer"}


@dataclass(frozen=True)
class Service:
    """One process of the stack: argv and environment templates, the port it listens on, how to see it is up."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # variable -> template; "{}" = any value
    port: str | None = None  # the template name of the port it listens on
    health: str | None = None  # HTTP path that answers 200 when it is up


# Every Airflow process reads the same configuration (as x-airflow-common in compose).
AIRFLOW_ENV = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://{airflow_db}",
    # Airflow derives an asyncpg URL otherwise; psycopg 3 (pinned already) does async as well.
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "postgresql+psycopg://{airflow_db}",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__CORE__PARALLELISM": "8",  # tasks defer their waits to the triggerer; 2 cores want few workers
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://{airflow_host}:{airflow_port}/execution/",
    "AIRFLOW__CORE__DAGS_FOLDER": "{dags_folder}",
    "AIRFLOW__CORE__PLUGINS_FOLDER": "{plugins_folder}",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in AIRFLOW_USERS.items()),
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": "{airflow_passwords_file}",
    # Shared by every process: the scheduler signs the task tokens the API server checks.
    "AIRFLOW__API_AUTH__JWT_SECRET": "{}",
    "AIRFLOW__API__SECRET_KEY": "{}",
    "AIRFLOW__CORE__FERNET_KEY": "{}",
    "AIRFLOW__API__BASE_URL": "http://{airflow_public_host}:{airflow_port}/",
}
# What the library reads (releasegate.settings): Airflow's tasks and triggers, the gateway and traffic.
RELEASEGATE_ENV = {
    "RELEASEGATE_HOME": "{releasegate_home}",
    "RELEASEGATE_DB_URL": "postgresql+psycopg://{releasegate_db}",
    "MLFLOW_TRACKING_URI": "http://{mlflow_host}:{mlflow_port}",
    "RELEASEGATE_GATEWAY_URL": "{gateway_scheme}://{gateway_host}:{gateway_port}",  # compose: https
    "RELEASEGATE_ADMIN_KEY": "{}",
    # Here the pipeline signs (`sign`, the key beside the home); compose only verifies (`verify-only`) and
    # mounts the signing folder into no worker.
    "RELEASEGATE_SIGNING_MODE": "{signing_mode}",
    "RELEASEGATE_SIGNING_KEY": "{signing_dir}/release.key",
    "RELEASEGATE_TRUSTED_KEYS": "{keys_dir}/release.pub",
}
_AIRFLOW_TASKS_ENV = {**AIRFLOW_ENV, **RELEASEGATE_ENV}
# The gateway's alert receiver triggers emergency_rollback through Airflow's REST API, as the operator user.
# Prometheus and Alertmanager send the keys in the files the gateway reads (tests/system/monitoring.py).
GATEWAY_ENV = {
    **RELEASEGATE_ENV,
    "RELEASEGATE_GATEWAY_METRICS_KEY_FILE": "{metrics_key_file}",
    "RELEASEGATE_GATEWAY_ALERTS_KEY_FILE": "{alerts_key_file}",
    "RELEASEGATE_AIRFLOW_URL": "http://{airflow_host}:{airflow_port}",
    "RELEASEGATE_AIRFLOW_USER": "operator",
    "RELEASEGATE_AIRFLOW_PASSWORD": "{}",
}

SERVICES: dict[str, Service] = {
    "airflow-apiserver": Service(
        ("airflow", "api-server", "--host", "{bind_host}", "--port", "{airflow_port}"),
        _AIRFLOW_TASKS_ENV,
        port="airflow_port",
        health="/api/v2/monitor/health",
    ),
    "airflow-scheduler": Service(("airflow", "scheduler"), _AIRFLOW_TASKS_ENV),
    "airflow-dag-processor": Service(("airflow", "dag-processor"), _AIRFLOW_TASKS_ENV),
    "airflow-triggerer": Service(("airflow", "triggerer"), _AIRFLOW_TASKS_ENV),
    "mlflow": Service(
        (
            "mlflow",
            "server",
            "--backend-store-uri",
            "postgresql://{mlflow_db}",
            "--artifacts-destination",
            "{mlflow_artifacts}",
            "--host",
            "{bind_host}",
            "--port",
            "{mlflow_port}",
            "--workers",
            "1",
            "--allowed-hosts",
            "{mlflow_allowed_hosts}",
        ),
        # One worker: uvicorn's supervisor kills workers that answer its pings late on a busy
        # machine. No job runner: releasegate uses none of MLflow's server-side jobs.
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        port="mlflow_port",
        health="/health",
    ),
    "gateway": Service(
        ("python", "-m", "releasegate.serving", "--host", "{bind_host}", "--port", "{gateway_port}"),
        GATEWAY_ENV,
        port="gateway_port",
        health="/readyz",
    ),
    "traffic": Service(
        (
            "releasegate",
            "traffic",
            "--model",
            MODEL,
            "--rps",
            "{traffic_rps}",
            "--duration",
            "0",
            "--feedback-delay",
            "1",
        ),
        RELEASEGATE_ENV,
    ),
}
AIRFLOW_PROCESSES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")


def render(template: str, values: dict[str, str]) -> str:
    """A template with its `{name}` fields filled in (a bare `{}` must be given as the value itself)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), template)


def matches(template: str, value: str) -> bool:
    """Whether `value` fits `template`: literal parts equal, each `{name}` or `{}` any non-empty text."""
    return extract(template, value) is not None


def extract(template: str, value: str) -> dict[str, str] | None:
    """The values of a template's `{name}` fields in `value` (None if it does not fit; repeats must agree)."""
    pattern, names = "", []
    for literal, field_ in re.findall(r"([^{]*)(\{\w*\})?", template):
        pattern += re.escape(literal)
        name = field_[1:-1]
        if not field_:
            continue
        if not name:
            pattern += ".+?"
        elif name in names:
            pattern += f"(?P={name})"
        else:
            names.append(name)
            pattern += f"(?P<{name}>.+?)"
    found = re.fullmatch(pattern, str(value), flags=re.DOTALL)
    return found.groupdict() if found else None


class StackError(RuntimeError):
    """A process of the stack exited or did not become healthy in time (the message has its log's tail)."""


class Databases:
    """Uniquely named databases on one PostgreSQL server, created for one run and dropped after it."""

    def __init__(self, admin_url: str, prefix: str):
        self.admin_url = admin_url
        self.prefix = prefix
        self.names: list[str] = []

    def url(self, name: str) -> str:
        """user@host:port/db of one of our databases (no scheme: each client adds its own driver)."""
        from sqlalchemy.engine import make_url

        admin = make_url(self.admin_url)
        auth = admin.username + (f":{admin.password}" if admin.password else "")
        return f"{auth}@{admin.host or '127.0.0.1'}:{admin.port or 5432}/{self.prefix}_{name}"

    def create(self, *names: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            for name in names:
                conn.execute(f'CREATE DATABASE "{self.prefix}_{name}"')
                self.names.append(name)

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.prefix}_{name}" WITH (FORCE)')
        self.names.clear()


def postgres_problem(admin_url: str) -> str | None:
    """Why the system tests cannot use the PostgreSQL at admin_url, or None when they can."""
    try:
        import psycopg

        with psycopg.connect(admin_url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as err:  # any failure means the same thing here: no usable server
        return f"PostgreSQL at {admin_url} is not usable ({type(err).__name__}: {str(err).strip()[:200]}). {HOW_TO_RUN}"
    return None


class Stack:
    """The processes, their URLs, ports, environment and logs; `start()` brings them up, `stop()` ends them."""

    def __init__(self, workdir: Path, admin_url: str, traffic_rps: int = 300):
        self.workdir = workdir
        self.logs_dir = workdir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.db = Databases(admin_url, f"rgsys_{uuid.uuid4().hex[:10]}")
        self.procs: dict[str, subprocess.Popen] = {}
        self._closing = contextlib.ExitStack()
        self.notifications = self._closing.enter_context(webhook_sink())  # what the stack told people
        self.timings: dict[str, float] = {}
        self.versions: dict[str, str] = {}
        self.ports = {"airflow_port": free_port(), "mlflow_port": free_port(), "gateway_port": free_port()}
        self.passwords = {user: secrets.token_urlsafe(12) for user in AIRFLOW_USERS}
        home = workdir / "releasegate"
        self.values = {
            **{k: str(v) for k, v in self.ports.items()},
            "bind_host": "127.0.0.1",
            "airflow_host": "127.0.0.1",
            "airflow_public_host": "127.0.0.1",
            "mlflow_host": "127.0.0.1",
            "gateway_host": "127.0.0.1",
            "gateway_scheme": "http",
            "airflow_db": self.db.url("airflow"),
            "mlflow_db": self.db.url("mlflow"),
            "releasegate_db": self.db.url("releasegate"),
            "dags_folder": str(ROOT / "dags"),
            "plugins_folder": str(ROOT / "plugins"),
            "airflow_passwords_file": str(workdir / "airflow" / "passwords.json"),
            "mlflow_artifacts": (workdir / "mlartifacts").as_uri(),
            "mlflow_allowed_hosts": ",".join(f"{h}:{self.ports['mlflow_port']}" for h in ("127.0.0.1", "localhost")),
            "releasegate_home": str(home),
            "keys_dir": str(home / "keys"),
            "signing_dir": str(home / "keys"),
            "signing_mode": "sign",
            "traffic_rps": str(traffic_rps),
            "metrics_key_file": str(workdir / "secrets" / "metrics.key"),
            "alerts_key_file": str(workdir / "secrets" / "alerts.key"),
        }
        self._secrets = {
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
            "RELEASEGATE_ADMIN_KEY": "rg-system-admin-" + secrets.token_urlsafe(24),
            "RELEASEGATE_AIRFLOW_PASSWORD": self.passwords["operator"],
        }
        self.env = self._environment()
        self._tokens: dict[str, str] = {}
        self._stopping = threading.Event()
        self._airflow_boot: threading.Thread | None = None
        self._airflow_error: str | None = None

    # --- what tests use -----------------------------------------------------------------------
    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['airflow_port']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow_port']}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway_port']}"

    @property
    def admin_key(self) -> str:
        return self._secrets["RELEASEGATE_ADMIN_KEY"]

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def airflow_token(self, user: str = "admin") -> str:
        """A JWT for one of AIRFLOW_USERS from the API server's POST /auth/token (cached per user)."""
        if user not in self._tokens:
            resp = httpx.post(
                f"{self.airflow_url}/auth/token", json={"username": user, "password": self.passwords[user]}, timeout=30
            )
            resp.raise_for_status()
            self._tokens[user] = resp.json()["access_token"]
        return self._tokens[user]

    def airflow(self, user: str = "admin") -> httpx.Client:
        """An httpx client on Airflow's API server, authenticated as `user`; close it (or use `with`)."""
        return httpx.Client(
            base_url=self.airflow_url, timeout=30, headers={"Authorization": f"Bearer {self.airflow_token(user)}"}
        )

    def run(self, argv: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        """Run a command (e.g. `releasegate trigger ...`) in the stack's environment, output captured."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)

    # --- environment --------------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in list(env):  # the outer test run's own Airflow and releasegate settings must not leak in
            if name.startswith(("AIRFLOW", "RELEASEGATE_", "MLFLOW_")):
                del env[name]
        for name, template in {**AIRFLOW_ENV, **GATEWAY_ENV}.items():
            env[name] = self.env_value(name, template)
        bin_dir = str(Path(sys.executable).parent)
        env.update(
            {
                "AIRFLOW_HOME": str(self.workdir / "airflow"),
                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "plugins"), os.environ.get("PYTHONPATH")])),
                "GIT_PYTHON_REFRESH": "quiet",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                # Compose passes the deployer's target through (empty: nobody is told); here every process that
                # tells people something (DAG and task callbacks, the gateway's incidents) tells this one sink.
                "RELEASEGATE_NOTIFY_WEBHOOK": self.notifications.url,
            }
        )
        return env

    def env_value(self, name: str, template: str) -> str:
        return self._secrets[name] if template == "{}" else render(template, self.values)

    def argv(self, name: str) -> list[str]:
        return [render(part, self.values) for part in SERVICES[name].argv]

    # --- processes ----------------------------------------------------------------------------
    def start_process(self, name: str, argv: list[str] | None = None) -> subprocess.Popen:
        """Start one process in its own process group (stopping kills the group, children included)."""
        log = open(self.log_path(name), "w")
        env = dict(self.env)
        if name in SERVICES:
            env.update({var: self.env_value(var, t) for var, t in SERVICES[name].env.items()})
        proc = subprocess.Popen(
            argv or self.argv(name), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    def stop_processes(self, *names: str, grace: float = 10) -> None:
        """SIGTERM each process group, give them `grace` seconds together, then SIGKILL what is left."""
        procs = [self.procs.pop(name) for name in names if name in self.procs]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # A group outlives its leader (Airflow's renamed children): kill whatever is left of each.
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def check_alive(self, *names: str) -> None:
        for name in names:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}; {self.log_path(name)}:\n{self.log_tail(name)}")

    def wait_for(self, what: str, ready: Callable[[], bool], processes: tuple[str, ...], timeout: float) -> float:
        """Poll `ready` until it is true; StackError (with the processes' log tails) if one exits or time runs out."""
        started = time.monotonic()
        while True:
            self.check_alive(*processes)
            try:
                if ready():
                    return time.monotonic() - started
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() - started > timeout or self._stopping.is_set():
                tails = "\n".join(f"--- {self.log_path(p)} ---\n{self.log_tail(p)}" for p in processes)
                raise StackError(f"{what}: not ready after {timeout:.0f}s\n{tails}")
            time.sleep(0.5)

    def _healthy(self, name: str) -> Callable[[], bool]:
        url = f"http://127.0.0.1:{self.values[SERVICES[name].port]}{SERVICES[name].health}"
        return lambda: httpx.get(url, timeout=2).status_code == 200

    def _airflow_healthy(self) -> bool:
        health = httpx.get(f"{self.airflow_url}/api/v2/monitor/health", timeout=5).json()
        return all(
            health[part]["status"] == "healthy" for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        )

    def _dags_listed(self, dag_ids: tuple[str, ...]) -> Callable[[], bool]:
        def listed() -> bool:
            with self.airflow() as client:
                return all(client.get(f"/api/v2/dags/{dag_id}").status_code == 200 for dag_id in dag_ids)

        return listed

    def start(self, dag_ids: tuple[str, ...] = ("model_release",), timeout: float = 300) -> None:
        """Create the databases, start every process, wait for each to be healthy.

        `self.timings` has the seconds from the start at which each part was up. Airflow boots (its
        migration, then its four processes) while MLflow, the models and the gateway come up.
        """
        t0 = time.monotonic()

        def mark(what: str) -> None:
            self.timings[what] = round(time.monotonic() - t0, 1)

        self.db.create("airflow", "mlflow", "releasegate")
        (self.workdir / "airflow").mkdir(exist_ok=True)
        Path(self.values["airflow_passwords_file"]).write_text(json.dumps(self.passwords))
        for role in ("metrics", "alerts"):  # as `make secrets` writes them for compose
            key_file = Path(self.values[f"{role}_key_file"])
            key_file.parent.mkdir(exist_ok=True)
            key_file.write_text(f"rg-system-{role}-{secrets.token_urlsafe(24)}\n")
        self.start_process("airflow-db-migrate", ["airflow", "db", "migrate"])
        self._airflow_boot = threading.Thread(target=self._boot_airflow, args=(dag_ids, timeout, mark), daemon=True)
        self._airflow_boot.start()
        self.start_process("mlflow")
        self._prepare_releasegate()
        self.start_process("gateway")
        self.wait_for("MLflow server", self._healthy("mlflow"), ("mlflow",), timeout)
        mark("mlflow healthy")
        self._register_models()
        mark("models registered, champion signed")
        self.wait_for(
            "gateway",
            lambda: httpx.get(f"{self.gateway_url}/healthz", timeout=2).status_code == 200,
            ("gateway",),
            timeout,
        )
        self._route_champion()
        self.wait_for("gateway /readyz", self._healthy("gateway"), ("gateway",), timeout)
        mark("gateway ready, serving the champion")
        self.start_process("traffic")

        self._airflow_boot.join()
        if self._airflow_error:
            raise StackError(self._airflow_error)
        self.wait_for("traffic", self._traffic_logged, ("traffic", "gateway"), 60)
        mark("traffic labelled")
        with open(self.logs_dir / "timings.json", "w") as out:
            json.dump(self.timings, out, indent=1)

    def _boot_airflow(self, dag_ids: tuple[str, ...], timeout: float, mark: Callable[[str], None]) -> None:
        """Wait for `airflow db migrate`, start Airflow's processes, wait for them and the DAGs (a thread)."""
        migrate = self.procs["airflow-db-migrate"]
        deadline = time.monotonic() + timeout
        while migrate.poll() is None:
            if self._stopping.is_set():
                return
            if time.monotonic() > deadline:
                self._airflow_error = f"airflow db migrate still running after {timeout:.0f}s"
                return
            time.sleep(0.5)
        if migrate.returncode != 0:
            self._airflow_error = (
                f"airflow db migrate failed (exit {migrate.returncode}):\n{self.log_tail('airflow-db-migrate')}"
            )
            return
        self.procs.pop("airflow-db-migrate")
        mark("airflow db migrated")
        if self._stopping.is_set():
            return
        for name in AIRFLOW_PROCESSES:
            self.start_process(name)
        try:
            self.wait_for("Airflow API server", self._healthy("airflow-apiserver"), AIRFLOW_PROCESSES, timeout)
            mark("airflow api-server healthy")
            self.wait_for(
                "Airflow scheduler, triggerer and dag-processor heartbeats",
                self._airflow_healthy,
                AIRFLOW_PROCESSES,
                timeout,
            )
            mark("airflow scheduler, triggerer, dag-processor heartbeats")
            self.wait_for(f"DAGs {', '.join(dag_ids)} parsed", self._dags_listed(dag_ids), AIRFLOW_PROCESSES, timeout)
            mark("airflow DAGs listed")
        except StackError as err:
            self._airflow_error = str(err)

    def in_env(self):
        """This process's environment pointed at the stack, for the library calls the fixture and tests make."""
        import contextlib

        import pytest

        @contextlib.contextmanager
        def patched():
            with pytest.MonkeyPatch.context() as mp:
                for name in {**AIRFLOW_ENV, **RELEASEGATE_ENV}:
                    mp.setenv(name, self.env[name])
                yield

        return patched()

    def _prepare_releasegate(self) -> None:
        """releasegate's tables (migrated once, before the gateway and Airflow reach for them) and signing keys."""
        from releasegate import signing, storage
        from releasegate.settings import get_settings

        with self.in_env():
            storage.engine()
            signing.ensure_keys(get_settings())

    def _register_models(self) -> None:
        """Demo models in the MLflow server, the champion signed: what `releasegate demo` does on SQLite."""
        from releasegate import signing
        from releasegate.demo import models
        from releasegate.settings import get_settings

        with self.in_env():
            settings = get_settings()
            self.versions = models.register_demo_models(settings, model_name=MODEL)
            signing.sign_version(MODEL, self.versions["champion"])

    def _route_champion(self) -> None:
        from releasegate.backends.local import LocalBackend
        from releasegate.settings import get_settings

        with self.in_env():
            LocalBackend(settings=get_settings()).set_route(MODEL, self.versions["champion"])

    def _traffic_logged(self) -> bool:
        import sqlalchemy as sa

        from releasegate import storage

        with storage.engine(self.env["RELEASEGATE_DB_URL"]).connect() as conn:
            labelled = conn.execute(sa.select(sa.func.count()).select_from(storage.feedback)).scalar_one()
        return labelled > 0

    def stop(self) -> None:
        """Stop every process (traffic first, Airflow before its database) and drop the databases."""
        from releasegate import storage

        self._stopping.set()
        if self._airflow_boot is not None:
            self._airflow_boot.join()
        self.stop_processes(*reversed(list(self.procs)))
        storage.dispose_all()
        self.db.drop()
        self._closing.close()


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
