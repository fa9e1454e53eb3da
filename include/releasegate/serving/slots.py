"""Model slots: one loaded, verified and warmed MLflow pyfunc per (model, version), with micro-batching.

Requests hand their rows to the slot's queue; one batcher task per slot collects rows for at
most `max_wait` seconds or `max_rows` rows, builds one DataFrame and makes one predict call in a
worker thread, then resolves each request's future with its slice of the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import chain

from releasegate.serving.payloads import Rows, Schema

log = logging.getLogger(__name__)

_PLACEHOLDER = {"boolean": False, "integer": 0, "long": 0, "float": 0.0, "double": 0.0, "string": "",
                "datetime": "1970-01-01T00:00:00"}


class LoadError(Exception):
    """A version that cannot serve: unsigned, tampered, missing, or failing its warm-up predict."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class ModelCallError(Exception):
    """A predict call that raised or answered with the wrong shape."""


@dataclass
class _Job:
    rows: Rows
    future: asyncio.Future


def _outputs(result, n: int, label: str) -> list:
    """One JSON-ready prediction per input row, or ModelCallError."""
    import numpy as np
    import pandas as pd

    if isinstance(result, pd.DataFrame):
        values = result.iloc[:, 0].tolist() if result.shape[1] == 1 else result.to_dict(orient="records")
    elif isinstance(result, (pd.Series, np.ndarray)):
        values = result.tolist()
    elif isinstance(result, list):
        values = result
    else:
        raise ModelCallError(f"{label} returned {type(result).__name__}, not one prediction per row")
    if len(values) != n:
        raise ModelCallError(f"{label} returned {len(values)} predictions for {n} rows")
    return values


class Slot:
    """A served version: its pyfunc, input schema and batcher."""

    def __init__(self, model: str, version: str, pyfunc, schema: Schema, metrics, executor: Executor,
                 max_rows: int = 64, max_wait: float = 0.002):
        self.model = model
        self.version = version
        self.label = f"{model} v{version}"
        self.schema = schema
        self._pyfunc = pyfunc
        self._executor = executor
        self._max_rows = max_rows
        self._max_wait = max_wait
        self._batch_rows = metrics.batch_rows.labels(model, version)
        self._pending: deque[_Job] = deque()
        self._pending_rows = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # --- synchronous part, runs in worker threads -------------------------------------------

    def call(self, jobs: list[Rows]) -> list:
        """One predict over the rows of all `jobs` (one DataFrame), answers concatenated."""
        import numpy as np
        import pandas as pd

        names = self.schema.names or list(jobs[0].columns)
        dtypes = {c.name: c.dtype for c in self.schema.columns} if self.schema.columns else {}
        data = {}
        for name in names:
            values = jobs[0].columns[name] if len(jobs) == 1 else list(
                chain.from_iterable(j.columns[name] for j in jobs))
            dtype = dtypes.get(name)
            if dtype and dtype != "object" and None not in values:
                values = np.asarray(values, dtype=dtype)
            data[name] = values
        frame = pd.DataFrame(data, columns=names)
        n = len(frame)
        try:
            result = self._pyfunc.predict(frame)
        except Exception as err:
            raise ModelCallError(f"{self.label} predict failed: {type(err).__name__}: {err}") from err
        return _outputs(result, n, self.label)

    def warm(self, example: Rows | None) -> None:
        """One predict before the slot takes traffic (the input example, else a row from the signature)."""
        if example is None:
            if not self.schema.columns:
                raise LoadError(f"{self.label} has neither an input example nor a column signature to warm up with")
            example = Rows({c.name: [_PLACEHOLDER.get(c.kind, None)] for c in self.schema.columns}, 1)
        try:
            self.call([example])
        except Exception as err:
            raise LoadError(f"warm-up predict failed for {self.label}: {err}") from err

    # --- the batcher, on the event loop ---------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher {self.label}")

    def close(self) -> None:
        """Stop after the queued requests are answered (requests that hold the slot still get answers)."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()

    async def predict(self, rows: Rows) -> list:
        """This request's predictions, one per row, computed in a shared batch."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            return await loop.run_in_executor(self._executor, self.call, [rows])
        future = loop.create_future()
        self._pending.append(_Job(rows, future))
        self._pending_rows += rows.n
        self._wake.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._pending_rows < self._max_rows and self._max_wait > 0:
                await asyncio.sleep(self._max_wait)  # let requests already on their way join this batch
            jobs: list[_Job] = []
            rows = 0
            while self._pending and (not jobs or rows + self._pending[0].rows.n <= self._max_rows):
                job = self._pending.popleft()
                self._pending_rows -= job.rows.n
                if job.future.done():  # the caller gave up (timeout) before the batch ran
                    continue
                jobs.append(job)
                rows += job.rows.n
            if not jobs:
                continue
            try:
                await self._answer(loop, jobs, rows)
            except Exception as err:  # never let the batcher die: fail these requests instead
                log.exception("batcher of %s", self.label)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ModelCallError(f"{self.label}: {err}"))

    async def _answer(self, loop, jobs: list[_Job], rows: int) -> None:
        self._batch_rows.observe(rows)
        try:
            values = await loop.run_in_executor(self._executor, self.call, [j.rows for j in jobs])
        except Exception as err:
            if len(jobs) == 1:
                _settle(jobs[0].future, error=err)
                return
            # One bad request must not fail its neighbours: answer each on its own.
            for job in jobs:
                try:
                    _settle(job.future, await loop.run_in_executor(self._executor, self.call, [job.rows]))
                except Exception as one_err:
                    _settle(job.future, error=one_err)
            return
        start = 0
        for job in jobs:
            _settle(job.future, values[start:start + job.rows.n])
            start += job.rows.n


def _settle(future: asyncio.Future, value=None, error: Exception | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error if isinstance(error, ModelCallError) else ModelCallError(str(error)))
    else:
        future.set_result(value)


def load_slot(model: str, version: str, settings, metrics, executor: Executor, *, max_rows: int = 64,
              max_wait: float = 0.002) -> Slot:
    """Fetch + verify (registry.fetch_verified), load from that same directory, warm. Blocking: run in a thread."""
    from releasegate import registry, signing

    label = f"{model} v{version}"
    try:
        model_dir = registry.fetch_verified(model, version, settings)
    except signing.SignatureError as err:
        raise LoadError(f"signature verification failed for {label}: {err}") from err
    except registry.RegistryError as err:
        raise LoadError(f"{label} is not in the model registry: {err}", 404) from err
    try:
        pyfunc = registry.load_pyfunc(model_dir)
    except Exception as err:
        raise LoadError(f"could not load {label} from {model_dir}: {type(err).__name__}: {err}") from err
    schema = Schema.from_mlflow(pyfunc.metadata.get_input_schema())
    slot = Slot(model, version, pyfunc, schema, metrics, executor, max_rows=max_rows, max_wait=max_wait)
    slot.warm(_example_rows(pyfunc, model_dir))
    return slot


def _example_rows(pyfunc, model_dir) -> Rows | None:
    import pandas as pd

    try:
        example = pyfunc.metadata.load_input_example(str(model_dir))
    except Exception:  # a missing or unreadable example: warm up from the signature instead
        log.warning("input example of %s unreadable; warming up from the signature", model_dir, exc_info=True)
        return None
    if isinstance(example, pd.DataFrame) and len(example):
        return Rows(example.head(1).to_dict(orient="list"), 1)
    return None
