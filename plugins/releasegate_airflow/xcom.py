"""The one place where releasegate's typed step results become XCom JSON, and XCom JSON becomes them again."""

from __future__ import annotations

from typing import Any, TypeVar

from airflow.sdk.exceptions import AirflowSkipException
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def push(result: BaseModel) -> dict[str, Any]:
    """A step's result as its task's XCom; a `Skipped` step becomes a skipped task."""
    from releasegate.results import Skipped

    if isinstance(result, Skipped):
        raise AirflowSkipException(result.reason)
    return result.model_dump(mode="json")


def pull(kind: type[M], value: Any) -> M:
    """An upstream task's XCom back as the result it was."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise AirflowSkipException(f"no {kind.__name__.lower()} upstream (the task that makes it was skipped)")
    return kind.model_validate(value)
