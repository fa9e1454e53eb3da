"""The release's steps, one function per task of dags/model_release.py.

Each step reads the release row, does its one thing, and moves the state through
`release.transition`, so the same code runs from Airflow, the CLI and the tests. Every
step is idempotent: run again, it finds the work done and returns the same answer.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from releasegate import audit, incidents, release
from releasegate import policy as policies
from releasegate.backends import Applied, Backend, BackendKind, backend_kind
from releasegate.contract import AuditAction, Branch, Mode, Outcome, RouteChange, Stage, StageKind
from releasegate.errors import SignatureRefused
from releasegate.release import State
from releasegate.results import Ended, Opened, Recorded, Rejected, Routed, Signed, Skipped, Summary, Validated
from releasegate.verdict import Decision, Verdict, Window

log = logging.getLogger(__name__)


def _policy(rel: release.Release) -> policies.Policy:
    return policies.parse(rel.policy, source=f"release {rel.release_id} policy")


def _backend(model: str, *, wait_ready: bool = True) -> Backend:
    """The backend that serves `model` (see backends.backend_kind)."""
    if backend_kind(model) is BackendKind.kserve:
        from releasegate.backends.kserve import KServeBackend

        return KServeBackend(wait_ready=wait_ready)
    from releasegate.backends.local import LocalBackend

    return LocalBackend()


def _restore_champion(rel: release.Release) -> None:
    """All traffic back to the release's champion, no candidate."""
    assert rel.champion_version is not None
    _backend(rel.model).set_route(rel.model, rel.champion_version, None, Mode.single, 0, release_id=None)


def _serve_alone(
    model: str,
    version: str,
    change: RouteChange,
    actor: str,
    release_id: str | None = None,
    *,
    keeps_release: bool = False,
) -> Applied:
    """All of `model`'s traffic to `version`, audited as `change` (of `release_id`); the route itself carries the
    release's id only while the watch after promotion reads its requests (`keeps_release`)."""
    applied = _backend(model).set_route(
        model, version, None, Mode.single, 0, release_id=release_id if keeps_release else None
    )
    audit.append(
        actor,
        AuditAction.route,
        model=model,
        version=version,
        release_id=release_id,
        details={"change": change.value, "mode": Mode.single.value, "candidate_weight": 0, "champion_version": version},
    )
    return applied


def _tag(rel: release.Release, **tags: str) -> None:
    from releasegate import registry

    registry.set_version_tags(rel.model, rel.candidate_version, {f"releasegate.{k}": str(v) for k, v in tags.items()})


def _skip(rel: release.Release, why: str) -> Skipped:
    return Skipped(reason=f"release {rel.release_id} {why}", state=rel.state)


def _check_residency(model: str, candidate: str, actor: str) -> None:
    """Refuse, before anything is opened, routed or logged, a release that would put the model's data outside
    the regions it allows; the refusal is an audit event naming the part and both regions."""
    from releasegate import registry, residency
    from releasegate.settings import get_settings

    try:
        residency.check(model, registry.get_model_tags(model), backend_kind(model), get_settings())
    except residency.ResidencyRefused as err:
        audit.append(actor, AuditAction.release_refused, model=model, version=candidate, details={"reason": str(err)})
        raise


def start(
    model: str,
    version: str | None = None,
    policy_name: str = "default",
    *,
    airflow_run_id: str | None = None,
    actor: str = "airflow",
    is_run_alive: Callable[[str | None], bool] = lambda run_id: True,
    experiment_id: str | None = None,
) -> Opened:
    """Resolve candidate and champion, store the resolved policy, open the release (one per model).

    `experiment_id`: the concluded experiment the candidate won against this champion (model_experiment's
    release_winner); under a policy with `experiment_winner.skip_shadow_and_canary` its result stands for
    the shadow and canary. A candidate that did not win it, or a champion it was not compared with, is refused.
    """
    from releasegate import registry

    pol = policies.load(policy_name)
    candidate = registry.resolve_version(model, version or "challenger")
    champion = registry.get_alias(model, "champion")
    if champion == candidate:
        raise release.ReleaseError(f"{model} v{candidate} is already the champion: nothing to release")
    if experiment_id:
        _check_won(model, candidate, champion, experiment_id)
    _check_residency(model, candidate, actor)

    rel = release.open_release(
        model,
        candidate,
        champion,
        pol.model_dump(mode="json"),
        airflow_run_id=airflow_run_id,
        actor=actor,
        is_run_alive=is_run_alive,
        close_stale=functools.partial(close_stale, actor=actor),
        experiment_id=experiment_id or None,
    )
    _tag(rel, release_id=rel.release_id, state=rel.state.value)
    return Opened(
        release_id=rel.release_id,
        model=model,
        candidate=candidate,
        champion=champion,
        policy=pol.name,
        policy_digest=pol.digest,
    )


def _check_won(model: str, candidate: str, champion: str | None, experiment_id: str) -> None:
    from releasegate import experiments

    try:
        won = experiments.won(experiment_id)
    except (experiments.DesignError, release.ReleaseError) as err:
        raise release.ReleaseError(f"no experiment result to release on: {err}") from err
    if won.model != model or won.winner != candidate:
        raise release.ReleaseError(
            f"{model} v{candidate} did not win experiment {experiment_id} ({won.model} v{won.winner} did)"
        )
    if won.control != champion:
        raise release.ReleaseError(
            f"experiment {experiment_id} compared v{won.winner} with v{won.control}, but the champion is now "
            f"v{champion}: its result says nothing about this release"
        )


def _won_experiment(rel: release.Release) -> str | None:
    """The experiment whose result stands for this release's shadow and canary: the one its audited opening
    names, where its policy skips those stages for an experiment's winner."""
    if not _policy(rel).experiment_winner.skip_shadow_and_canary:
        return None
    opened = audit.events(release_id=rel.release_id, action=AuditAction.release_opened)
    return opened[0]["details"].get("experiment_id") if opened else None


def close_stale(stale: release.Release, actor: str = "airflow") -> None:
    """A model's lock left by a run that is gone (a release's or an experiment's): the traffic it moved goes back,
    the previous champion if it was being watched after promotion, else its champion alone."""
    if stale.state is State.watching:
        _undo_promotion(stale, actor)
    elif stale.champion_version:
        _restore_champion(stale)


def sign(release_id: str, actor: str = "airflow") -> Signed | Rejected | Skipped:
    """Sign the candidate (or verify an existing signature) before anything loads it; a bad signature rejects it."""
    from releasegate import signing

    rel = release.get(release_id)
    if rel.terminal:
        return _skip(rel, f"ended as {rel.state.value}")
    if rel.state not in (State.pending, State.signing):
        return _skip(rel, f"is past signing ({rel.state.value})")
    release.transition(release_id, State.signing, actor=actor)
    try:
        digest = sign_audited(rel.model, rel.candidate_version, release_id, actor)
    except signing.SignatureError as err:
        return _reject(rel, f"signature check failed: {err}", actor)
    return Signed(digest=digest)


def sign_audited(model: str, version: str, release_id: str, actor: str) -> str:
    """Sign `version` (or verify its signature) and audit it under `release_id`; SignatureError if refused.

    What an earlier release recorded counts: the audit log is anchored, so deleting the version's bundle and
    its digest tag in the registry does not make a signed version signable again.
    """
    from releasegate import signing

    earlier = audit.events(model=model, version=version, action=AuditAction.signed)
    digest = signing.sign_version(
        model, version, signed_before=earlier[-1]["details"].get("digest") if earlier else None
    )
    audit.append(
        actor, AuditAction.signed, model=model, version=version, release_id=release_id, details={"digest": digest}
    )
    return digest


def validate(release_id: str, actor: str = "airflow") -> Validated | Skipped:
    """Data contract, schema compatibility and offline comparison on the signed bytes; a failure rejects the release.

    A dependency that fails on the way (MLflow down) raises InfrastructureError: the task fails and
    may be retried; the candidate is not rejected for it.
    """
    from releasegate import validation

    rel = release.get(release_id)
    if rel.terminal:
        return _skip(rel, f"ended as {rel.state.value}")
    if rel.state not in (State.signing, State.validating):
        return _skip(rel, f"is not at validation ({rel.state.value})")
    release.transition(release_id, State.validating, actor=actor)
    report = validation.validate_candidate(rel.model, rel.candidate_version, rel.champion_version, _policy(rel))
    summary = report.model_dump(mode="json")
    _store_report(rel, "validation.json", summary)
    audit.append(
        actor,
        AuditAction.validation,
        model=rel.model,
        version=rel.candidate_version,
        release_id=release_id,
        details=summary,
    )
    if not report.passed:
        reason = "validation failed: " + "; ".join(report.reasons)
        release.transition(release_id, State.rejected, actor=actor, reason=reason, decision=Outcome.reject)
        _tag(rel, state=State.rejected.value, reasons=reason[:4000])
    return Validated(passed=report.passed, reasons=report.reasons)


def _reject(rel: release.Release, reason: str, actor: str) -> Rejected:
    release.transition(rel.release_id, State.rejected, actor=actor, reason=reason, decision=Outcome.reject)
    _tag(rel, state=State.rejected.value, reasons=reason[:4000])
    return Rejected(reason=reason)


def route(
    release_id: str, step: int, actor: str = "airflow", *, wait_ready: bool = True
) -> Routed | Rejected | Skipped:
    """Point traffic at a stage: `step` 0 is the shadow, n the policy's n-th canary step.

    wait_ready=False: a backend that deploys slowly (kserve) returns at once with a `readiness` to
    wait on (the Airflow side defers on it); the window then starts when the wait ends.
    A skip when the release already has a negative verdict, has ended, or its policy has fewer steps
    than the DAG.
    """
    rel = release.get(release_id)
    pol = _policy(rel)
    if rel.terminal:
        return _skip(rel, f"ended as {rel.state.value}")
    if rel.champion_version is None:
        return _skip(rel, "has no champion to compare with")
    last = rel.last_verdict
    if last is not None and last.decision.negative:
        return _skip(rel, f"already has a {last.decision.value} verdict")
    won = _won_experiment(rel)
    if won:
        return _skip(rel, f"is the winner of experiment {won}: policy {pol.name} skips shadow and canary for it")
    if step == 0:
        stage, mode, state = Stage.shadow(), Mode.shadow, State.shadow
    elif step > len(pol.canary.steps):
        return _skip(rel, f"policy {pol.name} has {len(pol.canary.steps)} canary steps")
    else:
        stage, mode, state = Stage.canary(step, pol.canary.steps[step - 1]), Mode.canary, State.canary
    try:
        applied = _backend(rel.model, wait_ready=wait_ready).set_route(
            rel.model, rel.champion_version, rel.candidate_version, mode, stage.weight, release_id=release_id
        )
    except SignatureRefused as err:
        return _reject(rel, f"the serving platform refused the candidate: {err}", actor)
    release.transition(release_id, state, actor=actor)
    since = time.time()
    audit.append(
        actor,
        AuditAction.route,
        model=rel.model,
        version=rel.candidate_version,
        release_id=release_id,
        details={
            "change": RouteChange.stage.value,
            "mode": mode.value,
            "candidate_weight": stage.weight,
            "stage": stage.model_dump(mode="json"),
            "revision": applied.revision,
            "status": applied.status,
        },
    )
    _tag(rel, state=state.value, weight=str(stage.weight))
    window = pol.shadow.max_window_seconds if stage.is_shadow else pol.canary.max_window_seconds
    # Only the last step extends: an earlier step whose window ends undecided hands its evidence on.
    extends = pol.inconclusive == policies.Inconclusive.extend and (stage.is_shadow or step == len(pol.canary.steps))
    return Routed(
        stage=stage,
        since=since,
        window_seconds=window,
        max_extensions=pol.max_extensions if extends else 0,
        poll_seconds=pol.poll_seconds,
        readiness=applied.readiness,
        serving_status=applied.status,
    )


def poll(release_id: str, stage: Stage, since: float, window_closed: bool) -> Verdict:
    """One look at the evidence (the deferrable wait calls this every poll interval)."""
    from releasegate import analysis
    from releasegate.analysis import srm

    rel = release.get(release_id)
    # Knative assigns each request, not each routing key: count SRM in requests.
    unit = srm.Unit.requests if backend_kind(rel.model) is BackendKind.kserve else srm.Unit.routing_keys
    return analysis.analyse(
        rel.model,
        release_id,
        stage,
        since,
        time.time(),
        _policy(rel),
        window_closed=window_closed,
        srm_unit=unit,
        earlier=_finished_canary_steps(rel, stage),
    )


def _finished_canary_steps(rel: release.Release, stage: Stage) -> list[Window]:
    """The windows of the canary steps this release passed before `stage`: their evidence carries."""
    if stage.is_shadow:
        return []
    return [
        v.window
        for v in rel.verdicts
        if v.window.stage.kind is StageKind.canary
        and v.window.stage.weight != stage.weight
        and v.decision in (Decision.promote, Decision.continue_)
    ]


def record(release_id: str, verdict: Verdict, actor: str = "airflow") -> Recorded:
    """Keep the verdict that ended a wait, with the release and in the audit log, and report the stage's drift."""
    release.record_verdict(release_id, verdict, actor=actor)
    log.info("verdict %s: %s", verdict.decision.value, verdict.reason)
    drift = stage_drift(release_id, verdict.window, actor=actor)
    return Recorded(stage=verdict.window.stage, decision=verdict.decision, reason=verdict.reason, drift=drift)


def stage_drift(release_id: str, window: Window, actor: str = "airflow") -> dict[str, Any]:
    """Evidently reports on the stage's logged traffic (input drift; prediction drift in shadow), kept in MLflow.

    Reports are evidence beside the verdict, not a gate of their own: a report that cannot be
    made is recorded in the audit log with its error, and the release goes on.
    """
    from releasegate import drift, registry

    rel = release.get(release_id)
    stage = window.stage
    summary: dict[str, Any] = {"stage": stage.model_dump(mode="json")}
    try:
        with tempfile.TemporaryDirectory(prefix="rg-drift-") as tmp:
            out = Path(tmp)
            inputs = drift.release_drift_report(
                rel.model, release_id, rel.candidate_version, window.start, window.end + 1, out
            )
            if inputs is not None:
                summary["input_drift"] = {
                    "drifted_share": inputs.drifted_share,
                    "drifted_columns": inputs.drifted_columns,
                    "rows_current": inputs.rows_current,
                }
            if stage.is_shadow:
                pairs = drift.read_shadow_pairs(rel.model, window.start, window.end + 1, release_id=release_id)
                if not pairs.empty:
                    predictions = drift.prediction_drift(pairs, out)
                    summary["prediction_drift"] = {
                        "drifted": predictions.drifted_columns,
                        "rows": predictions.rows_current,
                    }
            if any(out.iterdir()):
                summary["reports"] = f"releasegate/releases/{release_id}/{stage.slug}"
                registry.log_artifact(rel.model, rel.candidate_version, out, artifact_path=summary["reports"])
    except Exception as err:  # evidence, not a gate: say so and go on
        log.exception("drift report for %s failed", stage)
        summary["error"] = f"{type(err).__name__}: {err}"
    audit.append(
        actor, AuditAction.drift, model=rel.model, version=rel.candidate_version, release_id=release_id, details=summary
    )
    return summary


def decide(release_id: str) -> Branch:
    """What the evidence so far says the release does next.

    Promotion needs the last canary step's `promote` (earlier steps pass with `promote` or `continue`)
    and no negative verdict; a policy with `approval.required` asks a human first, and one with
    `inconclusive: approve` asks a human instead of rolling back an undecided release.
    """
    rel = release.get(release_id)
    pol = _policy(rel)
    if rel.terminal:
        return Branch.finish
    if rel.champion_version is None:
        return Branch.approve if pol.approval.required else Branch.promote
    if _won_experiment(rel) and not any(v.decision.negative for v in rel.verdicts):
        return Branch.approve if pol.approval.required else Branch.promote
    last = rel.last_verdict
    final_weight = pol.canary.steps[-1]
    if (
        last is not None
        and last.decision is Decision.promote
        and last.window.stage.kind is StageKind.canary
        and last.window.stage.weight == final_weight
        and not any(v.decision.negative for v in rel.verdicts)
    ):
        return Branch.approve if pol.approval.required else Branch.promote
    if (
        last is not None
        and last.decision is Decision.inconclusive
        and pol.inconclusive == policies.Inconclusive.approve
    ):
        return Branch.approve
    return Branch.rollback


class ApprovalRequest(BaseModel):
    """What the person asked to approve sees, how long they have, who may answer and who may not."""

    subject: str
    body: str
    timeout_seconds: float
    seconds_left: float  # of the timeout, counted from when the release began to wait (less when asked again)
    approvers: list[str]
    triggered_by: str | None = None
    separate_duties: bool = False


class NoEligibleApprover(Exception):
    """Separation of duties leaves nobody to approve: the policy's only approver triggered the release."""


def request_approval(release_id: str, actor: str = "airflow", *, triggered_by: str | None = None) -> ApprovalRequest:
    """Hold the release for a human: state `awaiting_approval`, and the request's text with the evidence.

    `triggered_by` is the Airflow user who started the release; under `approval.separate_duties`
    they are left out of the approvers (and `record_approval` refuses their approval). Asked
    again, it returns the same request with the time left.
    """
    rel = release.get(release_id)
    pol = _policy(rel)
    last = rel.last_verdict
    why = (
        "the evidence did not decide and the policy asks a person (inconclusive: approve)"
        if last is not None and last.decision is Decision.inconclusive
        else f"policy {pol.name} requires an approval to promote"
    )
    if rel.state is not State.awaiting_approval:
        rel = release.transition(release_id, State.awaiting_approval, actor=actor, reason=f"awaiting approval: {why}")
    waiting = AuditAction.moved_to(State.awaiting_approval)
    since = max((e["time"] for e in audit.events(release_id=release_id) if e["action"] == waiting), default=time.time())
    separate = pol.approval.separate_duties and triggered_by is not None
    approvers = [user for user in pol.approval.approvers if not (separate and user == triggered_by)]
    if pol.approval.approvers and not approvers:
        reason = (
            f"policy {pol.name} names only {triggered_by} to approve, who triggered this release: separation of "
            "duties (approval.separate_duties) leaves nobody to approve it"
        )
        _audit_answer(rel, approved=False, approver=None, who="nobody (separation of duties)", comment=reason)
        raise NoEligibleApprover(reason)
    timeout = pol.approval.timeout_seconds
    lines = [
        f"**Release** `{rel.release_id}`: model **{rel.model}**, candidate v{rel.candidate_version} "
        f"over champion v{rel.champion_version}, policy `{pol.name}`.",
        f"**Why you are asked**: {why}.",
        f"**No answer within {timeout:,.0f} s rolls the release back.**",
    ]
    if separate:
        lines.append(
            f"**Separation of duties**: {triggered_by} triggered this release, so someone else must approve it "
            f"({triggered_by} may still roll it back)."
        )
    lines += [
        "",
        "| stage | decision | evidence (candidate − champion, always-valid bounds) |",
        "|---|---|---|",
    ]
    for verdict in rel.verdicts:
        metrics = "; ".join(
            f"{m.name} {m.estimate:+.3f} [{m.lower:+.3f}, {m.upper:+.3f}] (margin {m.margin:g})"
            if m.estimate is not None and m.lower is not None and m.upper is not None
            else f"{m.name} n/a"
            for m in verdict.metrics
        )
        lines.append(f"| {verdict.window.stage} | {verdict.decision.value} | {metrics} |")
    if last is not None:
        lines += ["", f"**Last verdict**: {last.reason}"]
    try:
        lines += ["", f"Reports: `{report_uri(rel)}`"]
    except Exception as err:  # the request goes out without the link rather than not at all
        lines += ["", f"Reports: not found in MLflow ({type(err).__name__}: {err})"]
    return ApprovalRequest(
        subject=f"Promote {rel.model} v{rel.candidate_version} (champion v{rel.champion_version})?",
        body="\n".join(lines),
        timeout_seconds=timeout,
        seconds_left=since + timeout - time.time(),
        approvers=approvers,
        triggered_by=triggered_by,
        separate_duties=separate,
    )


def record_approval(
    release_id: str,
    *,
    approved: bool,
    approver: str | None,
    timed_out: bool = False,
    comment: str | None = None,
    triggered_by: str | None = None,
) -> Branch:
    """Write the answer, or the timeout, to the audit log; returns the branch it leads to.

    An approval by the release's own triggerer under `approval.separate_duties` is audited as
    refused and does not count: the branch is `approve`, ask again.
    """
    rel = release.get(release_id)
    if approved and _policy(rel).approval.refuses(approver, triggered_by):
        refused = f"{approver} triggered this release and may not approve it (separation of duties)"
        _audit_answer(rel, approved=False, approver=approver, who=str(approver), comment=comment, refused=refused)
        return Branch.approve
    who = approver or ("nobody (timeout)" if timed_out else "unknown")
    _audit_answer(rel, approved=approved, approver=approver, who=who, timed_out=timed_out, comment=comment)
    return Branch.promote if approved else Branch.rollback


def _audit_answer(
    rel: release.Release,
    *,
    approved: bool,
    approver: str | None,
    who: str,
    timed_out: bool = False,
    comment: str | None = None,
    refused: str | None = None,
) -> None:
    details: dict[str, Any] = {"approved": approved, "approver": who, "timed_out": timed_out, "comment": comment}
    if refused is not None:
        details["refused"] = refused
    audit.append(
        f"airflow:{approver}" if approver else "airflow",
        AuditAction.approval,
        model=rel.model,
        version=rel.candidate_version,
        release_id=rel.release_id,
        details=details,
    )


def _approval(rel: release.Release) -> dict[str, Any] | None:
    answers = [e for e in audit.events(release_id=rel.release_id) if e["action"] == AuditAction.approval]
    return answers[-1]["details"] if answers else None


def promote(release_id: str, actor: str = "airflow") -> Ended:
    """All traffic to the candidate; aliases champion → candidate, previous → old champion."""
    from releasegate import registry

    rel = release.get(release_id)
    if rel.state in (State.promoted, State.watching):
        return Ended(state=rel.state, reason=rel.reasons[-1] if rel.reasons else None)
    watch = _policy(rel).watch
    won = _won_experiment(rel)
    watched = watch.seconds > 0 and rel.champion_version is not None and not won  # a watch needs a canary
    release.transition(release_id, State.promoting, actor=actor)
    # Under a watch the single route keeps the release's id: its requests are the watch's evidence, and the
    # gateway keeps the previous champion loaded until the route changes again (docs/decisions.md, "After promotion").
    _serve_alone(rel.model, rel.candidate_version, RouteChange.promotion, actor, release_id, keeps_release=watched)
    if rel.champion_version:
        registry.set_alias(rel.model, "previous", rel.champion_version)
    registry.set_alias(rel.model, "champion", rel.candidate_version)
    if registry.get_alias(rel.model, "challenger") == rel.candidate_version:
        registry.delete_alias(rel.model, "challenger")
    reason = (
        _last_reason(rel)
        or (won and f"won experiment {won} against v{rel.champion_version}")
        or "first version of the model: no champion to compare with"
    )
    answer = _approval(rel) if rel.state is State.awaiting_approval else None
    if answer is not None:
        note = f": {answer['comment']}" if answer.get("comment") else ""
        reason = f"approved by {answer['approver']}{note} ({reason})"
    if watched:
        rel = release.transition(
            release_id,
            State.watching,
            actor=actor,
            reason=f"promoted ({reason}); watched for {watch.seconds:g} s with v{rel.champion_version} kept loaded",
        )
        _tag(rel, state=State.watching.value)
        return Ended(state=rel.state, reason=rel.reasons[-1])
    rel = release.transition(release_id, State.promoted, actor=actor, reason=reason, decision=Outcome.promote)
    _tag(rel, state=State.promoted.value, reasons=reason[:4000])
    return Ended(state=rel.state, reason=reason)


class Watching(BaseModel):
    """What the watch after promotion follows: from when, for how long, against which canary step."""

    release_id: str
    since: float
    seconds: float
    poll_seconds: float


def watch_started(release_id: str) -> Watching | None:
    """The release's watch, or None when it has none to keep (not promoted under a watch, or ended already)."""
    rel = release.get(release_id)
    if rel.state is not State.watching:
        return None
    pol = _policy(rel)
    [moved] = audit.events(release_id=release_id, action=AuditAction.release_watching)
    return Watching(
        release_id=release_id, since=moved["time"], seconds=pol.watch.seconds, poll_seconds=pol.poll_seconds
    )


def watch_poll(release_id: str, since: float, window_closed: bool) -> Verdict:
    """One look at the new champion's requests since promotion, against its last canary step."""
    from releasegate.analysis import watch

    rel = release.get(release_id)
    canary = [v for v in rel.verdicts if v.window.stage.kind is StageKind.canary]
    if not canary:
        raise release.ReleaseError(f"release {release_id} has no canary verdict for its watch to compare with")
    baseline = canary[-1].window
    return watch.analyse(rel.model, release_id, _policy(rel), baseline, since, time.time(), window_closed)


def end_watch(release_id: str, verdict: Verdict, actor: str = "airflow") -> Ended:
    """The watch's verdict: the promotion stands (previous champion unloaded), or it is undone and rolled back."""
    rel = release.get(release_id)
    if rel.state is not State.watching:
        return Ended(state=rel.state, reason=rel.reasons[-1] if rel.reasons else None)
    release.record_verdict(release_id, verdict, actor=actor)
    if verdict.decision is Decision.rollback:
        _undo_promotion(rel, actor)
        rel = release.transition(
            release_id, State.rolled_back, actor=actor, reason=verdict.reason, decision=Outcome.rollback
        )
        _tag(rel, state=State.rolled_back.value, reasons=verdict.reason[:4000])
        return Ended(state=rel.state, reason=verdict.reason)
    _serve_alone(rel.model, rel.candidate_version, RouteChange.watch_ended, actor, release_id)
    reason = f"{_last_reason(rel) or 'promoted'}; {verdict.reason}"
    rel = release.transition(release_id, State.promoted, actor=actor, reason=reason, decision=Outcome.promote)
    _tag(rel, state=State.promoted.value, reasons=reason[:4000])
    return Ended(state=rel.state, reason=reason)


def _undo_promotion(rel: release.Release, actor: str) -> None:
    """Traffic and the `champion` alias back on the release's champion; the candidate keeps its tags."""
    from releasegate import registry

    assert rel.champion_version is not None  # a watch needs a champion to go back to
    _serve_alone(rel.model, rel.champion_version, RouteChange.rollback, actor, rel.release_id)
    registry.set_alias(rel.model, "champion", rel.champion_version)


def rollback(release_id: str, actor: str = "airflow") -> Ended:
    """All traffic back to the champion; the candidate is tagged with the reasons."""
    rel = release.get(release_id)
    if rel.terminal:
        return Ended(state=rel.state, reason=rel.reasons[-1] if rel.reasons else None)
    assert rel.champion_version is not None  # a release without a champion is promoted, never rolled back
    _serve_alone(rel.model, rel.champion_version, RouteChange.rollback, actor, release_id)
    last = rel.last_verdict.decision if rel.last_verdict is not None else None
    to = State.invalid if last is Decision.invalid else State.rolled_back
    reason = _last_reason(rel) or "no verdict was reached"
    answer = _approval(rel) if rel.state is State.awaiting_approval else None
    if answer is not None and answer["timed_out"]:
        reason = f"no approval arrived within the policy's timeout, so the release rolls back (last verdict: {reason})"
    elif answer is not None:
        note = f": {answer['comment']}" if answer.get("comment") else ""
        reason = f"rejected by {answer['approver']}{note} (last verdict: {reason})"
    elif last in (Decision.inconclusive, Decision.continue_, None):
        reason = f"the evidence did not decide before the window ended ({reason})"
    rel = release.transition(release_id, to, actor=actor, reason=reason, decision=Outcome.rollback)
    _tag(rel, state=to.value, reasons=reason[:4000])
    return Ended(state=rel.state, reason=reason)


def _last_reason(rel: release.Release) -> str | None:
    return rel.last_verdict.reason if rel.last_verdict is not None else None


def finish(release_id: str, actor: str = "airflow", *, pipeline_failed: bool = False) -> Summary:
    """Close the release: a run that errored is `failed` with the champion restored; reports and the signed audit head go to MLflow."""
    from releasegate.settings import get_settings

    rel = release.get(release_id)
    if not rel.terminal:
        if rel.champion_version:
            try:
                if rel.state is State.watching:  # failed after promotion: the aliases go back with the traffic
                    _undo_promotion(rel, actor)
                else:
                    _restore_champion(rel)
            except Exception as err:  # the failure we report is the pipeline's, not this one
                log.error("could not restore the champion route for %s: %s", rel.model, err)
        reason = (
            "a pipeline task failed; traffic restored to the champion"
            if pipeline_failed
            else "the run ended before a decision; traffic restored to the champion"
        )
        rel = release.transition(release_id, State.failed, actor=actor, reason=reason, decision=Outcome.fail)
        _tag(rel, state=State.failed.value, reasons=reason)
    settings = get_settings()
    summary = summarize(rel)
    _store_report(rel, "release.json", summary.model_dump(mode="json"))
    # A copy beside the release's reports; the head `audit.verify` checks is the one anchored at every event.
    if settings.audit_key.exists():
        _store_report(rel, "audit-head.json", audit.sign_head(settings.audit_key))
    return summary.model_copy(update={"reports": report_uri(rel)})


def summarize(rel: release.Release) -> Summary:
    """The release as a person reads it: outcome, reasons, verdicts, durations."""
    return Summary(
        release_id=rel.release_id,
        model=rel.model,
        candidate=rel.candidate_version,
        champion=rel.champion_version,
        state=rel.state,
        decision=rel.decision,
        reasons=rel.reasons,
        verdicts=rel.verdicts,
        policy=rel.policy.get("name"),
        started_at=rel.started_at,
        ended_at=rel.ended_at,
        duration_seconds=None if rel.ended_at is None else round(rel.ended_at - rel.started_at, 1),
    )


def report_uri(rel: release.Release) -> str:
    from releasegate import registry

    run_id = registry.client().get_model_version(rel.model, rel.candidate_version).run_id
    return f"runs:/{run_id}/releasegate/releases/{rel.release_id}"


def _store_report(rel: release.Release, name: str, content: dict[str, Any]) -> None:
    from releasegate import registry

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(content, indent=2, default=str))
        registry.log_artifact(
            rel.model, rel.candidate_version, path, artifact_path=f"releasegate/releases/{rel.release_id}"
        )


def abort(release_id: str, *, reason: str, actor: str) -> Ended:
    """An operator stops the release now: champion route restored, state `aborted`."""
    rel = release.get(release_id)
    if rel.terminal:
        return Ended(state=rel.state, reason="the release had already ended")
    if rel.champion_version:
        _restore_champion(rel)
    rel = release.transition(
        release_id, State.aborted, actor=actor, reason=f"aborted by {actor}: {reason}", decision=Outcome.abort
    )
    _tag(rel, state=State.aborted.value, reasons=reason[:4000])
    return Ended(state=rel.state, reason=reason)


def serve_champion(model: str, version: str, actor: str = "cli") -> Applied:
    """Put `version` alone on the model's route (verified first), and make it the champion if there is none.

    How a model's first version starts serving; releases move the route after that.
    """
    from releasegate import registry

    applied = _serve_alone(model, version, RouteChange.serve, actor)
    if registry.get_alias(model, "champion") is None:
        registry.set_alias(model, "champion", version)
    return applied


def current_route(model: str) -> Applied | None:
    """The split the model's serving platform follows now."""
    return _backend(model).get_route(model)


EMERGENCY_REASON_MIN = 10  # a reason someone can act on later, not "x"


class ClosedRelease(BaseModel):
    release_id: str
    state: State
    candidate: str


class EmergencyRollback(BaseModel):
    """What an emergency rollback did: the champion it went back to, and the open release it closed."""

    model: str
    champion: str
    rolled_back_from: str | None
    reason: str
    actor: str
    aborted_release: ClosedRelease | None
    audit_seq: int | None


def emergency_rollback(
    model: str,
    reason: str,
    actor: str,
    release_id: str | None = None,
    category: str | None = None,
    incident: int | None = None,
    alert: dict[str, Any] | None = None,
) -> EmergencyRollback:
    """Back to the `previous` champion at once: route first, then an open release aborted, then the aliases; audited.

    `previous` is left where it is, so running this twice is a no-op rather than a jump back to
    the version just rolled away from. A critical incident is opened, or, when the rollback answers one
    (`incident`: an alert's, from the alert receiver), recorded in it; the `alert` goes to the audit event.
    """
    from releasegate import registry

    reason = (reason or "").strip()
    if len(reason) < EMERGENCY_REASON_MIN:
        raise ValueError(
            f"an emergency rollback needs a reason of at least {EMERGENCY_REASON_MIN} characters "
            f"(got {reason!r}): it is what the audit log keeps"
        )
    previous = registry.get_alias(model, "previous")
    champion = registry.get_alias(model, "champion")
    if previous is None:
        raise release.ReleaseError(f"{model} has no `previous` alias, so there is no earlier champion to go back to")
    open_rel = release.active(model)
    if release_id and (open_rel is None or open_rel.release_id != release_id):
        named = release.get(release_id)
        if named.model != model:
            raise release.ReleaseError(f"release {release_id} is a release of {named.model}, not of {model}")
    # Traffic first: that is the emergency. Nothing else has changed if the serving platform refuses.
    _serve_alone(model, previous, RouteChange.emergency_rollback, actor)
    aborted: ClosedRelease | None = None
    if open_rel is not None:
        why = f"emergency rollback of {model} to v{previous} by {actor}: {reason}"
        # A release already moving the aliases cannot be aborted; it ends failed, so the rollback still wins.
        to = State.failed if State.aborted not in release.MOVES.get(open_rel.state, ()) else State.aborted
        closed = release.transition(
            open_rel.release_id,
            to,
            actor=actor,
            reason=why,
            decision=Outcome.abort if to is State.aborted else Outcome.fail,
        )
        _tag(closed, state=to.value, reasons=why[:4000])
        aborted = ClosedRelease(release_id=closed.release_id, state=to, candidate=closed.candidate_version)
    if champion != previous:
        registry.set_alias(model, "champion", previous)
        if champion is not None:
            registry.set_version_tags(model, champion, {"releasegate.emergency_rollback": reason[:4000]})
    event = audit.append(
        actor,
        AuditAction.emergency_rollback,
        model=model,
        version=previous,
        release_id=aborted.release_id if aborted else None,
        details={
            "from_version": champion,
            "to_version": previous,
            "reason": reason,
            "category": category,
            "aborted_release": aborted.model_dump(mode="json") if aborted else None,
            "incident": incident,
            "alert": alert,
        },
    )
    what = f"{model}: emergency rollback from v{champion} to v{previous} by {actor}: {reason}"
    if incident is not None:
        incidents.record(
            incident,
            actor=actor,
            event="rolled_back",
            note=what,
            details={"from_version": champion, "to_version": previous, "audit_seq": event.get("seq")},
            severity=incidents.Severity.critical,
        )
    else:
        incidents.open_incident(
            actor=actor,
            source=AuditAction.emergency_rollback.value,
            severity=incidents.Severity.critical,
            title=what,
            model=model,
            release_id=aborted.release_id if aborted else None,
        )
    return EmergencyRollback(
        model=model,
        champion=previous,
        rolled_back_from=champion,
        reason=reason,
        actor=actor,
        aborted_release=aborted,
        audit_seq=event.get("seq"),
    )
