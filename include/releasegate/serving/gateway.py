"""The gateway's state and request flow: routes, slots, arms, fallback, shadow mirroring, logging."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson
import sqlalchemy as sa

from releasegate import storage
from releasegate.serving import auth, routing
from releasegate.serving.config import GatewayConfig
from releasegate.serving.logprocess import ProcessLogWriter
from releasegate.serving.logwriter import LogWriter
from releasegate.serving.payloads import PayloadError, Rows, check
from releasegate.serving.routing import Route, RouteSpec
from releasegate.serving.slots import LoadError, ModelCallError, Slot, load_slot

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """An unknown model or route (404)."""


class Unavailable(RuntimeError):
    """Known but not servable yet (503): its versions are still loading."""


@dataclass(frozen=True)
class Active:
    """A route the traffic follows, with its loaded slots."""

    route: Route
    champion: Slot
    candidate: Slot | None
    same_schema: bool = field(init=False)  # the candidate takes the champion's checked rows as they are

    def __post_init__(self) -> None:
        object.__setattr__(self, "same_schema", self.candidate is not None and
                           self.candidate.schema == self.champion.schema)


class Answer(NamedTuple):  # a tuple: built once a request, a frozen dataclass's __init__ cost more
    outputs: list
    version: str
    arm: str


class Gateway:
    """Everything one gateway process serves; the HTTP layer (app.py) is a thin shell around it."""

    def __init__(self, settings, config: GatewayConfig, metrics):
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.engine = storage.engine(settings.db_url)
        self.keys = auth.KeyStore(auth.pepper(settings), settings.admin_api_key)
        self.routes: dict[str, Active] = {}
        self.synced = False  # the routes stored at start have been tried once
        self.failures: dict[str, tuple[int, str, float]] = {}  # model -> (revision, error, when)
        self._slots: dict[tuple[str, str], Slot] = {}
        self._loading: dict[tuple[str, str], asyncio.Task] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="predict")
        # Written by a child process: a thread here would share the event loop's GIL (see logprocess).
        self.predictions = ProcessLogWriter(settings.db_url, "predictions", metrics,
                                            flush_interval=config.log_flush_interval,
                                            batch_rows=config.log_batch_rows, max_buffer=config.log_buffer)
        self.feedback_log = LogWriter(self.engine, storage.feedback, metrics, expand=lambda rows: rows,
                                      flush_interval=config.log_flush_interval, batch_rows=config.log_batch_rows,
                                      max_buffer=config.log_buffer)
        # Mirrored requests waiting for the shadow taker: a deque and a wake-up event, not an asyncio.Queue,
        # whose put/get/task_done bookkeeping cost the request path more than the rest of the mirror.
        self._shadow: deque = deque()
        self._shadow_wake: asyncio.Event | None = None
        self._shadow_busy = 0  # mirrored requests taken and not yet answered
        self._mirror_slots: asyncio.Semaphore | None = None
        self._mirroring: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.keys.refresh, self.engine)
        self.predictions.start()
        self.feedback_log.start()
        self._shadow_wake = asyncio.Event()
        self.metrics.shadow_queue.set_function(lambda: len(self._shadow))
        self._mirror_slots = asyncio.Semaphore(self.config.shadow_workers)
        self._tasks = [asyncio.create_task(self._shadow_worker(), name="shadow")]
        self._tasks.append(asyncio.create_task(self._poll(), name="poller"))

    async def stop(self) -> None:
        """Finish mirrored work briefly, then flush the logs (uvicorn calls this on SIGTERM)."""
        poller = self._tasks.pop()
        poller.cancel()
        deadline = time.monotonic() + 5
        while (self._shadow or self._shadow_busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._shadow or self._shadow_busy:
            log.warning("shutting down with %d mirrored requests unanswered", len(self._shadow) + self._shadow_busy)
        for task in [*self._tasks, *self._mirroring]:
            task.cancel()
        for slot in self._slots.values():
            slot.close()
        await asyncio.to_thread(self.predictions.close)
        await asyncio.to_thread(self.feedback_log.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- routes ---------------------------------------------------------------------------------

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    async def slot(self, model: str, version: str) -> Slot:
        """The loaded slot for a version, loading (verify + warm) it once however many callers ask."""
        key = (model, version)
        if key in self._slots:
            return self._slots[key]
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key))
            self._loading[key] = task
        return await asyncio.shield(task)

    async def _load(self, key: tuple[str, str]) -> Slot:
        try:
            slot = await asyncio.to_thread(load_slot, key[0], key[1], self.settings, self.metrics, self._executor,
                                           max_rows=self.config.batch_max_rows,
                                           max_wait=self.config.batch_max_wait_ms / 1000)
            slot.start()
            self._slots[key] = slot
            # The heap now holds MLflow, sklearn, pandas and the model: millions of long-lived objects.
            # Left to the collector, each full collection walks them all and stalls every request for
            # ~0.2 s (the p99 tail); frozen, collections only see what requests allocate.
            gc.freeze()
            log.info("loaded %s v%s (signature verified, warmed; predicts with %s)", *key, slot.engine)
            return slot
        finally:
            self._loading.pop(key, None)

    async def _prepare(self, route: Route) -> Active:
        champion = await self.slot(route.model, route.champion_version)
        candidate = await self.slot(route.model, route.candidate_version) if route.candidate_version else None
        return Active(route, champion, candidate)

    def _apply(self, active: Active) -> bool:
        current = self.routes.get(active.route.model)
        if current is not None and current.route.revision >= active.route.revision:
            return False
        self.routes[active.route.model] = active
        self.failures.pop(active.route.model, None)
        self.metrics.route_revision.labels(active.route.model).set(active.route.revision)
        log.info("route %s revision %d applied: %s", active.route.model, active.route.revision,
                 active.route.model_dump(exclude={"model", "revision", "updated_at"}))
        self._unload_unused()
        return True

    def _unload_unused(self) -> None:
        used = {(a.route.model, s.version) for a in self.routes.values() for s in (a.champion, a.candidate) if s}
        for key in [k for k in self._slots if k not in used]:
            self._slots.pop(key).close()

    def _read_routes(self) -> list[Route]:
        with self.engine.connect() as conn:
            return [Route(**row._mapping) for row in conn.execute(sa.select(storage.routes))]

    def _write_route(self, model: str, spec: RouteSpec) -> Route:
        table = storage.routes
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    current = conn.execute(sa.select(table.c.revision).where(table.c.model == model)
                                           .with_for_update()).scalar()
                    values = spec.model_dump() | {"updated_at": time.time(), "revision": (current or 0) + 1}
                    if current is None:
                        conn.execute(table.insert().values(model=model, **values))
                    else:
                        conn.execute(table.update().where(table.c.model == model).values(**values))
                return Route(model=model, **values)
            except sa.exc.IntegrityError:  # another replica inserted the first row at the same moment
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def put_route(self, model: str, spec: RouteSpec) -> Route:
        """Load, verify and warm the versions first; then store the route (revision + 1) and apply it."""
        async with self._lock(model):
            try:
                champion = await self.slot(model, spec.champion_version)
                candidate = await self.slot(model, spec.candidate_version) if spec.candidate_version else None
            except LoadError:
                self.metrics.route_load_failures.labels(model).inc()
                self._unload_unused()
                raise
            route = await asyncio.to_thread(self._write_route, model, spec)
            self._apply(Active(route, champion, candidate))
            return route

    async def sync_routes(self) -> None:
        """Apply every stored route newer than the one served, once its versions are loaded."""
        for route in await asyncio.to_thread(self._read_routes):
            current = self.routes.get(route.model)
            if current is not None and current.route.revision >= route.revision:
                continue
            failed = self.failures.get(route.model)
            if failed and failed[0] == route.revision and \
                    time.time() - failed[2] < self.config.retry_failed_load_seconds:
                continue
            async with self._lock(route.model):
                try:
                    active = await self._prepare(route)
                except LoadError as err:
                    log.error("route %s revision %d not applied: %s", route.model, route.revision, err)
                    self.failures[route.model] = (route.revision, str(err), time.time())
                    self.metrics.route_load_failures.labels(route.model).inc()
                    self._unload_unused()
                    continue
                self._apply(active)
        self.synced = True

    async def _poll(self) -> None:
        while True:
            try:
                await self.sync_routes()
                await asyncio.to_thread(self.keys.refresh, self.engine)
            except Exception:  # a database hiccup must not stop the poller
                log.exception("polling routes and keys failed")
            await asyncio.sleep(self.config.poll_interval)

    def route(self, model: str) -> Route:
        active = self.routes.get(model)
        if active is None:
            raise NotFound(f"no route for model {model!r}")
        return active.route

    def readiness(self) -> tuple[bool, dict]:
        models = {m: {"revision": a.route.revision} for m, a in self.routes.items()}
        for model, (revision, error, _) in self.failures.items():
            models.setdefault(model, {})["failed_revision"] = revision
            models[model]["error"] = error
        ready = self.synced and not any(m not in self.routes for m in self.failures)
        return ready, {"ready": ready, "models": models}

    # --- predictions ----------------------------------------------------------------------------

    def active(self, model: str) -> Active:
        active = self.routes.get(model)
        if active is None:
            if model in self.failures or not self.synced:
                raise Unavailable(f"model {model!r} is not ready: "
                                  + (self.failures[model][1] if model in self.failures else "routes still loading"))
            known = ", ".join(sorted(self.routes)) or "none"
            raise NotFound(f"unknown model {model!r} (served models: {known})")
        return active

    async def infer(self, active: Active, rows: Rows, request_id: str, routing_key: str) -> Answer:
        """Route one request, answer it, log every model call (the caller's rows were checked already)."""
        route = active.route
        digest = routing.key_digest(route.model, routing_key)
        base = {"request_id": request_id, "model": route.model, "mode": route.mode, "release_id": route.release_id,
                "routing_key_hash": digest[:16], "sample_bucket": routing.sample_bucket(request_id)}
        fallback = False
        if active.candidate is not None and routing.choose_arm(route, digest) == "candidate":
            outputs = await self._call_candidate(active, rows, base, served=True)
            if outputs is not None:
                return Answer(outputs, active.candidate.version, "candidate")
            fallback = True
            self.metrics.fallbacks.labels(route.model).inc()
        champion = active.champion
        start = time.perf_counter()
        try:
            outputs = await champion.predict(rows)
        except ModelCallError as err:
            self._log_call(base, rows, None, champion, "champion", start, served=False, fallback=fallback,
                           status="error", error=str(err))
            raise
        self._log_call(base, rows, outputs, champion, "champion", start, served=True, fallback=fallback)
        if route.mode == "shadow" and active.candidate is not None:
            if len(self._shadow) < self.config.shadow_queue:
                self._shadow.append((active, rows, base))
                self._shadow_wake.set()
            else:
                self.metrics.shadow_dropped.labels(route.model).inc()
        return Answer(outputs, champion.version, "champion")

    async def _call_candidate(self, active: Active, rows: Rows, base: dict, served: bool) -> list | None:
        """The candidate's answer, or None after logging why it has none (error, timeout, wrong shape)."""
        slot = active.candidate
        start = time.perf_counter()
        status, error = "ok", None
        try:
            if not active.same_schema:
                rows = check(rows, slot.schema, slot.label)
            # A timeout scope, not wait_for: no extra task per call on the champion's event loop.
            async with asyncio.timeout(self.config.candidate_timeout):
                outputs = await slot.predict(rows)
        except TimeoutError:
            status, error = "timeout", f"{slot.label} took longer than {self.config.candidate_timeout:g}s"
        except (ModelCallError, PayloadError) as err:
            status, error = "error", str(err)
        if status != "ok":
            self._log_call(base, rows, None, slot, "candidate", start, served=False, fallback=False,
                           status=status, error=error)
            return None
        self._log_call(base, rows, outputs, slot, "candidate", start, served=served, fallback=False)
        return outputs

    async def _shadow_worker(self) -> None:
        """Take every mirrored request waiting: one compiled call for all of them inline, else a batch task.

        One taker, collecting for `batch_max_wait_ms`, so the mirrored requests share one candidate call
        (with a taker per request they were called one by one). Batches that need
        the slot's batcher run as tasks, at most `shadow_workers` at a time.
        """
        wait = self.config.batch_max_wait_ms / 1000
        queue = self._shadow
        while True:
            if not queue:
                self._shadow_wake.clear()
                await self._shadow_wake.wait()
                continue
            if wait > 0:
                # Nobody waits for a mirrored answer, so wait for more to share the call: a call costs the
                # demo's candidate ~36 µs for one row and ~41 µs for eight.
                await asyncio.sleep(wait)
            batch = [queue.popleft() for _ in range(min(len(queue), self.config.batch_max_rows))]
            self._shadow_busy += len(batch)
            try:
                done = self._mirror_inline(batch)
            except Exception:
                log.exception("mirrored calls to %s", batch[0][0].candidate.label)
                done = True
            if done:
                self._shadow_busy -= len(batch)
                continue
            await self._mirror_slots.acquire()
            task = asyncio.create_task(self._mirror_each(batch))
            self._mirroring.add(task)
            task.add_done_callback(self._mirroring.discard)

    def _mirror_inline(self, batch: list[tuple[Active, Rows, dict]]) -> bool:
        """One call of a compiled candidate for the whole batch; False where that does not apply.

        A compiled call takes microseconds and cannot hang, so it runs inline, without the per-request
        future and timeout that cost the champion's event loop more than the prediction. Each mirrored
        row logs the batch call's own duration as its latency (not its time in the queue): that is what
        the candidate would have cost the request.
        """
        slot = batch[0][0].candidate
        if not all(a.candidate is slot and a.same_schema for a, _, _ in batch):
            return False
        start = time.perf_counter()
        try:
            values = slot.call_fast([rows for _, rows, _ in batch])
        except ModelCallError:
            return False  # one call each attributes the error to its request
        if values is None:
            return False
        at = 0
        for _, rows, base in batch:
            self._log_call(base, rows, values[at:at + rows.n], slot, "candidate", start, served=False,
                           fallback=False)
            at += rows.n
        return True

    async def _mirror_each(self, batch: list[tuple[Active, Rows, dict]]) -> None:
        try:
            await asyncio.gather(*(self._call_candidate(active, rows, base, served=False)
                                   for active, rows, base in batch))
        except Exception:
            log.exception("mirrored calls to %s", batch[0][0].candidate.label)
        finally:
            self._shadow_busy -= len(batch)
            self._mirror_slots.release()

    def _log_call(self, base: dict, rows: Rows, outputs: list | None, slot: Slot, arm: str, start: float, *,
                  served: bool, fallback: bool, status: str = "ok", error: str | None = None) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.model_call(slot.model, slot.version, arm, elapsed)
        if status != "ok":
            self.metrics.errors.labels(slot.model, slot.version, arm, status).inc()
        row = dict(base, time=time.time(), version=slot.version, arm=arm, served=served, fallback=fallback,
                   latency_ms=elapsed * 1000, status=status, error=error)
        self.predictions.put((row, rows, outputs), rows=rows.n)

    # --- feedback -------------------------------------------------------------------------------

    def feedback(self, items) -> int:
        """Queue labels for the `feedback` table; PayloadError names the first bad item."""
        items = items if isinstance(items, list) else [items]
        if not items:
            raise PayloadError("no feedback items")
        now = time.time()
        rows = []
        for i, item in enumerate(items):
            where = f"feedback item {i}"
            if not isinstance(item, dict):
                raise PayloadError(f"{where} must be an object with request_id and ground_truth")
            extra = set(item) - {"request_id", "ground_truth", "business_value"}
            if extra:
                raise PayloadError(f"{where} has unexpected field(s) {sorted(extra)}", 422)
            rid = item.get("request_id")
            if not isinstance(rid, str) or not 0 < len(rid) <= 64:
                raise PayloadError(f"{where}: request_id must be a string of 1-64 characters", 422)
            if item.get("ground_truth") is None:
                raise PayloadError(f"{where}: ground_truth is required", 422)
            value = item.get("business_value")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PayloadError(f"{where}: business_value must be a number", 422)
            rows.append({"request_id": rid, "time": now, "ground_truth": orjson.dumps(item["ground_truth"]).decode(),
                         "business_value": value})
        if not self.feedback_log.put(rows, rows=len(rows)):
            raise Unavailable("the feedback buffer is full; retry shortly")
        return len(rows)
