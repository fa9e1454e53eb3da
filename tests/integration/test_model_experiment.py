"""model_experiment end to end: a 3-arm experiment as an Airflow run (`airflow dags test`, which runs dag.test())
on live gateway traffic, with a real MLflow registry, a real gateway process and the demo's traffic generator.

The arms are the demo's versions: the champion (control), the "good" candidate (it flags more churners, so
more retention offers convert) and the "bad" one (trained on a stale snapshot: it converts almost nobody).
The traffic generator's feedback carries each answer's simulated business outcome (demo/traffic.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from releasegate import audit, experiments, pipeline, registry, release, storage
from releasegate.analysis.experiment import ArmStatus
from releasegate.backends.local import LocalBackend
from releasegate.contract import AuditAction, Mode
from tests import forkserver

MODEL = "churn"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def run_dag(dag_id: str, conf: dict) -> str:
    out = forkserver.run(
        ["airflow", "dags", "test", dag_id, "-c", json.dumps(conf)], env=dict(os.environ), timeout=1200
    )
    finished = [line for line in out.stdout.splitlines() + out.stderr.splitlines() if "DagRun Finished" in line]
    assert finished, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def test_three_arm_experiment_finds_the_best_arm_and_hands_it_to_the_release(stack, tmp_path, monkeypatch):
    """The good arm wins on conversion, the bad one is stopped by a guard (its traffic back to the control),
    the champion serves alone afterwards, the result is audited and stored in MLflow, and the winner is the
    `challenger` for a model_release run the experiment triggered. That release, run under a policy that lets
    an experiment's result stand for shadow and canary, promotes the winner with no stage of its own."""
    good, bad, champion = stack.versions["good"], stack.versions["bad"], stack.versions["champion"]
    registry.set_alias(MODEL, "challenger", champion)  # not the winner yet: the experiment must move it
    # The shipped design the demo runs (include/policies/experiments/quick.yaml).
    log = run_dag(
        "model_experiment", {"model_name": MODEL, "arms": f"{good},{bad}", "weights": "33,33", "design": "quick"}
    )

    exp = next(r for r in release.list_releases(MODEL) if experiments.is_experiment(r))
    assert exp.state is release.State.concluded, (exp.reasons, log[-3000:], stack.log("gateway")[-3000:])
    # The plan made as it opened, in the task's log: conversion at the champion's last hour, or why there is none.
    assert re.search(
        r"; plan: (conversion from [0-9.]+ by 0\.\d+ .* fixed horizon [0-9,]+ requests|no plan for conversion)", log
    ), log[:5000]
    decided = audit.events(release_id=exp.release_id, action=AuditAction.experiment_decided)
    assert decided and decided[-1]["details"]["winner"] == good, decided
    result = decided[-1]["details"]["result"]
    arms = {a["arm"]: a for a in result["arms"]}
    assert arms[good]["status"] == ArmStatus.winner
    stopped = audit.events(release_id=exp.release_id, action=AuditAction.experiment_arm_stopped)
    assert [e["version"] for e in stopped] == [bad], stopped
    conversion = next(m for m in arms[good]["metrics"] if m["name"] == "conversion")
    assert conversion["lower"] > 0, conversion  # the always-valid bound clears the control

    # Traffic: three arms at their weights, sticky per customer; then the champion alone again.
    p = storage.predictions
    with storage.engine().connect() as conn:
        rows = conn.execute(
            sa.select(p.c.version, p.c.routing_key_hash, p.c.cpu_ms).where(
                p.c.release_id == exp.release_id, p.c.mode == Mode.experiment, p.c.served
            )
        ).all()
    served = {v: sum(1 for r in rows if r.version == v) for v in (champion, good, bad)}
    assert all(served.values()), served
    print(f"experiment {exp.release_id}: {exp.ended_at - exp.started_at:.0f} s, requests per version {served}")
    good_keys = {r.routing_key_hash for r in rows if r.version == good}
    keys_elsewhere = {r.routing_key_hash for r in rows if r.version in (champion, bad)}
    assert good_keys and not good_keys & keys_elsewhere, "a customer of the good arm was served by another arm"
    assert all(r.cpu_ms is not None and r.cpu_ms >= 0 for r in rows[:500])  # CPU per row logged with every call
    route = LocalBackend().get_route(MODEL)
    assert route is not None and route.mode is Mode.single and route.champion_version == champion

    # Handed to the release: the winner is the challenger, and model_release was triggered for it.
    assert registry.get_alias(MODEL, "challenger") == good
    with sa.create_engine(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).connect() as conn:
        confs = conn.execute(sa.text("SELECT conf FROM dag_run WHERE dag_id = 'model_release'")).scalars().all()
    confs = [json.loads(c) if isinstance(c, str | bytes) else c for c in confs]
    handed = {"model_name": MODEL, "version": good, "policy": "default", "experiment_id": exp.release_id}
    assert handed in confs, confs
    report = registry.client().list_artifacts(
        registry.client().get_model_version(MODEL, champion).run_id, f"releasegate/experiments/{exp.release_id}"
    )
    assert {Path(a.path).name for a in report} == {"experiment.json", "experiment.html"}

    # The triggered release, run under the default policy but for `experiment_winner.skip_shadow_and_canary`.
    policy = yaml.safe_load((REPO / "include" / "policies" / "default.yaml").read_text())
    policy |= {"name": "winner", "experiment_winner": {"skip_shadow_and_canary": True}}
    (tmp_path / "winner.yaml").write_text(yaml.safe_dump(policy))
    monkeypatch.setenv("RELEASEGATE_POLICIES_DIR", str(tmp_path))
    with pytest.raises(release.ReleaseError, match="did not win"):
        pipeline.start(MODEL, bad, "winner", experiment_id=exp.release_id, actor="test")
    log = run_dag("model_release", handed | {"policy": "winner"})
    rel = next(r for r in release.list_releases(MODEL) if not experiments.is_experiment(r))
    assert rel.state is release.State.promoted, (rel.reasons, log[-3000:])
    assert registry.get_alias(MODEL, "champion") == good
    assert rel.verdicts == [] and f"won experiment {exp.release_id}" in rel.reasons[-1], rel.reasons
    stages = [e["details"].get("mode") for e in audit.events(release_id=rel.release_id, action=AuditAction.route)]
    assert Mode.shadow not in stages and Mode.canary not in stages, stages


def test_a_second_experiment_is_refused_while_a_release_holds_the_lock(stack):
    """One release or experiment per model at a time: the model's lock is the releases table's."""
    opened = release.open_release(
        MODEL, stack.versions["good"], stack.versions["champion"], {"name": "default"}, airflow_run_id="r1", actor="t"
    )
    try:
        with pytest.raises(release.ReleaseInProgress):
            experiments.open_experiment(
                MODEL, [(stack.versions["bad"], 30)], "default", airflow_run_id="r2", actor="test"
            )
    finally:
        release.transition(opened.release_id, release.State.aborted, actor="test", reason="test over")
