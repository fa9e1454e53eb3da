"""The release's steps, one function per task of dags/model_release.py.

Each step reads the release row, does its one thing, and moves the state through
`release.transition`, so the same code runs from Airflow, the CLI and the tests. Every
step is idempotent: run again, it finds the work done and returns the same answer.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

from releasegate import audit, release
from releasegate import policy as policies
from releasegate.release import State

log = logging.getLogger(__name__)

# A step that has nothing to do because the release already ended says so with this key;
# the Airflow side turns it into a skipped task.
SKIPPED = "skipped"
_NEGATIVE = {"rollback", "invalid"}
APPROVE = "approve"  # the DAG's human-approval task


def _policy(rel: release.Release) -> policies.Policy:
    return policies.parse(rel.policy, source=f"release {rel.release_id} policy")


def backend_kind(model: str | None, settings=None) -> str:
    """local | kserve: the registered model's tag `releasegate.backend`, else RELEASEGATE_BACKEND (default local).

    Where a model is served is a fact about the model, not about a release policy.
    """
    from releasegate.backends import DeploymentError
    from releasegate.settings import get_settings

    kind = None
    if model:
        from releasegate import registry

        try:
            kind = registry.get_model_tags(model).get("releasegate.backend")
        except registry.RegistryError:
            kind = None
    kind = kind or (settings or get_settings()).backend
    if kind not in ("local", "kserve"):
        raise DeploymentError(f"unknown backend {kind!r} for model {model!r} (registered-model tag "
                              f"releasegate.backend or RELEASEGATE_BACKEND): use local or kserve")
    return kind


def _backend(model: str | None = None, settings=None, *, wait_ready: bool = True):
    if backend_kind(model, settings) == "kserve":
        from releasegate.backends.kserve import KServeBackend

        return KServeBackend(wait_ready=wait_ready)
    from releasegate.backends.local import LocalBackend

    return LocalBackend(settings=settings)


def _restore_champion(rel: release.Release) -> None:
    """All traffic back to the release's champion, no candidate."""
    _backend(rel.model).set_route(rel.model, rel.champion_version, None, "single", 0, release_id=None)


def _tag(rel: release.Release, **tags: str) -> None:
    from releasegate import registry

    registry.set_version_tags(rel.model, rel.candidate_version, {f"releasegate.{k}": str(v) for k, v in tags.items()})


def _skip(rel: release.Release, why: str) -> dict:
    return {SKIPPED: f"release {rel.release_id} {why}", "state": rel.state.value}


def start(model: str, version: str | None = None, policy_name: str = "default", *, airflow_run_id: str | None = None,
          actor: str = "airflow", is_run_alive: Callable[[str | None], bool] = lambda run_id: True) -> dict:
    """Resolve candidate and champion, store the resolved policy, open the release (one per model)."""
    from releasegate import registry

    pol = policies.load(policy_name)
    candidate = registry.resolve_version(model, version or "challenger")
    champion = registry.get_alias(model, "champion")
    if champion == candidate:
        raise release.ReleaseError(f"{model} v{candidate} is already the champion: nothing to release")

    def close_stale(stale: release.Release) -> None:
        if stale.champion_version:
            _restore_champion(stale)

    rel = release.open_release(model, candidate, champion, pol.model_dump(mode="json"),
                               airflow_run_id=airflow_run_id, actor=actor,
                               is_run_alive=is_run_alive, close_stale=close_stale)
    _tag(rel, release_id=rel.release_id, state=rel.state.value)
    return {"release_id": rel.release_id, "model": model, "candidate": candidate, "champion": champion,
            "policy": pol.name, "policy_digest": pol.digest}


def validate(release_id: str, actor: str = "airflow") -> dict:
    """Data contract, schema compatibility and offline comparison; a failure rejects the release."""
    from releasegate import validation

    rel = release.get(release_id)
    if rel.state not in (State.pending, State.validating):
        return _skip(rel, f"is past validation ({rel.state.value})")
    release.transition(release_id, State.validating, actor=actor)
    report = validation.validate_candidate(rel.model, rel.candidate_version, rel.champion_version, _policy(rel))
    summary = report.model_dump(mode="json")
    _store_report(rel, "validation.json", summary)
    audit.append(actor, "validation", model=rel.model, version=rel.candidate_version, release_id=release_id,
                 details=summary)
    if not report.passed:
        reason = "validation failed: " + "; ".join(report.reasons)
        release.transition(release_id, State.rejected, actor=actor, reason=reason, decision="reject")
        _tag(rel, state=State.rejected.value, reasons=reason[:4000])
    return {"passed": report.passed, "reasons": report.reasons}


def sign(release_id: str, actor: str = "airflow") -> dict:
    """Sign the candidate (or verify an existing signature); a bad signature rejects the release."""
    from releasegate import signing

    rel = release.get(release_id)
    if rel.terminal:
        return _skip(rel, f"ended as {rel.state.value}")
    if rel.state is not State.validating and rel.state is not State.signing:
        return {"state": rel.state.value}
    release.transition(release_id, State.signing, actor=actor)
    try:
        digest = signing.sign_version(rel.model, rel.candidate_version)
    except signing.SignatureError as err:
        return _reject(rel, f"signature check failed: {err}", actor)
    audit.append(actor, "signed", model=rel.model, version=rel.candidate_version, release_id=release_id,
                 details={"digest": digest})
    return {"digest": digest}


def _reject(rel: release.Release, reason: str, actor: str) -> dict:
    release.transition(rel.release_id, State.rejected, actor=actor, reason=reason, decision="reject")
    _tag(rel, state=State.rejected.value, reasons=reason[:4000])
    return {"rejected": reason}


def route(release_id: str, stage: str, actor: str = "airflow", *, wait_ready: bool = True) -> dict:
    """Point traffic at the stage ("shadow" or "canary-<n>" for the n-th policy step, from 1).

    wait_ready=False: a backend that deploys slowly (kserve) returns at once with a `readiness` to
    wait on (the Airflow side defers on it); the window then starts when the wait ends.

    Returns the window start and the candidate weight, or a skip when the release already
    has a negative verdict, has ended, or the policy has fewer steps than the DAG.
    """
    from releasegate.backends import DeploymentError

    rel = release.get(release_id)
    pol = _policy(rel)
    if rel.terminal:
        return _skip(rel, f"ended as {rel.state.value}")
    if rel.champion_version is None:
        return _skip(rel, "has no champion to compare with")
    if rel.verdicts and rel.verdicts[-1]["decision"] in _NEGATIVE | {"inconclusive"}:
        return _skip(rel, f"already has a {rel.verdicts[-1]['decision']} verdict")
    if stage == "shadow":
        mode, weight, state = "shadow", 0, State.shadow
    else:
        step = int(stage.removeprefix("canary-"))
        if step > len(pol.canary.steps):
            return _skip(rel, f"policy {pol.name} has {len(pol.canary.steps)} canary steps")
        mode, weight, state = "canary", pol.canary.steps[step - 1], State.canary
    try:
        applied = _backend(rel.model, wait_ready=wait_ready).set_route(
            rel.model, rel.champion_version, rel.candidate_version, mode, weight,
                                       release_id=release_id)
    except DeploymentError as err:
        if "signature" in str(err).lower() or "signed" in str(err).lower():
            return _reject(rel, f"the gateway refused the candidate: {err}", actor)
        raise
    release.transition(release_id, state, actor=actor)
    since = time.time()
    audit.append(actor, "route", model=rel.model, version=rel.candidate_version, release_id=release_id,
                 details={"mode": mode, "candidate_weight": weight, "stage": stage,
                          "revision": applied.get("revision") if isinstance(applied, dict) else None,
                          "status": applied.get("status") if isinstance(applied, dict) else None})
    _tag(rel, state=state.value, weight=weight)
    window = pol.shadow.max_window_seconds if mode == "shadow" else pol.canary.max_window_seconds
    return {"stage": stage if mode == "canary" else "shadow", "analysis_stage": f"canary-{weight}" if mode == "canary" else "shadow",
            "candidate_weight": weight, "since": since, "window_seconds": window,
            # Only the last step extends: an earlier step whose window ends undecided hands its evidence on.
            "max_extensions": (pol.max_extensions if pol.inconclusive == policies.Inconclusive.extend
                               and (mode == "shadow" or weight == pol.canary.steps[-1]) else 0),
            "poll_seconds": pol.poll_seconds,
            **({"readiness": applied["readiness"]} if isinstance(applied, dict) and applied.get("readiness") else {})}


def poll(release_id: str, analysis_stage: str, since: float, candidate_weight: int, window_closed: bool) -> dict:
    """One look at the evidence (the deferrable wait calls this every poll interval)."""
    from releasegate import analysis

    rel = release.get(release_id)
    verdict = analysis.analyse(rel.model, release_id, analysis_stage, since, time.time(), _policy(rel),
                               candidate_weight=candidate_weight, window_closed=window_closed,
                               # Knative assigns each request, not each routing key: count SRM in requests.
                               srm_unit="requests" if backend_kind(rel.model) == "kserve" else "routing_keys",
                               earlier=_finished_canary_steps(rel, analysis_stage))
    return verdict.model_dump(mode="json")


def _finished_canary_steps(rel: release.Release, analysis_stage: str) -> list[tuple[float, float, int]]:
    """(start, end, weight) of the canary steps this release passed before `analysis_stage`: their evidence carries."""
    if analysis_stage == "shadow":
        return []
    steps = []
    for verdict in rel.verdicts:
        stage = (verdict.get("window") or {}).get("stage") or ""
        if stage.startswith("canary-") and stage != analysis_stage and verdict["decision"] in ("promote", "continue"):
            steps.append((verdict["window"]["start"], verdict["window"]["end"], int(stage.removeprefix("canary-"))))
    return steps


def record(release_id: str, verdict: dict, actor: str = "airflow") -> dict:
    """Keep the verdict that ended a wait, with the release and in the audit log, and report the stage's drift."""
    release.record_verdict(release_id, verdict, actor=actor)
    log.info("verdict %s: %s", verdict.get("decision"), verdict.get("reason"))
    drift = stage_drift(release_id, verdict["window"], actor=actor)
    return {"decision": verdict["decision"], "reason": verdict["reason"], "drift": drift}


def stage_drift(release_id: str, window: dict, actor: str = "airflow") -> dict | None:
    """Evidently reports on the stage's logged traffic (input drift; prediction drift in shadow), kept in MLflow.

    Reports are evidence beside the verdict, not a gate of their own: a report that cannot be
    made is recorded in the audit log with its error, and the release goes on.
    """
    from releasegate import drift, registry

    rel = release.get(release_id)
    stage = window.get("stage") or "stage"
    summary: dict = {"stage": stage}
    try:
        with tempfile.TemporaryDirectory(prefix="rg-drift-") as tmp:
            out = Path(tmp)
            inputs = drift.release_drift_report(rel.model, release_id, rel.candidate_version, window["start"],
                                                window["end"] + 1, out)
            if inputs is not None:
                summary["input_drift"] = {"drifted_share": inputs.drifted_share,
                                          "drifted_columns": inputs.drifted_columns,
                                          "rows_current": inputs.rows_current}
            if stage == "shadow":
                pairs = drift.read_shadow_pairs(rel.model, window["start"], window["end"] + 1, release_id=release_id)
                if not pairs.empty:
                    predictions = drift.prediction_drift(pairs, out)
                    summary["prediction_drift"] = {"drifted": predictions.drifted_columns,
                                                   "rows": predictions.rows_current}
            if any(out.iterdir()):
                registry.log_artifact(rel.model, rel.candidate_version, out,
                                      artifact_path=f"releasegate/releases/{release_id}/{stage}")
    except Exception as err:  # evidence, not a gate: say so and go on
        log.exception("drift report for %s failed", stage)
        summary["error"] = f"{type(err).__name__}: {err}"
    audit.append(actor, "drift", model=rel.model, version=rel.candidate_version, release_id=release_id,
                 details=summary)
    return summary


def decide(release_id: str) -> str:
    """promote | rollback | approve | finish: what the evidence so far says the release does next.

    Promotion needs the last canary step's `promote` (earlier steps pass with `promote` or `continue`)
    and no negative verdict; a policy with `approval.required` asks a human first, and one with
    `inconclusive: approve` asks a human instead of rolling back an undecided release.
    """
    rel = release.get(release_id)
    pol = _policy(rel)
    if rel.terminal:
        return "finish"
    if rel.champion_version is None:
        return APPROVE if pol.approval.required else "promote"
    decisions = [v["decision"] for v in rel.verdicts]
    last = rel.verdicts[-1] if rel.verdicts else None
    final_stage = f"canary-{pol.canary.steps[-1]}"
    if (last and last["decision"] == "promote" and (last.get("window") or {}).get("stage") == final_stage
            and not set(decisions) & (_NEGATIVE | {"inconclusive"})):
        return APPROVE if pol.approval.required else "promote"
    if last and last["decision"] == "inconclusive" and pol.inconclusive == policies.Inconclusive.approve:
        return APPROVE
    return "rollback"


def request_approval(release_id: str, actor: str = "airflow") -> dict:
    """Hold the release for a human: state `awaiting_approval`, and the request's text with the evidence."""
    rel = release.get(release_id)
    pol = _policy(rel)
    last = rel.verdicts[-1] if rel.verdicts else None
    why = ("the evidence did not decide and the policy asks a person (inconclusive: approve)"
           if last and last["decision"] == "inconclusive" else f"policy {pol.name} requires an approval to promote")
    if rel.state is not State.awaiting_approval:
        rel = release.transition(release_id, State.awaiting_approval, actor=actor, reason=f"awaiting approval: {why}")
    timeout = pol.approval.timeout_seconds
    lines = [f"**Release** `{rel.release_id}`: model **{rel.model}**, candidate v{rel.candidate_version} "
             f"over champion v{rel.champion_version}, policy `{pol.name}`.",
             f"**Why you are asked**: {why}.",
             f"**No answer within {timeout:,.0f} s rolls the release back.**", "",
             "| stage | decision | evidence (candidate − champion, always-valid bounds) |", "|---|---|---|"]
    for verdict in rel.verdicts:
        metrics = "; ".join(
            f"{m['name']} {m['estimate']:+.3f} [{m['lower']:+.3f}, {m['upper']:+.3f}] (margin {m['margin']:g})"
            if m.get("estimate") is not None and m.get("lower") is not None else f"{m['name']} n/a"
            for m in verdict.get("metrics", []))
        lines.append(f"| {(verdict.get('window') or {}).get('stage', '?')} | {verdict['decision']} | {metrics} |")
    if last:
        lines += ["", f"**Last verdict**: {last['reason']}"]
    try:
        lines += ["", f"Reports: `{report_uri(rel)}`"]
    except Exception as err:  # the request goes out without the link rather than not at all
        lines += ["", f"Reports: not found in MLflow ({type(err).__name__}: {err})"]
    return {"subject": f"Promote {rel.model} v{rel.candidate_version} (champion v{rel.champion_version})?",
            "body": "\n".join(lines), "timeout_seconds": timeout, "approvers": list(pol.approval.approvers)}


def record_approval(release_id: str, *, approved: bool, approver: str | None, timed_out: bool = False,
                    comment: str | None = None) -> str:
    """Write the answer, or the timeout, to the audit log; returns the branch it leads to."""
    rel = release.get(release_id)
    who = approver or ("nobody (timeout)" if timed_out else "unknown")
    audit.append(f"airflow:{approver}" if approver else "airflow", "approval", model=rel.model,
                 version=rel.candidate_version, release_id=release_id,
                 details={"approved": approved, "approver": who, "timed_out": timed_out, "comment": comment})
    return "promote" if approved else "rollback"


def _approval(rel: release.Release) -> dict | None:
    answers = [e for e in audit.events(release_id=rel.release_id) if e["action"] == "approval"]
    return answers[-1]["details"] if answers else None


def promote(release_id: str, actor: str = "airflow") -> dict:
    """All traffic to the candidate; aliases champion → candidate, previous → old champion."""
    from releasegate import registry

    rel = release.get(release_id)
    if rel.state is State.promoted:
        return {"state": rel.state.value}
    release.transition(release_id, State.promoting, actor=actor)
    _backend(rel.model).set_route(rel.model, rel.candidate_version, None, "single", 0, release_id=release_id)
    audit.append(actor, "route", model=rel.model, version=rel.candidate_version, release_id=release_id,
                 details={"mode": "single", "candidate_weight": 0, "stage": "promoted",
                          "champion_version": rel.candidate_version})
    if rel.champion_version:
        registry.set_alias(rel.model, "previous", rel.champion_version)
    registry.set_alias(rel.model, "champion", rel.candidate_version)
    if registry.get_alias(rel.model, "challenger") == rel.candidate_version:
        registry.delete_alias(rel.model, "challenger")
    reason = _last_reason(rel) or "first version of the model: no champion to compare with"
    answer = _approval(rel) if rel.state is State.awaiting_approval else None
    if answer is not None:
        note = f": {answer['comment']}" if answer.get("comment") else ""
        reason = f"approved by {answer['approver']}{note} ({reason})"
    rel = release.transition(release_id, State.promoted, actor=actor, reason=reason, decision="promote")
    _tag(rel, state=State.promoted.value, reasons=reason[:4000])
    return {"state": rel.state.value, "reason": reason}


def rollback(release_id: str, actor: str = "airflow") -> dict:
    """All traffic back to the champion; the candidate is tagged with the reasons."""
    rel = release.get(release_id)
    if rel.terminal:
        return {"state": rel.state.value}
    _restore_champion(rel)
    audit.append(actor, "route", model=rel.model, version=rel.champion_version, release_id=release_id,
                 details={"mode": "single", "candidate_weight": 0, "stage": "rolled back",
                          "champion_version": rel.champion_version})
    last = rel.verdicts[-1]["decision"] if rel.verdicts else None
    to = State.invalid if last == "invalid" else State.rolled_back
    reason = _last_reason(rel) or "no verdict was reached"
    answer = _approval(rel) if rel.state is State.awaiting_approval else None
    if answer is not None and answer["timed_out"]:
        reason = f"no approval arrived within the policy's timeout, so the release rolls back (last verdict: {reason})"
    elif answer is not None:
        note = f": {answer['comment']}" if answer.get("comment") else ""
        reason = f"rejected by {answer['approver']}{note} (last verdict: {reason})"
    elif last in ("inconclusive", "continue", None):
        reason = f"the evidence did not decide before the window ended ({reason})"
    rel = release.transition(release_id, to, actor=actor, reason=reason, decision="rollback")
    _tag(rel, state=to.value, reasons=reason[:4000])
    return {"state": rel.state.value, "reason": reason}


def _last_reason(rel: release.Release) -> str | None:
    return rel.verdicts[-1]["reason"] if rel.verdicts else None


def finish(release_id: str, actor: str = "airflow", *, pipeline_failed: bool = False) -> dict:
    """Close the release: a run that errored is `failed` with the champion restored; reports and the signed audit head go to MLflow."""
    from releasegate.settings import get_settings

    rel = release.get(release_id)
    if not rel.terminal:
        if rel.champion_version:
            try:
                _restore_champion(rel)
            except Exception as err:  # the failure we report is the pipeline's, not this one
                log.error("could not restore the champion route for %s: %s", rel.model, err)
        reason = "a pipeline task failed; traffic restored to the champion" if pipeline_failed else \
                 "the run ended before a decision; traffic restored to the champion"
        rel = release.transition(release_id, State.failed, actor=actor, reason=reason, decision="fail")
        _tag(rel, state=State.failed.value, reasons=reason)
    settings = get_settings()
    summary = summarize(rel)
    _store_report(rel, "release.json", summary)
    if settings.signing_key.exists():
        _store_report(rel, "audit-head.json", audit.sign_head(settings.signing_key))
    summary["reports"] = report_uri(rel)
    return summary


def summarize(rel: release.Release) -> dict:
    """The release as a person reads it: outcome, reasons, verdicts, durations."""
    return {
        "release_id": rel.release_id, "model": rel.model, "candidate": rel.candidate_version,
        "champion": rel.champion_version, "state": rel.state.value, "decision": rel.decision,
        "reasons": rel.reasons, "verdicts": rel.verdicts, "policy": rel.policy.get("name"),
        "started_at": rel.started_at, "ended_at": rel.ended_at,
        "duration_seconds": None if rel.ended_at is None else round(rel.ended_at - rel.started_at, 1),
    }


def report_uri(rel: release.Release) -> str:
    from releasegate import registry

    run_id = registry.client().get_model_version(rel.model, rel.candidate_version).run_id
    return f"runs:/{run_id}/releasegate/releases/{rel.release_id}"


def _store_report(rel: release.Release, name: str, content: dict) -> None:
    from releasegate import registry

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(content, indent=2, default=str))
        registry.log_artifact(rel.model, rel.candidate_version, path,
                              artifact_path=f"releasegate/releases/{rel.release_id}")


def abort(release_id: str, *, reason: str, actor: str) -> dict:
    """An operator stops the release now: champion route restored, state `aborted`."""
    rel = release.get(release_id)
    if rel.terminal:
        return {"state": rel.state.value, "note": "release had already ended"}
    if rel.champion_version:
        _restore_champion(rel)
    rel = release.transition(release_id, State.aborted, actor=actor, reason=f"aborted by {actor}: {reason}",
                             decision="abort")
    _tag(rel, state=State.aborted.value, reasons=reason[:4000])
    return {"state": rel.state.value, "reason": reason}


EMERGENCY_REASON_MIN = 10  # a reason someone can act on later, not "x"


def emergency_rollback(model: str, reason: str, actor: str, release_id: str | None = None,
                       category: str | None = None) -> dict:
    """Back to the `previous` champion at once: route first, then an open release aborted, then the aliases; audited.

    `previous` is left where it is, so running this twice is a no-op rather than a jump back to
    the version just rolled away from.
    """
    from releasegate import registry

    reason = (reason or "").strip()
    if len(reason) < EMERGENCY_REASON_MIN:
        raise ValueError(f"an emergency rollback needs a reason of at least {EMERGENCY_REASON_MIN} characters "
                         f"(got {reason!r}): it is what the audit log keeps")
    previous = registry.get_alias(model, "previous")
    champion = registry.get_alias(model, "champion")
    if previous is None:
        raise release.ReleaseError(f"{model} has no `previous` alias, so there is no earlier champion to go back to")
    open_rel = release.active(model)
    if release_id and (open_rel is None or open_rel.release_id != release_id):
        named = release.get(release_id)
        if named.model != model:
            raise release.ReleaseError(f"release {release_id} is a release of {named.model}, not of {model}")
    # Traffic first: that is the emergency. Nothing else has changed if the gateway refuses.
    _backend().set_route(model, previous, None, "single", 0, release_id=None)
    audit.append(actor, "route", model=model, version=previous,
                 details={"mode": "single", "candidate_weight": 0, "stage": "emergency rollback",
                          "champion_version": previous})
    aborted = None
    if open_rel is not None:
        why = f"emergency rollback of {model} to v{previous} by {actor}: {reason}"
        # A release already moving the aliases cannot be aborted; it ends failed, so the rollback still wins.
        to = State.failed if State.aborted not in release.MOVES.get(open_rel.state, ()) else State.aborted
        closed = release.transition(open_rel.release_id, to, actor=actor, reason=why,
                                    decision="abort" if to is State.aborted else "fail")
        _tag(closed, state=to.value, reasons=why[:4000])
        aborted = {"release_id": closed.release_id, "state": to.value, "candidate": closed.candidate_version}
    if champion != previous:
        registry.set_alias(model, "champion", previous)
        if champion is not None:
            registry.set_version_tags(model, champion, {"releasegate.emergency_rollback": reason[:4000]})
    event = audit.append(actor, "emergency_rollback", model=model, version=previous,
                         release_id=aborted["release_id"] if aborted else None,
                         details={"from_version": champion, "to_version": previous, "reason": reason,
                                  "category": category, "aborted_release": aborted})
    return {"model": model, "champion": previous, "rolled_back_from": champion, "reason": reason, "actor": actor,
            "aborted_release": aborted, "audit_seq": event.get("seq")}
