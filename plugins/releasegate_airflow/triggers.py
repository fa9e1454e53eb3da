"""The deferrable waits: poll releasegate's analysis in the triggerer, holding no worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

# The operator has just looked; the trigger's first look waits until the scheduler has surely processed
# the deferral (docs/architecture.md, "Deferral").
FIRST_LOOK_AFTER_SECONDS = 10.0


def trigger_event(payload: dict[str, Any]) -> TriggerEvent:
    """The event a trigger fires, carrying `payload` (JSON) back to the deferred task."""
    return TriggerEvent(payload)  # type: ignore[no-untyped-call]  # Airflow leaves TriggerEvent.__init__ unannotated


class AnalysisTrigger(BaseTrigger):
    """Re-run the analysis every poll interval until it decides or the window (and its extensions) ends.

    The statistics are always-valid (sequential), so looking this often does not inflate errors.
    `route` is the stage's `Routed` result as JSON (what the route task pushed).
    """

    def __init__(self, release_id: str, route: dict[str, Any]):
        super().__init__()  # type: ignore[no-untyped-call]  # Airflow leaves BaseTrigger.__init__ unannotated
        self.release_id = release_id
        self.route = route

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"release_id": self.release_id, "route": self.route},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from releasegate import pipeline
        from releasegate.results import Routed

        route = Routed.model_validate(self.route)
        deadline = route.since + route.window_seconds
        extensions = 0
        await asyncio.sleep(max(route.poll_seconds, FIRST_LOOK_AFTER_SECONDS))
        while True:
            closed = time.time() >= deadline
            final = closed and extensions >= route.max_extensions
            verdict = await asyncio.to_thread(pipeline.poll, self.release_id, route.stage, route.since, final)
            if verdict.decision.decisive or final:
                yield trigger_event(verdict.model_copy(update={"extensions": extensions}).model_dump(mode="json"))
                return
            if closed:
                extensions += 1
                deadline += route.window_seconds
                self.log.info(
                    "window of %s ended undecided: extension %d of %d", route.stage, extensions, route.max_extensions
                )
            else:
                self.log.info("%s: %s", route.stage, verdict.reason)
            await asyncio.sleep(route.poll_seconds)


class WatchTrigger(BaseTrigger):
    """Re-run the watch's analysis every poll interval until a limit is crossed or the watch ends.

    `watching` is pipeline.Watching as JSON (from when, for how long, how often).
    """

    def __init__(self, watching: dict[str, Any]):
        super().__init__()  # type: ignore[no-untyped-call]  # Airflow leaves BaseTrigger.__init__ unannotated
        self.watching = watching

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {"watching": self.watching})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from releasegate import pipeline

        watch = pipeline.Watching.model_validate(self.watching)
        deadline = watch.since + watch.seconds
        while True:
            final = time.time() >= deadline
            verdict = await asyncio.to_thread(pipeline.watch_poll, watch.release_id, watch.since, final)
            if verdict.decision.decisive or final:
                yield trigger_event(verdict.model_dump(mode="json"))
                return
            self.log.info("watch: %s", verdict.reason)
            await asyncio.sleep(min(watch.poll_seconds, max(deadline - time.time(), 0.0)))


class ExperimentTrigger(BaseTrigger):
    """Look at an experiment's evidence every poll interval (stopping the arms a guard shows clearly worse) until
    it is decided or its time is up. `started` is experiments.Started as JSON."""

    def __init__(self, started: dict[str, Any]):
        super().__init__()  # type: ignore[no-untyped-call]  # Airflow leaves BaseTrigger.__init__ unannotated
        self.started = started

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {"started": self.started})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from releasegate import experiments

        started = experiments.Started.model_validate(self.started)
        await asyncio.sleep(min(started.poll_seconds, max(started.deadline - time.time(), 0.0)))
        while True:
            final = time.time() >= started.deadline
            look = await asyncio.to_thread(experiments.look, started.experiment_id, final)
            if look.done:
                yield trigger_event(look.model_dump(mode="json"))
                return
            self.log.info("experiment %s: %s", started.experiment_id, look.decision.reason)
            await asyncio.sleep(min(started.poll_seconds, max(started.deadline - time.time(), 0.0)))
