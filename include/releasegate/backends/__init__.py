"""Deployment targets: one small interface, implemented by the local gateway and by KServe."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from releasegate.contract import BACKEND_TAG, Mode
from releasegate.errors import DeploymentError, SignatureRefused
from releasegate.results import ReadinessWait

__all__ = ["Applied", "ArmWeight", "Backend", "BackendKind", "DeploymentError", "SignatureRefused", "backend_kind"]


class BackendKind(StrEnum):
    local = "local"  # releasegate's own gateway
    kserve = "kserve"  # KServe InferenceServices behind Istio


class Applied(BaseModel):
    """A traffic split a backend applied: serving now, or (a slow backend) with a readiness to wait on."""

    model: str
    champion_version: str
    candidate_version: str | None
    mode: Mode
    candidate_weight: int
    release_id: str | None
    arms: list[ArmWeight] | None = None  # an experiment's arms besides the champion
    revision: int | str | None = None
    readiness: ReadinessWait | None = None
    status: dict[str, Any] | None = None


class ArmWeight(BaseModel):
    """An experiment's arm besides the control: its version, its percent of the traffic, whether it is stopped
    (its traffic back to the control)."""

    version: str
    weight: int
    stopped: bool = False


@runtime_checkable
class Backend(Protocol):
    """Where a model's traffic split is set and read."""

    def set_route(
        self,
        model: str,
        champion_version: str,
        candidate_version: str | None = None,
        mode: Mode = Mode.single,
        candidate_weight: int = 0,
        release_id: str | None = None,
        arms: list[ArmWeight] | None = None,
    ) -> Applied:
        """Apply the split; returns once traffic follows it (or with a readiness), else DeploymentError.
        An experiment (mode `experiment`) gives its `arms` besides the champion and its id as `release_id`.

        A candidate refused for its signature raises SignatureRefused.
        """
        ...

    def get_route(self, model: str) -> Applied | None:
        """The split traffic follows now, or None when the model has no route."""
        ...


def backend_kind(model: str) -> BackendKind:
    """The registered model's tag `releasegate.backend`, else RELEASEGATE_BACKEND (default local).

    Where a model is served is a fact about the model, not about a release policy.
    """
    from releasegate import registry
    from releasegate.settings import get_settings

    try:
        kind = registry.get_model_tags(model).get(BACKEND_TAG)
    except registry.RegistryError:
        kind = None
    kind = kind or get_settings().backend
    try:
        return BackendKind(kind)
    except ValueError:
        raise DeploymentError(
            f"unknown backend {kind!r} for model {model!r} (registered-model tag {BACKEND_TAG} "
            f"or RELEASEGATE_BACKEND): use local or kserve"
        ) from None
