"""How long the prediction log, feedback and nightly reports are kept, and the purge that enforces it.

A model declares its retention in the registered-model tag `releasegate.retention` (JSON, `Retention` below);
a model without it keeps predictions 90 days, feedback and reports 365. The nightly evaluation's `purge` task
calls `purge`: it deletes what is older, model by model, in batches of `batch` rows, each its own short
transaction, so the gateway's log writer waits at most one batch; and it writes each model's counts to the audit
log (`data.purged`). A release's evidence outlives its rows: its verdicts hold the numbers they were reached on,
and the audit log keeps them. See docs/operations.md, "Retention".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from releasegate import audit, storage
from releasegate.contract import NIGHTLY_REPORTS, RETENTION_TAG, AuditAction, from_tag
from releasegate.errors import ReleasegateError

if TYPE_CHECKING:
    from releasegate.settings import Settings

log = logging.getLogger(__name__)

DAY = 86400.0
_STAMP = "%Y%m%dT%H%M%SZ"  # a nightly report folder's name: the end of its window


class RetentionError(ReleasegateError):
    """A `releasegate.retention` tag that is not a retention."""


class Retention(BaseModel):
    """Days each kind of record of a model is kept (the tag's JSON; what it leaves out keeps its default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    predictions_days: float = Field(default=90, gt=0)
    feedback_days: float = Field(default=365, gt=0)
    reports_days: float = Field(default=365, gt=0)

    @classmethod
    def from_tags(cls, model: str, tags: dict[str, str]) -> Retention:
        return from_tag(cls, model, tags, RETENTION_TAG, RetentionError, "a retention")


class Purged(BaseModel):
    """What one model's purge deleted, and the cut-offs it deleted before (epoch seconds)."""

    model: str
    retention: Retention
    predictions: int = 0
    feedback: int = 0
    reports: list[str] = []
    batches: int = 0
    predictions_before: float
    feedback_before: float
    reports_before: float


def retention_of(model: str, settings: Settings | None = None) -> Retention:
    """The model's declared retention; the defaults for a model the registry no longer has."""
    from releasegate import registry

    try:
        return Retention.from_tags(model, registry.get_model_tags(model, settings))
    except registry.RegistryError:
        return Retention()


def purge(
    now: float | None = None,
    *,
    batch: int = 5000,
    actor: str = "nightly",
    retention: Callable[[str], Retention] | None = None,
    reports: bool = True,
    engine: sa.Engine | None = None,
    settings: Settings | None = None,
) -> list[Purged]:
    """Delete every model's predictions, feedback and nightly reports older than its retention; audit the counts.

    Feedback goes with its request's model (found through the logged request id); feedback whose request is no
    longer logged goes after the default feedback retention. `retention` (default: the registry's tags) gives a
    model's `Retention`; `reports=False` leaves MLflow alone (the log-only purge of tests and scripts).
    """
    eng = engine or storage.engine()
    now = time.time() if now is None else now
    of = retention or (lambda model: retention_of(model, settings))
    with eng.connect() as conn:
        models = set(conn.execute(sa.select(storage.predictions.c.model).distinct()).scalars())
    if reports:
        models |= _registered_models(settings)
    results = []
    for model in sorted(models):
        kept = of(model)
        done = Purged(
            model=model,
            retention=kept,
            predictions_before=now - kept.predictions_days * DAY,
            feedback_before=now - kept.feedback_days * DAY,
            reports_before=now - kept.reports_days * DAY,
        )
        done.feedback, batches = _in_batches(eng, _feedback_of(model, done.feedback_before), batch)
        done.batches += batches
        predictions = storage.predictions
        old = sa.select(predictions.c.id).where(
            predictions.c.model == model, predictions.c.time < done.predictions_before
        )
        done.predictions, batches = _in_batches(eng, (predictions, old), batch)
        done.batches += batches
        if reports:
            done.reports = _purge_reports(model, done.reports_before, settings)
        if done.predictions or done.feedback or done.reports:
            audit.append(actor, AuditAction.data_purged, model=model, details=done.model_dump(mode="json"), engine=eng)
        log.info(
            "%s: purged %d predictions, %d feedback rows, %d reports",
            model,
            done.predictions,
            done.feedback,
            len(done.reports),
        )
        results.append(done)
    orphans, _ = _in_batches(eng, _orphan_feedback(now - Retention().feedback_days * DAY), batch)
    if orphans:
        audit.append(actor, AuditAction.data_purged, details={"feedback_without_prediction": orphans}, engine=eng)
    return results


def _feedback_of(model: str, before: float) -> tuple[sa.Table, sa.Select[tuple[int]]]:
    feedback, predictions = storage.feedback, storage.predictions
    of_model = sa.exists().where(predictions.c.request_id == feedback.c.request_id, predictions.c.model == model)
    return feedback, sa.select(feedback.c.id).where(feedback.c.time < before, of_model)


def _orphan_feedback(before: float) -> tuple[sa.Table, sa.Select[tuple[int]]]:
    feedback, predictions = storage.feedback, storage.predictions
    logged = sa.exists().where(predictions.c.request_id == feedback.c.request_id)
    return feedback, sa.select(feedback.c.id).where(feedback.c.time < before, ~logged)


def _in_batches(eng: sa.Engine, target: tuple[sa.Table, sa.Select[tuple[int]]], batch: int) -> tuple[int, int]:
    """Delete the rows `select` finds, `batch` at a time, each batch its own transaction: (rows, batches)."""
    table, select = target
    deleted = batches = 0
    while True:
        with eng.begin() as conn:
            ids = list(conn.execute(select.order_by(table.c.id).limit(batch)).scalars())
            if ids:
                conn.execute(table.delete().where(table.c.id.in_(ids)))
        if not ids:
            return deleted, batches
        deleted, batches = deleted + len(ids), batches + 1


def _registered_models(settings: Settings | None) -> set[str]:
    from releasegate import registry

    return {rm.name for rm in registry.client(settings).search_registered_models()}


def _purge_reports(model: str, before: float, settings: Settings | None) -> list[str]:
    """Delete the nightly report folders of every version of `model` whose window ended before `before`."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from releasegate import registry

    mlflow_client = registry.client(settings)
    runs = {mv.run_id for mv in mlflow_client.search_model_versions(f"name='{model}'") if mv.run_id}
    deleted = []
    for run_id in sorted(runs):
        folders = [info.path for info in mlflow_client.list_artifacts(run_id, NIGHTLY_REPORTS) if info.is_dir]
        old = [path for path in folders if (stamp := _stamp(path)) is not None and stamp < before]
        if old:
            repository = get_artifact_repository(mlflow_client.get_run(run_id).info.artifact_uri)
            for path in old:
                repository.delete_artifacts(path)  # type: ignore[no-untyped-call]  # MLflow: untyped
                deleted.append(f"{run_id}/{path}")
    return deleted


def _stamp(path: str) -> float | None:
    try:
        return datetime.strptime(path.rpartition("/")[2], _STAMP).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None  # not a folder the nightly evaluation wrote
