"""A slot's micro-batch: a failed batch call is retried request by request, and the answers say so; pending work
is bounded (a full queue refuses at once, a request past its deadline fails and leaves the queue)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import mlflow.pyfunc
import pandas as pd
import pytest

from releasegate.serving.metrics import Metrics
from releasegate.serving.payloads import Rows, Schema
from releasegate.serving.slots import Measured, ModelCallError, Retried, Slot


class Poisoned(mlflow.pyfunc.PythonModel):
    """Doubles x; a call that holds x == 77 raises."""

    def predict(self, context, model_input, params=None):
        if (model_input["x"] == 77).any():
            raise RuntimeError("refuses x 77")
        return (model_input["x"] * 2).tolist()


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    """A real MLflow pyfunc directory, loaded as the gateway loads it."""
    path = tmp_path_factory.mktemp("poisoned") / "model"
    mlflow.pyfunc.save_model(path, python_model=Poisoned(), input_example=pd.DataFrame({"x": [1, 2]}))
    return mlflow.pyfunc.load_model(str(path))


@pytest.fixture
def slot(pyfunc):
    slot = Slot(
        "m",
        "1",
        pyfunc,
        Schema.from_mlflow(pyfunc.metadata.get_input_schema()),
        Metrics(),
        ThreadPoolExecutor(2),
        max_wait=0.01,
    )
    slot.warm(None)
    return slot


def _batch(slot: Slot, xs: list[int]) -> list:
    """The outcome of each one-row request, all submitted before the batcher runs (so they share a call)."""

    async def serve():
        slot.start()
        try:
            return await asyncio.gather(*(slot.predict(Rows({"x": [x]}, 1), 30) for x in xs), return_exceptions=True)
        finally:
            slot.close()

    return asyncio.run(serve())


def test_a_batch_that_answers_gives_plain_answers_with_their_cpu_time(slot):
    answers = _batch(slot, [1, 2, 3])
    assert answers == [[2], [4], [6]] and all(type(a) is Measured for a in answers)  # not Retried: status ok
    assert len({a.cpu_ms for a in answers}) == 1 and answers[0].cpu_ms > 0  # the batch's CPU time, per row


def test_a_poisoned_request_fails_alone_and_its_neighbours_answers_carry_the_failed_call(slot):
    answers = _batch(slot, [1, 77, 3, 4])
    assert isinstance(answers[1], ModelCallError) and "refuses x 77" in str(answers[1])
    neighbours = [answers[0], answers[2], answers[3]]
    assert neighbours == [[2], [6], [8]]
    assert all(type(a) is Retried and "m v1 predict failed: RuntimeError: refuses x 77" in a.error for a in neighbours)


def test_a_request_alone_in_its_call_is_not_retried(slot):
    [answer] = _batch(slot, [77])
    assert isinstance(answer, ModelCallError)


class Hanging(mlflow.pyfunc.PythonModel):
    """Doubles x; a call holding x == 99 hangs until HANG is set (at most 30 s)."""

    def predict(self, context, model_input, params=None):
        if (model_input["x"] == 99).any():
            HANG.wait(30)
        return (model_input["x"] * 2).tolist()


HANG = threading.Event()


@pytest.fixture
def hanging_slot(tmp_path):
    path = tmp_path / "model"
    mlflow.pyfunc.save_model(path, python_model=Hanging(), input_example=pd.DataFrame({"x": [1, 2]}))
    pyfunc = mlflow.pyfunc.load_model(str(path))
    HANG.clear()
    slot = Slot(
        "h",
        "1",
        pyfunc,
        Schema.from_mlflow(pyfunc.metadata.get_input_schema()),
        Metrics(),
        ThreadPoolExecutor(2),
        max_wait=0.001,
        max_queue_rows=5,
    )
    slot.warm(None)
    yield slot
    HANG.set()


def test_requests_behind_a_hanging_call_time_out_and_leave_the_queue(hanging_slot):
    from releasegate.serving.slots import CallTimeout, QueueFull

    slot = hanging_slot

    async def serve():
        slot.start()
        try:
            stuck = asyncio.ensure_future(slot.predict(Rows({"x": [99]}, 1), 0.3))
            await asyncio.sleep(0.05)  # its batch is in the model now, hanging
            waiting = [asyncio.ensure_future(slot.predict(Rows({"x": [i]}, 1), 0.3)) for i in range(5)]
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFull, match="5 rows waiting"):
                await slot.predict(Rows({"x": [7]}, 1), 0.3)  # a full queue fails at once
            outcomes = await asyncio.gather(stuck, *waiting, return_exceptions=True)
            queued_after = slot.queued_rows
            HANG.set()
            return outcomes, queued_after
        finally:
            slot.close()

    outcomes, queued_after = asyncio.run(asyncio.wait_for(serve(), 10))
    assert all(isinstance(o, CallTimeout) and "h v1 took longer than 0.3s" in str(o) for o in outcomes), outcomes
    assert queued_after == 0  # the timed-out requests left the queue though the model still hangs


def test_a_cancelled_request_leaves_the_queue_at_once(hanging_slot):
    slot = hanging_slot

    async def serve():
        slot.start()
        try:
            stuck = asyncio.ensure_future(slot.predict(Rows({"x": [99]}, 1), 5))
            await asyncio.sleep(0.05)
            waiting = asyncio.ensure_future(slot.predict(Rows({"x": [1]}, 3), 5))
            await asyncio.sleep(0.01)
            before = slot.queued_rows
            waiting.cancel()
            await asyncio.sleep(0)
            after = slot.queued_rows
            HANG.set()
            await stuck
            return before, after
        finally:
            slot.close()

    assert asyncio.run(asyncio.wait_for(serve(), 10)) == (3, 0)
