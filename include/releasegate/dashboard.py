"""The release dashboard's read model: releases, their timelines, traffic, verdicts and reports, experiments, and
incidents, as plain dicts.

The Airflow plugin (plugins/releasegate_airflow/dashboard) only renders what these return;
every query lives here, beside the tables it reads.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError

from releasegate import audit, experiments, incidents, release, storage
from releasegate.analysis.experiment import ArmResult, ArmStatus, ExperimentResult
from releasegate.contract import Arm, AuditAction, Mode, RouteChange, Stage
from releasegate.incidents import IncidentState
from releasegate.release import State
from releasegate.verdict import Decision, Verdict

DAG_ID = "model_release"
EXPERIMENT_DAG_ID = "model_experiment"  # its runs open the experiments (releasegate.experiments)
# Reports a stage may have (drift.input_drift / drift.prediction_drift file names), and their titles.
REPORTS = {"input_drift": "Input drift", "prediction_drift": "Prediction drift"}
# Report folders: a stage's slug, or a canary's weight in the events written before stages were typed.
_STAGE_FOLDER = re.compile(r"^(shadow|canary-\d{1,2}-\d{1,2}pct|canary-\d{1,3})$")
_GOOD = {
    State.promoted: True,
    State.rolled_back: False,
    State.rejected: False,
    State.invalid: False,
    State.failed: False,
    State.aborted: False,
    State.concluded: True,
}


# The incidents page lists what needs a person first: the lifecycle's order, then the newest first.
_INCIDENT_ORDER = {state: rank for rank, state in enumerate(IncidentState)}


class NotFound(LookupError):
    """A release, an experiment, a report of either, or an incident that does not exist."""


def releases(limit: int = 200, engine: sa.Engine | None = None) -> list[dict[str, Any]]:
    """The newest releases first: who, what, where it stands and why."""
    return [_summary(rel) for rel in release.list_releases(engine=engine or storage.engine(), limit=limit)]


def _stage(value: Any) -> Stage | None:
    """A stage as an event stored it (a Stage's JSON, or a legacy name), None for anything else."""
    try:
        return Stage.model_validate(value)
    except (ValidationError, ValueError):
        return None


def _summary(rel: release.Release) -> dict[str, Any]:
    end = rel.ended_at if rel.ended_at is not None else time.time()
    experiment = experiments.is_experiment(rel)
    return {
        "release_id": rel.release_id,
        # An experiment's row holds its arms' versions as the candidate, and its design as the policy.
        "experiment": experiment,
        "dag_id": EXPERIMENT_DAG_ID if experiment else DAG_ID,
        "model": rel.model,
        "candidate": rel.candidate_version,
        "arms": rel.candidate_version.split(",") if experiment else [],
        "champion": rel.champion_version,
        "state": rel.state.value,
        "terminal": rel.terminal,
        "decision": rel.decision,
        "reason": rel.reasons[-1] if rel.reasons else None,
        "reasons": rel.reasons,
        "policy": rel.policy.get("name"),
        "airflow_run_id": rel.airflow_run_id,
        "started_at": rel.started_at,
        "ended_at": rel.ended_at,
        "duration_seconds": round(end - rel.started_at, 1),
        "stages": [str(v.window.stage) for v in rel.verdicts],
    }


def release_of_run(airflow_run_id: str, engine: sa.Engine | None = None) -> str | None:
    """The id of the release a `model_release` run opened, if it opened one."""
    query = (
        sa.select(storage.releases.c.release_id)
        .where(storage.releases.c.airflow_run_id == airflow_run_id)
        .order_by(storage.releases.c.started_at.desc())
        .limit(1)
    )
    with (engine or storage.engine()).connect() as conn:
        return conn.execute(query).scalar()


def release_page(release_id: str, engine: sa.Engine | None = None) -> dict[str, Any]:
    """Everything the release's page shows: summary, timeline, traffic split, verdicts, reports, approvals."""
    eng = engine or storage.engine()
    try:
        rel = release.get(release_id, eng)
    except release.ReleaseError as err:
        raise NotFound(str(err)) from err
    events = audit.events(release_id=release_id, engine=eng)
    # The evidence shown is the audit's copy: the hash chain covers it, the releases row it mirrors is not.
    verdicts = [Verdict.model_validate(e["details"]) for e in events if e["action"] == AuditAction.verdict]
    return {
        **_summary(rel),
        "policy_digest": verdicts[-1].policy.digest if verdicts else None,
        "timeline": [_timeline_entry(e, rel.started_at) for e in events],
        "traffic": traffic(events, rel),
        "verdicts": [_verdict(v) for v in verdicts],
        "verdicts_match_audit": verdicts == rel.verdicts,
        "reports": reports(events),
        "approvals": [
            e["details"] | {"time": e["time"], "actor": e["actor"]}
            for e in events
            if e["action"] == AuditAction.approval
        ],
    }


def experiment_page(experiment_id: str, engine: sa.Engine | None = None) -> dict[str, Any]:
    """Everything an experiment's page shows: its arms with their status and exposures, and per metric each arm's
    estimate against the control with its always-valid interval (docs/decisions.md, "Experiments (A/B/n)").

    The evidence is the audited result once the experiment decided; before that it is computed now from the logged
    requests by `experiments.assess`, which changes nothing. A stopped arm's evidence is the one it was stopped on.
    """
    eng = engine or storage.engine()
    try:
        rel = release.get(experiment_id, eng)
        record = experiments.Record.of(rel)
    except (release.ReleaseError, experiments.DesignError) as err:
        raise NotFound(str(err)) from err
    events = audit.events(release_id=experiment_id, engine=eng)
    result, evidence = _experiment_result(rel, record, events)
    stopped = {
        e["version"]: ArmResult.model_validate(e["details"])
        for e in events
        if e["action"] == AuditAction.experiment_arm_stopped
    }
    judged = {a.arm: a for a in result.arms} if result else {}
    exposures = _exposures(rel, eng)
    arms: list[dict[str, Any]] = []
    for arm in record.arms:
        found = (stopped.get(arm.version) if arm.stopped else None) or judged.get(arm.version)
        status = ArmStatus.stopped if arm.stopped else found.status if found else ArmStatus.running
        arms.append(
            {
                "version": arm.version,
                "weight": arm.weight,
                "stopped": arm.stopped,
                "status": status.value,
                "reason": found.reason if found else None,
                "judged_requests": found.requests if found else None,
                "exposures": exposures.get(arm.version, 0),
                "bounds": {b.name: b.model_dump(mode="json") for b in found.metrics} if found else {},
            }
        )
    control = rel.champion_version
    metrics = [
        {
            **spec.model_dump(mode="json"),
            "arms": [
                # "arm" (the arm's estimate) and "control" are the bound's; the arm is named by its version.
                {"version": a["version"], "status": a["status"], **(a["bounds"].get(spec.name) or _NO_BOUND)}
                for a in arms
            ],
        }
        for spec in record.design.metrics
    ]
    return {
        **_summary(rel),
        "control": {
            "version": control,
            "weight": 100 - sum(a.weight for a in record.arms if not a.stopped),
            "exposures": exposures.get(control or "", 0),
        },
        "design": record.design.model_dump(mode="json", exclude={"metrics"}),
        "traffic_started_at": record.started_at,
        "arm_results": [{k: v for k, v in a.items() if k != "bounds"} for a in arms],
        "metrics": metrics,
        "evidence": evidence,
        "winner": result.winner if result else None,
        "decided": result.decided if result else False,
        "verdict": result.reason if result else None,
        "alpha_each": result.alpha_each if result else None,
        "srm": result.srm.model_dump(mode="json") if result else None,
        "report_stored": evidence == "audited",  # experiments.conclude stores the report after auditing it
        "timeline": [_timeline_entry(e, rel.started_at) for e in events],
    }


# An arm with no evidence yet (its traffic has not started), shaped as analysis.experiment.MetricBound's fields.
_NO_BOUND = {k: None for k in ("control", "arm", "difference", "lower", "upper")} | {"cleared": False, "crossed": False}


def _experiment_result(
    rel: release.Release, record: experiments.Record, events: list[dict[str, Any]]
) -> tuple[ExperimentResult | None, str]:
    """The experiment's result and where it comes from: `audited` (its decision), `at_end` (it ended undecided,
    e.g. failed: the evidence up to then), `live` (running: the evidence now), or `none` (no traffic yet)."""
    decided = [e for e in events if e["action"] == AuditAction.experiment_decided]
    if decided:
        return ExperimentResult.model_validate(decided[-1]["details"]["result"]), "audited"
    if record.started_at is None or rel.champion_version is None:
        return None, "none"
    if rel.terminal:
        return experiments.assess(rel, record, rel.ended_at or rel.updated_at), "at_end"
    return _live(rel, record), "live"


# A running experiment's evidence, per experiment id: (when assessed, the result). A view re-reads every logged
# request of the experiment, seconds at 30,000 of them, and the page reloads itself: one assessment serves every
# view for one of the experiment's poll intervals (the DAG looks no more often).
_LIVE: dict[str, tuple[float, ExperimentResult]] = {}
_LIVE_LOCK = threading.Lock()


def _live(rel: release.Release, record: experiments.Record) -> ExperimentResult:
    now = time.time()
    with _LIVE_LOCK:
        cached = _LIVE.get(rel.release_id)
    if cached is not None and now - cached[0] < max(record.design.poll_seconds, 5.0):
        return cached[1]
    result = experiments.assess(rel, record, now)
    with _LIVE_LOCK:
        for stale in [k for k, (at, _) in _LIVE.items() if now - at > 3600]:
            del _LIVE[stale]
        _LIVE[rel.release_id] = (now, result)
    return result


def _exposures(rel: release.Release, engine: sa.Engine) -> dict[str, int]:
    """Requests per version as the gateway logged them: an arm's are those it was called for (a failed call that
    the control answered included, as the analysis counts it); the control's, the rest."""
    p = storage.predictions
    where = sa.and_(p.c.release_id == rel.release_id, p.c.model == rel.model, p.c.mode == Mode.experiment.value)
    requests = sa.func.count(sa.distinct(p.c.request_id))
    per_arm = sa.select(p.c.version, requests).where(where, p.c.arm != Arm.champion.value).group_by(p.c.version)
    with engine.connect() as conn:
        counts: dict[str, int] = dict(conn.execute(per_arm).tuples().all())
        total = int(conn.execute(sa.select(requests).where(where)).scalar() or 0)
    if rel.champion_version is not None:
        counts[rel.champion_version] = total - sum(counts.values())
    return counts


def _timeline_entry(event: dict[str, Any], started_at: float) -> dict[str, Any]:
    action, d = event["action"], event["details"]
    outcome = None  # True: good news, False: bad news, None: neither
    if action == AuditAction.release_opened:
        title, kind, text = "opened", "state", f"champion v{d.get('champion')}, policy {d.get('policy')}"
    elif action.startswith("release."):
        state = State(d.get("to") or action.removeprefix("release."))
        title, kind, text = f"→ {state.value}", "state", d.get("reason") or ""
        outcome = _GOOD.get(state)
    elif action == AuditAction.route:
        title, kind = "traffic", "route"
        text = _route_text(d, event.get("version"))
    elif action == AuditAction.experiment_arm_stopped:
        title, kind, outcome = f"arm v{event.get('version')} stopped", "experiment", False
        text = d.get("reason") or ""
    elif action == AuditAction.experiment_decided:
        winner = d.get("winner")
        title, kind = (f"winner v{winner}" if winner else "no winner"), "experiment"
        outcome = False if d.get("invalid") else (True if winner else None)
        text = (d.get("result") or {}).get("reason") or ""
    elif action == AuditAction.verdict:
        verdict = Verdict.model_validate(d)
        title, kind = f"verdict {verdict.window.stage}: {verdict.decision.value}", "verdict"
        text = verdict.reason
        outcome = {Decision.promote: True, Decision.rollback: False, Decision.invalid: False}.get(verdict.decision)
    elif action == AuditAction.drift:
        title, kind = f"drift reports {_stage(d.get('stage')) or ''}", "drift"
        text = _drift_text(d)
    elif action == AuditAction.validation:
        title, kind = "validation", "validation"
        outcome = d.get("passed")
        evaluation = d.get("evaluation") or {}
        text = "passed" if outcome else "failed: " + "; ".join(d.get("reasons") or [])
        if evaluation.get("metric"):
            text += (
                f" (offline {evaluation['metric']}: candidate {evaluation.get('candidate', 0):.3f} vs "
                f"champion {evaluation.get('champion', 0):.3f} on {evaluation.get('rows', 0):,} rows)"
            )
    elif action == AuditAction.signed:
        title, kind, text = "signed", "signed", d.get("digest", "")
    elif action == AuditAction.approval and d.get("refused"):
        title, kind, outcome = "approval refused", "approval", False
        text = f"an approval by {d.get('approver')} did not count: {d['refused']}"
    elif action == AuditAction.approval:
        title, kind = "approval", "approval"
        outcome = bool(d.get("approved"))
        text = f"{'approved' if d.get('approved') else 'rejected'} by {d.get('approver')}" + (
            f": {d['comment']}" if d.get("comment") else ""
        )
    else:
        title, kind, text = action, "other", ""
    return {
        "seq": event["seq"],
        "time": event["time"],
        "offset_seconds": round(event["time"] - started_at, 1),
        "actor": event["actor"],
        "action": action,
        "kind": kind,
        "title": title,
        "text": text,
        "outcome": outcome,
    }


def _route_text(d: dict[str, Any], version: str | None = None) -> str:
    stage = _stage(d.get("stage"))
    if d.get("mode") == Mode.shadow:
        return "shadow: the candidate answers a mirror of every request; the champion serves them all"
    if d.get("mode") == Mode.canary:
        return f"{stage or 'canary'}: {d.get('candidate_weight')}% of requests served by the candidate"
    if d.get("mode") == Mode.experiment:
        arms = [a for a in d.get("arms") or [] if not a.get("stopped")]
        control = 100 - sum(int(a.get("weight") or 0) for a in arms)
        split = ", ".join(f"v{a.get('version')} {a.get('weight')}%" for a in arms)
        stopped = [f"v{a.get('version')}" for a in d.get("arms") or [] if a.get("stopped")]
        return f"experiment: control v{version} {control}%, {split or 'no arm'}" + (
            f" ({', '.join(stopped)} stopped: back to the control)" if stopped else ""
        )
    return f"{_change(d)}: all traffic to v{d.get('champion_version') or version}"


_CHANGES = {
    RouteChange.serve: "served",
    RouteChange.promotion: "promoted",
    RouteChange.rollback: "rolled back",
    RouteChange.emergency_rollback: "emergency rollback",
    RouteChange.experiment_ended: "experiment ended",
}


def _change(d: dict[str, Any]) -> str:
    """What a route event to one version did, in words."""
    change = d.get("change")
    if change in _CHANGES:
        return _CHANGES[RouteChange(change)]
    # Events written before route changes were typed said it in `stage` ("promoted", "rolled back").
    return str(d.get("stage") or "single")


def _drift_text(d: dict[str, Any]) -> str:
    if d.get("error"):
        return f"no report: {d['error']}"
    parts = []
    if (inputs := d.get("input_drift")) is not None:
        cols = ", ".join(inputs.get("drifted_columns") or []) or "none"
        parts.append(
            f"input drift on {inputs.get('rows_current', 0):,} rows: "
            f"{inputs.get('drifted_share', 0):.0%} of columns drifted ({cols})"
        )
    if (preds := d.get("prediction_drift")) is not None:
        parts.append(
            f"prediction drift between the arms on {preds.get('rows', 0):,} rows: "
            f"{'drifted' if preds.get('drifted') else 'none'}"
        )
    return "; ".join(parts) or "no traffic in the window"


def traffic(events: list[dict[str, Any]], rel: release.Release) -> list[dict[str, Any]]:
    """The split over time from the audit's route events: candidate's served share and whether it is mirrored."""
    points = []
    for e in events:
        if e["action"] != AuditAction.route:
            continue
        d = e["details"]
        mode = Mode(d["mode"])
        if mode is Mode.single:  # promoted: the candidate is now the champion and serves everything
            served = 100 if d.get("champion_version") == rel.candidate_version else 0
        else:
            served = int(d.get("candidate_weight") or 0)
        stage = _stage(d.get("stage"))
        points.append(
            {
                "time": e["time"],
                "offset_seconds": round(e["time"] - rel.started_at, 1),
                "mode": mode.value,
                "stage": str(stage) if stage else _change(d),
                "candidate_served_percent": served,
                "mirrored": mode is Mode.shadow,
            }
        )
    return points


def _verdict(v: Verdict) -> dict[str, Any]:
    window = v.window
    return {
        "stage": str(window.stage),
        "slug": window.stage.slug,
        "decision": v.decision.value,
        "reason": v.reason,
        "window": window.model_dump(mode="json"),
        "duration_seconds": round(window.end - window.start, 1),
        "samples": {arm.value: s.model_dump() for arm, s in v.samples.items()},
        "metrics": [m.model_dump(mode="json") for m in v.metrics],
        "srm": v.srm.model_dump(mode="json") if v.srm else None,
        "slices": [s.model_dump(mode="json") for s in v.slices],
        "extensions": v.extensions,
    }


def reports(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Evidently reports each stage stored in MLflow (from the audit's drift events)."""
    found = []
    for e in events:
        if e["action"] != AuditAction.drift:
            continue
        d = e["details"]
        stage = _stage(d.get("stage"))
        if stage is None:
            continue
        # Events written before stages were typed kept their reports under the canary's weight ("canary-25").
        folder = d.get("reports") or f"releasegate/releases/{e['release_id']}/" + (
            d["stage"] if isinstance(d.get("stage"), str) else stage.slug
        )
        for name, title in REPORTS.items():
            if d.get(name) is not None:
                found.append(
                    {
                        "stage": folder.rsplit("/", 1)[-1],
                        "name": name,
                        "title": f"{title}, {stage}",
                        "artifact_path": f"{folder}/{name}.html",
                    }
                )
    return found


def report_html(release_id: str, stage: str, name: str, engine: sa.Engine | None = None) -> str:
    """One stored Evidently report of the release, fetched from MLflow: the HTML page."""
    from releasegate import registry

    if name not in REPORTS or not _STAGE_FOLDER.match(stage):
        raise NotFound(f"no report {name!r} for stage {stage!r}")
    page = release_page(release_id, engine)
    wanted = next((r for r in page["reports"] if r["stage"] == stage and r["name"] == name), None)
    if wanted is None:
        raise NotFound(f"release {release_id} stored no {name} report for {stage}")
    with tempfile.TemporaryDirectory(prefix="rg-report-") as tmp:
        try:
            path = registry.download_artifact(page["model"], page["candidate"], wanted["artifact_path"], dst=tmp)
        except registry.RegistryError as err:
            raise NotFound(str(err)) from err
        return path.read_text(encoding="utf-8")


def report_location(release_id: str, engine: sa.Engine | None = None) -> dict[str, Any]:
    """Where the release's artifacts are in MLflow: the runs:/ URI, and a link into MLflow's UI when it has one."""
    from releasegate import registry
    from releasegate.settings import get_settings

    try:
        rel = release.get(release_id, engine or storage.engine())
    except release.ReleaseError as err:
        raise NotFound(str(err)) from err
    uri = get_settings().mlflow_tracking_uri
    # A release's artifacts are on its candidate's run; an experiment's report on its control's (the champion).
    if experiments.is_experiment(rel) and rel.champion_version is not None:
        version, folder = rel.champion_version, f"releasegate/experiments/{rel.release_id}"
    else:
        version, folder = rel.candidate_version, f"releasegate/releases/{rel.release_id}"
    try:
        run_id = registry.source_run(rel.model, version)
    except registry.RegistryError as err:
        raise NotFound(str(err)) from err
    location = {"uri": f"runs:/{run_id}/{folder}", "ui": None}
    if uri.startswith(("http://", "https://")):
        experiment = registry.client().get_run(run_id).info.experiment_id
        location["ui"] = f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}/artifacts/{folder}"
    return location


def chain_status(engine: sa.Engine | None = None) -> dict[str, Any]:
    """The audit chain recomputed now and checked against its anchored signed head: intact, or how it broke."""
    report = audit.verify(engine or storage.engine())
    return {
        "ok": report.ok,
        "status": "intact" if report.ok else "broken",
        "failure": report.failure.value if report.failure else None,
        "events": report.events,
        "first_bad_seq": report.first_bad_seq,
        "anchored": report.anchored_seq is not None or report.events == 0,
        "anchored_seq": report.anchored_seq,
        "message": report.message,
        "head": report.head,
    }


def incidents_page(
    state: IncidentState | None = None,
    model: str | None = None,
    limit: int = 500,
    engine: sa.Engine | None = None,
) -> dict[str, Any]:
    """The incidents page: the first `limit` incidents (open first, then acknowledged, resolved, closed; newest
    first within each), and what its filters offer (how many are in each state, the models with incidents)."""
    eng = engine or storage.engine()
    t = storage.incidents
    found = sorted(
        incidents.list_incidents(state, model, eng), key=lambda i: (_INCIDENT_ORDER[i.state], -i.opened_at, -i.id)
    )
    shown = found[:limit]
    per_state = sa.select(t.c.state, sa.func.count()).group_by(t.c.state)
    if model is not None:
        per_state = per_state.where(t.c.model == model)
    with eng.connect() as conn:
        resolved_at = _resolved_at(conn, [i.id for i in shown])
        counts: dict[str, int] = dict(conn.execute(per_state).tuples().all())
        models = conn.execute(sa.select(t.c.model).where(t.c.model.is_not(None)).distinct()).scalars().all()
    return {
        "incidents": [_incident_summary(i, resolved_at.get(i.id)) for i in shown],
        "total": len(found),
        "state": state.value if state else None,
        "model": model,
        "counts": {s.value: counts.get(s.value, 0) for s in IncidentState},
        "models": sorted(models),
    }


def incident_page(incident_id: int, engine: sa.Engine | None = None) -> dict[str, Any]:
    """Everything an incident's page shows: the incident, its alert's labels and annotations, its timeline."""
    eng = engine or storage.engine()
    try:
        incident = incidents.get(incident_id, eng)
    except incidents.IncidentError as err:
        raise NotFound(str(err)) from err
    resolved = [e.time for e in incident.timeline if e.event == IncidentState.resolved.value]
    alert = incident.alert or {}
    return {
        **_incident_summary(incident, resolved[-1] if resolved else None),
        "resolution": incident.resolution,
        "review_url": incident.review_url,
        "updated_at": incident.updated_at,
        "alert": incident.alert,
        "alert_labels": sorted((alert.get("labels") or {}).items()),
        "alert_annotations": sorted((alert.get("annotations") or {}).items()),
        "timeline": [
            {
                "time": e.time,
                "offset_seconds": round(e.time - incident.opened_at, 1),
                "event": e.event,
                "actor": e.actor,
                "note": e.note,
                "details": e.details,
            }
            for e in incident.timeline
        ],
    }


def _resolved_at(conn: sa.Connection, ids: list[int]) -> dict[int, float]:
    """When each of these incidents was last resolved (a reopened one may be resolved more than once)."""
    e = storage.incident_events
    query = (
        sa.select(e.c.incident_id, sa.func.max(e.c.time))
        .where(e.c.event == IncidentState.resolved.value, e.c.incident_id.in_(ids))
        .group_by(e.c.incident_id)
    )
    return dict(conn.execute(query).tuples().all())


def _incident_summary(incident: incidents.Incident, resolved_at: float | None) -> dict[str, Any]:
    active = incident.state in incidents.ACTIVE
    took = None if active or resolved_at is None else round(resolved_at - incident.opened_at, 1)
    return {
        "id": incident.id,
        "severity": incident.severity.value,
        "state": incident.state.value,
        "active": active,
        "title": incident.title,
        "source": incident.source,
        "model": incident.model,
        "release_id": incident.release_id,
        "owner": incident.owner,
        "opened_at": incident.opened_at,
        # An active incident's age; a resolved or closed one's time to resolve (to its last resolve, if reopened).
        "age_seconds": round(time.time() - incident.opened_at, 1) if active else None,
        "resolved_at": None if active else resolved_at,
        "time_to_resolve_seconds": took,
    }
