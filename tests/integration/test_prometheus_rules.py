"""Prometheus' files through promtool: the config parses, the alert rules load, and their unit tests pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.require import require

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_prometheus_files_pass_promtool_and_alerts_fire_on_the_arm_that_crosses_its_limit():
    """`promtool check config` (syntax: its rule path is the container's), `check rules`, and the rule unit tests."""
    promtool = shutil.which("promtool")
    require(None if promtool else "promtool is not installed (Debian: apt-get install prometheus); .ci/run installs it")
    assert promtool is not None
    for args in (
        ["check", "config", "--syntax-only", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        done = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_alertmanager_config_passes_amtool_and_routes_an_actionable_alert_to_the_gateway():
    """`amtool check-config`, and `amtool config routes test`: the champion-failing alert's labels reach the
    releasegate receiver on the fast route (the one with a 5 s group wait)."""
    amtool = shutil.which("amtool")
    require(
        None
        if amtool
        else "amtool is not installed (Debian: apt-get install prometheus-alertmanager); .ci/run installs it"
    )
    assert amtool is not None
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    checked = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    labels = ["alertname=ReleasegateChampionFailing", "model=churn", "severity=critical", "action=rollback"]
    routed = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={config}", "--verify.receivers=releasegate", *labels],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert routed.returncode == 0, routed.stdout + routed.stderr
