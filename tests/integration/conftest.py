"""A live stack for the release tests: MLflow store (SQLite), the gateway process, demo traffic."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "churn"


@contextlib.contextmanager
def gateway_process(home: Path, port: int, timeout: float = 60.0) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`python -m releasegate.serving` on loopback with this process's environment, its output in
    `home/gateway.log`; yields once /readyz answers, and stops the process group however the block ends."""
    from tests.waiting import gateway_ready

    log = home / "gateway.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "releasegate.serving", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            start_new_session=True,
        )
    try:
        gateway_ready(f"http://127.0.0.1:{port}", proc, lambda: log.read_text()[-4000:], timeout=timeout)
        yield proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


class Stack:
    """The processes a release talks to, started for real on loopback."""

    def __init__(self, home: Path, env: dict):
        self.home = home
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.versions: dict[str, str] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, airflow_env):
    """Demo models registered and the champion signed; gateway serving it; traffic with labels flowing."""
    from tests.conftest import _point_env_at

    home = tmp_path_factory.mktemp("stack")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        mp.setenv("RELEASEGATE_GATEWAY_URL", f"http://127.0.0.1:{port}")
        from releasegate import signing, storage
        from releasegate.demo import models
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        stack = Stack(home, dict(os.environ))
        stack.versions = models.register_demo_models(settings, model_name=MODEL)
        signing.sign_version(MODEL, stack.versions["champion"])
        gateway = stack.start("gateway", [sys.executable, "-m", "releasegate.serving", "--port", str(port)])
        deadline = time.time() + 120
        while True:
            assert gateway.poll() is None, stack.log("gateway")
            try:
                if httpx.get(f"{settings.gateway_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "gateway did not start:\n" + stack.log("gateway")
            time.sleep(0.3)
        from releasegate.backends.local import LocalBackend

        LocalBackend(settings=settings).set_route(MODEL, stack.versions["champion"])
        stack.start(
            "traffic",
            [
                sys.executable,
                "-m",
                "releasegate.cli",
                "traffic",
                "--model",
                MODEL,
                "--rps",
                "300",
                "--duration",
                "0",
                "--feedback-delay",
                "1",
                "--api-key",
                settings.admin_api_key,
            ],
        )
        try:
            yield stack
        finally:
            stack.stop("traffic")
            stack.stop("gateway")
            storage.dispose_all()
