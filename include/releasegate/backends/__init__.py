"""Deployment targets: one small interface, implemented by the local gateway (and KServe)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class DeploymentError(RuntimeError):
    """The target refused or failed a change; the message is the target's own explanation."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@runtime_checkable
class Backend(Protocol):
    """Where a model's traffic split is set and read."""

    def set_route(self, model: str, champion_version: str, candidate_version: str | None = None,
                  mode: str = "single", candidate_weight: int = 0, release_id: str | None = None) -> dict:
        """Apply the split; returns the route once traffic follows it, or raises DeploymentError."""
        ...

    def get_route(self, model: str) -> dict | None:
        """The split traffic follows now, or None when the model has no route."""
        ...
