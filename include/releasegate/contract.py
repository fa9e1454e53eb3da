"""The release's vocabulary as types: stages, arms, modes, call statuses, branches and audit actions.

Inside the library these are enums and small values; only the Airflow plugins turn them into XCom
JSON, and only the CLI and the dashboard turn them into text (docs/architecture.md, "The contract").
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

# Registered-model tags releasegate reads: the expectation suite, the holdout's label column, the backend, the
# regions the model's data may be processed and stored in (comma-separated; none: anywhere).
SUITE_TAG = "releasegate.expectation_suite"
LABEL_TAG = "releasegate.label"
BACKEND_TAG = "releasegate.backend"
REGIONS_TAG = "releasegate.regions"
# The classes of the model's input columns: what the prediction log may hold of each (releasegate.privacy).
CLASSIFICATION_TAG = "releasegate.classification"
# How long the model's predictions, feedback and nightly reports are kept (releasegate.retention).
RETENTION_TAG = "releasegate.retention"
# The features the gateway looks up in Feast for the model's requests (releasegate.serving.features).
FEAST_TAG = "releasegate.feast"

# Where the nightly evaluation stores a champion version's reports (under the version's source run).
NIGHTLY_REPORTS = "releasegate/reports/nightly"

# The asset the nightly evaluation emits an event on when a champion needs retraining.
RETRAINING_ASSET = "releasegate://retraining-needed"


class StageKind(StrEnum):
    shadow = "shadow"  # the candidate answers a mirror of every request; callers get the champion's answer
    canary = "canary"  # the candidate answers a share of the requests itself
    watch = "watch"  # after promotion: the new champion answers everything, watched against its own canary


class Stage(BaseModel):
    """Where a release's traffic is: the shadow, or canary step `step` (from 1) at `weight` % to the candidate.

    A canary step's number and its weight are two facts: the policy's steps [5, 25, 50] make step 2
    the 25 % one. Both travel together so neither is ever read as the other.
    """

    model_config = ConfigDict(frozen=True)

    kind: StageKind
    step: int = 0
    weight: int = 0

    @classmethod
    def shadow(cls) -> Self:
        return cls(kind=StageKind.shadow)

    @classmethod
    def canary(cls, step: int, weight: int) -> Self:
        return cls(kind=StageKind.canary, step=step, weight=weight)

    @classmethod
    def watch(cls) -> Self:
        return cls(kind=StageKind.watch)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        # Verdicts written before stages were typed name a canary by its weight ("canary-25"): the audit log
        # keeps them, so they still read.
        if isinstance(data, str):
            if data == StageKind.shadow:
                return {"kind": StageKind.shadow}
            match = re.fullmatch(r"canary-(\d+)", data)
            if match:
                return {"kind": StageKind.canary, "weight": int(match.group(1))}
            raise ValueError(f"not a stage: {data!r}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind is not StageKind.canary and (self.step or self.weight):
            raise ValueError(f"the {self.kind.value} stage has no step and no weight")
        if self.kind is StageKind.canary and not 0 < self.weight < 100:
            raise ValueError(f"a canary weight is a percentage between 1 and 99, got {self.weight}")
        return self

    @property
    def is_shadow(self) -> bool:
        return self.kind is StageKind.shadow

    @property
    def slug(self) -> str:
        """A name for files and folders: `shadow`, `canary-2-25pct` (step 2 at 25 %)."""
        return self.kind.value if self.kind is not StageKind.canary else f"canary-{self.step}-{self.weight}pct"

    def __str__(self) -> str:
        if self.kind is StageKind.watch:
            return "watch after promotion"
        if self.is_shadow:
            return "shadow"
        return f"canary {self.step} ({self.weight} %)" if self.step else f"canary {self.weight} %"


class Arm(StrEnum):
    champion = "champion"
    candidate = "candidate"


ARMS = (Arm.champion, Arm.candidate)


# Feedback items one POST /feedback may carry (a larger request is refused with 413); senders chunk by it.
MAX_FEEDBACK_ITEMS = 100


class Mode(StrEnum):
    """How a model's route splits its traffic."""

    single = "single"  # the champion alone
    shadow = "shadow"
    canary = "canary"
    experiment = "experiment"  # A/B/n: the champion (control) and up to 5 arms, each with its weight


class CallStatus(StrEnum):
    """How one model call went, as the prediction log records it; every status but `ok` is the model's failure."""

    ok = "ok"
    error = "error"
    timeout = "timeout"
    retried = "retried"  # its micro-batch call failed; the request's own retry answered
    skipped = "skipped"  # not called: the candidate's circuit breaker was open after repeated failures


class RouteChange(StrEnum):
    """Why a model's traffic split changed (the `route` audit event's `change`)."""

    serve = "serve"  # an operator put a version on the model's route (`releasegate routes set`)
    stage = "stage"  # a release's shadow or canary step; the event's `stage` says which
    promotion = "promotion"
    watch_ended = "watch_ended"  # the watch after a promotion passed: the previous champion is unloaded
    rollback = "rollback"
    emergency_rollback = "emergency_rollback"
    experiment = "experiment"  # an experiment's arms share the traffic (or one arm stopped)
    experiment_ended = "experiment_ended"  # the champion alone again after an experiment


class ErrorCode(StrEnum):
    """Machine-readable reasons in the gateway's error answers (`{"error": ..., "code": ...}`)."""

    signature_refused = "signature_refused"  # the version's signature does not verify with a trusted key


class MissingFeatures(StrEnum):
    """What the gateway does when a request's entity is not in the feature store, or the store does not answer."""

    defaults = "defaults"  # serve with the declared default of each feature (missing where none is declared)
    reject = "reject"  # refuse the request: 422 naming the entity, 503 when the store does not answer
    serve_without = "serve_without"  # serve with the features missing: each version's signature decides


class FeatureMiss(StrEnum):
    """Why a request's features were not looked up (the gateway's `feature_misses` metric)."""

    missing_entity = "missing_entity"  # the store holds no values for the entity
    timeout = "timeout"  # the store did not answer within RELEASEGATE_GATEWAY_FEATURE_TIMEOUT
    error = "error"  # the store answered with an error


class Outcome(StrEnum):
    """What ended a release (its row's `decision`)."""

    promote = "promote"
    reject = "reject"  # validation or the signature said no before any traffic
    rollback = "rollback"  # a verdict or a person said no
    abort = "abort"  # an operator stopped it
    fail = "fail"  # the pipeline itself errored
    conclude = "conclude"  # an experiment reached its result (a winner or none)


class Branch(StrEnum):
    """Where the release goes after its last stage."""

    promote = "promote"
    rollback = "rollback"
    approve = "approve"  # ask a person first (the DAG's human-in-the-loop task)
    finish = "finish"  # the release already ended: only the closing task runs


class NotificationEvent(StrEnum):
    """What people are told about (releasegate.notifications)."""

    release_outcome = "release_outcome"  # a release ended: promoted, rolled back, rejected, invalid, aborted, failed
    approval_requested = "approval_requested"  # a release waits for a person
    rollback = "rollback"  # an emergency rollback ran (or failed)
    incident_opened = "incident_opened"  # a new incident, not a repeat of an open one


class AuditAction(StrEnum):
    """Every kind of event the audit log holds."""

    release_opened = "release.opened"
    release_refused = "release.refused"  # not opened: e.g. it would put the model's data outside its regions
    # A release's move into each state (release.State), written by release.transition.
    release_validating = "release.validating"
    release_signing = "release.signing"
    release_shadow = "release.shadow"
    release_canary = "release.canary"
    release_awaiting_approval = "release.awaiting_approval"
    release_promoting = "release.promoting"
    release_watching = "release.watching"
    release_promoted = "release.promoted"
    release_rejected = "release.rejected"
    release_rolled_back = "release.rolled_back"
    release_invalid = "release.invalid"
    release_aborted = "release.aborted"
    release_failed = "release.failed"
    release_experimenting = "release.experimenting"
    release_concluded = "release.concluded"
    experiment_look = "experiment.look"  # one look at an experiment's evidence that changed something
    experiment_arm_stopped = "experiment.arm_stopped"  # a guard crossed: the arm's traffic back to the control
    experiment_decided = "experiment.decided"  # the experiment's result: its winner, or none
    validation = "validation"
    signed = "signed"
    route = "route"
    apikey_created = "apikey.created"
    apikey_revoked = "apikey.revoked"
    serving_ready = "serving.ready"
    serving_not_ready = "serving.not_ready"
    verdict = "verdict"
    drift = "drift"
    approval = "approval"
    emergency_rollback = "emergency_rollback"
    nightly_evaluated = "nightly.evaluated"
    nightly_no_traffic = "nightly.no_traffic"
    nightly_alert = "nightly.alert"
    drift_watch_alarm = "drift_watch.alarm"  # the near-real-time watch found input drift
    data_purged = "data.purged"  # rows and reports past the model's retention
    subject_exported = "subject.exported"  # a data subject's rows, exported on request
    subject_erased = "subject.erased"  # a data subject's rows, erased on request
    # An incident's lifecycle (releasegate.incidents): opened, then each move.
    incident_opened = "incident.opened"
    incident_acknowledged = "incident.acknowledged"
    incident_resolved = "incident.resolved"
    incident_closed = "incident.closed"
    incident_reopened = "incident.reopened"

    @classmethod
    def moved_to(cls, state: StrEnum) -> AuditAction:
        """The event of a release's move into `state`."""
        return cls(f"release.{state.value}")


_Tagged = TypeVar("_Tagged", bound=BaseModel)


def from_tag(
    kind: type[_Tagged], model: str, tags: dict[str, str], tag: str, error: type[Exception], what: str
) -> _Tagged:
    """A registered-model tag's JSON as `kind` (its defaults when the tag is absent); `error` naming each problem."""
    value = tags.get(tag)
    if value is None:
        return kind()
    try:
        return kind.model_validate_json(value)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'tag'}: {e['msg']}" for e in err.errors())
        raise error(f"{model}'s {tag} tag is not {what}: {problems}") from None
