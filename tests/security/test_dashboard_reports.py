"""Stored XSS through an Evidently report: a category value sent to the gateway lands in the report's own <script>.

The dashboard serves reports inside Airflow's API server, on Airflow's origin, so a report is
served sandboxed: its scripts run (they draw the charts) in an opaque origin, with no access to
the operator's Airflow session. A real Evidently report carrying a planted script, a real MLflow
store, the dashboard on uvicorn and headless Chromium.
"""

from __future__ import annotations

import html
import json

import numpy as np
import pandas as pd
import pytest

from tests import browser
from tests.integration.test_dashboard_browser import served_dashboard  # noqa: F401  (fixture)
from tests.require import require
from tests.unit.test_dashboard import (  # noqa: F401  (fixtures)
    airflow_auth,
    client,
    clock,
    promoted_release,
    token_for,
)

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


@pytest.fixture
def stored_reports(settings, clock, tmp_path):
    """A promoted release whose shadow stored two reports in MLflow: one carries the planted value, one is clean."""
    from releasegate import registry

    mlflow_client = registry.client(settings)
    experiment = mlflow_client.create_experiment("xss", artifact_location=settings.mlflow_artifact_root.as_uri())
    run = mlflow_client.create_run(experiment)
    mlflow_client.create_registered_model("churn")
    for _ in range(2):
        mlflow_client.create_model_version("churn", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    rel = promoted_release(clock)
    shadow = tmp_path / "shadow"
    _evidently_report(shadow, "input_drift", ["north", "south", PLANTED])
    _evidently_report(shadow, "prediction_drift", ["north", "south", "east"])
    assert PLANTED in (shadow / "input_drift.html").read_text()  # the report embeds it as sent
    for leftover in shadow.glob("*.json"):
        leftover.unlink()
    registry.log_artifact("churn", "2", shadow, artifact_path=f"releasegate/releases/{rel.release_id}/shadow")
    return rel


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
    assert stolen["ran"] is True and stolen["origin"] == "null"
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


def test_reports_are_served_sandboxed_and_pages_allow_no_script(client, stored_reports, airflow_auth):
    cookies = {"_token": token_for(airflow_auth)}
    rel = stored_reports
    report = client.get(f"/releases/{rel.release_id}/reports/shadow/input_drift.html", cookies=cookies)
    assert report.status_code == 200
    csp = [d.strip() for d in report.headers["content-security-policy"].split(";")]
    assert (
        "sandbox allow-scripts allow-downloads" in csp
        and "allow-same-origin" not in report.headers["content-security-policy"]
    )
    assert "connect-src 'none'" in csp and "form-action 'none'" in csp
    assert report.headers["x-content-type-options"] == "nosniff"

    for path in ("/", f"/releases/{rel.release_id}"):
        page = client.get(path, cookies=cookies)
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy and "frame-ancestors 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff" and "<script" not in page.text
    api = client.get("/api/releases", cookies=cookies)
    assert api.headers["x-content-type-options"] == "nosniff"
    refused = client.get("/", headers={"Accept": "text/html"})
    assert refused.status_code == 401 and "default-src 'none'" in refused.headers["content-security-policy"]
