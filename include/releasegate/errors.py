"""The exceptions callers catch by meaning, never by message (docs/architecture.md, "Errors").

A release's tasks tell three kinds of failure apart: the candidate's own fault (the release is
rejected or rolled back, with the reason), a dependency that failed (the task fails, Airflow may
retry it, and the release ends `failed` with the champion restored), and contention that a retry
resolves by itself.
"""

from __future__ import annotations


class ReleasegateError(Exception):
    """Any error releasegate raises on purpose."""


class InfrastructureError(ReleasegateError):
    """A service releasegate depends on (MLflow, its database, a gateway, Kubernetes) failed or was unreachable.

    Never a verdict on the model: the task fails instead of rejecting the candidate.
    """


class TransientStorageError(InfrastructureError):
    """Contention in releasegate's database (a concurrent writer won, a lock was held): the same work, retried, succeeds."""


class DeploymentError(ReleasegateError):
    """A serving target refused or failed a traffic change; the message is the target's own explanation."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class SignatureRefused(DeploymentError):
    """The serving target refused the candidate because its signature does not verify: the release is rejected."""


def sentence(err: BaseException, limit: int = 300) -> str:
    """An exception as one line a person reads in a reason: whitespace collapsed, at most `limit` characters.

    Some libraries put whole data frames into their messages; a reason is a sentence, not a dump.
    """
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
