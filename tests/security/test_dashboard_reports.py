"""Stored XSS through an Evidently report: a category value sent to the gateway lands in the report's own <script>.

The dashboard serves reports inside Airflow's API server, on Airflow's origin, so a report is
served sandboxed: its scripts run (they draw the charts) in an opaque origin, with no access to
the operator's Airflow session. A real Evidently report carrying a planted script, a real MLflow
store, the dashboard on uvicorn and headless Chromium.
"""

from __future__ import annotations

import html
import json
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

from releasegate import audit, release
from releasegate.release import State
from tests import browser
from tests.require import require

try:
    from releasegate.contract import AuditAction

    DRIFT = AuditAction.drift
except ImportError:  # 674b38f, whose dashboard these tests are also run against (issue 12), took the action's string
    DRIFT = "drift"

# The dashboard's app and its Airflow tokens as tests/unit/test_dashboard.py and test_dashboard_browser.py set them
# up, repeated here because those modules build their releases with names 674b38f does not have.
JWT_SECRET = "releasegate-dashboard-test-secret-" + "0123456789abcdef" * 2

# What a predict-key holder sends as a category value. It closes Evidently's <script>, then tries what an
# attacker wants from an operator's browser: the Airflow session cookie and the dashboard's API (same origin).
PLANTED = (
    "</script><script>(async function(){if(window.__planted)return;window.__planted=1;"
    "var out={ran:true,origin:String(window.origin)};"
    "try{out.cookie=document.cookie}catch(e){out.cookie_error=e.name}"
    "try{var r=await fetch('/releasegate/api/releases',{credentials:'include'});out.api=await r.text()}"
    "catch(e){out.api_error=e.name}"
    "try{out.storage=String(window.localStorage.length)}catch(e){out.storage_error=e.name}"
    "var p=document.createElement('pre');p.id='planted-result';p.textContent=JSON.stringify(out);"
    "document.documentElement.appendChild(p)})()</script><script>"
)


def _evidently_report(out, name: str, regions: list[str]) -> None:
    """A real input-drift report, as a stage's drift step writes it, on traffic with these region values."""
    from releasegate import drift

    rng = np.random.default_rng(7)
    reference = pd.DataFrame({"tenure": rng.normal(12, 3, 400), "region": rng.choice(["north", "south"], 400)})
    current = pd.DataFrame({"tenure": rng.normal(13, 3, 400), "region": rng.choice(regions, 400)})
    drift.input_drift(reference, current, out, name=name)


@pytest.fixture(scope="module")
def airflow_auth(airflow_env):
    """Airflow's auth manager in this process, on the session's migrated metadata DB, with a known JWT secret."""
    from airflow import settings as airflow_settings
    from airflow.api_fastapi.app import create_auth_manager

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{airflow_env['AIRFLOW_HOME']}/airflow.db")
        mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET)
        airflow_settings.configure_vars()
        airflow_settings.reconfigure_orm()
        manager = create_auth_manager()
        type(manager)._get_token_validator.__func__.cache_clear()  # built with this secret, not an earlier one
        yield manager
        type(manager)._get_token_validator.__func__.cache_clear()
    airflow_settings.configure_vars()
    airflow_settings.reconfigure_orm()


def token_for(manager, username: str = "alice", role: str | None = "viewer") -> str:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return manager.generate_jwt(SimpleAuthManagerUser(username=username, role=role))


@pytest.fixture
def client(rg_home, airflow_auth):
    from fastapi.testclient import TestClient

    from releasegate_airflow.dashboard import create_app

    return TestClient(create_app())


@pytest.fixture
def served_dashboard(rg_home, airflow_auth):
    """The plugin app under /releasegate of a root app (like Airflow's API server), on a free loopback port."""
    import uvicorn
    from fastapi import FastAPI

    from releasegate_airflow.dashboard import MOUNT_PREFIX, create_app

    root = FastAPI()
    root.mount(MOUNT_PREFIX, create_app())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}{MOUNT_PREFIX}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def stored_reports(settings, tmp_path):
    """A release whose shadow stored two reports in MLflow: one carries the planted value, one is clean.

    Written with calls 674b38f has too: the release opens, its shadow's drift event names the reports (by the
    stage's plain name, as events did before stages were typed), and an operator stops it.
    """
    from releasegate import registry

    mlflow_client = registry.client(settings)
    experiment = mlflow_client.create_experiment("xss", artifact_location=settings.mlflow_artifact_root.as_uri())
    run = mlflow_client.create_run(experiment)
    mlflow_client.create_registered_model("churn")
    for _ in range(2):
        mlflow_client.create_model_version("churn", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    rel = release.open_release("churn", "2", "1", {"name": "default"}, airflow_run_id="manual__xss", actor="airflow")
    rid = rel.release_id
    shadow = tmp_path / "shadow"
    _evidently_report(shadow, "input_drift", ["north", "south", PLANTED])
    _evidently_report(shadow, "prediction_drift", ["north", "south", "east"])
    assert PLANTED in (shadow / "input_drift.html").read_text()  # the report embeds it as sent
    for leftover in shadow.glob("*.json"):
        leftover.unlink()
    registry.log_artifact("churn", "2", shadow, artifact_path=f"releasegate/releases/{rid}/shadow")
    audit.append(
        "airflow",
        DRIFT,
        model="churn",
        version="2",
        release_id=rid,
        details={
            "stage": "shadow",
            "reports": f"releasegate/releases/{rid}/shadow",
            "input_drift": {"drifted_columns": ["region"], "drifted_share": 0.5, "rows_current": 400},
            "prediction_drift": {"drifted": [], "rows": 400},
        },
    )
    return release.transition(rid, State.aborted, actor="airflow:alice", reason="the reports were read")


def test_a_planted_script_in_a_report_does_not_run_on_the_dashboards_origin(
    served_dashboard, stored_reports, airflow_auth
):
    if (missing := browser.available()) is not None:
        require(f"{missing}; .ci/run installs it")
    token = token_for(airflow_auth)
    rel = stored_reports
    report = browser.render(
        f"{served_dashboard}/releases/{rel.release_id}/reports/shadow/input_drift.html",
        token=token,
        wait_for_css="#planted-result",
    )
    found = report.html.split('<pre id="planted-result">')[1].split("</pre>")[0]
    stolen = json.loads(html.unescape(found))
    # It ran: the payload is real. It ran in an opaque origin, not the dashboard's (Airflow's).
    assert stolen["ran"] is True and stolen["origin"] == "null", stolen
    assert "cookie" not in stolen and stolen["cookie_error"] == "SecurityError"
    assert "api" not in stolen and stolen["api_error"] == "TypeError"
    assert "storage" not in stolen and stolen["storage_error"] == "SecurityError"
    assert token not in report.html and rel.release_id not in found

    # The sandbox still lets a report's own scripts draw it.
    clean = browser.render(
        f"{served_dashboard}/releases/{rel.release_id}/reports/shadow/prediction_drift.html",
        token=token,
        wait_for_css="svg",
    )
    assert clean.html.count("<svg") >= 2 and "Dataset Drift" in clean.html


def test_reports_are_served_sandboxed_and_pages_allow_no_script(client, stored_reports, airflow_auth, monkeypatch):
    cookies = {"_token": token_for(airflow_auth)}
    rel = stored_reports
    report = client.get(f"/releases/{rel.release_id}/reports/shadow/input_drift.html", cookies=cookies)
    assert report.status_code == 200 and PLANTED in report.text
    policy = report.headers.get("content-security-policy", "")
    csp = [d.strip() for d in policy.split(";")]
    assert "sandbox allow-scripts allow-downloads" in csp and "allow-same-origin" not in policy, report.headers
    assert "connect-src 'none'" in csp and "form-action 'none'" in csp
    assert report.headers["x-content-type-options"] == "nosniff"

    # A release page with every kind of evidence (verdicts, routes, charts), as tests/unit/test_dashboard.py draws it.
    from tests.unit.test_dashboard import Clock, promoted_release

    clock = Clock(time.time())
    monkeypatch.setattr(release, "time", clock)
    monkeypatch.setattr(audit, "time", clock)
    full = promoted_release(clock)
    for path in ("/", f"/releases/{rel.release_id}", f"/releases/{full.release_id}"):
        page = client.get(path, cookies=cookies)
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy and "frame-ancestors 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff" and "<script" not in page.text
    api = client.get("/api/releases", cookies=cookies)
    assert api.headers["x-content-type-options"] == "nosniff"
    refused = client.get("/", headers={"Accept": "text/html"})
    assert refused.status_code == 401 and "default-src 'none'" in refused.headers["content-security-policy"]
