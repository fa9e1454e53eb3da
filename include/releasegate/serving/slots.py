"""Model slots: one loaded, verified and warmed MLflow pyfunc per (model, version), with micro-batching.

Requests hand their rows to the slot's queue; one batcher task per slot collects rows for at
most `max_wait` seconds or `max_rows` rows and makes one predict call, then resolves each
request's future with its slice of the answer. A plain sklearn model that skl2onnx converts
(and whose graph agrees with it, see `compiled`) predicts on the event loop from the column
lists, in microseconds and without the GIL; any other model gets one DataFrame per batch and
predicts in a worker thread.

Pending work is bounded: a request that would put more than `max_queue_rows` rows in the queue
fails at once (`QueueFull`), and a request not answered by its deadline fails (`CallTimeout`) and
leaves the queue, whether it was waiting or its batch is stuck in a hanging predict call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import chain
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from releasegate.contract import ErrorCode
from releasegate.serving import compiled
from releasegate.serving.breaker import Breaker
from releasegate.serving.payloads import V2_DATATYPES, Rows, Schema
from releasegate.signing import VerifiedModel

if TYPE_CHECKING:
    from pathlib import Path

    from mlflow.pyfunc import PyFuncModel
    from mlflow.types import Schema as MlflowSchema
    from mlflow.types import TensorSpec
    from numpy.typing import NDArray
    from pandas import DataFrame

    from releasegate.serving.metrics import Metrics
    from releasegate.settings import Settings

log = logging.getLogger(__name__)

# A warm-up value per column kind (looked up by a column's kind, None for a column of any type).
_PLACEHOLDER: dict[str | None, bool | int | float | str] = {
    "boolean": False,
    "integer": 0,
    "long": 0,
    "float": 0.0,
    "double": 0.0,
    "string": "",
    "datetime": "1970-01-01T00:00:00",
}


class LoadError(Exception):
    """A version that cannot serve: unsigned, tampered, missing, or failing its warm-up predict."""

    def __init__(self, message: str, status: int = 422, code: ErrorCode | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class ModelCallError(Exception):
    """A predict call that raised or answered with the wrong shape."""


class CallTimeout(ModelCallError):
    """No answer within the caller's timeout (the model hangs, or its queue is that long)."""


class QueueFull(ModelCallError):
    """The version already holds `max_queue_rows` rows waiting: refused at once instead of queued."""


class Measured(list[Any]):
    """A request's answers with the CPU time of the model call that made them, per row, in milliseconds: the
    thread CPU time around the predict call over its batch's rows (a model that spreads its work over threads
    of its own is undercounted; docs/architecture.md, "Resource use per arm").

    A list, so callers use it as any answer; the log reads `cpu_ms`.
    """

    __slots__ = ("cpu_ms",)

    def __init__(self, values: Iterable[Any], cpu_ms: float | None):
        super().__init__(values)
        self.cpu_ms = cpu_ms


class Retried(Measured):
    """A request's answers from a call of its own after its batch call failed; `error` says how that call failed.

    Only the log looks at the type (status `retried`).
    """

    __slots__ = ("error",)

    def __init__(self, values: list[Any], error: str):
        super().__init__(values, getattr(values, "cpu_ms", None))
        self.error = error


@dataclass(eq=False)  # compared by identity: a job leaves the queue with deque.remove
class _Job:
    rows: Rows
    future: asyncio.Future[list[Any]]
    deadline: float  # loop time
    timeout: float


def _object_array(values: list[Any]) -> NDArray[Any]:
    import numpy as np

    out = np.empty(len(values), dtype=object)  # np.asarray would turn lists in cells into a 2-d array
    out[:] = values
    return out


def _frame(pd: ModuleType, arrays: list[NDArray[Any]], names: list[str]) -> DataFrame:
    """A DataFrame of typed column arrays, built without pandas' per-column inference.

    The columns were checked against the signature already, yet pd.DataFrame(dict) spent most of
    its time inferring their types (16 rows x 9 columns: 4.5 ms against 0.6 ms, on a loaded machine).
    """
    index = pd.RangeIndex(len(arrays[0]) if arrays else 0)
    try:
        return pd.DataFrame._from_arrays(arrays, columns=pd.Index(names), index=index, verify_integrity=False)
    except (AttributeError, TypeError):  # a pandas without this constructor: the public, slower path
        return pd.DataFrame(dict(zip(names, arrays)), columns=names, index=index)


def _outputs(result: object, n: int, label: str) -> list[Any]:
    """One JSON-ready prediction per input row, or ModelCallError."""
    import numpy as np
    import pandas as pd

    values: list[Any]
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

    def __init__(
        self,
        model: str,
        version: str,
        pyfunc: PyFuncModel,
        schema: Schema,
        metrics: Metrics,
        executor: Executor,
        max_rows: int = 64,
        max_wait: float = 0.002,
        outputs: list[dict[str, Any]] | None = None,
        directory: VerifiedModel | None = None,
        max_queue_rows: int = 4096,
    ) -> None:
        self.model = model
        self.outputs = outputs or [{"name": "predict", "datatype": "BYTES", "shape": [-1]}]  # v2 metadata
        self.version = version
        self.label = f"{model} v{version}"
        self.schema = schema
        self._pyfunc = pyfunc
        # A plain sklearn predict skips MLflow's own schema enforcement: `payloads.select` already did it.
        estimator = compiled.raw_sklearn(pyfunc)
        self._predict: Callable[[DataFrame], object] = estimator.predict if estimator is not None else pyfunc.predict
        self._estimator = estimator
        self._fast: compiled.Predict | None = None
        self._fast_missing: set[str] = set()  # optional columns the graph answers like sklearn when missing
        self.engine = "sklearn" if estimator is not None else "mlflow pyfunc"
        self._executor = executor
        self._max_rows = max_rows
        self._max_wait = max_wait
        self._batch_rows = metrics.batch_rows.labels(model, version)
        self._cpu_seconds = metrics.model_cpu.labels(model, version)
        self._metrics = metrics
        self._pending: deque[_Job] = deque()
        self._pending_rows = 0
        self._max_queue_rows = max_queue_rows
        self._running: list[_Job] = []  # the batch being answered
        # One timer per slot, not one per request: it fails the jobs past their deadline and re-arms itself.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = math.inf
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._directory = directory  # removed once the slot has answered its last request
        self.breaker: Breaker | None = None  # the gateway's, for this version's calls as a candidate
        self.on_removed: Callable[[], None] | None = None  # called once its directory is deleted

    # --- synchronous part, runs in worker threads -------------------------------------------

    def _columns(self, jobs: list[Rows]) -> dict[str, list[Any]]:
        names = self.schema.names or list(jobs[0].columns)
        return {
            name: jobs[0].columns[name] if len(jobs) == 1 else list(chain.from_iterable(j.columns[name] for j in jobs))
            for name in names
        }

    def call_fast(self, jobs: list[Rows]) -> list[Any] | None:
        """The compiled graph's answers, or None where it does not apply (no graph; a missing value it may not see)."""
        if self._fast is None:
            return None
        columns = self._columns(jobs)
        if any(None in values and name not in self._fast_missing for name, values in columns.items()):
            return None  # sklearn decides what this missing value means
        n = sum(j.n for j in jobs)
        cpu = time.thread_time()  # the graph runs on this thread (one intra-op thread, compiled.py)
        try:
            result = self._fast(columns)
        except compiled.BeyondFloat32:
            return None
        except Exception as err:
            raise ModelCallError(f"{self.label} predict failed: {type(err).__name__}: {err}") from err
        return self._measured(_outputs(result, n, self.label), time.thread_time() - cpu, n, on_loop=True)

    def _measured(self, values: list[Any], cpu_seconds: float, rows: int, on_loop: bool = False) -> Measured:
        """The answers with their CPU per row; the CPU counted (tallied when on the event loop: metrics.py)."""
        if on_loop:
            self._metrics.add(self._cpu_seconds, cpu_seconds)
        else:
            self._cpu_seconds.inc(cpu_seconds)
        return Measured(values, cpu_seconds * 1000 / rows if rows else None)

    def call(self, jobs: list[Rows]) -> list[Any]:
        """One predict over the rows of all `jobs` (one DataFrame), answers concatenated."""
        import numpy as np
        import pandas as pd

        names = self.schema.names or list(jobs[0].columns)
        columns = self._columns(jobs)
        if not self.schema.columns:  # no signature: let pandas infer each column's type
            frame = pd.DataFrame(columns, columns=names)
        else:
            arrays = []
            for col in self.schema.columns:
                values, dtype = columns[col.name], col.dtype or "object"
                if dtype != "object" and None in values:  # optional columns: None is NaN, as pandas reads it
                    dtype = "float64" if dtype.startswith(("int", "float")) else "object"
                    values = [np.nan if v is None else v for v in values] if dtype == "float64" else values
                arrays.append(_object_array(values) if dtype == "object" else np.asarray(values, dtype=dtype))
            frame = _frame(pd, arrays, names)
        n = len(frame)
        cpu = time.thread_time()
        try:
            result = self._predict(frame)
        except Exception as err:
            raise ModelCallError(f"{self.label} predict failed: {type(err).__name__}: {err}") from err
        return self._measured(_outputs(result, n, self.label), time.thread_time() - cpu, n)

    def warm(self, example: Rows | None) -> None:
        """One predict before the slot takes traffic (the input example, else a row from the signature)."""
        if example is None:
            if not self.schema.columns:
                raise LoadError(f"{self.label} has neither an input example nor a column signature to warm up with")
            example = Rows({c.name: [_PLACEHOLDER.get(c.kind)] for c in self.schema.columns}, 1)
        elif self.schema.columns:  # an example without an optional column: it arrives missing, as in requests
            example = Rows(
                {c.name: example.columns.get(c.name, [None] * example.n) for c in self.schema.columns}, example.n
            )
        try:
            want = self.call([example])
        except Exception as err:
            raise LoadError(f"warm-up predict failed for {self.label}: {err}") from err
        self._compile(example, want)

    def _compile(self, example: Rows, want: list[Any]) -> None:
        """Use the ONNX graph of the model if skl2onnx converts it and it agrees with sklearn's `want` on `example`.

        An optional numeric column may reach the graph missing only if, with that column blanked on the
        example rows, sklearn answers and the graph agrees with it.
        """

        def agree(got: list[Any], expected: list[Any]) -> bool:
            if got == expected:
                return True
            # A regressor's values, computed in float32 by the graph.
            return all(
                isinstance(g, float) and isinstance(e, (int, float)) and math.isclose(g, e, rel_tol=1e-4, abs_tol=1e-6)
                for g, e in zip(got, expected, strict=True)
            )

        def parity(predict: compiled.Predict) -> str | None:
            got = _outputs(predict(self._columns([example])), example.n, self.label)
            if not agree(got, want):
                return f"answers {got[:5]} against sklearn's {want[:5]} on the input example"
            for column in self.schema.columns or ():
                if column.required or column.kind not in compiled.NUMERIC:
                    continue
                blanked = Rows({**example.columns, column.name: [None] * example.n}, example.n)
                try:
                    expected = self.call([blanked])
                except ModelCallError:
                    continue  # sklearn refuses the missing value: so does the slot, through sklearn
                if agree(_outputs(predict(self._columns([blanked])), example.n, self.label), expected):
                    self._fast_missing.add(column.name)
            return None

        result = compiled.compile_sklearn(self._estimator, self.schema, parity)
        self._fast = result.predict
        if result.predict is not None:
            self.engine = result.reason
        log.info(
            "%s predicts with %s%s",
            self.label,
            self.engine,
            "" if result.predict is not None else f" ({result.reason})",
        )

    # --- the batcher, on the event loop ---------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher {self.label}")
        self._metrics.follow(self._metrics.slot_queue_rows, lambda: self._pending_rows, self.model, self.version)

    def close(self) -> None:
        """Stop after the queued requests are answered (requests that hold the slot still get answers)."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        try:
            self._metrics.forget(self._metrics.slot_queue_rows, self.model, self.version)
        except KeyError:  # never started
            pass
        if self._directory is not None:
            directory, self._directory = self._directory, None

            def remove() -> None:
                directory.remove()
                if self.on_removed is not None:
                    self.on_removed()

            if self._task is None or self._task.done():
                remove()
            else:
                self._task.add_done_callback(lambda _: remove())

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a predict call."""
        return self._pending_rows

    async def predict(self, rows: Rows, timeout: float) -> list[Any]:
        """This request's predictions, one per row, computed in a shared batch.

        CallTimeout after `timeout` seconds (the request leaves the queue), QueueFull at once if the queue
        holds `max_queue_rows` rows already; ModelCallError if the model fails.
        """
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            values = self.call_fast([rows])
            if values is not None:
                return values
            try:
                async with asyncio.timeout(timeout):
                    return await loop.run_in_executor(self._executor, self.call, [rows])
            except TimeoutError:
                raise CallTimeout(f"{self.label} took longer than {timeout:g}s") from None
        if self._pending_rows and self._pending_rows + rows.n > self._max_queue_rows:
            raise QueueFull(f"{self.label} has {self._pending_rows} rows waiting (at most {self._max_queue_rows})")
        future: asyncio.Future[list[Any]] = loop.create_future()
        job = _Job(rows, future, loop.time() + timeout, timeout)
        self._pending.append(job)
        self._pending_rows += rows.n
        if job.deadline < self._watchdog_at:
            self._arm(loop, job.deadline)
        cast("asyncio.Event", self._wake).set()  # made by start(), before the batcher task
        try:
            return await future
        except asyncio.CancelledError:  # the caller went away: its rows leave the queue now
            self._forget(job)
            raise

    def _forget(self, job: _Job) -> None:
        try:
            self._pending.remove(job)
        except ValueError:  # already taken by the batcher, or failed by the watchdog
            return
        self._pending_rows -= job.rows.n

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = loop.call_at(when, self._sweep)
        self._watchdog_at = when

    def _sweep(self) -> None:
        """Fail every job past its deadline (waiting, or in a batch that has not answered); re-arm for the next."""
        self._watchdog, self._watchdog_at = None, math.inf
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # the loop's clock has millisecond steps
        earliest = math.inf
        for job in self._running:
            if not job.future.done():
                if job.deadline <= now:
                    job.future.set_exception(CallTimeout(f"{self.label} took longer than {job.timeout:g}s"))
                else:
                    earliest = min(earliest, job.deadline)
        kept: deque[_Job] = deque()
        for job in self._pending:
            if job.future.done():  # its caller is gone
                self._pending_rows -= job.rows.n
            elif job.deadline <= now:
                self._pending_rows -= job.rows.n
                job.future.set_exception(CallTimeout(f"{self.label} took longer than {job.timeout:g}s"))
            else:
                kept.append(job)
                earliest = min(earliest, job.deadline)
        self._pending = kept
        if earliest != math.inf:
            self._arm(loop, earliest)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None  # start() makes it before it starts this task
        while True:
            if not self._pending:
                if self._closing:
                    return
                wake.clear()
                await wake.wait()
                continue
            if self._pending_rows < self._max_rows and self._max_wait > 0:
                # Let requests already on their way join this batch. For the compiled graph only one turn of the
                # event loop: its call costs microseconds, so waiting longer would only add latency, while the
                # requests whose bytes are already read join this call rather than each paying one.
                await asyncio.sleep(self._max_wait if self._fast is None else 0)
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
            self._running = jobs
            try:
                await self._answer(loop, jobs, rows)
            except Exception as err:  # never let the batcher die: fail these requests instead
                log.exception("batcher of %s", self.label)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ModelCallError(f"{self.label}: {err}"))
            finally:
                self._running = []

    async def _answer(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], rows: int) -> None:
        self._metrics.observe(self._batch_rows, rows)
        try:
            # The compiled graph answers in microseconds: a thread hop would cost more than the call.
            values = self.call_fast([j.rows for j in jobs])
            if values is None:
                values = await loop.run_in_executor(self._executor, self.call, [j.rows for j in jobs])
        except Exception as err:
            if len(jobs) == 1:
                _settle(jobs[0].future, error=err)
                return
            # One bad request must not fail its neighbours: answer each on its own. Each answer still carries the
            # batch's failure (logged as `retried`), so the logged error rate stays the model's call failure rate.
            text = str(err)
            batch_error = text.splitlines()[0][:200] if text else type(err).__name__
            for job in jobs:
                try:
                    values = await loop.run_in_executor(self._executor, self.call, [job.rows])
                except Exception as one_err:
                    _settle(job.future, error=one_err)
                else:
                    _settle(job.future, Retried(values, batch_error))
            return
        start = 0
        cpu_ms = getattr(values, "cpu_ms", None)
        for job in jobs:
            _settle(job.future, Measured(values[start : start + job.rows.n], cpu_ms))
            start += job.rows.n


def _settle(future: asyncio.Future[list[Any]], value: list[Any] | None = None, error: Exception | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error if isinstance(error, ModelCallError) else ModelCallError(str(error)))
    else:
        future.set_result(cast("list[Any]", value))  # without an error, the caller gives the value


def load_slot(
    model: str,
    version: str,
    settings: Settings,
    metrics: Metrics,
    executor: Executor,
    *,
    max_rows: int = 64,
    max_wait: float = 0.002,
    max_queue_rows: int = 4096,
) -> Slot:
    """Fetch + verify (signing.fetch_verified), load from that same directory, warm. Blocking: run in a thread.

    The verified directory lives as long as the slot (a pyfunc may read its artifacts when it predicts):
    a failed load or a closed slot removes it, so the model cache holds only what is served.
    """
    from releasegate import registry, signing

    label = f"{model} v{version}"
    resident = _resident_bytes()
    try:
        verified = signing.fetch_verified(model, version, settings)
    except signing.SignatureError as err:
        raise LoadError(f"signature verification failed for {label}: {err}", code=ErrorCode.signature_refused) from err
    except registry.RegistryError as err:
        raise LoadError(f"{label} is not in the model registry: {err}", 404) from err
    except Exception as err:
        from mlflow.exceptions import MlflowException

        if isinstance(err, MlflowException) and err.error_code == "INVALID_PARAMETER_VALUE":
            # A name or version the registry refuses is one it cannot hold: as missing as any other.
            raise LoadError(f"{label} is not in the model registry, which refuses it: {err.message}", 404) from err
        raise
    try:
        try:
            pyfunc: PyFuncModel = registry.load_pyfunc(verified)
        except Exception as err:
            raise LoadError(f"could not load {label}: {type(err).__name__}: {err}") from err
        # mlflow leaves Model.get_input_schema and get_output_schema unannotated.
        schema = Schema.from_mlflow(pyfunc.metadata.get_input_schema())  # type: ignore[no-untyped-call]
        slot = Slot(
            model,
            version,
            pyfunc,
            schema,
            metrics,
            executor,
            max_rows=max_rows,
            max_wait=max_wait,
            outputs=_v2_outputs(pyfunc.metadata.get_output_schema()),  # type: ignore[no-untyped-call]
            directory=verified,
            max_queue_rows=max_queue_rows,
        )
        slot.warm(_example_rows(pyfunc, verified.path))
    except BaseException:
        verified.remove()
        raise
    metrics.model_memory.labels(model, version).set(max(0, _resident_bytes() - resident))
    return slot


def _resident_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


_NUMPY_V2 = {
    "bool": "BOOL",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "float32": "FP32",
    "float64": "FP64",
    "object": "BYTES",
    "str": "BYTES",
}


def _v2_outputs(schema: MlflowSchema | None) -> list[dict[str, Any]] | None:
    """The v2 `outputs` metadata from an MLflow output signature, where it says enough."""
    if schema is None or not getattr(schema, "inputs", None):
        return None
    outputs = []
    for i, spec in enumerate(schema.inputs):
        name = getattr(spec, "name", None) or ("predict" if len(schema.inputs) == 1 else f"output_{i}")
        if schema.is_tensor_spec():
            # A tensor-spec schema holds TensorSpecs only.
            dtype, shape = _NUMPY_V2.get(str(spec.type), "BYTES"), list(cast("TensorSpec", spec).shape)
        else:
            dtype, shape = V2_DATATYPES.get(getattr(getattr(spec, "type", None), "name", ""), "BYTES"), [-1]
        outputs.append({"name": name, "datatype": dtype, "shape": shape})
    return outputs


def _example_rows(pyfunc: PyFuncModel, model_dir: Path) -> Rows | None:
    import pandas as pd

    try:
        example = pyfunc.metadata.load_input_example(str(model_dir))
    except Exception:  # a missing or unreadable example: warm up from the signature instead
        log.warning("input example of %s unreadable; warming up from the signature", model_dir, exc_info=True)
        return None
    if isinstance(example, pd.DataFrame) and len(example):
        example = example.head(100)  # every row of it: they are also the compiled graph's parity rows
        return Rows(example.to_dict(orient="list"), len(example))
    return None
