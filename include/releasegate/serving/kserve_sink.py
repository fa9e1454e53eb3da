"""The KServe logger sink: request/response CloudEvents in, the gateway's `predictions` rows out.

KServe's logger (`spec.predictor.logger`, mode `all`) posts every request and every 200 response of
a predictor as a binary-mode CloudEvent (ce-id = the request id, ce-type ...inference.request /
...inference.response, ce-time = when the agent sent it). The sink pairs them by (id, version) and
writes one `predictions` row per input row, labelled from the `routes` table as the gateway labels
its own: arm, mode, release, served. The version comes from the logger URL's query
(`/events?model=churn&version=3`), which each revision carries in its own spec.

Who may post: the logger cannot send headers (its CRD has a URL, no credentials), so callers are
told apart by their mesh identity. Istio's sidecar in front of the sink requires mTLS and admits
only the predictors' service accounts to /events and the feedback accounts to /feedback
(include/k8s/sink.yaml.j2); the sink checks the same accounts again in the identity that sidecar
appends to X-Forwarded-Client-Cert (401 without one, 403 for another account; counted).

Pairing happens in the database (`sink_pairs`), not in a replica's memory: the two events of a
request may reach different replicas. The event that completes a pair claims it (pending -> paired)
in the transaction that writes its rows; a request still pending after `pending_seconds` is claimed
by whichever replica's sweep gets there first (pending -> expired) and written as an error row,
once. Events wait for the database in a queue bounded in bytes (503 past it); bodies are bounded
(413). The sweep outlives database errors: it logs, counts and retries with backoff.

What KServe does not give, and what the sink does instead:
- latency: the logger records none. It is the response event's time minus the request event's,
  both stamped by the same agent in the same pod (no clock skew), so it covers the model server
  and the agent's queue but not the network to the caller. Mesh metrics would be exact but are
  histograms per workload: they cannot be joined to a request, its label or its slice.
- errors: the logger sends no event for a non-200 answer, so a request with no response after
  `pending_seconds` is written as an `error` row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from releasegate import storage
from releasegate.contract import Arm, CallStatus, Mode
from releasegate.privacy import Classification, DataClass, FeedbackClasses, FeedbackGuard, Protector
from releasegate.serving import routing
from releasegate.serving.logwriter import LogWriter, PredictionEntry, Row, expand_predictions
from releasegate.serving.metrics import Metrics
from releasegate.serving.payloads import PayloadError, Rows, Schema, parse_invocations, parse_v2

if TYPE_CHECKING:
    from releasegate.k8s import K8sSettings
    from releasegate.settings import Settings

log = logging.getLogger(__name__)
# What the sink logs under for a model whose classification it has never been able to read.
FAIL_CLOSED = Classification(
    others=DataClass.drop, feedback=FeedbackClasses(ground_truth=DataClass.encrypt, business_value=DataClass.drop)
)
REQUEST = "org.kubeflow.serving.inference.request"
RESPONSE = "org.kubeflow.serving.inference.response"
XFCC = "x-forwarded-client-cert"
_ANY = Schema(None)
# Errors that mean "the database cannot take this right now": the batch is kept and retried.
_TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
_MAX_BACKOFF = 30.0
_REPORT_EVERY = 5.0  # seconds between two log lines about the same kind of refusal


class EventError(ValueError):
    """A CloudEvent the sink cannot use (400); the message says what is wrong."""


class Refused(Exception):
    """A request the sink will not take: unauthenticated (401), another account (403), too large (413), full (503)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


@dataclass(frozen=True, slots=True)
class Event:
    """One logger event, checked and waiting for the database."""

    request_id: str
    version: str
    model: str
    is_request: bool
    time: float  # the event's ce-time
    received: float  # when this replica took it
    body: str  # the logged JSON
    size: int  # its bytes, as counted against the queue's bound
    routing_key: str | None = None  # a request's


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=64)
    ground_truth: object
    business_value: float | None = None


def _event_time(value: str | None, received: float) -> float:
    if not value:
        return received
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as err:
        raise EventError(f"ce-time {value!r} is not an RFC 3339 time") from err


def parse_inputs(body: object) -> Rows:
    """A logged request body: Open Inference Protocol v2 (MLServer's) or an MLflow/v1 payload."""
    if (
        isinstance(body, dict)
        and isinstance(body.get("inputs"), list)
        and body["inputs"]
        and isinstance(body["inputs"][0], dict)
        and "datatype" in body["inputs"][0]
    ):
        return parse_v2(body, _ANY)
    return parse_invocations(body, _ANY)


def parse_outputs(body: object, n: int) -> list[Any]:
    """One output per input row from a logged response body (v2 `outputs[0].data`, or v1 `predictions`)."""
    if isinstance(body, dict) and isinstance(body.get("outputs"), list) and body["outputs"]:
        data = body["outputs"][0].get("data")
    elif isinstance(body, dict):
        data = body.get("predictions")
    else:
        data = body
    if isinstance(data, list) and data and isinstance(data[0], list) and len(data) == n:
        data = [row[0] if len(row) == 1 else row for row in data]
    if not isinstance(data, list) or len(data) != n:
        raise EventError(f"the response has {len(data) if isinstance(data, list) else 'no'} outputs for {n} input rows")
    return data


# -- who is calling ---------------------------------------------------------------------------------------------


def _split_unquoted(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def peer_identity(xfcc: str | None) -> str | None:
    """The caller's SPIFFE URI from X-Forwarded-Client-Cert: the last element's, which the sink's own sidecar appended.

    Envoy appends the verified peer of the mTLS connection it terminated; any earlier element came
    with the request and proves nothing.
    """
    if not xfcc:
        return None
    last = _split_unquoted(xfcc, ",")[-1]
    for pair in _split_unquoted(last, ";"):
        key, _, value = pair.partition("=")
        if key.strip().lower() == "uri":
            return value.strip().strip('"') or None
    return None


class Identities:
    """The SPIFFE identities that may post events and feedback (from K8sSettings, as the AuthorizationPolicy's)."""

    def __init__(self, settings: K8sSettings) -> None:
        self.events = frozenset(f"spiffe://{p}" for p in settings.principals(settings.sink_event_accounts))
        self.feedback = frozenset(f"spiffe://{p}" for p in settings.principals(settings.sink_feedback_accounts))

    @staticmethod
    def check(headers: Mapping[str, str], allowed: frozenset[str], what: str) -> str:
        identity = peer_identity(headers.get(XFCC))
        if identity is None:
            raise Refused(401, "unauthenticated", f"{what} needs a mesh identity (mTLS through the sink's sidecar)")
        if identity not in allowed:
            raise Refused(403, "forbidden", f"{identity} may not post {what}")
        return identity


# -- pairing ----------------------------------------------------------------------------------------------------


class Sink:
    """Takes logger events into a bounded queue; a writer thread pairs them through `sink_pairs` and writes rows."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        pending_seconds: float = 30.0,
        route_ttl: float = 2.0,
        max_queue_bytes: int = 64 * 1_048_576,
        batch_events: int = 500,
        flush_interval: float = 0.05,
        routing_secret: bytes,
        protector: Protector | None = None,
        classification: Callable[[str], Classification] | None = None,
        classification_ttl: float = 60.0,
    ) -> None:
        self.engine = engine
        self.routing_secret = routing_secret  # keys the logged routing-key hash, as the gateway's does
        # Inputs are logged in the form the model's classification allows, as the gateway logs them.
        self.protector = protector
        self.feedback_guard = FeedbackGuard()
        self.classification_of = classification or (lambda model: Classification())
        self.classification_ttl = classification_ttl
        self._classes: dict[str, tuple[float, Classification]] = {}
        self.pending_seconds = pending_seconds
        # A claimed pair is kept this long, so a repeated or late event finds it and writes nothing.
        self.retention_seconds = max(10 * pending_seconds, 600.0)
        self.route_ttl = route_ttl
        self.max_queue_bytes = max_queue_bytes
        self.batch_events = batch_events
        self.flush_interval = flush_interval
        self.metrics = Metrics()
        r = self.metrics.registry
        self.refused = Counter(
            "releasegate_sink_refused_requests",
            "Requests the sink refused: unauthenticated, forbidden, too_large, invalid, overloaded.",
            ("endpoint", "reason"),
            registry=r,
        )
        self.outcomes = Counter(
            "releasegate_sink_events",
            "Logger events by outcome: paired (a pair written), pending (waiting for its other half), late "
            "(its pair was already written or expired), dropped (not written: database refused it or shutdown).",
            ("outcome",),
            registry=r,
        )
        self.expired = Counter(
            "releasegate_sink_expired",
            "Pairs the sweep closed: request (written as an error row) or response (its request never came).",
            ("half",),
            registry=r,
        )
        self.db_errors = Counter(
            "releasegate_sink_db_errors", "Database errors, by task (pair or sweep); retried.", ("task",), registry=r
        )
        Gauge("releasegate_sink_queue_bytes", "Event bytes waiting for the database.", registry=r).set_function(
            lambda: self._queued_bytes
        )
        self.feedback_log: LogWriter[list[Row]] = LogWriter(
            engine, storage.feedback, self.metrics, expand=lambda rows: rows
        )
        self._queue: deque[Event] = deque()
        self._queued_bytes = 0
        self._unsettled = 0
        self._cond = threading.Condition()
        self._closing = False
        self._give_up_at = float("inf")
        self._thread = threading.Thread(target=self._run, name="sink-pairing", daemon=True)
        self._routes: dict[str, tuple[float, dict[str, Any] | None]] = {}

    def start(self) -> Sink:
        self._thread.start()
        self.feedback_log.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Pair what is queued (giving up after `timeout` s if the database stays down), then stop.

        Pending pairs stay in the database: their other half may still reach another replica.
        """
        with self._cond:
            self._closing = True
            self._give_up_at = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout + 5)
        self.feedback_log.close(timeout)

    def queued(self) -> int:
        """Events taken and not yet through the database (queued, or in a batch being paired)."""
        return self._unsettled

    # -- taking events --------------------------------------------------------------------------------------

    def accept(
        self, headers: Mapping[str, str], query: Mapping[str, str], body: bytes, received: float | None = None
    ) -> Event:
        """Check one CloudEvent and queue it for pairing; EventError if unusable, Refused (503) if the queue is full."""
        received = time.time() if received is None else received
        kind, request_id = headers.get("ce-type"), headers.get("ce-id")
        if kind not in (REQUEST, RESPONSE):
            raise EventError(f"ce-type must be {REQUEST} or {RESPONSE}, got {kind!r} (binary-mode CloudEvents only)")
        if not request_id or len(request_id) > 64:
            raise EventError("ce-id (the request id) must be 1-64 characters")
        model, version = query.get("model"), query.get("version")
        if not model or not version:
            raise EventError("the logger URL must carry ?model=...&version=... (the kserve backend renders it so)")
        if len(model) > 200 or len(version) > 50:
            raise EventError("model (200) or version (50 characters) too long")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            raise EventError(f"the event's data is not JSON: {err}") from err
        routing_key = None
        if kind == REQUEST:
            try:
                parse_inputs(payload)
            except PayloadError as err:
                raise EventError(f"the logged request has no usable rows: {err}") from err
            routing_key = _routing_key(headers.get("ce-metadata"))
        event = Event(
            request_id=request_id,
            version=version,
            model=model,
            is_request=kind == REQUEST,
            time=_event_time(headers.get("ce-time"), received),
            received=received,
            body=body.decode(),
            size=len(body),
            routing_key=routing_key,
        )
        with self._cond:
            if self._closing:
                raise Refused(503, "overloaded", "the sink is shutting down")
            if self._queued_bytes + len(body) > self.max_queue_bytes:
                raise Refused(
                    503,
                    "overloaded",
                    f"{self._queued_bytes} event bytes are waiting for the database (limit {self.max_queue_bytes})",
                )
            self._queue.append(event)
            self._queued_bytes += len(body)
            self._unsettled += 1
            if len(self._queue) >= self.batch_events:
                self._cond.notify()
        return event

    # -- the pairing thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.wait(self.flush_interval)
                if not self._queue:
                    if self._closing:
                        return
                    continue
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch_events))]
            try:
                self._pair_with_retries(batch)
            finally:
                with self._cond:
                    self._queued_bytes -= sum(e.size for e in batch)
                    self._unsettled -= len(batch)

    def _pair_with_retries(self, batch: list[Event]) -> None:
        delay, outage_since = 0.2, None
        while True:
            try:
                self.pair(batch)
            except _TRANSIENT as err:
                self.db_errors.labels("pair").inc()
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning(
                        "sink: the database refuses the pairing (%s); holding %d events", _first(err), len(batch)
                    )
                if self._closing and time.monotonic() > self._give_up_at:
                    self.outcomes.labels("dropped").inc(len(batch))
                    log.error("sink: shutting down with the database still down; %d events not paired", len(batch))
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception as err:  # the batch itself was refused: pair its events one by one
                if len(batch) == 1:
                    self.outcomes.labels("dropped").inc()
                    log.error("sink: the database refused event %s: %s", batch[0].request_id, _first(err))
                    return
                for event in batch:
                    self._pair_with_retries([event])
                return
            if outage_since is not None:
                log.warning("sink: pairing again after %.1f s", time.monotonic() - outage_since)
            return

    def pair(self, events: list[Event], now: float | None = None) -> int:
        """Record each event's half and write every pair it completes, in one transaction; returns rows written."""
        now = time.time() if now is None else now
        table = storage.sink_pairs
        entries: list[PredictionEntry] = []
        outcomes = {"paired": 0, "pending": 0, "late": 0}
        with self.engine.begin() as conn:
            # One lock order on every replica, so two batches touching the same pairs cannot deadlock.
            for event in sorted(events, key=lambda e: (e.request_id, e.version)):
                half = (
                    {"request_time": event.time, "request_body": event.body, "routing_key": event.routing_key}
                    if event.is_request
                    else {"response_time": event.time, "response_body": event.body}
                )
                insert = _dialect_insert(conn)(table).values(
                    request_id=event.request_id,
                    version=event.version,
                    model=event.model,
                    state="pending",
                    received=event.received,
                    updated_at=now,
                    **half,
                )
                recorded = conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=[table.c.request_id, table.c.version],
                        set_={**{k: insert.excluded[k] for k in half}, "updated_at": now},
                        where=table.c.state == "pending",
                    )
                ).rowcount
                if not recorded:  # its pair was claimed already
                    outcomes["late"] += 1
                    continue
                claimed = conn.execute(
                    table.update()
                    .where(
                        table.c.request_id == event.request_id,
                        table.c.version == event.version,
                        table.c.state == "pending",
                        table.c.request_body.is_not(None),
                        table.c.response_body.is_not(None),
                    )
                    .values(state="paired", updated_at=now)
                    .returning(*table.c)
                ).first()
                if claimed is None:
                    outcomes["pending"] += 1
                    continue
                outcomes["paired"] += 1
                entry = self._entry(claimed._mapping)
                if entry is not None:
                    entries.append(entry)
            written = self._insert(conn, entries)
        for outcome, n in outcomes.items():
            if n:
                self.outcomes.labels(outcome).inc(n)
        return written

    def expire(self, now: float | None = None) -> int:
        """Claim pairs pending longer than `pending_seconds`: a request becomes an error row, a lone response is
        counted. Claimed rows past their retention are deleted. Returns the pairs claimed."""
        now = time.time() if now is None else now
        table = storage.sink_pairs
        with self.engine.begin() as conn:
            claimed = conn.execute(
                table.update()
                .where(table.c.state == "pending", table.c.received < now - self.pending_seconds)
                .values(state="expired", updated_at=now)
                .returning(*table.c)
            ).all()
            entries = [e for row in claimed if row.request_body is not None if (e := self._entry(row._mapping))]
            self._insert(conn, entries)
            conn.execute(
                table.delete().where(table.c.state != "pending", table.c.updated_at < now - self.retention_seconds)
            )
        requests = sum(row.request_body is not None for row in claimed)
        if requests:
            self.expired.labels("request").inc(requests)
        if len(claimed) - requests:
            self.expired.labels("response").inc(len(claimed) - requests)
        return len(claimed)

    def _insert(self, conn: sa.Connection, entries: list[PredictionEntry]) -> int:
        rows: list[Row] = []
        for entry in entries:
            try:
                rows += expand_predictions(entry)
            except (TypeError, ValueError) as err:  # a value JSON cannot hold: this pair only, not the whole batch
                log.error("sink: the rows of request %s cannot be encoded: %s", entry[0]["request_id"], err)
                self.outcomes.labels("dropped").inc()
        if rows:
            conn.execute(storage.predictions.insert(), rows)
        return len(rows)

    def _entry(self, pair: sa.RowMapping) -> PredictionEntry | None:
        """The predictions entry of a claimed pair (outputs None: an error row, with the reason)."""
        model, version, request_id = pair["model"], pair["version"], pair["request_id"]
        try:
            rows = parse_inputs(orjson.loads(pair["request_body"]))
        except (PayloadError, orjson.JSONDecodeError) as err:  # checked when it arrived; kept from crashing a batch
            log.error("sink: the stored request %s of %s v%s is unusable: %s", request_id, model, version, err)
            self.outcomes.labels("dropped").inc()
            return None
        outputs: list[Any] | None = None
        if pair["response_body"] is None:
            error = f"no response logged within {self.pending_seconds:g}s (KServe logs none for a non-200 answer)"
        else:
            try:
                outputs, error = parse_outputs(orjson.loads(pair["response_body"]), rows.n), None
            except (EventError, orjson.JSONDecodeError) as err:
                error = f"the logged response is unusable: {err}"
        route = self.route(model) or {}
        # As the gateway labels them: the candidate, or an experiment's arm besides the control, is `candidate`.
        arm_versions = {route.get("candidate_version"), *(a.get("version") for a in route.get("arms") or ())}
        arm = Arm.candidate if version in arm_versions - {None} else Arm.champion
        mode = Mode(route.get("mode") or Mode.single)
        answered = pair["response_time"] if outputs is not None else None
        base = {
            "request_id": request_id,
            "time": pair["request_time"],
            "model": model,
            "version": version,
            "arm": arm,
            "mode": mode,
            "release_id": route.get("release_id"),
            "routing_key_hash": routing.routing_key_hash(model, pair["routing_key"] or request_id, self.routing_secret),
            "sample_bucket": routing.sample_bucket(request_id),
            "served": not (arm is Arm.candidate and mode is Mode.shadow),
            "fallback": False,
            "latency_ms": None if answered is None else max(0.0, (answered - pair["request_time"]) * 1000),
            "status": CallStatus.ok if outputs is not None else CallStatus.error,
            "error": error,
        }
        if self.protector is not None:
            classification = self.classification(model)
            rows = self.protector.rows(rows, classification)
            self.feedback_guard.served(request_id, classification)
        return (base, rows, outputs)

    def classification(self, model: str) -> Classification:
        """The model's classification, read again after `classification_ttl`. When it cannot be read (registry
        down, tag malformed) the last one read holds; with none read yet, nothing is logged raw: text is
        pseudonymised, every other column dropped, labels encrypted and business values dropped."""
        cached = self._classes.get(model)
        if cached and time.monotonic() - cached[0] < self.classification_ttl:
            return cached[1]
        try:
            found = self.classification_of(model)
        except Exception as err:  # any failure to read it: fail closed, below
            log.warning(
                "sink: %s's classification cannot be read (%s); logging under %s",
                model,
                err,
                "the last one read" if cached else "text pseudonymised, other columns dropped, labels encrypted",
            )
            found = cached[1] if cached else FAIL_CLOSED
        self._classes[model] = (time.monotonic(), found)
        self.feedback_guard.declare(model, found)
        return found

    def route(self, model: str) -> dict[str, Any] | None:
        cached = self._routes.get(model)
        if cached and time.monotonic() - cached[0] < self.route_ttl:
            return cached[1]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(storage.routes).where(storage.routes.c.model == model)).first()
        value = dict(row._mapping) if row else None
        self._routes[model] = (time.monotonic(), value)
        return value

    # -- labels -----------------------------------------------------------------------------------------------

    def feedback(self, items: object) -> int:
        items = items if isinstance(items, list) else [items]
        if not items:
            raise EventError("no feedback items")
        rows, now = [], time.time()
        for i, item in enumerate(items):
            try:
                fb = Feedback.model_validate(item)
            except ValidationError as err:
                first = err.errors()[0]
                raise EventError(
                    f"feedback item {i}: {'.'.join(map(str, first['loc'])) or 'item'}: {first['msg']}"
                ) from err
            if fb.ground_truth is None:
                raise EventError(f"feedback item {i}: ground_truth is required")
            if self.protector is not None:
                truth, value = self.protector.feedback(
                    fb.ground_truth, fb.business_value, self.feedback_guard.classes(fb.request_id)
                )
            else:
                truth, value = orjson.dumps(fb.ground_truth).decode(), fb.business_value
            rows.append({"request_id": fb.request_id, "time": now, "ground_truth": truth, "business_value": value})
        self.feedback_log.put(rows, rows=len(rows))
        return len(rows)


def _dialect_insert(conn: sa.Connection) -> Any:
    """INSERT ... ON CONFLICT of the connection's dialect (PostgreSQL's and SQLite's share the API)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        return insert
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    raise NotImplementedError(f"the sink pairs events on PostgreSQL or SQLite, not {conn.dialect.name}")


def _routing_key(metadata: str | None) -> str | None:
    """The first routing-key header value KServe copied into the event's `metadata` (logger.metadataHeaders)."""
    if not metadata:
        return None
    try:
        headers = orjson.loads(metadata)
    except orjson.JSONDecodeError:
        return None
    for name, values in (headers or {}).items():
        if name.lower() == "x-routing-key" and values:
            return str(values[0])
    return None


def _first(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass `limit` bytes: by Content-Length, else while reading."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise EventError(f"Content-Length {length!r} is not a number")
        if int(length) > limit:
            raise Refused(413, "too_large", f"the body has {length} bytes; the sink takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, "too_large", f"the body passed {limit} bytes, the most the sink takes")
        chunks.append(chunk)
    return b"".join(chunks)


def _registered_classification(model: str, settings: Settings) -> Classification:
    """The registered-model tag's classification; the defaults for a model the registry does not have."""
    from releasegate import registry

    try:
        tags = registry.get_model_tags(model, settings)
    except registry.RegistryError:
        return Classification()
    return Classification.from_tags(model, tags)


def create_app(
    settings: Settings | None = None,
    *,
    k8s_settings: K8sSettings | None = None,
    pending_seconds: float | None = None,
    sweep_seconds: float = 1.0,
) -> Starlette:
    """The sink's ASGI app: POST /events (CloudEvents), POST /feedback, /healthz, /metrics."""
    from releasegate.k8s import K8sSettings
    from releasegate.settings import get_settings

    settings = settings or get_settings()
    k8s_settings = k8s_settings or K8sSettings.from_env()
    sink = Sink(
        storage.engine(settings.db_url),
        pending_seconds=k8s_settings.sink_pending_seconds if pending_seconds is None else pending_seconds,
        max_queue_bytes=k8s_settings.sink_queue_bytes,
        routing_secret=routing.routing_secret(settings),
        protector=Protector.of(settings),
        classification=lambda model: _registered_classification(model, settings),
    )
    identities = Identities(k8s_settings)
    max_body = k8s_settings.sink_max_body_bytes
    last_report: dict[str, float] = {}

    def refuse(endpoint: str, err: Refused | EventError, status: int, reason: str) -> Response:
        sink.refused.labels(endpoint, reason).inc()
        sink.metrics.http_response(endpoint, status)
        now = time.monotonic()
        if status != 400 and now - last_report.get(reason, -_REPORT_EVERY) >= _REPORT_EVERY:
            last_report[reason] = now
            log.warning("sink: refused %s (%d %s): %s", endpoint, status, reason, err)
        return JSONResponse({"error": str(err)}, status_code=status)

    async def sweep() -> None:
        failures = 0
        while True:
            await asyncio.sleep(min(sweep_seconds * 2**failures, _MAX_BACKOFF))
            try:
                await asyncio.to_thread(sink.expire)
            except Exception as err:  # any error: a sweep that dies leaves every unanswered request unwritten
                sink.db_errors.labels("sweep").inc()
                failures = min(failures + 1, 16)
                log.warning("sink: the sweep failed (%s: %s); retrying with backoff", type(err).__name__, _first(err))
            else:
                if failures:
                    log.warning("sink: the sweep works again")
                failures = 0

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sink.start()
        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(sink.close)

    async def events(request: Request) -> Response:
        try:
            identities.check(request.headers, identities.events, "/events")
            body = await _read_body(request, max_body)
            sink.accept(request.headers, request.query_params, body)
        except Refused as err:
            return refuse("/events", err, err.status, err.reason)
        except EventError as err:
            return refuse("/events", err, 400, "invalid")
        sink.metrics.http_response("/events", 202)
        return JSONResponse({"accepted": True}, status_code=202)

    async def feedback(request: Request) -> Response:
        try:
            identities.check(request.headers, identities.feedback, "/feedback")
            body = await _read_body(request, max_body)
            accepted = sink.feedback(orjson.loads(body))
        except Refused as err:
            return refuse("/feedback", err, err.status, err.reason)
        except orjson.JSONDecodeError as err:
            return refuse("/feedback", EventError(f"the body is not JSON: {err}"), 400, "invalid")
        except EventError as err:
            return refuse("/feedback", err, 422, "invalid")
        sink.metrics.http_response("/feedback", 200)
        return JSONResponse({"accepted": accepted})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def metrics(request: Request) -> Response:
        return Response(sink.metrics.render(), media_type=sink.metrics.content_type)

    app = Starlette(
        routes=[
            Route("/events", events, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
    app.state.sink = sink
    return app


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m releasegate.serving.kserve_sink", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    # No access log: two events per model call would drown everything else.
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
