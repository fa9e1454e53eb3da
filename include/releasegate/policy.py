"""Release policies: typed, loaded from YAML in include/policies/, stored resolved with each release."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class PolicyError(ValueError):
    """A policy file that is missing or does not validate; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Inconclusive(StrEnum):
    """What follows a verdict that the evidence cannot decide at the end of a window."""

    extend = "extend"  # extend the window, up to max_extensions times, then roll back
    approve = "approve"  # hold for a human approval
    rollback = "rollback"


class Offline(_Strict):
    """Holdout comparison of the candidate with the champion before any traffic."""

    metric: Literal["accuracy", "log_loss", "roc_auc", "mae", "rmse"] = "accuracy"
    margin: float = Field(
        default=0.01, ge=0, description="Non-inferiority margin: candidate may be worse by at most this."
    )
    min_rows: int = Field(default=200, ge=1)


class Shadow(_Strict):
    max_window_seconds: float = Field(default=600, gt=0)
    min_samples: int = Field(default=300, ge=1, description="Labelled mirrored requests needed before a decision.")
    min_agreement: float = Field(
        default=0.8,
        ge=0,
        lt=1,
        description="Share of mirrored requests where both arms agree; 0 turns the agreement check off.",
    )
    agreement_tolerance: float | None = Field(
        default=None,
        ge=0,
        description="Regression: two answers agree when they differ by at most this, in target units. "
        "Unset, a regressor's release has no agreement check (exact equality of two "
        "regressors' outputs means nothing).",
    )


class Canary(_Strict):
    steps: list[int] = Field(default_factory=lambda: [5, 25, 50])
    max_window_seconds: float = Field(default=600, gt=0)
    min_samples: int = Field(default=200, ge=1, description="Labelled requests per arm needed before a decision.")

    @field_validator("steps")
    @classmethod
    def _increasing_percentages(cls, steps: list[int]) -> list[int]:
        if not steps or any(not 0 < s < 100 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("canary steps must be increasing percentages between 1 and 99")
        return steps


class Guardrails(_Strict):
    error_rate_margin: float = Field(
        default=0.01, ge=0, description="Absolute: candidate error rate may exceed the champion's by this."
    )
    latency_p99_margin: float = Field(
        default=0.5, ge=0, description="Relative: candidate p99 may exceed the champion's by this share."
    )
    latency_p99_slack_ms: float = Field(
        default=5.0,
        ge=0,
        description="Absolute: a candidate p99 within this many ms of the "
        "champion's is never too slow (at sub-millisecond p99s a relative margin "
        "measures scheduling noise, not the model).",
    )

    def latency_limit_ms(self, champion_p99_ms: float) -> float:
        """The latency a candidate request may take: the larger of the relative and the absolute allowance."""
        return max((1 + self.latency_p99_margin) * champion_p99_ms, champion_p99_ms + self.latency_p99_slack_ms)

    def latency_limit_text(self, champion_p99_ms: float) -> str:
        return (
            f"limit {self.latency_limit_ms(champion_p99_ms):.1f} ms = the larger of {1 + self.latency_p99_margin:g} "
            f"× and +{self.latency_p99_slack_ms:g} ms over champion p99 {champion_p99_ms:.1f} ms"
        )


REGRESSION_METRICS = frozenset({"absolute_error", "squared_error", "mae", "rmse"})


class Primary(_Strict):
    metric: Literal["accuracy", "log_loss", "absolute_error", "squared_error"] = "accuracy"
    margin: float = Field(
        default=0.02,
        ge=0,
        description="Non-inferiority margin on the feedback-labelled metric "
        "(accuracy: a share; absolute_error, squared_error: target units).",
    )


class Approval(_Strict):
    required: bool = False
    timeout_seconds: float = Field(default=3600, gt=0, description="No answer by then rolls the release back.")
    approvers: list[str] = Field(
        default_factory=list, description="Airflow user ids who may answer; empty: any user allowed to act on the DAG."
    )
    separate_duties: bool = Field(
        default=False,
        description="The Airflow user who triggered the release may not approve it (they may still roll it back).",
    )

    def refuses(self, approver: str | None, triggered_by: str | None) -> bool:
        """Whether an approval by `approver` of a release `triggered_by` started breaks the separation of duties."""
        return self.separate_duties and approver is not None and approver == triggered_by


class Watch(_Strict):
    """The watch after promotion (docs/decisions.md, "After promotion"): the new champion against its own canary."""

    seconds: float = Field(
        default=0,
        ge=0,
        description="How long the previous champion stays loaded while the new one is watched; 0: no watch.",
    )
    min_requests: int = Field(
        default=200, ge=30, description="Requests the new champion answers before a limit can be judged crossed."
    )


class ExperimentWinner(_Strict):
    """A release of an experiment's winner (docs/experiments.md, "The winner's release")."""

    skip_shadow_and_canary: bool = Field(
        default=False,
        description="The winner of a concluded experiment against the same champion goes from validation straight "
        "to the decision (and approval, where required): the experiment's result on live traffic is its evidence. "
        "No watch follows its promotion (the watch compares with a canary). Off: shadow and canary as for any "
        "candidate.",
    )


class DriftWatch(_Strict):
    """The near-real-time drift watch: the nightly's drift tests on each champion's last minutes of traffic."""

    schedule: str = Field(default="*/5 * * * *", description="Cron expression (UTC) of the drift watch.")
    window_minutes: float = Field(default=15, gt=0, description="How much recent traffic each watch reads.")
    max_rows: int = Field(default=5000, ge=1, description="Requests sampled from the window at most.")
    min_rows: int = Field(
        default=200, ge=1, description="Requests a window needs before it is tested; fewer and the model is skipped."
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str) -> str:
        return _valid_cron(schedule)


class Monitoring(_Strict):
    """The nightly evaluation of a champion's logged traffic: when it runs and what raises the alarm."""

    schedule: str = Field(default="0 3 * * *", description="Cron expression (UTC) of the nightly evaluation.")
    window_hours: float = Field(default=24, gt=0, description="How much recent traffic each evaluation reads.")
    max_drifted_share: float = Field(
        default=0.2, ge=0, le=1, description="Alarm above this share of drifted input columns."
    )
    max_accuracy_drop: float = Field(
        default=0.05,
        ge=0,
        description="Alarm when labelled live accuracy falls this far below the version's accuracy on its holdout.",
    )
    min_labelled: int = Field(default=200, ge=1, description="Labelled requests needed before quality is judged.")
    watch: DriftWatch = DriftWatch()

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str) -> str:
        return _valid_cron(schedule)


def _valid_cron(schedule: str) -> str:
    from croniter import croniter

    if not croniter.is_valid(schedule):
        raise ValueError(f"not a cron expression: {schedule!r}")
    return schedule


class Policy(_Strict):
    """A release policy. Unknown fields are errors, so a typo never silently loosens a gate."""

    name: str
    description: str = ""
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Error level of the always-valid bounds.")
    srm_p_value: float = Field(default=0.001, gt=0, lt=1, description="Sample-ratio-mismatch alarm level.")
    poll_seconds: float = Field(default=5, gt=0)
    offline: Offline = Offline()
    shadow: Shadow = Shadow()
    canary: Canary = Canary()
    guardrails: Guardrails = Guardrails()
    primary: Primary = Primary()
    slices: list[str] = Field(default_factory=list, description="Categorical features analysed per value.")
    inconclusive: Inconclusive = Inconclusive.extend
    max_extensions: int = Field(default=2, ge=0)
    approval: Approval = Approval()
    watch: Watch = Watch()
    experiment_winner: ExperimentWinner = ExperimentWinner()
    monitoring: Monitoring = Monitoring()

    @model_validator(mode="after")
    def _one_task(self) -> Policy:
        offline, online = self.offline.metric in REGRESSION_METRICS, self.primary.metric in REGRESSION_METRICS
        if offline != online:
            raise ValueError(
                f"offline.metric {self.offline.metric} and primary.metric {self.primary.metric} "
                f"judge different kinds of model (classification: accuracy, log_loss, roc_auc; "
                f"regression: mae, rmse offline, absolute_error, squared_error online)"
            )
        return self

    @property
    def regression(self) -> bool:
        """Whether the policy judges a regressor (its primary metric is an error in target units)."""
        return self.primary.metric in REGRESSION_METRICS

    @property
    def agreement_checked(self) -> bool:
        """Shadow compares the arms' answers: labels for equality, a regressor's values within the tolerance."""
        if self.regression:
            return self.shadow.agreement_tolerance is not None and self.shadow.min_agreement > 0
        return self.shadow.min_agreement > 0

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def available(policy_dirs: Path | list[Path] | None = None) -> list[str]:
    """Names of the policies on the search path (the user's folders, then the shipped one)."""
    return sorted({p.stem for folder in _dirs(policy_dirs) for p in folder.glob("*.yaml")})


def experiment_designs(policy_dirs: Path | list[Path] | None = None) -> list[str]:
    """Names of the experiment designs (`experiments/<name>.yaml` in each policies folder; releasegate.experiments)."""
    return sorted({p.stem for folder in _dirs(policy_dirs) for p in (folder / "experiments").glob("*.yaml")})


def find(name: str, policy_dirs: Path | list[Path] | None = None) -> Path | None:
    """The first `<name>.yaml` on the search path."""
    return next((folder / f"{name}.yaml" for folder in _dirs(policy_dirs) if (folder / f"{name}.yaml").is_file()), None)


def load(name_or_path: str | Path, policy_dirs: Path | list[Path] | None = None) -> Policy:
    """Load a policy by name (from the search path) or by path; errors name the offending field."""
    given = Path(name_or_path)
    path = given if given.suffix else find(str(name_or_path), policy_dirs)
    if path is None or not path.is_file():
        folders = ", ".join(str(d) for d in _dirs(policy_dirs))
        raise PolicyError(
            f"policy {str(name_or_path)!r} not found in {folders} "
            f"(known: {', '.join(available(policy_dirs)) or 'none'}; RELEASEGATE_POLICIES_DIR adds "
            f"folders of your own)"
        )
    return parse(read_named(path, "policy", PolicyError), source=path.name)


def read_named(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """A policy-like YAML file's mapping, its `name` defaulting to the file's stem; `error` names a bad one."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {path.name}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{what} {path.name}: a mapping of fields expected, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def parse(data: dict[str, Any], source: str = "policy") -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise PolicyError(f"{source}: {problems}") from exc


def _dirs(policy_dirs: Path | list[Path] | None) -> list[Path]:
    if policy_dirs is not None:
        return [policy_dirs] if isinstance(policy_dirs, Path) else list(policy_dirs)
    from releasegate.settings import get_settings

    return get_settings().policy_dirs
