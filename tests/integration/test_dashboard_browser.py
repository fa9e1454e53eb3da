"""The dashboard in headless Chromium: served by uvicorn on a loopback port, mounted under /releasegate as Airflow mounts it."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tests import browser
from tests.require import require
from tests.unit.test_dashboard import (  # noqa: F401  (fixtures shared with the TestClient tests)
    airflow_auth,
    clock,
    conclude_experiment_row,
    incident_clock,
    incident_story,
    log_experiment_traffic,
    open_experiment_row,
    promoted_release,
    rolled_back_release,
    token_for,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def served_dashboard(rg_home, airflow_auth, clock):
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


def _shots(tmp_path: Path) -> Path:
    """Where screenshots go: the test's temp dir, or docs/ when RELEASEGATE_UPDATE_SCREENSHOTS=1 (README pictures)."""
    return ROOT / "docs" if os.environ.get("RELEASEGATE_UPDATE_SCREENSHOTS") == "1" else tmp_path


def test_dashboard_renders_the_releases_and_a_release_page_in_chromium(served_dashboard, airflow_auth, clock, tmp_path):
    if (missing := browser.available()) is not None:
        # On a laptop without Chromium this skips; CI installs it (.ci/run), so there a missing browser fails.
        require(f"{missing}; .ci/run installs it")
    from releasegate import signing
    from releasegate.settings import get_settings

    signing.generate_keys(get_settings().audit_key.parent)  # as a deployment has it: the audit head is anchored
    good, bad = promoted_release(clock), rolled_back_release(clock)
    token = token_for(airflow_auth)

    listing = browser.render(
        f"{served_dashboard}/",
        token=token,
        screenshot=_shots(tmp_path) / "dashboard.png",
        wait_for_css="#releases",
        width=1300,
        height=520,
    )
    assert listing.title == "Releases · releasegate"
    for rel in (good, bad):
        assert f'data-release-id="{rel.release_id}"' in listing.html
    assert 'data-status="intact"' in listing.html and "head not anchored" not in listing.html

    page = browser.render(
        f"{served_dashboard}/releases/{good.release_id}",
        token=token,
        screenshot=_shots(tmp_path) / "dashboard-release.png",
        wait_for_css="#timeline",
        width=1300,
    )
    assert page.html.count("<svg") >= 2 and 'data-stage="canary-2-50pct"' in page.html
    assert page.screenshot.stat().st_size > 20_000  # a real picture, not a blank page

    refused = browser.render(f"{served_dashboard}/", cookies={"_token": "not-a-token"})
    assert "Not allowed" in refused.html and "data-release-id" not in refused.html


def test_incidents_page_shows_an_incident_in_chromium(served_dashboard, airflow_auth, incident_clock, tmp_path):
    if (missing := browser.available()) is not None:
        require(f"{missing}; .ci/run installs it")
    ids = incident_story(incident_clock)
    page = browser.render(
        f"{served_dashboard}/incidents",
        token=token_for(airflow_auth),
        screenshot=_shots(tmp_path) / "dashboard-incidents.png",
        wait_for_css="#incidents",
        width=1400,
        height=420,
    )
    assert page.title == "Incidents · releasegate"
    assert f'data-incident-id="{ids["release"]}" data-state="open"' in page.html
    assert f'href="/releasegate/incidents/{ids["release"]}"' in page.html  # links under Airflow's mount
    assert "<img" not in page.html  # an alert summary carrying markup stays text in a real browser's DOM


def test_experiment_page_shows_its_arms_and_intervals_in_chromium(served_dashboard, airflow_auth, clock, tmp_path):
    if (missing := browser.available()) is not None:
        require(f"{missing}; .ci/run installs it")
    rel = open_experiment_row(clock)
    log_experiment_traffic(rel.release_id, clock.now)
    conclude_experiment_row(rel, clock)
    page = browser.render(
        f"{served_dashboard}/experiments/{rel.release_id}",
        token=token_for(airflow_auth),
        screenshot=_shots(tmp_path) / "dashboard-experiment.png",
        wait_for_css="#timeline",
        width=1300,
    )
    assert page.title == f"{rel.release_id} · releasegate"
    assert (
        'data-version="2" data-status="winner"' in page.html and 'data-version="3" data-status="stopped"' in page.html
    )
    assert "<svg" in page.html and "v3 (stopped)" in page.html
    assert page.screenshot.stat().st_size > 20_000  # a real picture, not a blank page
