"""The nightly evaluation of every champion: drift, data contract and quality on a day of logged traffic.

`evaluate` is one model's evaluation, what a mapped task of dags/nightly_evaluation.py calls:
its reports are stored as MLflow artifacts of the champion version under
`releasegate/reports/nightly/<UTC time>/`, its numbers and reasons go to the audit log, and
non-empty `reasons` mean retraining is needed.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from releasegate import audit, drift, incidents, notifications, privacy
from releasegate.contract import NIGHTLY_REPORTS, SUITE_TAG, AuditAction
from releasegate.evaluation import HOLDOUT_ARTIFACT, label_column
from releasegate.settings import Settings, get_settings

if TYPE_CHECKING:
    import pandas as pd

    from releasegate.policy import Monitoring, Policy

log = logging.getLogger(__name__)

CHAMPION = "champion"
REPORTS = NIGHTLY_REPORTS
# A webhook that gets the alert as JSON; without it the alert is the audit event and the failed task.


class Evaluation(BaseModel):
    """One champion's nightly result: the numbers, where the reports are, and why retraining is needed (if so)."""

    model: str
    version: str
    since: float
    until: float
    requests: int
    input_drift: dict[str, Any] | None = None
    prediction_drift: dict[str, Any] | None = None
    contract: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    artifacts: str | None = None
    reasons: list[str] = []
    note: str = ""

    @property
    def alarm(self) -> bool:
        return bool(self.reasons)


def champions(settings: Settings | None = None) -> list[dict[str, str]]:
    """Every registered model with a `champion` alias, as {"model", "version"} (sorted by model)."""
    from releasegate import registry

    client = registry.client(settings)
    found: list[dict[str, str]] = []
    for rm in client.search_registered_models():
        aliases = getattr(rm, "aliases", None) or {}
        if CHAMPION in aliases:
            found.append({"model": rm.name, "version": str(aliases[CHAMPION])})
    return sorted(found, key=lambda c: c["model"])


def evaluate(
    model: str,
    version: str,
    until: float,
    policy: str | Policy = "default",
    actor: str = "nightly",
    settings: Settings | None = None,
) -> Evaluation:
    """Drift, contract and quality reports on `model`'s traffic in the policy's window before `until`."""
    from releasegate import policy as policy_module
    from releasegate import storage

    settings = settings or get_settings()
    if isinstance(policy, str):
        policy = policy_module.load(policy, settings.policy_dirs)
    limits = policy.monitoring
    since = until - limits.window_hours * 3600
    engine = storage.engine(settings.db_url)
    result = Evaluation(model=model, version=str(version), since=since, until=until, requests=0)

    current = drift.read_logged_inputs(model, since, until, engine=engine)
    result.requests = int(current.attrs.get("requests_in_window", len(current)))
    if current.empty:
        result.note = f"no traffic for {model} between {_iso(since)} and {_iso(until)}: nothing to evaluate"
        log.info(result.note)
        audit.append(
            actor,
            AuditAction.nightly_no_traffic,
            model=model,
            version=version,
            details={"since": since, "until": until},
            engine=engine,
        )
        return result

    stamp = datetime.fromtimestamp(until, UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="rg-nightly-") as tmp:
        out = Path(tmp) / "reports"
        reference, holdout = _reference_data(model, version, Path(tmp), settings)
        title = f"{model} v{version}, {_iso(since)} to {_iso(until)}"

        allowed = privacy.report_allowance(model, settings)  # encrypted fields the reports may show
        inputs = drift.input_drift(reference, current, out, title=f"Input drift: {title}", decrypt=allowed)
        result.input_drift = _numbers(inputs)
        if inputs.drifted_share > limits.max_drifted_share:
            result.reasons.append(
                f"input drift in {len(inputs.drifted_columns)} of {len(inputs.columns)} columns "
                f"({inputs.drifted_share:.0%} > {limits.max_drifted_share:.0%}): " + ", ".join(inputs.drifted_columns)
            )

        pairs = drift.read_shadow_pairs(model, since, until, engine=engine)
        if not pairs.empty:
            preds = drift.prediction_drift(pairs, out, title=f"Prediction drift, champion vs candidate: {title}")
            result.prediction_drift = _numbers(preds) | {
                "agreement": float((pairs["champion"] == pairs["candidate"]).mean())
            }

        result.contract = _contract(model, current, out, settings)
        if result.contract.get("success") is False:
            result.reasons.append(
                f"data contract {result.contract['suite']!r} failed on live inputs: "
                + "; ".join(result.contract["failures"])
            )

        labelled = drift.read_labelled(
            model, since, until, version=version, engine=engine, decrypt_labels="ground_truth" in allowed
        )
        if labelled.attrs.get("encrypted_labels"):
            result.note = (
                f"{labelled.attrs['encrypted_labels']} labelled requests left out of the quality report: their "
                "labels are encrypted and the classification's decrypt_in_reports does not name ground_truth"
            )
        if not labelled.empty:
            scored = _scored_holdout(model, version, holdout, settings) if holdout is not None else None
            report = drift.quality(labelled, out, title=f"Quality: {title}", reference=scored)
            result.quality = report.model_dump(exclude={"html", "json"})
            result.reasons += _quality_reasons(report, limits)

        from releasegate import registry

        result.artifacts = f"{REPORTS}/{stamp}"
        (out / "evaluation.json").write_text(result.model_dump_json(indent=2))
        registry.log_artifact(model, version, out, artifact_path=result.artifacts, settings=settings)

    audit.append(
        actor,
        AuditAction.nightly_evaluated,
        model=model,
        version=version,
        details=result.model_dump(mode="json"),
        engine=engine,
    )
    return result


def alert_message(evaluations: list[dict[str, Any]]) -> str | None:
    """One sentence per model that needs retraining; None when nothing crossed a limit."""
    alarms = [e for e in evaluations if e.get("reasons")]
    if not alarms:
        return None
    return "retraining needed: " + " | ".join(
        f"{e['model']} v{e['version']}: {'; '.join(e['reasons'])}" for e in alarms
    )


def notify(evaluations: list[dict[str, Any]], actor: str = "nightly", settings: Settings | None = None) -> str | None:
    """The alert hook: an audit event per alarm, and a POST to $RELEASEGATE_ALERT_WEBHOOK when set."""
    from releasegate import storage

    message = alert_message(evaluations)
    if message is None:
        return None
    settings = settings or get_settings()
    engine = storage.engine(settings.db_url)
    alarms = [e for e in evaluations if e.get("reasons")]
    for e in alarms:
        audit.append(
            actor,
            AuditAction.nightly_alert,
            model=e["model"],
            version=e["version"],
            details={"reasons": e["reasons"], "artifacts": e.get("artifacts")},
            engine=engine,
        )
        incidents.open_incident(
            actor=actor,
            source=AuditAction.nightly_alert.value,
            severity=incidents.Severity.medium,
            title=f"{e['model']} v{e['version']}: {'; '.join(e['reasons'])}",
            model=e["model"],
            engine=engine,
            settings=settings,
        )
    post_alert(message, alarms, settings)
    return message


def post_alert(message: str, alarms: list[dict[str, Any]], settings: Settings) -> None:
    """POST {"text", "alarms"} to $RELEASEGATE_ALERT_WEBHOOK when set; a failure is logged, never raised."""
    if settings.alert_webhook:  # a dead webhook is logged: the red run still tells people
        notifications.post_json(settings.alert_webhook, {"text": message, "alarms": alarms}, what="alert webhook")


def no_traffic_message(evaluations: list[dict[str, Any]]) -> str:
    """What a run says when it evaluated nothing."""
    if not evaluations:
        return "no registered model has a champion alias: nothing to evaluate"
    return "; ".join(
        e["note"] or f"{e['model']} v{e['version']}: {e['requests']} requests evaluated, no alarm" for e in evaluations
    )


def _reference_data(
    model: str, version: str, tmp: Path, settings: Settings
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The version's reference inputs, and its holdout with labels when it has one."""

    from releasegate import registry

    reference = registry.read_frame(model, version, drift.REFERENCE_ARTIFACT, dst=tmp / "reference", settings=settings)
    holdout = None
    if registry.has_artifact(model, version, HOLDOUT_ARTIFACT, settings):
        holdout = registry.read_frame(model, version, HOLDOUT_ARTIFACT, dst=tmp / "holdout", settings=settings)
    return reference, holdout


def _scored_holdout(model: str, version: str, holdout: pd.DataFrame, settings: Settings) -> pd.DataFrame | None:
    """The version's own answers on its holdout (target, prediction): the quality it was released with."""
    import pandas as pd

    from releasegate import registry, signing

    try:
        label = label_column(model, holdout.columns, settings)
    except ValueError as err:
        log.warning("holdout of %s v%s: %s; quality has no reference", model, version, err)
        return None
    with tempfile.TemporaryDirectory(prefix="rg-nightly-model-") as tmp:
        loaded = registry.load_pyfunc(signing.fetch_verified(model, version, settings, parent=Path(tmp)))
        predicted = loaded.predict(holdout.drop(columns=[label]))
    values = predicted.iloc[:, 0] if hasattr(predicted, "iloc") and predicted.ndim == 2 else predicted
    return pd.DataFrame({"target": holdout[label].to_numpy(), "prediction": list(values)})


def _contract(model: str, current: pd.DataFrame, out: Path, settings: Settings) -> dict[str, Any]:
    """The model's expectation suite on the logged inputs, saved as contract.json."""
    from releasegate import registry, validation

    suite = registry.get_model_tags(model, settings=settings).get(SUITE_TAG)
    found: dict[str, Any]
    if not suite:
        found = {
            "suite": None,
            "success": None,
            "failures": [],
            "note": f"registered model {model!r} has no {SUITE_TAG} tag: no contract to check",
        }
    else:
        found = validation.run_contract(
            current.reset_index(drop=True),
            suite,
            settings=settings,
            features_only=True,
            logged=privacy.logged_classes(current),
        ).model_dump()
    out.mkdir(parents=True, exist_ok=True)
    (out / "contract.json").write_text(json.dumps(found, indent=2))
    return found


def _quality_reasons(report: drift.QualitySummary, limits: Monitoring) -> list[str]:
    if report.task != "classification" or report.rows_current < limits.min_labelled or not report.reference_metrics:
        return []
    live, released = report.metrics.get("accuracy"), report.reference_metrics.get("accuracy")
    if live is None or released is None or released - live <= limits.max_accuracy_drop:
        return []
    return [
        f"accuracy on {report.rows_current} labelled requests is {live:.3f}, {released - live:.3f} below "
        f"the {released:.3f} on the version's holdout (limit {limits.max_accuracy_drop:.3f})"
    ]


def _numbers(summary: drift.DriftSummary) -> dict[str, Any]:
    return summary.model_dump(exclude={"html", "json"})


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")
