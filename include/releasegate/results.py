"""What each step of a release returns: one pydantic value per kind, told apart by its `result` field.

The Airflow plugins turn them into XCom JSON (and a `Skipped` into a skipped task); `releasegate
trigger --wait` reads them back with `parse` instead of guessing what an XCom is from its keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from releasegate.contract import Outcome, Stage
from releasegate.release import State
from releasegate.verdict import Decision, Verdict


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)

    def describe(self) -> str:
        """One line for a person following the run."""
        raise NotImplementedError


class Opened(_Result):
    result: Literal["opened"] = "opened"
    release_id: str
    model: str
    candidate: str
    champion: str | None
    policy: str
    policy_digest: str

    def describe(self) -> str:
        return f"release {self.release_id}: {self.model} v{self.candidate} over v{self.champion} (policy {self.policy})"


class Skipped(_Result):
    """The step had nothing to do: the release ended already, or the policy has fewer steps than the DAG."""

    result: Literal["skipped"] = "skipped"
    reason: str
    state: State

    def describe(self) -> str:
        return self.reason


class Validated(_Result):
    result: Literal["validated"] = "validated"
    passed: bool
    reasons: list[str]

    def describe(self) -> str:
        return "passed" if self.passed else "failed: " + "; ".join(self.reasons)[:400]


class Signed(_Result):
    result: Literal["signed"] = "signed"
    digest: str

    def describe(self) -> str:
        return f"signature {self.digest[:23]}"


class Rejected(_Result):
    result: Literal["rejected"] = "rejected"
    reason: str

    def describe(self) -> str:
        return f"rejected: {self.reason}"[:400]


class ReadinessWait(BaseModel):
    """What a slow backend (kserve) hands over to wait on before the stage's window starts."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    targets: list[dict[str, Any]]


class Routed(_Result):
    """A stage's traffic is set: its analysis window and how the wait polls it."""

    result: Literal["routed"] = "routed"
    stage: Stage
    since: float
    window_seconds: float
    max_extensions: int
    poll_seconds: float
    readiness: ReadinessWait | None = None
    serving_status: dict[str, Any] | None = None  # the backend's account of the split, once it serves it

    def describe(self) -> str:
        return (
            f"{self.stage}: {self.stage.weight}% of traffic to the candidate"
            if not self.stage.is_shadow
            else "shadow: every request mirrored to the candidate"
        )


class Recorded(_Result):
    """The verdict that ended a stage's wait, kept with the release, and the stage's drift summary."""

    result: Literal["recorded"] = "recorded"
    stage: Stage
    decision: Decision
    reason: str
    drift: dict[str, Any] | None = None

    def describe(self) -> str:
        return f"{self.decision.value}: {self.reason}"[:400]


class Ended(_Result):
    """Promotion, rollback or abort done: the release's final state and why."""

    result: Literal["ended"] = "ended"
    state: State
    reason: str | None = None

    def describe(self) -> str:
        return f"{self.state.value}: {self.reason}"[:400] if self.reason else self.state.value


class Summary(_Result):
    """The release as a person reads it: outcome, reasons, verdicts, durations (the `finish` step's answer)."""

    result: Literal["summary"] = "summary"
    release_id: str
    model: str
    candidate: str
    champion: str | None
    state: State
    decision: Outcome | None
    reasons: list[str]
    verdicts: list[Verdict]
    policy: str | None
    started_at: float
    ended_at: float | None
    duration_seconds: float | None
    reports: str | None = None

    def describe(self) -> str:
        reason = self.reasons[-1] if self.reasons else ""
        return f"{self.state.value}: {reason}"[:400] if reason else self.state.value


StepResult = Annotated[
    Opened | Skipped | Validated | Signed | Rejected | Routed | Recorded | Ended | Summary,
    Field(discriminator="result"),
]
_ADAPTER: TypeAdapter[StepResult] = TypeAdapter(StepResult)


def parse(value: object) -> StepResult | None:
    """A step's XCom back as its result; None for a value no step of a release returns."""
    if not isinstance(value, dict) or "result" not in value:
        return None
    try:
        return _ADAPTER.validate_python(value)
    except ValueError:
        return None
