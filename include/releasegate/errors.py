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


def describe(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most `limit` characters: its type and first line, and its root cause's.

    A reason is a sentence, not a dump: some libraries put whole data frames into their messages.
    """
    text = _named(exc)
    root = exc
    for _ in range(20):  # a hand-made cycle of causes must not hang the validate step
        inner = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if inner is None:
            break
        root = inner
    if root is not exc and _first_line(root) not in _first_line(exc):
        # Wrappers such as MLflow's schema error print the whole input before the cause: the cause is the point.
        cause = f" (cause: {_clip(_named(root), limit // 2)})"
        text = _clip(text, limit - len(cause)) + cause
    return _clip(text, limit)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def _named(exc: BaseException) -> str:
    message = _first_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
