"""model_release end to end with dag.test(): a real MLflow store, a real gateway process, real traffic.

Each release is `airflow dags test` (which runs `dag.test()`) in its own process, as the demo
runs it: Airflow's in-process execution API then never shares a SQLite lock with the test.

The tests run in file order on one stack: marker values are planted in classified columns, the
better candidate is promoted, then the worse one is rolled back against the new champion, then the
refusals; last, every byte the releases left behind is searched for the markers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from releasegate import audit, pipeline, registry, release, signing
from releasegate.backends import SignatureRefused
from releasegate.backends.local import LocalBackend
from releasegate.contract import Arm, AuditAction, Mode, Stage
from releasegate.verdict import Decision
from tests import forkserver
from tests.unit.test_dashboard import airflow_auth  # noqa: F401  (fixture)
from tests.webhook_sink import webhook_sink

ROOT = Path(__file__).resolve().parents[2]
MODEL = "churn"
pytestmark = pytest.mark.integration


# A customer's identity, sent in three classified columns and as the routing key (docs/operations.md, "Personal data").
EMAIL = "marker.person@example.ae"  # region: pseudonymise
EMIRATES_ID = "784-1987-1234567-1"  # plan: encrypt
CHANNEL = "marker-channel-5521"  # channel: drop
ROUTING_KEY = "784-1990-7654321-2"
MARKERS = [EMAIL, EMIRATES_ID, CHANNEL, ROUTING_KEY]
# Its labels encrypted at rest too: the releases below must still judge accuracy on them.
CLASSES = {
    "columns": {"region": "pseudonymise", "plan": "encrypt", "channel": "drop"},
    "feedback": {"ground_truth": "encrypt"},
}


def run_release(version: str, policy: str = "default", env: dict[str, str] | None = None, model: str = MODEL) -> str:
    """One model_release run through `airflow dags test` (dag.test()); returns its output's last lines."""
    import json
    import os

    conf = json.dumps({"model_name": model, "version": version, "policy": policy})
    out = forkserver.run(
        ["airflow", "dags", "test", "model_release", "-c", conf], env={**os.environ, **(env or {})}, timeout=1200
    )
    finished = [line for line in out.stdout.splitlines() + out.stderr.splitlines() if "DagRun Finished" in line]
    assert finished, out.stdout[-3000:] + out.stderr[-3000:]
    return finished[-1]


def newest_release(version: str) -> release.Release:
    return next(r for r in release.list_releases(MODEL) if r.candidate_version == version)


def test_marker_values_are_logged_only_in_their_classified_form(stack):
    """Before the releases: the churn model's classification names an encrypted and a dropped column besides the
    pseudonymised region; requests carrying the markers are logged with none of them in the clear."""
    import json

    import httpx
    import orjson
    import sqlalchemy as sa

    from releasegate import storage
    from releasegate.contract import CLASSIFICATION_TAG
    from releasegate.demo import data
    from releasegate.privacy import Protector
    from releasegate.settings import get_settings
    from tests.waiting import wait_until

    settings = get_settings()
    registry.client().set_registered_model_tag(MODEL, CLASSIFICATION_TAG, json.dumps(CLASSES))
    LocalBackend().set_route(MODEL, stack.versions["champion"])  # a route change: the gateway reads the tag again
    rows = data.generate(40, seed=11).drop(columns=[data.LABEL]).to_dict(orient="records")
    marked = [row | {"region": EMAIL, "plan": EMIRATES_ID, "channel": CHANNEL} for row in rows]
    table = storage.predictions
    sent: list[str] = []
    with httpx.Client(base_url=settings.gateway_url, timeout=30) as client:

        def logged_encrypted() -> list:
            """Send the marked rows again; the logged ones once any request's rows were logged encrypted."""
            resp = client.post(
                f"/models/{MODEL}/invocations",
                json={"dataframe_records": marked[:2]},
                headers={"authorization": f"Bearer {settings.admin_api_key}", "x-routing-key": ROUTING_KEY},
            )
            assert resp.status_code == 200, resp.text
            sent.append(resp.json()["request_id"])
            with storage.engine().connect() as conn:
                found = conn.execute(sa.select(table.c.inputs).where(table.c.request_id.in_(sent)))
                return [orjson.loads(v) for v in found.scalars() if '"e:' in v]

        logged = wait_until(logged_encrypted, timeout=60, every=0.5, what="the new classification applied")
    protector = Protector.of(settings)
    assert all("channel" not in row for row in logged)
    assert {protector.decrypt(row["plan"]) for row in logged} == {EMIRATES_ID}
    assert {row["region"] for row in logged} == {protector.pseudonym(EMAIL)}


def test_better_candidate_is_promoted(stack):
    good, champion = stack.versions["good"], stack.versions["champion"]
    run_release(good)
    rel = newest_release(good)
    assert rel.state is release.State.promoted, (rel.reasons, stack.log("gateway"))
    stages = [v.window.stage for v in rel.verdicts]
    decisions = [v.decision for v in rel.verdicts]
    assert stages[0].is_shadow and [s.weight for s in stages[1:]] == [5, 25, 50], stages
    # An earlier canary step whose window closes with nothing failed hands its evidence on (`continue`);
    # the shadow and the last step must each pass on their own evidence.
    assert decisions[0] is decisions[-1] is Decision.promote, decisions
    assert set(decisions[1:-1]) <= {Decision.promote, Decision.continue_}, decisions
    assert registry.get_alias(MODEL, "champion") == good
    assert registry.get_alias(MODEL, "previous") == champion
    # Its labels were logged encrypted (CLASSES' feedback) and the verdicts opened them: accuracy was measured.
    import sqlalchemy as sa

    from releasegate import storage

    p, f = storage.predictions, storage.feedback
    of_release = sa.select(p.c.request_id).where(p.c.release_id == rel.release_id)
    with storage.engine().connect() as conn:
        labels = conn.execute(sa.select(f.c.ground_truth).where(f.c.request_id.in_(of_release))).scalars().all()
    assert labels and all(label.startswith('"e:k1:') for label in labels), labels[:3]
    from releasegate.analysis.window import read_window

    shadow = rel.verdicts[0].window
    _, read = read_window(MODEL, rel.release_id, shadow.stage.kind, shadow.start, shadow.end)
    assert len(read) and set(read["ground_truth"]) <= {"0", "1"}  # what the shadow's verdict judged: churn's labels
    assert rel.verdicts[0].samples[Arm.champion].labelled > 0
    route = LocalBackend().get_route(MODEL)
    assert route.champion_version == good and route.mode is Mode.single
    assert registry.get_version_tags(MODEL, good)["releasegate.state"] == "promoted"
    assert audit.verify().ok
    # Each stage left Evidently reports in MLflow, next to the release summary and the signed audit head.
    drift = [e["details"] for e in audit.events(release_id=rel.release_id) if e["action"] == AuditAction.drift]
    assert [Stage.model_validate(d["stage"]) for d in drift] == stages and all("error" not in d for d in drift)
    assert "prediction_drift" in drift[0]
    for artifact in ("shadow/input_drift.html", "shadow/prediction_drift.json", "release.json", "audit-head.json"):
        assert registry.download_artifact(MODEL, good, f"releasegate/releases/{rel.release_id}/{artifact}").exists()


def test_worse_candidate_is_rolled_back(stack):
    bad, good = stack.versions["bad"], stack.versions["good"]
    run_release(bad)
    rel = newest_release(bad)
    assert rel.state is release.State.rolled_back, rel.reasons
    last = rel.verdicts[-1]
    failed = [m.name for m in last.metrics if m.passed is False]
    assert last.decision is Decision.rollback and set(failed) & {"accuracy", "agreement"}, last.reason
    assert rel.reasons[-1] == last.reason
    assert registry.get_alias(MODEL, "champion") == good
    route = LocalBackend().get_route(MODEL)
    assert route.champion_version == good and route.candidate_version is None
    tags = registry.get_version_tags(MODEL, bad)
    assert tags["releasegate.state"] == "rolled_back" and tags["releasegate.reasons"] == rel.reasons[-1][:4000]


def _new_signed_version(tmp_path: Path) -> str:
    """Register a copy of the champion's model directory as a new version, with its data, and sign it."""
    import mlflow

    source = registry.resolve_version(MODEL, "champion")
    model_dir = registry.download_model(MODEL, source, dst=tmp_path / "copy")
    from releasegate.demo.models import EXPERIMENT

    with mlflow.start_run(experiment_id=registry.client().get_experiment_by_name(EXPERIMENT).experiment_id) as run:
        mlflow.log_artifacts(str(model_dir), "model")
    version = str(mlflow.register_model(f"runs:/{run.info.run_id}/model", MODEL).version)
    for name in ("reference.parquet", "holdout.parquet"):
        local = registry.download_artifact(MODEL, source, f"releasegate/{name}", dst=tmp_path / name.split(".")[0])
        registry.log_artifact(MODEL, version, local, artifact_path="releasegate")
    signing.sign_version(MODEL, version)
    return version


def _tamper(version: str) -> None:
    """Change one byte of the stored model file, as someone with write access to the artifact store could."""
    run_id = registry.client().get_model_version(MODEL, version).run_id
    artifacts = Path(registry.client().get_run(run_id).info.artifact_uri.removeprefix("file://")) / "model"
    stored = [p for p in artifacts.glob("model.*") if p.suffix in (".pkl", ".skops")]
    assert stored, f"no model file under {artifacts}"
    for path in stored:
        path.write_bytes(path.read_bytes() + b"\0")


def test_tampered_model_is_refused_by_gateway_and_release_is_rejected_and_told(stack, tmp_path):
    version = _new_signed_version(tmp_path)
    _tamper(version)
    champion = registry.resolve_version(MODEL, "champion")
    with pytest.raises(SignatureRefused, match="signature"):
        LocalBackend().set_route(MODEL, champion, version, Mode.shadow, 0)
    assert LocalBackend().get_route(MODEL).candidate_version is None

    with webhook_sink() as sink:
        run_release(version, env={"RELEASEGATE_NOTIFY_WEBHOOK": sink.url})
    rel = newest_release(version)
    assert rel.state is release.State.rejected
    assert "signature" in rel.reasons[-1]
    # The DAG's success callback (Airflow's notifier) told the outcome from the release row.
    [told] = sink.bodies("release_outcome")
    assert (told["release_id"], told["version"], told["from_version"], told["state"]) == (
        rel.release_id,
        version,
        champion,
        "rejected",
    )
    assert told["reasons"] == rel.reasons and told["links"]["dashboard"].endswith(rel.release_id)
    assert LocalBackend().get_route(MODEL).champion_version == champion


def test_second_release_is_refused_while_one_runs_and_a_dead_run_does_not_block(stack, airflow_env):
    candidate = stack.versions["bad"]
    # A live holder: a queued Airflow run of model_release (no scheduler runs here, so it stays queued).
    subprocess.run(["airflow", "dags", "reserialize"], env=airflow_env, check=True, capture_output=True, timeout=300)
    subprocess.run(
        [
            "airflow",
            "dags",
            "trigger",
            "model_release",
            "--run-id",
            "holder-run",
            "--conf",
            '{"model_name": "churn", "version": "%s"}' % candidate,
        ],
        env=airflow_env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    holder = pipeline.start(MODEL, candidate, airflow_run_id="holder-run", actor="test").release_id
    releases_before = len(release.list_releases(MODEL))

    assert "state=failed" in run_release(candidate)
    assert release.active(MODEL).release_id == holder
    assert len(release.list_releases(MODEL)) == releases_before  # the refused run opened nothing

    # The holder's run dies: the next release closes it as failed and goes ahead.
    subprocess.run(
        ["airflow", "dags", "delete", "model_release", "--yes"],
        env=airflow_env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    run_release(candidate)
    assert release.get(holder).state is release.State.failed
    assert "gone or failed" in release.get(holder).reasons[-1]
    assert newest_release(candidate).release_id != holder


def test_no_marker_in_any_byte_the_releases_left(stack, airflow_env, airflow_auth):
    """After the releases: the SQLite log and its WAL, MLflow's database and every artifact (the releases' Evidently
    reports among them), every process's log, Airflow's database and task logs, and every dashboard page."""
    import re

    from fastapi.testclient import TestClient

    from releasegate_airflow.dashboard import create_app
    from tests.unit.test_dashboard import token_for

    stored = [p for root in (stack.home, Path(airflow_env["AIRFLOW_HOME"])) for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in stored}
    assert {"releasegate.db", "releasegate.db-wal", "mlflow.db"} <= names, sorted(names)[:40]
    assert any(p.suffix == ".html" and "releases" in str(p) for p in stored), "the releases' reports were stored"
    newest = release.list_releases(MODEL)[0].release_id.encode()  # the search reads what was written: it finds this
    assert any(newest in p.read_bytes() for p in stored if p.name.startswith("releasegate.db"))
    holding = {str(p): [m for m in MARKERS if m.encode() in p.read_bytes()] for p in stored}
    assert {path: found for path, found in holding.items() if found} == {}

    client = TestClient(create_app(), headers={"Authorization": f"Bearer {token_for(airflow_auth)}"})
    pages = ["/"] + [f"/releases/{rel.release_id}" for rel in release.list_releases(MODEL)]
    seen = []
    while pages:
        path = pages.pop()
        page = client.get(path)
        assert page.status_code == 200, (path, page.text[:300])
        seen.append(path)
        assert [m for m in MARKERS if m in page.text] == [], path
        reports = re.findall(r'href="(rel-[0-9a-f]+/reports/[^"]+\.html)"', page.text)  # relative to /releases/
        pages += [f"/releases/{link}" for link in reports if f"/releases/{link}" not in seen + pages]
    assert any("/reports/" in path for path in seen), seen
