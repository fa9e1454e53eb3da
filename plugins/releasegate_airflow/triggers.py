"""The deferrable wait: polls releasegate's analysis in the triggerer, holding no worker slot."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent

DECISIVE = {"promote", "rollback", "invalid"}
# The operator has just looked; the trigger's first look waits until the scheduler has surely processed
# the deferral (a trigger firing before that makes Airflow 3.3 fail the resumed task).
FIRST_LOOK_AFTER_SECONDS = 10.0


class AnalysisTrigger(BaseTrigger):
    """Re-run the analysis every poll interval until it decides or the window (and its extensions) ends.

    The statistics are always-valid (sequential), so looking this often does not inflate errors.
    """

    def __init__(self, release_id: str, analysis_stage: str, since: float, candidate_weight: int,
                 window_seconds: float, max_extensions: int, poll_seconds: float):
        super().__init__()
        self.release_id = release_id
        self.analysis_stage = analysis_stage
        self.since = since
        self.candidate_weight = candidate_weight
        self.window_seconds = window_seconds
        self.max_extensions = max_extensions
        self.poll_seconds = poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "release_id": self.release_id, "analysis_stage": self.analysis_stage, "since": self.since,
            "candidate_weight": self.candidate_weight, "window_seconds": self.window_seconds,
            "max_extensions": self.max_extensions, "poll_seconds": self.poll_seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from releasegate import pipeline

        deadline = self.since + self.window_seconds
        extensions = 0
        await asyncio.sleep(max(self.poll_seconds, FIRST_LOOK_AFTER_SECONDS))
        while True:
            closed = time.time() >= deadline
            final = closed and extensions >= self.max_extensions
            verdict = await asyncio.to_thread(pipeline.poll, self.release_id, self.analysis_stage, self.since,
                                              self.candidate_weight, final)
            if verdict["decision"] in DECISIVE or final:
                verdict["extensions"] = extensions
                yield TriggerEvent(verdict)
                return
            if closed:
                extensions += 1
                deadline += self.window_seconds
                self.log.info("window of %s ended undecided: extension %d of %d", self.analysis_stage,
                              extensions, self.max_extensions)
            else:
                self.log.info("%s: %s", self.analysis_stage, verdict["reason"])
            await asyncio.sleep(self.poll_seconds)
