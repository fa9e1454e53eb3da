"""Features from a Feast online store, merged into a request's rows before each version selects its columns.

A model declares them in its `releasegate.feast` tag: a Feast feature service, the entity keys a request
carries, and what to do when an entity is missing or the store does not answer (docs/features.md). The
requests waiting for a model's features share one lookup (`get_online_features` for all their rows), and
the merged rows are what the versions see and what the log holds. Feast is imported only when a served
model declares features: its import takes seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from releasegate import registry
from releasegate.contract import FEAST_TAG, FeatureMiss, MissingFeatures, from_tag
from releasegate.serving.payloads import PayloadError, Rows

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore, FeatureView
    from feast.infra.online_stores.online_store import OnlineStore
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto
    from feast.repo_config import RepoConfig
    from feast.value_type import ValueType

    from releasegate.serving.config import GatewayConfig
    from releasegate.serving.gateway import Active
    from releasegate.serving.metrics import Metrics
    from releasegate.settings import Settings

log = logging.getLogger(__name__)

# Value kinds Feast's own conversion (feast_value_type_to_python_type) hands back as the proto holds them; every
# other kind (timestamps, lists, sets, maps, JSON, UUID, decimal) still goes through it.
_PLAIN_VALUES = frozenset({"double_val", "float_val", "int32_val", "int64_val", "bool_val", "string_val", "bytes_val"})


class FeatureDeclarationError(ValueError):
    """A model's `releasegate.feast` tag that cannot be served: malformed, no repository, an unknown service."""


class FeaturesUnavailable(RuntimeError):
    """The feature store did not answer (timeout or error) and the model rejects requests without features (503)."""


class FeastDeclaration(BaseModel):
    """The `releasegate.feast` tag: where a model's features come from and what a miss does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature_service: str = Field(min_length=1, description="The Feast feature service whose features the model takes.")
    entities: list[str] = Field(min_length=1, description="The join keys each request carries (its own columns).")
    on_missing: MissingFeatures = Field(
        default=MissingFeatures.reject,
        description="An entity the store does not hold, or a store that does not answer.",
    )
    defaults: dict[str, StrictBool | StrictInt | StrictFloat | StrictStr] = Field(
        default_factory=dict, description="A value per feature for `on_missing: defaults` (and for a null value)."
    )


def declaration(model: str, tags: dict[str, str]) -> FeastDeclaration | None:
    """The model's feature declaration, None if it declares none; FeatureDeclarationError names the problem."""
    if FEAST_TAG not in tags:
        return None
    return from_tag(FeastDeclaration, model, tags, FEAST_TAG, FeatureDeclarationError, "a Feast feature declaration")


def open_store(settings: Settings) -> FeatureStore:
    """The deployment's Feast store (RELEASEGATE_FEAST_REPO). Blocking and slow the first time: Feast's import."""
    if settings.feast_repo is None:
        raise FeatureDeclarationError(
            f"a model declares Feast features ({FEAST_TAG}), but RELEASEGATE_FEAST_REPO names no feature repository"
        )
    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import FeatureStore

    return FeatureStore(repo_path=str(settings.feast_repo))


def service_features(store: FeatureStore, name: str) -> tuple[FeatureService, list[str], list[str]]:
    """The feature service, the features it serves from the online store, and those of views kept offline only."""
    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast.errors import FeastObjectNotFoundException

    try:
        service = store.get_feature_service(name)
    except FeastObjectNotFoundException as err:
        known = ", ".join(sorted(s.name for s in store.list_feature_services())) or "none"
        raise FeatureDeclarationError(f"Feast has no feature service {name!r} (known: {known})") from err
    online: list[str] = []
    offline: list[str] = []
    for projection in service.feature_view_projections:
        try:
            served = store.get_feature_view(projection.name).online
        except FeastObjectNotFoundException:
            served = True  # an on-demand view: computed at lookup time from what the store serves
        (online if served else offline).extend(f.name for f in projection.features)
    return service, online, offline


@dataclass(eq=False)
class _Job:
    keys: dict[str, list[Any]]
    n: int
    future: asyncio.Future[dict[str, list[Any]]]
    deadline: float  # the loop's time at which its request stops waiting for features


@dataclass(frozen=True)
class _Asked:
    table: FeatureView
    names: list[str]
    keys: list[EntityKeyProto]  # one per distinct entity
    rows: tuple[list[int], ...]  # the request rows of each entity


@dataclass(frozen=True)
class _Direct:
    """A feature service read from its online store without `get_online_features`' response.

    Why not Feast's own call: per lookup it builds an OnlineResponse protobuf (join keys and a status per value)
    that `to_dict` then takes apart again, ~0.1 ms of a one-row lookup's ~0.2 ms and a third of a 16-row one's
    (docs/benchmarks.md). Everything else is Feast's: its cached resolution of the service into feature views
    (`_get_cached_request_context`), its conversion of the entity values and de-duplication of the entities,
    the online store's own `online_read`, and its conversion of the values read. Only a service of plain feature
    views keyed by the declared entities is read so; one with on-demand views, request data or other join keys
    goes through `get_online_features` as before.
    """

    tables: list[tuple[FeatureView, list[str]]]
    entity_types: dict[str, ValueType]
    join_keys: dict[str, str]
    config: RepoConfig
    online: OnlineStore

    @classmethod
    def of(
        cls, store: FeatureStore, service: FeatureService, entities: list[str], features: list[str]
    ) -> _Direct | None:
        from feast import utils
        from feast.feature_view import DUMMY_ENTITY_ID

        try:
            (_, on_demand, join_keys, types, key_set, grouped, _, request_data, entityless) = (
                utils._get_cached_request_context(store.registry, store.project, service, False)
            )
        except Exception:  # Feast's own call will say what is wrong, at the lookup
            return None
        # Feast's join keys always hold its placeholder for entityless views, asked for or not.
        if on_demand or request_data or entityless or not set(key_set) - {DUMMY_ENTITY_ID} <= set(entities):
            return None
        tables = [(table, list(names)) for table, names in grouped]
        if sorted(name for _, names in tables for name in names) != sorted(features):
            return None
        return cls(tables, dict(types), dict(join_keys), store.config, store._get_provider().online_store)

    def read(self, keys: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """The values of every row of `keys` (blocking)."""
        n, asked = len(next(iter(keys.values()))), self.asked(keys)
        return self.values(
            n, [(a, self.online.online_read(self.config, a.table, a.keys, list(a.names))) for a in asked]
        )

    async def read_async(self, keys: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """`read` through the online store's asyncio client (one feature view, the usual case: awaited as it is,
        without the task `gather` would make of it)."""
        n, asked = len(next(iter(keys.values()))), self.asked(keys)
        reads = [self.online.online_read_async(self.config, a.table, a.keys, list(a.names)) for a in asked]
        read = [await reads[0]] if len(reads) == 1 else await asyncio.gather(*reads)
        return self.values(n, list(zip(asked, read)))

    def asked(self, keys: dict[str, list[Any]]) -> list[_Asked]:
        """Each feature view's distinct entity keys, as Feast's own lookup makes them."""
        from feast import utils
        from feast.type_map import python_values_to_proto_values
        from feast.value_type import ValueType

        protos = {
            name: python_values_to_proto_values(values, self.entity_types.get(name, ValueType.UNKNOWN))
            for name, values in keys.items()
            if name in self.entity_types
        }
        asked = []
        for table, names in self.tables:
            entities, rows, _ = utils._get_unique_entities(table, protos, self.join_keys)
            asked.append(_Asked(table, names, utils._get_entity_key_protos(entities), rows))
        return asked

    @staticmethod
    def values(
        n: int, read: list[tuple[_Asked, list[tuple[Any, dict[str, ValueProto] | None]]]]
    ) -> dict[str, list[Any]]:
        """A list of `n` values per feature from what each view's online read answered (None: not held)."""
        from feast.type_map import feast_value_type_to_python_type

        plain = _PLAIN_VALUES
        found: dict[str, list[Any]] = {}
        for asked, answers in read:
            for name in asked.names:
                column: list[Any] = [None] * n
                for (_, held), rows in zip(answers, asked.rows):
                    value = held.get(name) if held else None
                    if value is None:
                        continue
                    kind = value.WhichOneof("val")
                    if kind is None:
                        continue
                    # Feast's conversion tries a dozen kinds before it returns a plain one as is: ~1 µs a value.
                    python = getattr(value, kind) if kind in plain else feast_value_type_to_python_type(value)
                    for i in rows:
                        column[i] = python
                found[name] = column
        return found


class Lookup:
    """One model's features: its store and service, and the requests waiting to share the next lookup."""

    def __init__(
        self,
        model: str,
        declared: FeastDeclaration,
        store: FeatureStore,
        service: FeatureService,
        features: list[str],
        metrics: Metrics,
        config: GatewayConfig,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.model = model
        self.declared = declared
        self.features = features
        self._store = store
        self._service = service
        self._config = config
        self._executor = executor
        self._on_loop = bool(store.provider.async_supported.online.read)
        self._direct = _Direct.of(store, service, declared.entities, features)
        self._pending: deque[_Job] = deque()
        self._task: asyncio.Task[None] | None = None
        self._seconds = metrics.feature_lookup.labels(model)
        self._rows = metrics.feature_lookup_rows.labels(model)
        self._misses = metrics.feature_misses

    def read(self, keys: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """One lookup of every row of `keys` (blocking): a list of values per feature, None where none is held."""
        if self._direct is not None:
            return self._direct.read(keys)
        values = self._store.get_online_features(features=self._service, entity_rows=keys).to_dict()
        return {name: values[name] for name in self.features}

    async def lookup(self, keys: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """`read` without blocking the event loop: on the loop itself where the online store has an asyncio
        client (Redis, PostgreSQL, DynamoDB: no thread hop, and a lookup past the timeout is cancelled, not left
        running), else in a thread (SQLite)."""
        if not self._on_loop:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.read, keys)
        if self._direct is not None:
            return await self._direct.read_async(keys)
        response = await self._store.get_online_features_async(features=self._service, entity_rows=keys)
        values = response.to_dict()
        return {name: values[name] for name in self.features}

    def warm(self) -> None:
        """A lookup of no rows, answered or refused: Feast's first lookup loads what it needs for seconds, which
        is paid here, once, and not within a request's `feature_timeout`."""
        try:
            self.read({name: [] for name in self.declared.entities})
        except Exception:  # Feast refuses an empty lookup, after loading what a real one needs
            pass

    async def merge(self, sent: Rows) -> Rows:
        """`sent` with the model's features added (the store's values replace any the caller sent)."""
        declared = self.declared
        keys = {}
        for name in declared.entities:
            values = sent.columns.get(name)
            if values is None:
                raise PayloadError(
                    f"model {self.model!r} looks its features up by {name!r}: the request has no such column", 422
                )
            keys[name] = values
        # A row without a key is a missing entity, not asked for: Feast would fail the whole lookup on it.
        everyone = all(None not in values for values in keys.values())
        if everyone:
            asked, n = keys, sent.n
        else:
            keyed = [i for i in range(sent.n) if all(keys[name][i] is not None for name in declared.entities)]
            asked, n = {name: [values[i] for i in keyed] for name, values in keys.items()}, len(keyed)
        try:
            found = await self._fetch(asked, n) if n else {name: [] for name in self.features}
        except TimeoutError:
            return self._without(sent, FeatureMiss.timeout, f"did not answer within {self._config.feature_timeout:g}s")
        except Exception as err:  # the store failed: what it means for the request is the model's to say
            return self._without(sent, FeatureMiss.error, f"failed: {type(err).__name__}: {err}")
        if not everyone:  # one value per request row again, None for the rows without a key
            spread: dict[str, list[Any]] = {name: [None] * sent.n for name in found}
            for name, values in found.items():
                for at, i in enumerate(keyed):
                    spread[name][i] = values[at]
            found = spread
        if any(None in column for column in found.values()):
            missing = [i for i in range(sent.n) if all(found[name][i] is None for name in self.features)]
        else:
            missing = []
        if missing:
            self._misses.labels(self.model, FeatureMiss.missing_entity, declared.on_missing).inc()
            if declared.on_missing is MissingFeatures.reject:
                entity = ", ".join(f"{name}={keys[name][missing[0]]!r}" for name in declared.entities)
                raise PayloadError(
                    f"feature service {declared.feature_service!r} holds no features for {entity}"
                    + (f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""),
                    422,
                )
        if declared.defaults and declared.on_missing is MissingFeatures.defaults:
            for name, value in declared.defaults.items():
                column = found.get(name)
                if column is not None and None in column:
                    found[name] = [value if v is None else v for v in column]
        return Rows({**sent.columns, **found}, sent.n)

    def _without(self, sent: Rows, reason: FeatureMiss, what: str) -> Rows:
        action = self.declared.on_missing
        self._misses.labels(self.model, reason, action).inc()
        message = f"the feature store {what} (feature service {self.declared.feature_service!r})"
        if action is MissingFeatures.reject:
            raise FeaturesUnavailable(message)
        log.warning("%s: %s; serving with %s", self.model, message, action)
        defaults = self.declared.defaults if action is MissingFeatures.defaults else {}
        found = {name: [defaults.get(name)] * sent.n for name in self.features}
        return Rows({**sent.columns, **found}, sent.n)

    # --- the shared lookups, on the event loop --------------------------------------------------

    def _fetch(self, keys: dict[str, list[Any]], n: int) -> asyncio.Future[dict[str, list[Any]]]:
        """The features of `keys`' rows from the next shared lookup; TimeoutError once `feature_timeout` has passed.
        A future, not a coroutine: one frame less for every request to pass through when it resumes."""
        loop = asyncio.get_running_loop()
        job = _Job(keys, n, loop.create_future(), loop.time() + self._config.feature_timeout)
        self._pending.append(job)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name=f"features {self.model}")
        return job.future

    async def _run(self) -> None:
        """Take every request waiting (up to `feature_batch_rows` rows) into one lookup, until none waits.

        One lookup at a time per model: the requests that arrive during a lookup share the next one. Each request
        waits at most `feature_timeout` (its job's deadline): a lookup is given up at the earliest deadline of its
        requests, which then time out together, so a store that hangs holds up no later request for longer. One
        timer a lookup, none a request: `asyncio.wait_for` or `timeout` per request cost ~10 µs of the event loop.
        """
        loop = asyncio.get_running_loop()
        limit = self._config.feature_batch_rows
        while self._pending:
            if len(self._pending) < limit:
                await asyncio.sleep(0)  # one turn of the loop: the requests read in it share this lookup
            jobs: list[_Job] = []
            rows = 0
            now = loop.time()
            while self._pending and (not jobs or rows + self._pending[0].n <= limit):
                job = self._pending.popleft()
                if job.future.done():  # its request went away
                    continue
                if job.deadline <= now:  # it waited its whole time behind a lookup that was given up
                    _settle(job, error=TimeoutError())
                    continue
                jobs.append(job)
                rows += job.n
            if not jobs:
                continue
            try:
                await self._serve(jobs, rows)
            except Exception as err:  # never leave a request waiting: no timer of its own would end its wait
                log.exception("feature lookup of %s", self.model)
                for job in jobs:
                    _settle(job, error=err)

    async def _serve(self, jobs: list[_Job], rows: int) -> None:
        """One lookup for `jobs` (`rows` rows in all), given up at their earliest deadline; each job settled."""
        keys = {name: [v for job in jobs for v in job.keys[name]] for name in self.declared.entities}
        start = time.perf_counter()
        try:
            async with asyncio.timeout_at(min(job.deadline for job in jobs)):
                found = await self.lookup(keys)
        except TimeoutError as err:
            for job in jobs:
                _settle(job, error=err)
            return
        except Exception as err:
            if len(jobs) == 1:
                _settle(jobs[0], error=err)
                return
            # One request's bad key must not fail its neighbours: each is read on its own, within its own time.
            for job in jobs:
                try:
                    async with asyncio.timeout_at(job.deadline):
                        _settle(job, await self.lookup(job.keys))
                except Exception as one_err:
                    _settle(job, error=one_err)
            return
        finally:
            self._seconds.observe(time.perf_counter() - start)
            self._rows.observe(rows)
        at = 0
        for job in jobs:
            _settle(job, {name: values[at : at + job.n] for name, values in found.items()})
            at += job.n


def _settle(job: _Job, value: dict[str, list[Any]] | None = None, error: Exception | None = None) -> None:
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(value or {})


class Features:
    """The gateway's feature lookups: each model's declaration, read once per route revision."""

    def __init__(self, settings: Settings, config: GatewayConfig, metrics: Metrics) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="features")
        self._lookups: dict[str, tuple[int, Lookup | None]] = {}  # model -> (route revision, its lookup)
        self._failed: dict[str, tuple[int, float, Exception]] = {}  # model -> (revision, when, why)
        self._resolving: dict[tuple[str, int], asyncio.Task[Lookup | None]] = {}
        self._store: FeatureStore | None = None

    def prepare(self, model: str, revision: int) -> None:
        """Start reading the model's declaration for a route just applied, so its first request need not wait
        for Feast to load; that request waits for the same read if it is not done yet."""
        task = asyncio.ensure_future(self._resolve(model, revision))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure is logged by _resolve

    async def merge(self, active: Active, sent: Rows) -> Rows:
        """The request's rows with the model's declared features added; `sent` itself if it declares none."""
        route = active.route
        entry = self._lookups.get(route.model)
        if entry is not None and entry[0] == route.revision:
            lookup = entry[1]
        else:
            lookup = await self._resolve(route.model, route.revision)
        return sent if lookup is None else await lookup.merge(sent)

    async def _resolve(self, model: str, revision: int) -> Lookup | None:
        failed = self._failed.get(model)
        if failed and failed[0] == revision and time.monotonic() - failed[1] < self.config.retry_failed_load_seconds:
            raise FeaturesUnavailable(f"model {model!r} declares features the gateway cannot look up: {failed[2]}")
        key = (model, revision)
        task = self._resolving.get(key)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(self._declared, model), name=f"features of {model}")
            self._resolving[key] = task
            task.add_done_callback(lambda _: self._resolving.pop(key, None))
        try:
            lookup = await asyncio.shield(task)
        except (FeatureDeclarationError, OSError, ValueError) as err:
            self._failed[model] = (revision, time.monotonic(), err)
            log.error("model %s declares features the gateway cannot look up: %s", model, err)
            raise FeaturesUnavailable(f"model {model!r} declares features the gateway cannot look up: {err}") from None
        current = self._lookups.get(model)
        if current is None or current[0] < revision:
            self._lookups[model] = (revision, lookup)
            self._failed.pop(model, None)
        return lookup

    def _declared(self, model: str) -> Lookup | None:
        """Read the model's tag and, if it declares features, open its lookup (blocking: run in a thread)."""
        declared = declaration(model, registry.get_model_tags(model, self.settings))
        if declared is None:
            return None
        if self._store is None:
            self._store = open_store(self.settings)
        else:  # a service applied since the last route change
            self._store.refresh_registry()  # type: ignore[no-untyped-call]
        service, online, offline = service_features(self._store, declared.feature_service)
        if offline:
            raise FeatureDeclarationError(
                f"feature service {declared.feature_service!r} has features the online store does not serve: "
                + ", ".join(offline)
            )
        log.info("%s: looks up %s from Feast feature service %s", model, ", ".join(online), declared.feature_service)
        lookup = Lookup(model, declared, self._store, service, online, self.metrics, self.config, self._executor)
        lookup.warm()
        return lookup

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
