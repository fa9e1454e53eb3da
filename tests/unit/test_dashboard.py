"""The release dashboard plugin app: a real releasegate database filled by the library, real Airflow tokens.

Tokens are minted by Airflow's own auth manager (SimpleAuthManager, the default) with the
JWT secret the app validates with; Airflow's metadata database (for revoked tokens) is the
session's migrated one.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import sqlalchemy as sa

from releasegate import audit, release, storage
from releasegate.contract import Arm, AuditAction, Mode, Outcome, RouteChange, Stage
from releasegate.release import State
from releasegate.verdict import SRM, ArmSamples, Decision, MetricResult, PolicyRef, Verdict, Window

SHADOW = Stage.shadow()

JWT_SECRET = "releasegate-dashboard-test-secret-" + "0123456789abcdef" * 2
RUN_ID = "manual__2026-11-29T09:18:55.988289+00:00"


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


class Clock:
    """The release's wall clock, moved on by the story below so its steps take as long as a real release's."""

    def __init__(self, start: float):
        self.now = start

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Only the clock of release and audit is replaced; every row is still written by the library itself."""
    fake = Clock(time.time() - 3600)
    monkeypatch.setattr(release, "time", fake)
    monkeypatch.setattr(audit, "time", fake)
    return fake


def token_for(manager, username: str = "alice", role: str | None = "viewer") -> str:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return manager.generate_jwt(SimpleAuthManagerUser(username=username, role=role))


@pytest.fixture
def client(rg_home, airflow_auth, clock):
    from fastapi.testclient import TestClient

    from releasegate_airflow.dashboard import create_app

    return TestClient(create_app())


def _metric(name, kind, estimate, lower, upper, limit, margin, passed, higher=True, detail="", n=2048):
    return MetricResult(
        name=name,
        kind=kind,
        estimate=estimate,
        lower=lower,
        upper=upper,
        limit=limit,
        margin=margin,
        passed=passed,
        higher_is_better=higher,
        detail=detail,
        n=n,
        alpha=0.01,
    )


def _verdict(stage: Stage, decision: Decision, reason, metrics, end) -> Verdict:
    expected = None if stage.is_shadow else {Arm.champion: 1 - stage.weight / 100, Arm.candidate: stage.weight / 100}
    return Verdict(
        decision=decision,
        reason=reason,
        window=Window(start=end - 30, end=end, stage=stage),
        samples={
            Arm.champion: ArmSamples(requests=4585, routing_keys=4063, labelled=4302),
            Arm.candidate: ArmSamples(requests=234, routing_keys=213, labelled=220),
        },
        metrics=metrics,
        srm=SRM(counts={Arm.champion: 4063, Arm.candidate: 213}, expected=expected, p_value=0.81) if expected else None,
        policy=PolicyRef(name="default", digest="ccdf2ee60df1333ab2008faa0dc5a4b9"),
    )


def _route(stage: Stage) -> dict:
    """A route event's details as pipeline.route writes them."""
    mode = Mode.shadow if stage.is_shadow else Mode.canary
    return {
        "change": RouteChange.stage,
        "mode": mode,
        "candidate_weight": stage.weight,
        "stage": stage.model_dump(mode="json"),
        "revision": 2,
    }


def promoted_release(clock: Clock) -> release.Release:
    """A release through shadow and two canary steps to promotion, written as the pipeline writes it."""
    rel = release.open_release("churn", "2", "1", {"name": "default"}, airflow_run_id=RUN_ID, actor="airflow")
    rid = rel.release_id
    clock.advance(2)
    release.transition(rid, State.signing, actor="airflow")
    audit.append(
        "airflow", AuditAction.signed, model="churn", version="2", release_id=rid, details={"digest": "sha256:bad9"}
    )
    clock.advance(3)
    release.transition(rid, State.validating, actor="airflow")
    clock.advance(25)
    audit.append(
        "airflow",
        AuditAction.validation,
        model="churn",
        version="2",
        release_id=rid,
        details={
            "passed": True,
            "reasons": [],
            "evaluation": {"metric": "accuracy", "candidate": 0.878, "champion": 0.845, "rows": 3000},
        },
    )
    release.transition(rid, State.shadow, actor="airflow")
    audit.append("airflow", AuditAction.route, model="churn", version="2", release_id=rid, details=_route(SHADOW))
    t0 = clock.advance(38)
    release.record_verdict(
        rid,
        _verdict(
            SHADOW,
            Decision.promote,
            "promote: on 2,048 labelled shadow requests every "
            "check clears its limit; agreement 89.7% (87.2% … 92.2%; needs > 80%)",
            [
                _metric("error_rate", "guardrail", 0.0, -0.0009, 0.0009, 0.01, 0.01, True, higher=False),
                _metric("accuracy", "primary", 0.030, 0.004, 0.056, -0.02, 0.02, True),
                _metric("agreement", "agreement", 0.897, 0.872, 0.922, 0.8, 0.2, True),
            ],
            t0,
        ),
        actor="airflow",
    )
    audit.append(
        "airflow",
        AuditAction.drift,
        model="churn",
        version="2",
        release_id=rid,
        details={
            "stage": SHADOW.model_dump(mode="json"),
            "reports": f"releasegate/releases/{rid}/shadow",
            "input_drift": {"drifted_columns": [], "drifted_share": 0.0, "rows_current": 2156},
            "prediction_drift": {"drifted": [], "rows": 2228},
        },
    )
    release.transition(rid, State.canary, actor="airflow")
    for step, weight in ((1, 5), (2, 50)):
        stage = Stage.canary(step, weight)
        clock.advance(1)
        audit.append("airflow", AuditAction.route, model="churn", version="2", release_id=rid, details=_route(stage))
        clock.advance(60 * step)
        release.record_verdict(
            rid,
            _verdict(
                stage,
                Decision.promote,
                f"promote: on the labelled canary requests at {weight} % every check clears its limit",
                [
                    _metric("error_rate", "guardrail", 0.0024, -0.0049, 0.0097, 0.01, 0.01, True, higher=False),
                    _metric(
                        "latency_p99",
                        "guardrail",
                        0.0,
                        0.0,
                        0.0075,
                        0.01,
                        0.01,
                        True,
                        higher=False,
                        detail="limit 138.5 ms = 1.5 × champion p99 92.4 ms; candidate p99 128.8 ms",
                    ),
                    _metric("accuracy", "primary", 0.041, 0.018, 0.063, -0.02, 0.02, True),
                ],
                clock.now,
            ),
            actor="airflow",
        )
    clock.advance(1)
    release.transition(rid, State.promoting, actor="airflow")
    audit.append(
        "airflow",
        AuditAction.route,
        model="churn",
        version="2",
        release_id=rid,
        details={"change": RouteChange.promotion, "mode": Mode.single, "candidate_weight": 0, "champion_version": "2"},
    )
    return release.transition(
        rid,
        State.promoted,
        actor="airflow",
        decision=Outcome.promote,
        reason=(
            "promote: on 15,365 labelled canary-50 requests (7,750 candidate, 7,615 champion) every check clears its "
            "limit: error rate +0.000 (−0.001 … +0.000; needs < +0.01); accuracy +0.041 (+0.018 … +0.063; needs > −0.02)"
        ),
    )


def rolled_back_release(clock: Clock) -> release.Release:
    """A worse candidate whose shadow agreement fails: rolled back."""
    clock.advance(600)
    rel = release.open_release("churn", "3", "2", {"name": "default"}, airflow_run_id="manual__worse", actor="airflow")
    rid = rel.release_id
    for state in (State.signing, State.validating, State.shadow):
        clock.advance(10)
        release.transition(rid, state, actor="airflow")
    audit.append("airflow", AuditAction.route, model="churn", version="3", release_id=rid, details=_route(SHADOW))
    reason = (
        "rollback: the arms agree on 55.6% of requests (always-valid 99% bounds 38.0% … 73.1%), "
        "below the required 80%, on 108 shadow requests"
    )
    release.record_verdict(
        rid,
        _verdict(
            SHADOW,
            Decision.rollback,
            reason,
            [_metric("agreement", "agreement", 0.556, 0.380, 0.731, 0.8, 0.2, False, n=108)],
            clock.advance(21),
        ),
        actor="airflow",
    )
    audit.append(
        "airflow",
        AuditAction.route,
        model="churn",
        version="2",
        release_id=rid,
        details={"change": RouteChange.rollback, "mode": Mode.single, "candidate_weight": 0, "champion_version": "2"},
    )
    return release.transition(rid, State.rolled_back, actor="airflow", decision=Outcome.rollback, reason=reason)


def test_releases_list_shows_each_release_with_state_decision_and_airflow_run(client, airflow_auth, clock):
    good, bad = promoted_release(clock), rolled_back_release(clock)
    page = client.get("/", cookies={"_token": token_for(airflow_auth)})
    assert page.status_code == 200, page.text
    rows = re.findall(r'<tr class="release" data-release-id="([^"]+)" data-state="([^"]+)"', page.text)
    assert rows == [(bad.release_id, "rolled_back"), (good.release_id, "promoted")]  # newest first
    assert "/dags/model_release/runs/manual__2026-11-29T09%3A18%3A55.988289%2B00%3A00" in page.text
    assert "signed in to Airflow as <b>alice</b>" in page.text
    assert "the arms agree on 55.6% of requests" in page.text


def test_release_page_shows_timeline_traffic_metric_charts_and_evidence(client, airflow_auth, clock):
    rel = promoted_release(clock)
    page = client.get(f"/releases/{rel.release_id}", headers={"Authorization": f"Bearer {token_for(airflow_auth)}"})
    assert page.status_code == 200, page.text
    html = page.text
    # One timeline row per audit event of the release, in order.
    actions = re.findall(r'<tr class="event" data-action="([^"]+)"', html)
    assert actions == [e["action"] for e in audit.events(release_id=rel.release_id)]
    assert actions[0] == "release.opened" and actions[-1] == "release.promoted"
    # Charts are inline SVG with their text as text: the stages and metric names are readable.
    traffic = html.split('id="traffic-chart"')[1].split("</div>")[0]
    assert "<svg" in traffic and "shadow" in traffic and "50%" in traffic and "promoted" in traffic
    metrics = html.split('id="metrics-chart"')[1].split("</div>")[0]
    for name in ("error_rate [guardrail]", "latency_p99 [guardrail]", "accuracy [primary]", "agreement [agreement]"):
        assert name in metrics
    # Evidence: each verdict's sentence and numbers, with the bounds and limits.
    assert re.findall(r'class="card verdict" data-stage="([^"]+)"', html) == [
        "shadow",
        "canary-1-5pct",
        "canary-2-50pct",
    ]
    assert "<b>canary 2 (50 %)</b>" in html
    assert "agreement 89.7% (87.2% … 92.2%; needs &gt; 80%)" in html
    assert "+0.0410" in html and "+0.0180" in html and "+0.0630" in html
    assert "limit 138.5 ms = 1.5 × champion p99 92.4 ms" in html
    # Links: the shadow's two Evidently reports, MLflow, and the Airflow run.
    assert f'href="{rel.release_id}/reports/shadow/input_drift.html"' in html
    assert f'href="{rel.release_id}/reports/shadow/prediction_drift.html"' in html
    assert f'href="{rel.release_id}/mlflow"' in html
    assert 'href="/dags/model_release/runs/manual__2026-11-29T09%3A18%3A55.988289%2B00%3A00"' in html


def test_rolled_back_release_page_shows_the_failed_check(client, airflow_auth, clock):
    rel = rolled_back_release(clock)
    html = client.get(f"/releases/{rel.release_id}", cookies={"_token": token_for(airflow_auth)}).text
    verdict = html.split('class="card verdict"')[1]
    assert 'data-decision="rollback"' in verdict and "below the required 80%" in verdict
    assert re.search(r'data-name="agreement">.*?<span class="pill bad">failed</span>', verdict, re.S)
    assert "No report stored yet." in html
    assert 'http-equiv="refresh"' not in html  # ended: nothing to watch


def test_a_running_release_page_reloads_itself_and_shows_its_split_so_far(client, airflow_auth, clock):
    rel = release.open_release("churn", "4", "2", {"name": "default"}, airflow_run_id="manual__live", actor="airflow")
    for state in (State.signing, State.validating, State.shadow, State.canary):
        clock.advance(5)
        release.transition(rel.release_id, state, actor="airflow")
    audit.append(
        "airflow",
        AuditAction.route,
        model="churn",
        version="4",
        release_id=rel.release_id,
        details=_route(Stage.canary(2, 25)),
    )
    cookies = {"_token": token_for(airflow_auth)}
    html = client.get(f"/releases/{rel.release_id}", cookies=cookies).text
    assert '<meta http-equiv="refresh" content="15">' in html and "still running" in html
    assert "25%" in html.split('id="traffic-chart"')[1].split("</div>")[0]
    assert '<meta http-equiv="refresh"' in client.get("/", cookies=cookies).text


def test_audit_chain_status_turns_broken_when_a_row_is_edited(client, airflow_auth, clock):
    promoted_release(clock)
    cookies = {"_token": token_for(airflow_auth)}
    assert 'data-status="intact"' in client.get("/", cookies=cookies).text
    with storage.engine().begin() as conn:
        conn.execute(
            sa.update(storage.audit)
            .where(storage.audit.c.seq == 3)
            .values(details=audit.canonical({"passed": True, "note": "edited later"}))
        )
    html = client.get("/", cookies=cookies).text
    assert 'data-status="broken"' in html and "event 3 was changed after it was written" in html
    assert client.get("/api/releases", cookies=cookies).json()["audit_chain"]["first_bad_seq"] == 3


def test_deleting_the_last_events_turns_the_chain_status_broken_as_truncated(client, airflow_auth, clock, settings):
    from releasegate import signing

    signing.generate_keys(settings.audit_key.parent)
    promoted_release(clock)
    cookies = {"_token": token_for(airflow_auth)}
    html = client.get("/", cookies=cookies).text
    assert 'data-status="intact"' in html and "head not anchored" not in html
    with storage.engine().begin() as conn:
        last = conn.execute(sa.select(sa.func.max(storage.audit.c.seq))).scalar()
        conn.execute(sa.delete(storage.audit).where(storage.audit.c.seq == last))
    html = client.get("/", cookies=cookies).text
    assert 'data-status="broken"' in html and 'data-failure="truncated"' in html
    assert f"event {last} was deleted" in html


def test_a_refused_self_approval_is_shown_on_the_release_page(client, airflow_auth, clock):
    from releasegate import pipeline

    policy = {"name": "gated", "approval": {"required": True, "separate_duties": True}}
    rel = release.open_release("churn", "6", "2", policy, airflow_run_id="manual__sod", actor="airflow:alice")
    for state in (State.signing, State.validating, State.shadow, State.canary, State.awaiting_approval):
        release.transition(rel.release_id, state, actor="airflow:alice")
    pipeline.record_approval(rel.release_id, approved=True, approver="alice", triggered_by="alice")
    pipeline.record_approval(rel.release_id, approved=True, approver="bob", triggered_by="alice", comment="checked")
    html = client.get(f"/releases/{rel.release_id}", cookies={"_token": token_for(airflow_auth)}).text
    assert "refused: alice triggered this release and may not approve it (separation of duties)" in html
    assert "approved by bob: “checked”" in html
    timeline = html.split('id="timeline"')[1]
    assert "approval refused" in timeline and "an approval by alice did not count" in timeline


def test_verdicts_shown_are_the_audited_ones_and_an_edited_release_row_is_flagged(client, airflow_auth, clock):
    rel = rolled_back_release(clock)
    cookies = {"_token": token_for(airflow_auth)}
    assert 'id="verdicts-mismatch"' not in client.get(f"/releases/{rel.release_id}", cookies=cookies).text
    forged = [v.model_dump(mode="json") | {"decision": "promote", "reason": "promote: all good"} for v in rel.verdicts]
    with storage.engine().begin() as conn:  # the releases row is not hash-chained; the audit's copy is
        conn.execute(
            sa.update(storage.releases)
            .where(storage.releases.c.release_id == rel.release_id)
            .values(verdicts=json.dumps(forged))
        )
    html = client.get(f"/releases/{rel.release_id}", cookies=cookies).text
    assert 'id="verdicts-mismatch"' in html and 'data-status="intact"' in html
    assert 'data-decision="rollback"' in html and "promote: all good" not in html


def test_a_release_recorded_before_stages_were_typed_still_renders(client, airflow_auth, clock):
    """The audit log keeps what was written: verdicts naming a canary by its weight, route events naming the change."""
    rel = release.open_release("churn", "5", "2", {"name": "default"}, airflow_run_id="manual__old", actor="airflow")
    rid = rel.release_id
    old = _verdict(
        Stage.canary(1, 25),
        Decision.rollback,
        "rollback: accuracy",
        [_metric("accuracy", "primary", -0.05, -0.08, -0.02, -0.02, 0.02, False)],
        clock.advance(30),
    )
    legacy = old.model_dump(mode="json") | {
        "window": {"start": old.window.start, "end": old.window.end, "stage": "canary-25"}
    }
    audit.append(
        "airflow",
        AuditAction.route,
        model="churn",
        version="5",
        release_id=rid,
        details={"mode": "canary", "candidate_weight": 25, "stage": "canary-1"},
    )
    audit.append("airflow", AuditAction.verdict, model="churn", version="5", release_id=rid, details=legacy)
    audit.append(
        "airflow",
        AuditAction.drift,
        model="churn",
        version="5",
        release_id=rid,
        details={
            "stage": "canary-25",
            "input_drift": {"drifted_columns": [], "drifted_share": 0.0, "rows_current": 10},
        },
    )
    audit.append(
        "airflow",
        AuditAction.route,
        model="churn",
        version="2",
        release_id=rid,
        details={"mode": "single", "candidate_weight": 0, "stage": "rolled back", "champion_version": "2"},
    )
    with storage.engine().begin() as conn:
        conn.execute(
            sa.update(storage.releases)
            .where(storage.releases.c.release_id == rid)
            .values(verdicts=json.dumps([legacy]))
        )
    html = client.get(f"/releases/{rid}", cookies={"_token": token_for(airflow_auth)}).text
    assert "<b>canary 25 %</b>" in html and 'id="verdicts-mismatch"' not in html
    assert f'href="{rid}/reports/canary-25/input_drift.html"' in html
    assert "rolled back: all traffic to v2" in html


def test_anonymous_request_is_refused(client):
    assert client.get("/").status_code == 401
    assert client.get("/api/releases").json() == {"detail": "Not authenticated"}
    assert client.get("/incidents").status_code == client.get("/api/incidents/1").status_code == 401
    page = client.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and "Sign in to Airflow first" in page.text


def test_forged_expired_and_unprivileged_tokens_are_refused(client, airflow_auth, clock):
    from airflow.api_fastapi.auth.tokens import JWTGenerator

    claims = {"sub": "mallory", "role": "admin"}
    audience = type(airflow_auth)._get_jwt_audience()
    forged = JWTGenerator(
        secret_key="not-airflows-secret-" + "fedcba9876543210" * 3, valid_for=3600, audience=audience
    ).generate(claims)
    assert client.get("/", headers={"Authorization": f"Bearer {forged}"}).status_code == 403
    assert client.get("/", cookies={"_token": forged}).status_code == 403
    expired = JWTGenerator(secret_key=JWT_SECRET, valid_for=-120, audience=audience).generate(claims)
    assert client.get("/", cookies={"_token": expired}).status_code == 401
    # A valid token whose user has no role may not read the model_release DAG.
    refused = client.get("/", cookies={"_token": token_for(airflow_auth, "nobody", role=None)})
    assert refused.status_code == 403 and "may not read the model_release DAG" in refused.text


def test_unknown_release_or_report_is_404(client, airflow_auth, clock):
    rel = rolled_back_release(clock)
    cookies = {"_token": token_for(airflow_auth)}
    assert client.get("/releases/rel-doesnotexist", cookies=cookies).status_code == 404
    assert client.get(f"/releases/{rel.release_id}/reports/shadow/input_drift.html", cookies=cookies).status_code == 404
    assert (
        client.get(f"/releases/{rel.release_id}/reports/..%2F..%2Fkeys/input_drift.html", cookies=cookies).status_code
        == 404
    )


def test_report_links_serve_the_evidently_report_stored_in_mlflow(client, airflow_auth, clock, settings, tmp_path):
    """A real MLflow store on SQLite: the version's source run holds the stage's report, as stage_drift stores it."""
    from releasegate import registry

    mlflow_client = registry.client(settings)
    experiment = mlflow_client.create_experiment("dash", artifact_location=settings.mlflow_artifact_root.as_uri())
    run = mlflow_client.create_run(experiment)
    mlflow_client.create_registered_model("churn")
    mlflow_client.create_model_version("churn", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    mlflow_client.create_model_version("churn", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    rel = promoted_release(clock)
    reports = tmp_path / "shadow"
    reports.mkdir()
    (reports / "input_drift.html").write_text("<html><title>Input drift: churn v2</title>evidently</html>")
    registry.log_artifact("churn", "2", reports, artifact_path=f"releasegate/releases/{rel.release_id}/shadow")
    cookies = {"_token": token_for(airflow_auth)}

    report = client.get(f"/releases/{rel.release_id}/reports/shadow/input_drift.html", cookies=cookies)
    assert report.status_code == 200 and "<title>Input drift: churn v2</title>" in report.text
    # Listed by the audit but never stored (MLflow has no such file): a 404 that says so.
    missing = client.get(f"/releases/{rel.release_id}/reports/shadow/prediction_drift.html", cookies=cookies)
    assert missing.status_code == 404 and "has no artifact" in missing.json()["detail"]
    artifacts = client.get(f"/releases/{rel.release_id}/mlflow", cookies=cookies)
    assert f"runs:/{run.info.run_id}/releasegate/releases/{rel.release_id}" in artifacts.text


def test_a_model_release_runs_tab_leads_to_its_release(client, airflow_auth, clock):
    rel = promoted_release(clock)
    cookies = {"_token": token_for(airflow_auth)}
    tab = client.get(f"/runs/model_release/{RUN_ID}", cookies=cookies, follow_redirects=False)
    assert tab.status_code == 307 and tab.headers["location"] == f"../../releases/{rel.release_id}"
    assert client.get(f"/runs/model_release/{RUN_ID}", cookies=cookies).url.path == f"/releases/{rel.release_id}"
    assert client.get(f"/runs/nightly_evaluation/{RUN_ID}", cookies=cookies).status_code == 404
    assert client.get("/runs/model_release/manual__never", cookies=cookies).status_code == 404


HOSTILE = "<script>alert('label')</script>"


@pytest.fixture
def incident_clock(clock, monkeypatch) -> Clock:
    """The same wall clock for incidents and for the dashboard's ages, so an incident's durations are a story's."""
    from releasegate import dashboard, incidents

    monkeypatch.setattr(incidents, "time", clock)
    monkeypatch.setattr(dashboard, "time", clock)
    return clock


def incident_story(clock: Clock) -> dict[str, int]:
    """Four incidents as the library opens them: a rolled-back release's (still open), an emergency rollback's
    (acknowledged, resolved after 90 minutes, closed with its review), and two alerts through the real alert
    receiver, one of them acknowledged and carrying a hostile label."""
    from releasegate import incidents
    from releasegate.incidents import IncidentState, Severity
    from releasegate.serving.alerts import AlertReceiver
    from releasegate.settings import get_settings

    def alert(labels: dict[str, str], summary: str) -> int:
        notification = {
            "version": "4",
            "status": "firing",
            "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": summary}, "fingerprint": "f"}],
        }
        [done] = AlertReceiver(get_settings()).receive(notification, "alertmanager")
        return int(done["incident"])

    rolled_back_release(clock)  # opens incident 1
    [release_incident] = incidents.list_incidents()
    clock.advance(60)
    rollback = incidents.open_incident(
        actor="airflow:amal",
        source=AuditAction.emergency_rollback.value,
        severity=Severity.critical,
        title="churn: emergency rollback from v3 to v2 by amal: error spike",
        model="churn",
    ).id
    clock.advance(600)
    incidents.move(rollback, IncidentState.acknowledged, actor="amal", note="looking", owner="ml-oncall")
    clock.advance(4800)
    incidents.move(rollback, IncidentState.resolved, actor="amal", resolution="bad feature join; fixed upstream")
    clock.advance(60)
    incidents.move(rollback, IncidentState.closed, actor="amal", review_url="https://wiki.example/pir/2")
    clock.advance(30)
    hostile = alert(
        {"alertname": "ReleasegateModelLatencyP99High", "model": "fraud", "severity": "warning", "team": HOSTILE},
        "p99 <img src=x onerror=alert(1)> ms",
    )
    incidents.move(hostile, IncidentState.acknowledged, actor="bo")
    clock.advance(120)
    latency = alert({"alertname": "ReleasegateDriftAlarm", "model": "churn", "severity": "warning"}, "input drift")
    clock.advance(300)  # now: five minutes after the last alert
    return {"release": release_incident.id, "rollback": rollback, "hostile": hostile, "latency": latency}


def _text(html: str) -> str:
    """What a person reads in a piece of the page: its text without the tags."""
    return re.sub(r"<[^>]+>", "", html)


def _incident_rows(html: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr class="incident" data-incident-id="(\d+)" data-state="([^"]+)"', html)


def test_incidents_page_lists_open_ones_first_with_age_owner_and_release_link(client, airflow_auth, incident_clock):
    ids = incident_story(incident_clock)
    cookies = {"_token": token_for(airflow_auth)}
    html = client.get("/incidents", cookies=cookies).text
    # Open (newest first), then acknowledged, then closed: not simply newest first.
    assert _incident_rows(html) == [
        (str(ids["latency"]), "open"),
        (str(ids["release"]), "open"),
        (str(ids["hostile"]), "acknowledged"),
        (str(ids["rollback"]), "closed"),
    ]
    rows = {int(m[0]): m[1] for m in re.findall(r'data-incident-id="(\d+)"(.*?)</tr>', html, re.S)}
    release_id = incidents_release(ids["release"])
    assert f'href="/releases/{release_id}"' in rows[ids["release"]]
    assert "release.rolled_back" in _text(rows[ids["release"]]) and ">high<" in rows[ids["release"]]
    # 5,970 s since the release's incident opened; the emergency rollback's took 90 min from open to resolved.
    assert "open 1 h 39 min" in rows[ids["release"]] and "nobody yet" in rows[ids["release"]]
    assert "resolved in 1 h 30 min" in rows[ids["rollback"]] and "ml-oncall" in rows[ids["rollback"]]
    assert ">critical<" in rows[ids["rollback"]] and "emergency_rollback" in rows[ids["rollback"]]
    assert "open 5 min 0 s" in rows[ids["latency"]]
    assert "<td>bo</td>" in rows[ids["hostile"]] and "alert.ReleasegateModelLatencyP99High" in _text(
        rows[ids["hostile"]]
    )
    # The releases page leads here, and the release link names a release the dashboard has.
    assert '<a href="/incidents">Incidents</a>' in client.get("/", cookies=cookies).text
    assert client.get(f"/api/releases/{release_id}", cookies=cookies).json()["state"] == "rolled_back"


def incidents_release(incident_id: int) -> str:
    from releasegate import incidents

    release_id = incidents.get(incident_id).release_id
    assert release_id is not None
    return release_id


def test_incidents_page_filters_by_state_and_model(client, airflow_auth, incident_clock):
    from releasegate import dashboard

    ids = incident_story(incident_clock)
    cookies = {"_token": token_for(airflow_auth)}
    html = client.get("/incidents?state=open", cookies=cookies).text
    assert [i for i, _ in _incident_rows(html)] == [str(ids["latency"]), str(ids["release"])]
    assert '<a href="/incidents?state=open&amp;model=fraud" data-model="fraud">fraud</a>' in html
    assert 'data-state="closed">closed (1)</a>' in html and 'class="current">open (2)</a>' in html
    html = client.get("/incidents?model=fraud", cookies=cookies).text
    assert _incident_rows(html) == [(str(ids["hostile"]), "acknowledged")]
    assert 'data-state="open">open (0)</a>' in html and 'data-state="acknowledged">acknowledged (1)</a>' in html
    html = client.get("/incidents?state=resolved&model=churn", cookies=cookies).text
    assert _incident_rows(html) == [] and "No incident matches these filters." in html
    refused = client.get("/incidents?state=burning", cookies=cookies, headers={"Accept": "text/html"})
    assert refused.status_code == 400 and "no incident state &#39;burning&#39;" in refused.text
    first_two = dashboard.incidents_page(limit=2)
    assert [i["id"] for i in first_two["incidents"]] == [ids["latency"], ids["release"]] and first_two["total"] == 4
    api = client.get("/api/incidents", params={"state": "closed", "model": "churn"}, cookies=cookies).json()
    assert [i["id"] for i in api["incidents"]] == [ids["rollback"]] and api["models"] == ["churn", "fraud"]


def test_incident_page_shows_its_timeline_resolution_and_review(client, airflow_auth, incident_clock):
    ids = incident_story(incident_clock)
    cookies = {"_token": token_for(airflow_auth)}
    html = client.get(f"/incidents/{ids['rollback']}", cookies=cookies).text
    timeline = re.findall(
        r'<tr class="event" data-event="([^"]+)">.*?<td class="muted actor">([^<]*)</td>\s*<td class="note">([^<]*)</td>',
        html,
        re.S,
    )
    assert timeline == [
        ("opened", "airflow:amal", "churn: emergency rollback from v3 to v2 by amal: error spike"),
        ("acknowledged", "amal", "looking"),
        ("resolved", "amal", ""),
        ("closed", "amal", ""),
    ]
    assert "owner: ml-oncall" in html and "1 h 31 min" in html  # the close, 91 minutes after the opening
    assert '<dd id="resolution">bad feature join; fixed upstream</dd>' in html
    assert 'href="https://wiki.example/pir/2"' in html and "resolved in 1 h 30 min" in html
    assert 'id="alert"' not in html  # no alert opened this one
    release_id = incidents_release(ids["release"])
    assert (
        f'<a class="mono release" href="/releases/{release_id}">'
        in client.get(f"/incidents/{ids['release']}", cookies=cookies).text
    )
    missing = client.get("/incidents/999", cookies=cookies, headers={"Accept": "text/html"})
    assert missing.status_code == 404 and "incident 999 does not exist" in missing.text


def test_an_alerts_hostile_label_and_summary_are_shown_as_text(client, airflow_auth, incident_clock):
    from releasegate import incidents

    ids = incident_story(incident_clock)
    incidents.move(ids["hostile"], incidents.IncidentState.resolved, actor="bo", resolution="<b>fixed</b>")
    incidents.move(ids["hostile"], incidents.IncidentState.closed, actor="bo", review_url="javascript:alert(1)")
    cookies = {"_token": token_for(airflow_auth)}
    for html in (
        client.get("/incidents", cookies=cookies).text,
        client.get(f"/incidents/{ids['hostile']}", cookies=cookies).text,
    ):
        assert "<script>" not in html and "<img" not in html and "<b>fixed" not in html
    html = client.get(f"/incidents/{ids['hostile']}", cookies=cookies).text
    label = html.split('data-label="team">')[1].split("</tr>")[0]
    assert "&lt;script&gt;alert(&#39;label&#39;)&lt;/script&gt;" in label
    assert "p99 &lt;img src=x onerror=alert(1)&gt; ms" in html
    assert 'data-label="severity"><td class="mono">severity</td><td>warning</td>' in html
    # A review "link" that is not http(s) is shown, never made a link.
    assert '<dd id="review">javascript:alert(1)</dd>' in html and 'href="javascript:' not in html


# --- experiments ---------------------------------------------------------------------------------------------

EXPERIMENT_RUN = "manual__experiment"
QUICK_DESIGN = {
    "name": "quick",
    "sample_size": 3000,
    "min_requests_per_arm": 100,
    "metrics": [
        {"name": "conversion", "source": "conversion", "goal": "increase", "mde": 0.02, "role": "decide",
         "test": "superiority"},
        {"name": "error_rate", "source": "error", "goal": "decrease", "mde": 0.02, "role": "guard",
         "test": "non_inferiority"},
        {"name": "cpu_ms_per_row", "source": "cpu_ms", "goal": "decrease", "mde": 1.0, "role": "guard",
         "test": "non_inferiority"},
    ],
}  # fmt: skip


def open_experiment_row(clock: Clock) -> release.Release:
    """A 3-arm experiment on churn (control v1, arms v2 and v3 at 33 % each) whose traffic has started, as
    experiments.open_experiment and start write it (the gateway's route and the registry are not involved)."""
    from releasegate import experiments
    from releasegate.backends import ArmWeight

    record = experiments.Record(
        name="quick",
        design=experiments.Design.model_validate(QUICK_DESIGN),
        arms=[ArmWeight(version="2", weight=33), ArmWeight(version="3", weight=33)],
    )
    rel = release.open_release(
        "churn", "2,3", "1", record.model_dump(mode="json"), airflow_run_id=EXPERIMENT_RUN, actor="airflow"
    )
    clock.advance(5)
    release.transition(rel.release_id, State.signing, actor="airflow")
    clock.advance(5)
    _save_record(rel.release_id, record.model_copy(update={"started_at": clock.now}))
    return release.transition(rel.release_id, State.experimenting, actor="airflow")


def _save_record(experiment_id: str, record) -> None:
    with storage.engine().begin() as conn:
        conn.execute(
            sa.update(storage.releases)
            .where(storage.releases.c.release_id == experiment_id)
            .values(policy=json.dumps(record.model_dump(mode="json")))
        )


def log_experiment_traffic(experiment_id: str, start: float, per_arm: int = 600, prefix: str = "r") -> None:
    """Requests as the gateway logs them in an experiment: v1 (control) converts 10 %, v2 a third, v3 10 % but
    half its calls fail (the control answers those: a fallback, still v3's request). Conversions are feedback
    with a business value."""
    predictions, feedback = [], []
    for i in range(per_arm):
        for version, converts, fails in (
            ("1", i % 10 == 0, False),
            ("2", i % 3 == 0, False),
            ("3", i % 10 == 0, i % 2 == 0),
        ):
            request_id = f"{prefix}-{version}-{i}"
            at = start + i * 0.01
            base = {
                "request_id": request_id,
                "time": at,
                "model": "churn",
                "mode": Mode.experiment.value,
                "release_id": experiment_id,
                "routing_key_hash": f"{i:016x}",
                "sample_bucket": i % 1000,
                "latency_ms": 10.0,
                "cpu_ms": 2.0 + (i % 5) * 0.1,
            }
            arm = "champion" if version == "1" else "candidate"
            status = "error" if fails else "ok"
            predictions.append(
                base | {"version": version, "arm": arm, "served": not fails, "fallback": False, "status": status}
            )
            if fails:
                predictions.append(
                    base | {"version": "1", "arm": "champion", "served": True, "fallback": True, "status": "ok"}
                )
            if converts and not fails:
                feedback.append({"request_id": request_id, "time": at + 1, "ground_truth": "1", "business_value": 50.0})
    with storage.engine().begin() as conn:
        conn.execute(storage.predictions.insert(), predictions)
        conn.execute(storage.feedback.insert(), feedback)


def _arm_rows(html: str) -> dict[str, tuple[str, str]]:
    """The arms table: version -> (status, requests)."""
    rows = re.findall(
        r'<tr class="arm[^"]*" data-version="([^"]+)" data-status="([^"]+)">.*?<td class="num exposures">([^<]+)</td>',
        html,
        re.S,
    )
    return {version: (status, requests) for version, status, requests in rows}


def _bounds(html: str, metric: str) -> dict[str, list[str]]:
    """One metric's table: arm -> [control, arm, difference, lower, upper] as shown."""
    card = html.split(f'class="card metric" data-name="{metric}"')[1].split("</table>")[0]
    rows = re.findall(r'<tr class="bound" data-arm="([^"]+)">(.*?)</tr>', card, re.S)
    return {
        arm: [_text(c).strip() for c in re.findall(r'<td class="num mono[^"]*">(.*?)</td>', row, re.S)]
        for arm, row in rows
    }


def _shown(bound) -> list[str]:
    return [
        f"{bound.control:.4g}",
        f"{bound.arm:.4g}",
        *(f"{x:+.4g}" for x in (bound.difference, bound.lower, bound.upper)),
    ]


def test_a_running_experiment_page_shows_each_arms_status_exposures_and_live_intervals(client, airflow_auth, clock):
    from releasegate import experiments

    rel = open_experiment_row(clock)
    log_experiment_traffic(rel.release_id, clock.now)
    html = client.get(f"/experiments/{rel.release_id}", cookies={"_token": token_for(airflow_auth)}).text
    # v2 converts a third of its requests against the control's 10 %: it wins; half of v3's calls fail: a guard
    # stops it. Each arm got its 600 requests (v3's failed calls, answered by the control, are still v3's).
    assert _arm_rows(html) == {"1": ("control", "600"), "2": ("winner", "600"), "3": ("stopped", "600")}
    assert 'data-evidence="live"' in html and '<meta http-equiv="refresh" content="15">' in html
    # The page shows what experiments.assess computes now, which changes nothing.
    expected = experiments.assess(rel, experiments.Record.of(rel), time.time())
    assert release.get(rel.release_id).state is State.experimenting and not audit.events(
        release_id=rel.release_id, action=AuditAction.experiment_arm_stopped
    )
    for name in ("conversion", "error_rate", "cpu_ms_per_row"):
        shown = _bounds(html, name)
        assert shown == {a.arm: _shown(next(b for b in a.metrics if b.name == name)) for a in expected.arms}
    assert _bounds(html, "conversion")["2"][:3] == ["0.1", "0.3333", "+0.2333"]
    assert _bounds(html, "error_rate")["3"][:3] == ["0", "0.5", "+0.5"]
    assert "clearly worse on error_rate" in html
    # The chart: per metric, each arm's interval, labelled with its status.
    chart = html.split('id="experiment-chart"')[1].split("</div>")[0]
    assert "<svg" in chart and "conversion [decide, higher is better]" in chart
    assert "v2 (winner)" in chart and "v3 (stopped)" in chart and "error_rate [guard, lower is better]" in chart
    assert 'href="/dags/model_experiment/runs/manual__experiment"' in html
    assert "its report goes to MLflow when it concludes" in html
    # The JSON twin carries the same evidence.
    api = client.get(f"/api/experiments/{rel.release_id}", cookies={"_token": token_for(airflow_auth)}).json()
    assert {a["version"]: (a["status"], a["exposures"]) for a in api["arm_results"]} == {
        "2": ("winner", 600),
        "3": ("stopped", 600),
    }
    assert api["control"] == {"version": "1", "weight": 34, "exposures": 600} and api["winner"] == "2"


def conclude_experiment_row(rel: release.Release, clock: Clock):
    """The look that stops v3 and the conclusion that names v2, audited as experiments.look and conclude write
    them; returns the two results audited (v3's at its stop, the final one)."""
    from releasegate import experiments
    from releasegate.analysis.experiment import ArmStatus

    record = experiments.Record.of(rel)
    first = experiments.assess(rel, record, time.time())
    [bad] = [a for a in first.arms if a.status is ArmStatus.stopped]
    arms = [a.model_copy(update={"stopped": a.version == bad.arm}) for a in record.arms]
    _save_record(rel.release_id, record.model_copy(update={"arms": arms, "shares_since": clock.advance(10)}))
    audit.append(
        "airflow",
        AuditAction.experiment_arm_stopped,
        model="churn",
        version=bad.arm,
        release_id=rel.release_id,
        details=bad.model_dump(mode="json"),
    )
    rel = release.get(rel.release_id)
    final = experiments.assess(rel, experiments.Record.of(rel), time.time())
    clock.advance(10)
    audit.append(
        "airflow",
        AuditAction.experiment_decided,
        model="churn",
        version=final.winner,
        release_id=rel.release_id,
        details={"winner": final.winner, "invalid": False, "result": final.model_dump(mode="json")},
    )
    release.transition(rel.release_id, State.concluded, actor="airflow", reason=final.reason, decision=Outcome.conclude)
    return bad, final


def test_an_ended_experiment_page_shows_the_audited_result_and_the_stopped_arms_last_bounds(
    client, airflow_auth, clock
):
    rel = open_experiment_row(clock)
    log_experiment_traffic(rel.release_id, clock.now)
    bad, final = conclude_experiment_row(rel, clock)
    assert final.winner == "2" and [a.arm for a in final.arms] == ["2"]
    # Rows logged after the decision (a late flush of the gateway's log; none converts) would change what a
    # recomputation shows, not the audited result.
    log_experiment_traffic(rel.release_id, clock.now + 100, per_arm=300, prefix="late")
    with storage.engine().begin() as conn:
        conn.execute(sa.delete(storage.feedback).where(storage.feedback.c.request_id.like("late-%")))
    cookies = {"_token": token_for(airflow_auth)}
    html = client.get(f"/experiments/{rel.release_id}", cookies=cookies).text
    assert 'data-evidence="audited"' in html and 'http-equiv="refresh"' not in html
    assert _arm_rows(html) == {"1": ("control", "900"), "2": ("winner", "900"), "3": ("stopped", "900")}
    conversion = _bounds(html, "conversion")
    assert conversion["2"] == _shown(next(b for b in final.arms[0].metrics if b.name == "conversion"))
    assert conversion["2"][:3] == ["0.1", "0.3333", "+0.2333"]
    assert _bounds(html, "error_rate")["3"] == _shown(next(b for b in bad.metrics if b.name == "error_rate"))
    assert "<s>33%</s>" in html  # v3's share went back to the control
    assert re.search(r'id="verdict"><span class="pill good">winner v2</span> 2 wins on conversion', html)
    assert f'href="{rel.release_id}/mlflow"' in html
    timeline = html.split('id="timeline"')[1]
    assert "arm v3 stopped" in timeline and "winner v2" in timeline and "→ concluded" in timeline
    chart = html.split('id="experiment-chart"')[1].split("</div>")[0]
    assert "v3 (stopped)" in chart and "v2 (winner)" in chart


def test_the_releases_list_shows_an_experiment_row_beside_releases(client, airflow_auth, clock):
    good = promoted_release(clock)
    clock.advance(600)
    exp = open_experiment_row(clock)
    cookies = {"_token": token_for(airflow_auth)}
    page = client.get("/", cookies=cookies)
    assert page.status_code == 200, page.text
    rows = re.findall(r'<tr class="(release|experiment)" data-release-id="([^"]+)" data-state="([^"]+)"', page.text)
    assert rows == [("experiment", exp.release_id, "experimenting"), ("release", good.release_id, "promoted")]
    row = page.text.split(f'data-release-id="{exp.release_id}"')[1].split("</tr>")[0]
    assert f'href="experiments/{exp.release_id}"' in row and "arms v2, v3" in row
    assert 'href="/dags/model_experiment/runs/manual__experiment"' in row
    assert client.get("/api/releases", cookies=cookies).json()["releases"][0]["arms"] == ["2", "3"]
    # The release page's address of an experiment leads to its experiment page, as does its Airflow run's tab.
    moved = client.get(f"/releases/{exp.release_id}", cookies=cookies, follow_redirects=False)
    assert moved.status_code == 307 and moved.headers["location"] == f"../experiments/{exp.release_id}"
    tab = client.get(f"/runs/model_experiment/{EXPERIMENT_RUN}", cookies=cookies, follow_redirects=False)
    assert tab.status_code == 307 and tab.headers["location"] == f"../../experiments/{exp.release_id}"
    # No request logged yet: the arms are running, with no interval to draw.
    html = client.get(f"/experiments/{exp.release_id}", cookies=cookies).text
    assert _arm_rows(html) == {"1": ("control", "0"), "2": ("running", "0"), "3": ("running", "0")}
    assert "no interval yet" in html and "collecting: 100 requests per arm" in html


def test_a_missing_experiment_or_a_release_is_no_experiment_page(client, airflow_auth, clock):
    rel = rolled_back_release(clock)
    cookies = {"_token": token_for(airflow_auth)}
    missing = client.get("/experiments/rel-doesnotexist", cookies=cookies, headers={"Accept": "text/html"})
    assert missing.status_code == 404 and "release rel-doesnotexist does not exist" in missing.text
    assert client.get("/api/experiments/rel-doesnotexist", cookies=cookies).status_code == 404
    not_one = client.get(f"/api/experiments/{rel.release_id}", cookies=cookies)
    assert not_one.status_code == 404 and "is a release, not an experiment" in not_one.json()["detail"]


def test_an_experiments_mlflow_link_names_its_report_on_the_controls_run(client, airflow_auth, clock, settings):
    """A real MLflow store on SQLite, one run per version: the report is on the control's (v1's) run."""
    from releasegate import registry

    mlflow_client = registry.client(settings)
    experiment = mlflow_client.create_experiment("dash", artifact_location=settings.mlflow_artifact_root.as_uri())
    mlflow_client.create_registered_model("churn")
    runs = []
    for _ in range(3):
        run = mlflow_client.create_run(experiment)
        mlflow_client.create_model_version("churn", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        runs.append(run.info.run_id)
    rel = open_experiment_row(clock)
    log_experiment_traffic(rel.release_id, clock.now, per_arm=200)
    conclude_experiment_row(rel, clock)
    page = client.get(f"/experiments/{rel.release_id}/mlflow", cookies={"_token": token_for(airflow_auth)})
    assert f"runs:/{runs[0]}/releasegate/experiments/{rel.release_id}" in page.text
