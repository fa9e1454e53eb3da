"""The gateway's state and request flow: routes, slots, arms, fallback, shadow mirroring, logging."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias, TypedDict, cast

import sqlalchemy as sa

from releasegate import audit, registry, storage
from releasegate.contract import MAX_FEEDBACK_ITEMS, AuditAction, CallStatus, Mode
from releasegate.privacy import Classification, ClassificationError, FeedbackGuard, Protector
from releasegate.serving import auth, routing, workers
from releasegate.serving.alerts import AlertReceiver
from releasegate.serving.breaker import Breaker
from releasegate.serving.config import GatewayConfig
from releasegate.serving.features import Features
from releasegate.serving.logprocess import ProcessLogWriter
from releasegate.serving.logwriter import LogWriter, Row
from releasegate.serving.payloads import PayloadError, Rows, finite_double, select
from releasegate.serving.routing import Route, RouteSpec
from releasegate.serving.slots import (
    CallTimeout,
    LoadError,
    Measured,
    ModelCallError,
    QueueFull,
    Retried,
    Slot,
    load_slot,
)

if TYPE_CHECKING:
    from releasegate.serving.metrics import Metrics
    from releasegate.settings import Settings

log = logging.getLogger(__name__)
_METRICS_REFRESH = 0.5  # seconds between copies of the followed gauges into the workers' shared files


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
    classification: Classification = field(default_factory=Classification)  # what the log may hold of each column
    arms: tuple[Slot, ...] = ()  # an experiment's arms besides the champion, in route.arms' order
    same_schema: bool = field(init=False)  # the candidate takes the champion's selected rows as they are
    declared: frozenset[str] | None = field(init=False)  # columns a served version declares; None: one takes all

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "same_schema", self.candidate is not None and self.candidate.schema == self.champion.schema
        )
        names = [s.schema.names for s in self.slots]
        known = [n for n in names if n is not None]
        object.__setattr__(self, "declared", None if None in names else frozenset().union(*known))

    @property
    def slots(self) -> list[Slot]:
        """Every version the route serves: the champion, the candidate, an experiment's arms."""
        return [s for s in (self.champion, self.candidate, *self.arms) if s is not None]


def _standby(previous: Active | None, new: Active) -> str | None:
    """The version to keep loaded though the new route does not use it: a promotion under a watch (a single
    route still carrying the release's id) keeps the previous champion ready for a rollback, until the route
    changes again (docs/decisions.md, "After promotion")."""
    if previous is None or previous.candidate is None or new.route.mode is not Mode.single:
        return None
    promoted = new.route.release_id is not None and new.route.release_id == previous.route.release_id
    return previous.champion.version if promoted and previous.candidate.version == new.champion.version else None


class Answer(NamedTuple):  # a tuple: built once a request, a frozen dataclass's __init__ cost more
    outputs: list[Any]
    version: str
    arm: str


class _CallBase(TypedDict):
    """A request's values in the prediction log row of each model call it makes."""

    request_id: str
    model: str
    mode: Mode
    release_id: str | None
    routing_key_hash: str
    sample_bucket: int
    key_id: str | None


def _key_file(path: str | None, role: str) -> str | None:
    if not path:
        return None
    key = Path(path).read_text().strip()
    if not key:
        raise ValueError(f"the {role} key file {path} is empty")
    return key


def disk_use(root: Path) -> int:
    """Bytes of disk the files under `root` take (as `du` counts them); 0 if it does not exist."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:  # gone meanwhile (a version unloaded), or unreadable
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except OSError:
                    continue
    return total


# A request mirrored to the shadow candidate: (its route, which has a candidate; the rows the caller sent; the
# champion's rows; the logged rows; its log values).
_Mirrored: TypeAlias = tuple[Active, Rows, Rows, Rows, _CallBase]


class Gateway:
    """Everything one gateway process serves; the HTTP layer (app.py) is a thin shell around it."""

    def __init__(self, settings: Settings, config: GatewayConfig, metrics: Metrics) -> None:
        self.settings = settings
        self.config = config
        self.routing_secret = routing.routing_secret(settings)
        self.protector = Protector.of(settings)
        self.feedback_guard = FeedbackGuard()  # which model's feedback classes a feedback item's request falls under
        self.alerts = AlertReceiver(settings)  # Alertmanager's notifications: incidents, emergency rollbacks
        self.metrics = metrics
        self.features = Features(settings, config, metrics)  # looked up in Feast for models that declare them
        self.engine = storage.engine(settings.db_url)
        self.keys = auth.KeyStore(
            auth.pepper(settings),
            settings.admin_api_key,
            _key_file(config.metrics_key_file, "metrics"),
            _key_file(config.alerts_key_file, "alerts"),
        )
        self.siblings = workers.Siblings.of_environment()  # the other workers of this start, if any
        self.in_flight = 0  # inference and feedback requests being handled (app.py admits at most max_in_flight)
        self.routes: dict[str, Active] = {}
        self.synced = False  # the routes stored at start have been tried once
        self.failures: dict[str, tuple[int, str, float]] = {}  # model -> (revision, error, when)
        self._slots: dict[tuple[str, str], Slot] = {}
        self._loading: dict[tuple[str, str], asyncio.Task[Slot]] = {}
        self._syncing: dict[str, asyncio.Task[bool]] = {}  # model -> loading its stored route
        self._load_slots = asyncio.Semaphore(config.load_concurrency)
        self._locks: dict[str, asyncio.Lock] = {}
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="predict")
        # Written by a child process: a thread here would share the event loop's GIL (see logprocess).
        self.predictions = ProcessLogWriter(
            settings.db_url,
            "predictions",
            metrics,
            flush_interval=config.log_flush_interval,
            batch_rows=config.log_batch_rows,
            max_buffer=config.log_buffer,
        )
        self.feedback_log: LogWriter[list[Row]] = LogWriter(
            self.engine,
            storage.feedback,
            metrics,
            expand=lambda rows: rows,
            flush_interval=config.log_flush_interval,
            batch_rows=config.log_batch_rows,
            max_buffer=config.log_buffer,
        )
        # Mirrored requests waiting for the shadow taker: a deque and a wake-up event, not an asyncio.Queue,
        # whose put/get/task_done bookkeeping cost the request path more than the rest of the mirror.
        self._shadow: deque[_Mirrored] = deque()
        self._shadow_wake: asyncio.Event | None = None
        self._shadow_busy = 0  # mirrored requests taken and not yet answered
        self._mirror_slots: asyncio.Semaphore | None = None
        self._mirroring: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._measuring: asyncio.Future[int] | None = None
        self._measure_again = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.keys.refresh, self.engine)
        if self.siblings is not None:
            await asyncio.to_thread(self.siblings.start)
        self.predictions.start()
        self.feedback_log.start()
        self._shadow_wake = asyncio.Event()
        self.metrics.follow(self.metrics.shadow_queue, lambda: len(self._shadow))
        self._mirror_slots = asyncio.Semaphore(self.config.shadow_workers)
        self._tasks = [asyncio.create_task(self._shadow_worker(), name="mirror")]
        if self.siblings is not None:
            # One of several workers: take no connection before the stored routes are loaded (uvicorn listens
            # once this returns), so the others answer meanwhile, rather than this one with 503s.
            try:
                await self.sync_routes()
            except Exception:  # e.g. the database unreachable: the poller tries again, as it would after start
                log.exception("loading the stored routes at start failed")
            self._announce()
        if self.metrics.shared_dir is not None:
            self._tasks.append(asyncio.create_task(self._refresh_metrics(), name="metrics"))
        self._tasks.append(asyncio.create_task(self._poll(), name="poller"))  # last: stop() takes it first
        self._measure_cache()

    async def _refresh_metrics(self) -> None:
        """With several workers: copy the gauges that follow this process's state into the shared files."""
        while True:
            self.metrics.refresh()
            await asyncio.sleep(_METRICS_REFRESH)

    def _measure_cache(self) -> None:
        """Measure the model cache's disk use in a thread, for the gauge: after each load and unload, not per scrape."""
        if self._measuring is not None:  # one walk at a time; one more after it, for what changed meanwhile
            self._measure_again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # shutting down
            return
        self._measure_again = False
        self._measuring = loop.run_in_executor(None, disk_use, self.settings.model_cache_dir)
        self._measuring.add_done_callback(self._measured)

    def _measured(self, future: asyncio.Future[int]) -> None:
        self._measuring = None
        if not future.cancelled() and future.exception() is None:
            self.metrics.model_cache_bytes.set(future.result())
        if self._measure_again:
            self._measure_cache()

    async def stop(self) -> None:
        """Finish mirrored work briefly, then flush the logs (uvicorn calls this on SIGTERM)."""
        poller = self._tasks.pop()
        poller.cancel()
        deadline = time.monotonic() + 5
        while (self._shadow or self._shadow_busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._shadow or self._shadow_busy:
            log.warning("shutting down with %d mirrored requests unanswered", len(self._shadow) + self._shadow_busy)
        for task in [*self._tasks, *self._mirroring, *self._syncing.values()]:
            task.cancel()
        for slot in self._slots.values():
            slot.close()
        await asyncio.to_thread(self.predictions.close)
        await asyncio.to_thread(self.feedback_log.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.features.close()
        self.metrics.flush()  # with workers, this one's last counts into the shared files

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
            slot = await asyncio.to_thread(
                load_slot,
                key[0],
                key[1],
                self.settings,
                self.metrics,
                self._executor,
                max_rows=self.config.batch_max_rows,
                max_wait=self.config.batch_max_wait_ms / 1000,
                max_queue_rows=self.config.slot_queue_rows,
            )
            slot.breaker = self._breaker(*key)
            slot.on_removed = self._measure_cache
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
            self._measure_cache()  # a new verified directory, or the one a failed load removed

    def _breaker(self, model: str, version: str) -> Breaker:
        config = self.config
        gauge = self.metrics.circuit_open.labels(model, version)
        opened = self.metrics.circuit_opened.labels(model, version)
        gauge.set(0)

        def changed(is_open: bool) -> None:
            gauge.set(1 if is_open else 0)
            if is_open:
                opened.inc()
                log.error(
                    "%s v%s: %d failures within %gs; its calls are skipped for %gs",
                    model,
                    version,
                    config.breaker_failures,
                    config.breaker_window,
                    config.breaker_cooldown,
                )
            else:
                log.warning("%s v%s answered its trial call; its circuit is closed again", model, version)

        return Breaker(config.breaker_failures, config.breaker_window, config.breaker_cooldown, changed)

    async def _prepare(self, route: Route) -> Active:
        champion = await self.slot(route.model, route.champion_version)
        candidate = await self.slot(route.model, route.candidate_version) if route.candidate_version else None
        arms = tuple([await self.slot(route.model, arm.version) for arm in route.arms or ()])
        return Active(route, champion, candidate, await self._classification(route.model), arms)

    async def _classification(self, model: str) -> Classification:
        """The model's classification, read with each route change: a malformed one keeps the route from being
        applied (nothing is logged under a policy the gateway cannot read)."""
        tags = await asyncio.to_thread(registry.get_model_tags, model, self.settings)
        classification = Classification.from_tags(model, tags)
        self.feedback_guard.declare(model, classification)
        return classification

    def _apply(self, active: Active) -> bool:
        current = self.routes.get(active.route.model)
        if current is not None and current.route.revision >= active.route.revision:
            return False
        self.routes[active.route.model] = active
        self.failures.pop(active.route.model, None)
        self.features.prepare(active.route.model, active.route.revision)
        self.metrics.route_revision.labels(active.route.model).set(active.route.revision)
        log.info(
            "route %s revision %d applied: %s",
            active.route.model,
            active.route.revision,
            active.route.model_dump(exclude={"model", "revision", "updated_at"}),
        )
        self._unload_unused(active.route.model, keep=_standby(current, active))
        self._announce()
        return True

    def _announce(self) -> None:
        """Tell the other workers which route revisions this one serves, and which it could not load."""
        if self.siblings is not None:
            self.siblings.announce(
                {model: a.route.revision for model, a in self.routes.items()},
                {model: failed[0] for model, failed in self.failures.items()},
            )

    async def applied_everywhere(self, model: str, revision: int, timeout: float = 120.0) -> None:
        """Return once every worker serves the model's route at `revision` or newer (or failed to load it),
        so that an admin PUT's answer means the whole gateway follows it; a warning after `timeout` s."""
        if self.siblings is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            settled, live = await asyncio.to_thread(self.siblings.settled, model, revision)
            if settled >= live:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "route %s revision %d: %d of %d workers serve it after %.0f s; the others follow when loaded",
                    model,
                    revision,
                    settled,
                    live,
                    timeout,
                )
                return
            await asyncio.sleep(0.05)

    def _unload_unused(self, model: str, keep: str | None = None) -> None:
        """Close `model`'s slots its route does not use (but `keep`). Only under the model's lock: other models
        may be loading at the same moment, and their slots are in no route yet."""
        active = self.routes.get(model)
        used = {s.version for s in active.slots} if active else set()
        used |= {keep} if keep else set()
        for key in [k for k in self._slots if k[0] == model and k[1] not in used]:
            self._slots.pop(key).close()
            try:
                self.metrics.forget(self.metrics.circuit_open, *key)
            except KeyError:
                pass

    def _read_routes(self) -> list[Route]:
        with self.engine.connect() as conn:
            return [Route(**row._mapping) for row in conn.execute(sa.select(storage.routes))]

    def _write_route(self, model: str, spec: RouteSpec, caller: auth.Caller) -> Route:
        """Store the route (revision + 1) and its `route` audit event, naming the caller's key, in one transaction."""
        table = storage.routes

        def write(conn: sa.Connection) -> Route:
            current = conn.execute(sa.select(table.c.revision).where(table.c.model == model).with_for_update()).scalar()
            values = spec.model_dump() | {"updated_at": time.time(), "revision": (current or 0) + 1}
            if current is None:
                conn.execute(table.insert().values(model=model, **values))
            else:
                conn.execute(table.update().where(table.c.model == model).values(**values))
            # The release id goes in the details, not the event's column: the release's own `route` events (written
            # by the pipeline) are its timeline, and this one is the gateway's record of who changed the split.
            audit.append_in(
                conn,
                f"apikey:{caller.key_id}",
                AuditAction.route,
                model=model,
                version=spec.candidate_version or spec.champion_version,
                details=spec.model_dump(mode="json")
                | {"revision": values["revision"], "via": "gateway admin API", "key_id": caller.key_id},
            )
            return Route(model=model, **values)

        # Retried on contention: another replica inserting the first row, or appending to the audit log, at once.
        return audit.retrying(write, self.engine)

    async def put_route(self, model: str, spec: RouteSpec, caller: auth.Caller) -> Route:
        """Load, verify and warm the versions first; then store the route (revision + 1) and apply it."""
        async with self._lock(model):
            try:
                champion = await self.slot(model, spec.champion_version)
                candidate = await self.slot(model, spec.candidate_version) if spec.candidate_version else None
                arms = tuple([await self.slot(model, arm.version) for arm in spec.arms or ()])
                classification = await self._classification(model)
            except (LoadError, ClassificationError) as err:
                self.metrics.route_load_failures.labels(model).inc()
                self._unload_unused(model)
                if isinstance(err, ClassificationError):
                    raise PayloadError(str(err), 422) from None
                raise
            route = await asyncio.to_thread(self._write_route, model, spec, caller)
            self._apply(Active(route, champion, candidate, classification, arms))
            return route

    async def sync_routes(self) -> None:
        """Load every stored route newer than the one served, each model on its own, `load_concurrency` at once.

        A route is applied as soon as its own versions are loaded, so a slow model holds no other back. The first
        sync returns once every stored route has been tried (readiness waits for it); later ones do not wait.
        """
        tasks: list[asyncio.Task[bool]] = []
        for route in await asyncio.to_thread(self._read_routes):
            if not self._wanted(route):
                continue
            task = self._syncing.get(route.model)
            if task is None:  # else a load is under way; a newer revision is picked up by the next poll
                task = asyncio.create_task(self._sync_route(route), name=f"sync {route.model}")
                self._syncing[route.model] = task
                task.add_done_callback(functools.partial(self._synced, route.model))
            tasks.append(task)
        if not self.synced:
            self.synced = all(await asyncio.gather(*tasks))

    def _synced(self, model: str, _: asyncio.Task[bool]) -> None:
        self._syncing.pop(model, None)

    def _wanted(self, route: Route) -> bool:
        """A stored route newer than the one served, unless its load failed lately (retried after a while)."""
        current = self.routes.get(route.model)
        if current is not None and current.route.revision >= route.revision:
            return False
        failed = self.failures.get(route.model)
        return not (
            failed and failed[0] == route.revision and time.time() - failed[2] < self.config.retry_failed_load_seconds
        )

    async def _sync_route(self, route: Route) -> bool:
        """Load and apply one stored route; False if something other than its versions failed (tried again)."""
        async with self._lock(route.model):
            if not self._wanted(route):  # an admin PUT applied a newer revision meanwhile
                return True
            try:
                async with self._load_slots:
                    active = await self._prepare(route)
            except LoadError as err:
                log.error("route %s revision %d not applied: %s", route.model, route.revision, err)
                self.failures[route.model] = (route.revision, str(err), time.time())
                self.metrics.route_load_failures.labels(route.model).inc()
                self._unload_unused(route.model)
                return True
            except Exception:  # e.g. the registry's database unreachable: not the route's fault
                log.exception("loading route %s revision %d failed", route.model, route.revision)
                self._unload_unused(route.model)
                return False
            self._apply(active)
            return True

    async def _poll(self) -> None:
        while True:
            try:
                await self.sync_routes()
                self._announce()  # a failed load, for an admin PUT waiting on every worker
                await asyncio.to_thread(self.keys.refresh, self.engine)
            except Exception:  # a database hiccup must not stop the poller
                log.exception("polling routes and keys failed")
            await asyncio.sleep(self.config.poll_interval)

    def route(self, model: str) -> Route:
        active = self.routes.get(model)
        if active is None:
            raise NotFound(f"no route for model {model!r}")
        return active.route

    def ready(self) -> bool:
        """Every stored route has been tried, and each model whose route failed to load still serves an older one."""
        return self.synced and not any(m not in self.routes for m in self.failures)

    # --- predictions ----------------------------------------------------------------------------

    def active(self, model: str) -> Active:
        """The model's served route. The errors name no other model and no load error: a caller learns only
        about the model it asked for, and the load error is for an admin (GET /admin/routes) and the log."""
        active = self.routes.get(model)
        if active is None:
            if model in self.failures:
                raise Unavailable(f"model {model!r} is not ready: its route failed to load")
            if not self.synced:
                raise Unavailable(f"model {model!r} is not ready: routes still loading")
            raise NotFound(f"unknown model {model!r}")
        return active

    async def infer(
        self, active: Active, sent: Rows, request_id: str, routing_key: str, key_id: str | None = None
    ) -> Answer:
        """Route one request (the caller's parsed rows), answer it, log every model call.

        Each version gets the columns its own signature declares; the champion's are checked first, so a
        request it cannot take is a 422 whichever arm it is routed to.
        """
        sent = await self.features.merge(active, sent)
        champion = active.champion
        rows = select(sent, champion.schema, champion.label)
        logged = self.protector.rows(rows if rows is sent else self._logged(active, sent), active.classification)
        self.feedback_guard.served(request_id, active.classification)
        route = active.route
        digest = routing.key_digest(route.model, routing_key, self.routing_secret)
        base: _CallBase = {
            "request_id": request_id,
            "model": route.model,
            "mode": route.mode,
            "release_id": route.release_id,
            "routing_key_hash": digest[:16],
            "sample_bucket": routing.sample_bucket(request_id),
            "key_id": key_id,
        }
        fallback = False
        if active.arms:
            salted = routing.key_digest(routing.salted(route, route.model), routing_key, self.routing_secret)
            index = routing.choose_experiment_arm(route, salted)
            if index is not None:
                arm = active.arms[index]
                outputs = await self._call_candidate(active, sent, rows, logged, base, served=True, slot=arm)
                if outputs is not None:
                    return Answer(outputs, arm.version, "candidate")
                fallback = True
                self.metrics.fallbacks.labels(route.model).inc()
        elif active.candidate is not None and routing.choose_arm(route, digest) == "candidate":
            outputs = await self._call_candidate(active, sent, rows, logged, base, served=True)
            if outputs is not None:
                return Answer(outputs, active.candidate.version, "candidate")
            fallback = True
            self.metrics.fallbacks.labels(route.model).inc()
        outputs = await self._call_served(base, rows, logged, champion, "champion", fallback)
        if route.mode is Mode.shadow and active.candidate is not None:
            if len(self._shadow) < self.config.shadow_queue:
                self._shadow.append((active, sent, rows, logged, base))
                cast("asyncio.Event", self._shadow_wake).set()  # made by start()
            else:
                self.metrics.shadow_dropped.labels(route.model).inc()
        return Answer(outputs, champion.version, "champion")

    async def infer_version(
        self, active: Active, sent: Rows, version: str, request_id: str, key_id: str | None = None
    ) -> Answer:
        """A request for one served version by number (the v2 protocol's `/versions/{v}/infer`): that version
        answers, whatever the route's split, or NotFound names the versions served.

        The caller chose the arm, so the call is no exposure of a release: it is logged with no release and
        mode `single`, and never enters a canary's comparison (which reads its release's rows).
        """
        arms = [(slot, "champion" if slot is active.champion else "candidate") for slot in active.slots]
        found = next(((slot, arm) for slot, arm in arms if slot.version == version), None)
        model = active.route.model
        if found is None:
            raise NotFound(
                f"version {version!r} of {model!r} is not served (served: {', '.join(s.version for s, _ in arms)})"
            )
        slot, arm = found
        sent = await self.features.merge(active, sent)
        rows = select(sent, slot.schema, slot.label)
        logged = self.protector.rows(rows if rows is sent else self._logged(active, sent), active.classification)
        self.feedback_guard.served(request_id, active.classification)
        base: _CallBase = {
            "request_id": request_id,
            "model": model,
            "mode": Mode.single,
            "release_id": None,
            "routing_key_hash": routing.routing_key_hash(model, request_id, self.routing_secret),
            "sample_bucket": routing.sample_bucket(request_id),
            "key_id": key_id,
        }
        return Answer(await self._call_served(base, rows, logged, slot, arm, False), slot.version, arm)

    async def _call_served(
        self, base: _CallBase, rows: Rows, logged: Rows, slot: Slot, arm: str, fallback: bool
    ) -> list[Any]:
        """The answer of the version that serves the request, its call logged; a failure raises to the caller."""
        start = time.perf_counter()
        try:
            outputs = await slot.predict(rows, self.config.champion_timeout)
        except QueueFull:
            raise  # not a model call: nothing logged, the caller is told to retry (503)
        except ModelCallError as err:
            self._log_call(
                base,
                logged,
                None,
                slot,
                arm,
                start,
                served=False,
                fallback=fallback,
                status=CallStatus.timeout if isinstance(err, CallTimeout) else CallStatus.error,
                error=str(err),
            )
            raise
        self._log_call(base, logged, outputs, slot, arm, start, served=True, fallback=fallback)
        return outputs

    def _logged(self, active: Active, sent: Rows) -> Rows:
        """The request's inputs as logged: the caller's values of every column a served version declares.

        The others are ignored by every version; they are counted, not logged.
        """
        declared = active.declared
        if declared is None:
            return sent
        kept = {name: values for name, values in sent.columns.items() if name in declared}
        if len(kept) == len(sent.columns):
            return sent
        self.metrics.ignored(active.route.model, len(sent.columns) - len(kept))
        return Rows(kept, sent.n)

    async def _call_candidate(
        self,
        active: Active,
        sent: Rows,
        rows: Rows,
        logged: Rows,
        base: _CallBase,
        served: bool,
        slot: Slot | None = None,
    ) -> list[Any] | None:
        """The candidate's (or `slot`'s: an experiment's arm) answer, or None after logging why it has none (error,
        timeout, wrong shape).

        `rows` are the champion's columns: the candidate's own are selected from what the caller `sent`.
        """
        same_schema = active.same_schema if slot is None else slot.schema == active.champion.schema
        slot = cast("Slot", active.candidate) if slot is None else slot  # called for routes with a candidate only
        breaker = cast("Breaker", slot.breaker)  # every loaded slot has one
        if not breaker.allow():
            self._log_call(
                base,
                logged,
                None,
                slot,
                "candidate",
                None,
                served=False,
                fallback=False,
                status=CallStatus.skipped,
                error=breaker.describe(),
            )
            return None
        start = time.perf_counter()
        status, error = CallStatus.ok, None
        try:
            if not same_schema:
                rows = select(sent, slot.schema, slot.label)
            outputs = await slot.predict(rows, self.config.candidate_timeout)
        except CallTimeout as err:
            status, error = CallStatus.timeout, str(err)
        except (ModelCallError, PayloadError) as err:
            status, error = CallStatus.error, str(err)
        breaker.record(status is CallStatus.ok)
        if status is not CallStatus.ok:
            self._log_call(
                base, logged, None, slot, "candidate", start, served=False, fallback=False, status=status, error=error
            )
            return None
        self._log_call(base, logged, outputs, slot, "candidate", start, served=served, fallback=False)
        return outputs

    async def _shadow_worker(self) -> None:
        """Take every mirrored request waiting: one compiled call for all of them inline, else a batch task.

        One taker, collecting for `shadow_max_wait_ms` while fewer than `batch_max_rows` wait, so the mirrored
        requests share one candidate call (with a taker per request they were called one by one). The call runs
        on the event loop, so a caller's request that arrives meanwhile waits for it: collecting for longer than
        the callers' own batches makes those waits rarer (at 1,000 requests/s, 50 calls a second rather than 500),
        which is what a caller's p99 sees. Batches that need the slot's batcher run as tasks, at most
        `shadow_workers` at a time.
        """
        wait, most = self.config.shadow_max_wait_ms / 1000, self.config.batch_max_rows
        queue = self._shadow
        wake, mirror_slots = self._shadow_wake, self._mirror_slots
        assert wake is not None and mirror_slots is not None  # start() makes them before it starts this task
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            if wait > 0 and len(queue) < most:
                # Nobody waits for a mirrored answer, so wait for more to share the call: a call costs the
                # demo's candidate ~36 µs for one row and ~41 µs for eight.
                await asyncio.sleep(wait)
            batch = [queue.popleft() for _ in range(min(len(queue), most))]
            self._shadow_busy += len(batch)
            try:
                done = self._mirror_inline(batch)
            except Exception:
                log.exception("mirrored calls to %s", cast("Slot", batch[0][0].candidate).label)
                done = True
            if done:
                self._shadow_busy -= len(batch)
                continue
            await mirror_slots.acquire()
            task = asyncio.create_task(self._mirror_each(batch))
            self._mirroring.add(task)
            task.add_done_callback(self._mirroring.discard)

    def _mirror_inline(self, batch: list[_Mirrored]) -> bool:
        """One call of a compiled candidate for the whole batch; False where that does not apply.

        A compiled call takes microseconds and cannot hang, so it runs inline, without the per-request
        future and timeout that cost the champion's event loop more than the prediction. Each mirrored
        row logs the batch call's own duration as its latency (not its time in the queue): that is what
        the candidate would have cost the request.
        """
        slot = cast("Slot", batch[0][0].candidate)
        if not all(a.candidate is slot and a.same_schema for a, _, _, _, _ in batch):
            return False
        if slot.breaker is not None and slot.breaker.is_open:
            return False  # each request asks the breaker on its own: skipped, or the trial call
        start = time.perf_counter()
        try:
            values = slot.call_fast([rows for _, _, rows, _, _ in batch])
        except ModelCallError:
            return False  # one call each attributes the error to its request
        if values is None:
            return False
        at, cpu_ms = 0, getattr(values, "cpu_ms", None)
        for _, _, rows, logged, base in batch:
            outputs = Measured(values[at : at + rows.n], cpu_ms)
            self._log_call(base, logged, outputs, slot, "candidate", start, served=False, fallback=False)
            at += rows.n
        return True

    async def _mirror_each(self, batch: list[_Mirrored]) -> None:
        try:
            await asyncio.gather(
                *(
                    self._call_candidate(active, sent, rows, logged, base, served=False)
                    for active, sent, rows, logged, base in batch
                )
            )
        except Exception:
            log.exception("mirrored calls to %s", cast("Slot", batch[0][0].candidate).label)
        finally:
            self._shadow_busy -= len(batch)
            cast("asyncio.Semaphore", self._mirror_slots).release()  # made by start()

    def _log_call(
        self,
        base: _CallBase,
        rows: Rows,
        outputs: list[Any] | None,
        slot: Slot,
        arm: str,
        start: float | None,
        *,
        served: bool,
        fallback: bool,
        status: CallStatus = CallStatus.ok,
        error: str | None = None,
    ) -> None:
        """Log one model call (`start` None: a call skipped, which has no latency) and count it."""
        elapsed = time.perf_counter() - start if start is not None else None
        if type(outputs) is Retried:  # answered, but its batch call failed: that failure is the model's too
            status, error = CallStatus.retried, outputs.error
        self.metrics.model_call(slot.model, slot.version, arm, elapsed)
        if status is not CallStatus.ok:
            self.metrics.errors.labels(slot.model, slot.version, arm, status).inc()
        row = dict(
            base,
            time=time.time(),
            version=slot.version,
            arm=arm,
            served=served,
            fallback=fallback,
            latency_ms=elapsed * 1000 if elapsed is not None else None,
            cpu_ms=getattr(outputs, "cpu_ms", None),  # slots.Measured
            status=status,
            error=error,
        )
        self.predictions.put((row, rows, outputs), rows=rows.n)

    # --- feedback -------------------------------------------------------------------------------

    def feedback(self, items: object) -> int:
        """Queue labels for the `feedback` table; PayloadError names the first bad item.

        A label is what the analysis reads (`analysis.labels.per_row`): one JSON scalar (string, number,
        boolean) for the request, or a list of them, one per input row.
        """
        items = items if isinstance(items, list) else [items]
        if not items:
            raise PayloadError("no feedback items", 422)
        if len(items) > MAX_FEEDBACK_ITEMS:
            raise PayloadError(f"{len(items)} feedback items in one request; the limit is {MAX_FEEDBACK_ITEMS}", 413)
        now = time.time()
        rows = []
        for i, item in enumerate(items):
            where = f"feedback item {i}"
            if not isinstance(item, dict):
                raise PayloadError(f"{where} must be an object with request_id and ground_truth", 422)
            extra = set(item) - {"request_id", "ground_truth", "business_value"}
            if extra:
                raise PayloadError(f"{where} has unexpected field(s) {sorted(extra)}", 422)
            rid = item.get("request_id")
            if not isinstance(rid, str):
                raise PayloadError(f"{where}: request_id must be a string (the id the prediction was given)", 422)
            rid = routing.logged_request_id(rid)  # as the prediction was logged under it
            truth = item.get("ground_truth")
            if truth is None:
                raise PayloadError(f"{where}: ground_truth is required", 422)
            self._check_label(truth, where)
            value = item.get("business_value")
            if value is not None and not _finite_number(value):
                raise PayloadError(f"{where}: business_value must be a finite number", 422)
            # A float, as its column is: an integer JSON carries (up to 2**64 - 1) may not fit SQLite's INTEGER, and
            # the database would refuse the row after the caller was told it was accepted.
            logged_truth, logged_value = self.protector.feedback(
                truth, float(value) if value is not None else None, self.feedback_guard.classes(rid)
            )
            rows.append({"request_id": rid, "time": now, "ground_truth": logged_truth, "business_value": logged_value})
        if not self.feedback_log.put(rows, rows=len(rows)):
            raise Unavailable("the feedback buffer is full; retry shortly")
        return len(rows)

    def _check_label(self, truth: object, where: str) -> None:
        if isinstance(truth, list):
            if not 0 < len(truth) <= self.config.max_rows:
                raise PayloadError(
                    f"{where}: a ground_truth list has one label per input row (1 to {self.config.max_rows})", 422
                )
            if all(_label(v) for v in truth):
                return
        elif _label(truth):
            return
        raise PayloadError(
            f"{where}: ground_truth must be a string, a finite number or a boolean, or a list of them "
            "(one per input row of the request)",
            422,
        )


def _finite_number(value: object) -> bool:
    """A number the feedback columns (floats) hold: within the bounds the OpenAPI document states."""
    return finite_double(value)


def _label(value: object) -> bool:
    """A label the analysis can read: a string, a finite number or a boolean."""
    return type(value) is str or type(value) is bool or _finite_number(value)
