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
