"""A real gateway on a loopback port for the security tests (tests/security/test_gateway_*.py).

It serves the signed models of tests/integration/test_gateway.py plus one that hangs on cue (while the file
`HANG` names exists), with small limits so each protection shows within a test: at most 8 requests in flight,
4 rows waiting per version, a 1 s champion timeout, and a candidate circuit that opens after 3 failures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

LIMITS = {
    "RELEASEGATE_GATEWAY_POLL_INTERVAL": "0.2",
    "RELEASEGATE_GATEWAY_CANDIDATE_TIMEOUT": "0.3",
    "RELEASEGATE_GATEWAY_CHAMPION_TIMEOUT": "1.0",
    "RELEASEGATE_GATEWAY_BREAKER_FAILURES": "3",
    "RELEASEGATE_GATEWAY_BREAKER_WINDOW": "30",
    "RELEASEGATE_GATEWAY_BREAKER_COOLDOWN": "3",
    "RELEASEGATE_GATEWAY_SLOT_QUEUE_ROWS": "4",
    "RELEASEGATE_GATEWAY_MAX_IN_FLIGHT": "8",
}


class Hanging:
    """A model that answers 1 per row, and hangs (up to 20 s) while the file named by $GW_SECURITY_HANG exists."""

    def predict(self, context, model_input, params=None):
        gate, deadline = os.environ.get("GW_SECURITY_HANG"), time.time() + 20
        if not (gate and os.path.exists(gate)):
            return [1] * len(model_input)
        # Tests wait on these: `.calls` has a line per call that began to hang, `.ended` per one that returned.
        with open(gate + ".calls", "a") as calls:
            calls.write("hang\n")
        try:
            while os.path.exists(gate) and time.time() < deadline:
                time.sleep(0.02)
        finally:
            with open(gate + ".ended", "a") as ended:
                ended.write("ended\n")
        return [1] * len(model_input)


def _register_hanging(settings) -> str:
    import cloudpickle
    import mlflow

    from releasegate import signing
    from tests.integration.test_gateway import MODEL, _frame

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    methods = {name: value for name, value in vars(Hanging).items() if not name.startswith("__")}
    python_model = type("Hanging", (mlflow.pyfunc.PythonModel,), methods)
    experiment = mlflow.get_experiment_by_name("gateway-test").experiment_id
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=python_model(),
            registered_model_name=MODEL,
            input_example=_frame(3, seed=1)[0],
            pip_requirements=["mlflow"],
        )
    version = str(info.registered_model_version)
    signing.sign_version(MODEL, version, settings)
    return version


class SecurityGateway:
    """The gateway process, its admin client, and what the tests read back: its database and its metrics."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path, versions: dict, settings, hang: Path):
        from tests.integration.test_gateway import ADMIN

        self.url, self.proc, self.log_path, self.versions, self.settings, self.hang = (
            url,
            proc,
            log,
            versions,
            settings,
            hang,
        )
        self.client = httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {ADMIN}"})

    def log(self) -> str:
        return self.log_path.read_text()[-6000:]

    def put_route(self, **body) -> httpx.Response:
        from tests.integration.test_gateway import MODEL

        body.setdefault("candidate_version", None)
        return self.client.put(f"/admin/routes/{MODEL}", json=body)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include `labels` (0 if there are none)."""
        total = 0.0
        for found in re.finditer(rf"^{name}{{([^}}]*)}} (\S+)$", self.client.get("/metrics").text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(found.group(2))
        return total

    def count(self, table, *where) -> int:
        import sqlalchemy as sa

        from releasegate import storage

        with storage.engine(self.settings.db_url).connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()

    def writer_pid(self) -> int:
        """The prediction log's writer process (the gateway's child)."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        (writer,) = [c for c in children if b"logprocess" in Path(f"/proc/{c}/cmdline").read_bytes()]
        return int(writer)


@pytest.fixture(scope="session")
def security_gateway(tmp_path_factory):
    from releasegate import storage
    from tests.conftest import _point_env_at
    from tests.integration.conftest import gateway_process
    from tests.integration.test_gateway import MODEL, _register
    from tests.ports import free_port

    home = tmp_path_factory.mktemp("security-gateway")
    hang = home / "hang"
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        _point_env_at(home, mp)
        for name, value in LIMITS.items():
            mp.setenv(name, value)
        mp.setenv("GW_SECURITY_HANG", str(hang))
        from releasegate import signing
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        versions = _register(settings)
        versions["hanging"] = _register_hanging(settings)
        try:
            with gateway_process(home, port) as (proc, log):
                gw = SecurityGateway(f"http://127.0.0.1:{port}", proc, log, versions, settings, hang)
                try:
                    resp = gw.client.put(
                        f"/admin/routes/{MODEL}", json={"champion_version": versions["champion"]}, timeout=180
                    )
                    assert resp.status_code == 200, resp.text
                    yield gw
                finally:
                    hang.unlink(missing_ok=True)  # a call still hanging returns before the gateway is stopped
                    gw.client.close()
        finally:
            storage.dispose_all()
