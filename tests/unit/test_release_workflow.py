"""The example CI workflow runs what the docs say: register a version, then `releasegate trigger --wait`."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from click.testing import CliRunner

from releasegate.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_release_workflow_registers_then_triggers_and_waits_with_options_the_cli_has():
    workflow = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
    steps = workflow["jobs"]["release"]["steps"]
    commands = [s["run"] for s in steps if "run" in s]
    register = next(c for c in commands if "train_and_register.py" in c)
    assert (ROOT / shlex.split(register)[1]).exists()
    trigger = next(shlex.split(c) for c in commands if "releasegate trigger" in c)
    assert "--wait" in trigger
    # Every option the workflow passes exists (a renamed option would fail only in someone's CI).
    help_text = CliRunner().invoke(main, ["trigger", "--help"]).output
    assert all(arg in help_text for arg in trigger if arg.startswith("--"))
    env = workflow["jobs"]["release"]["env"]
    for name in (
        "RELEASEGATE_AIRFLOW_URL",
        "RELEASEGATE_AIRFLOW_USER",
        "RELEASEGATE_AIRFLOW_PASSWORD",
        "MLFLOW_TRACKING_URI",
    ):
        assert name in env and name in help_text + (ROOT / "docs/operations.md").read_text()
