"""The gateway's Prometheus metrics, in a registry of its own (so tests and replicas don't collide).

With several workers (docs/gateway.md, "Workers") prometheus_client's multiprocess mode keeps every value in
files shared by the workers: `/metrics` from any of them adds up counters and histograms over all, and each
gauge combines the workers' values as its `multiprocess_mode` says.

The updates every request makes (its response, its model calls and their latency, the requests in flight) are
tallied in plain Python numbers and added to the metrics in one step per label set by `flush()`: at each scrape
of this process and, with workers, every refresh of the gateway (a scrape then sees another worker's requests
within that interval). In multiprocess mode each prometheus_client update is a locked write to a memory-mapped
file (about 0.4-0.9 µs more than in one process, five to eight of them a request); tallied, a request's updates
cost the same whatever the number of workers.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class InFlight:
    """Requests of one endpoint received and not yet answered (the gauge follows it)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class _Observed:
    """Observations of one histogram child since the last flush: their sum and their count per bucket."""

    __slots__ = ("bounds", "buckets", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.buckets = [0] * len(bounds)
        self.total = 0.0


class Metrics:
    """Every metric the gateway exports; `render()` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Set by the supervisor before the workers start (prometheus_client reads it when it is imported).
        self.shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        arm = ("model", "version", "arm")
        r = self.registry
        self.requests = Counter(
            "releasegate_gateway_model_calls", "Model calls per arm (one per request and arm).", arm, registry=r
        )
        self.errors = Counter(
            "releasegate_gateway_model_errors",
            "Failed model calls, by kind (error | timeout | retried: the request's batch call "
            "failed and a call of its own answered | skipped: the candidate's circuit was open).",
            arm + ("kind",),
            registry=r,
        )
        self.circuit_open = Gauge(
            "releasegate_gateway_circuit_open",
            "1 while a candidate's circuit breaker is open (its calls skipped, the champion answering), else 0.",
            ("model", "version"),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.circuit_opened = Counter(
            "releasegate_gateway_circuit_opened",
            "Times a candidate's circuit breaker opened.",
            ("model", "version"),
            registry=r,
        )
        self.slot_queue_rows = Gauge(
            "releasegate_gateway_slot_queue_rows",
            "Rows waiting for a predict call of a served version (bounded by RELEASEGATE_GATEWAY_SLOT_QUEUE_ROWS).",
            ("model", "version"),
            multiprocess_mode="livesum",
            registry=r,
        )
        self.model_cpu = Counter(
            "releasegate_gateway_model_cpu_seconds",
            "CPU time of a version's predict calls (thread CPU time around each call): with model_calls, the CPU "
            "per call an experiment compares across arms.",
            ["model", "version"],
            registry=r,
        )
        self.model_memory = Gauge(
            "releasegate_gateway_model_memory_bytes",
            "Resident memory a gateway process grew by while loading and warming a version (its peak cost, "
            "approximate when versions load at once); with several workers, the largest worker's.",
            ["model", "version"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_cache_bytes = Gauge(
            "releasegate_gateway_model_cache_bytes",
            "Disk space of the model cache (RELEASEGATE_MODEL_CACHE), measured after each load and unload.",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.latency = Histogram(
            "releasegate_gateway_model_latency_seconds",
            "Time from submitting rows to a model until its answer (batching included).",
            arm,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # By model only: a label per column name would grow with whatever callers send.
        self.ignored_columns = Counter(
            "releasegate_gateway_ignored_columns",
            "Request columns no served version of the model declares (ignored and not "
            "logged), once per column and request.",
            ("model",),
            registry=r,
        )
        self.fallbacks = Counter(
            "releasegate_gateway_fallbacks",
            "Requests the champion answered because the candidate failed.",
            ("model",),
            registry=r,
        )
        self.batch_rows = Histogram(
            "releasegate_gateway_batch_rows",
            "Rows per predict call (micro-batching).",
            ("model", "version"),
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.feature_lookup = Histogram(
            "releasegate_gateway_feature_lookup_seconds",
            "Time of one feature-store lookup (one per batch of requests waiting, whatever their rows).",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.feature_lookup_rows = Histogram(
            "releasegate_gateway_feature_lookup_rows",
            "Entity rows per feature-store lookup.",
            ("model",),
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.feature_misses = Counter(
            "releasegate_gateway_feature_misses",
            "Requests whose features were not all found, by reason (missing_entity | timeout | error) and "
            "what the model declares for it (defaults | reject | serve_without).",
            ("model", "reason", "action"),
            registry=r,
        )
        self.shadow_dropped = Counter(
            "releasegate_gateway_shadow_dropped",
            "Mirrored requests dropped because the shadow queue was full.",
            ("model",),
            registry=r,
        )
        self.shadow_queue = Gauge(
            "releasegate_gateway_shadow_queue_depth",
            "Mirrored requests waiting.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.http = Counter(
            "releasegate_gateway_http_responses",
            "HTTP responses by endpoint and status.",
            ("endpoint", "status"),
            registry=r,
        )
        self.log_queue = Gauge(
            "releasegate_gateway_log_queue_depth",
            "Log entries waiting to be written.",
            ("table",),
            multiprocess_mode="livesum",
            registry=r,
        )
        self.log_dropped = Counter(
            "releasegate_gateway_log_dropped_rows",
            "Log rows not written, by reason (buffer_full, closed, writer_down, db_unavailable, db_error, "
            "encode_error: a row whose values could not be encoded, bad_frame: a shipment the writer "
            "could not read).",
            ("table", "reason"),
            registry=r,
        )
        self.log_written = Counter("releasegate_gateway_log_written_rows", "Log rows written.", ("table",), registry=r)
        self.route_revision = Gauge(
            "releasegate_gateway_route_revision",
            "Applied route revision (with several workers: the lowest one a worker serves).",
            ("model",),
            multiprocess_mode="livemin",
            registry=r,
        )
        self.route_load_failures = Counter(
            "releasegate_gateway_route_load_failures",
            "Route changes refused because a version failed to load or verify.",
            ("model",),
            registry=r,
        )

        self.log_lag = Gauge(
            "releasegate_gateway_log_lag_seconds",
            "Age of the oldest log entry not yet written (0 when the writer is caught up).",
            ("table",),
            multiprocess_mode="livemax",
            registry=r,
        )
        self.in_flight = Gauge(
            "releasegate_gateway_requests_in_flight",
            "Requests received and not yet answered.",
            ("endpoint",),
            multiprocess_mode="livesum",
            registry=r,
        )
        # Label children, cached by their label values (labels() takes a lock and builds a key per call).
        self._in_flight: dict[str, InFlight] = {}
        self._http: dict[tuple[str, int], Counter] = {}
        self._calls: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._ignored: dict[str, Counter] = {}
        # The per-request updates since the last flush (see the module's docstring), by label child.
        self._added: dict[Counter, float] = {}
        self._observed: dict[Histogram, _Observed] = {}
        # Gauges read from the gateway's state (see follow); with workers, copied into the shared files.
        self._followed: dict[tuple[int, tuple[str, ...]], tuple[Gauge, Callable[[], float]]] = {}

    def follow(self, gauge: Gauge, value: Callable[[], float], *labels: str) -> None:
        """Make the gauge (the child of `labels`) report `value()`: at each scrape in one process; with workers,
        as of the last `refresh()` (a scrape reads the shared files, not this process's state)."""
        child = gauge.labels(*labels) if labels else gauge
        if self.shared_dir is None:
            child.set_function(value)
        else:
            self._followed[(id(gauge), labels)] = (child, value)

    def forget(self, gauge: Gauge, *labels: str) -> None:
        """Drop a gauge's child (KeyError if it has none); with workers, set it to 0: shared files keep every child."""
        if self.shared_dir is None:
            gauge.remove(*labels)
        else:
            self._followed.pop((id(gauge), labels), None)
            gauge.labels(*labels).set(0)

    def refresh(self) -> None:
        """With workers: the tallies flushed and the followed gauges' values copied into the shared files (a
        no-op otherwise: one process's scrape reads its own state)."""
        self.flush()
        for child, value in list(self._followed.values()):
            child.set(value())

    def in_flight_of(self, endpoint: str) -> InFlight:
        """The endpoint's count of requests in flight, for the caller to raise and lower."""
        count = self._in_flight.get(endpoint)
        if count is None:
            count = self._in_flight[endpoint] = InFlight()
            self.follow(self.in_flight, lambda: count.n, endpoint)
        return count

    def add(self, child: Counter, amount: float = 1) -> None:
        """`child.inc(amount)`, tallied until the next flush. On the event loop only (see `flush`)."""
        self._added[child] = self._added.get(child, 0) + amount

    def observe(self, child: Histogram, value: float) -> None:
        """`child.observe(value)`, tallied until the next flush. On the event loop only (see `flush`)."""
        tally = self._observed.get(child)
        if tally is None:
            tally = self._observed[child] = _Observed(child._upper_bounds)
        tally.total += value
        tally.buckets[bisect_left(tally.bounds, value)] += 1  # the first bound >= value, as observe() counts it

    def http_response(self, endpoint: str, status: int) -> None:
        """Count one response; label children are cached (labels() takes a lock and builds a key per call)."""
        key = (endpoint, status)
        child = self._http.get(key)
        if child is None:
            child = self._http[key] = self.http.labels(endpoint, str(status))
        self.add(child)

    def model_call(self, model: str, version: str, arm: str, seconds: float | None) -> None:
        """Count a model call and observe its latency (None: a call skipped, which took no time of the model's)."""
        key = (model, version, arm)
        children = self._calls.get(key)
        if children is None:
            children = self._calls[key] = (
                self.requests.labels(model, version, arm),
                self.latency.labels(model, version, arm),
            )
        self.add(children[0])
        if seconds is not None:
            self.observe(children[1], seconds)

    def flush(self) -> None:
        """Add the tallied updates to the metrics, one update per label child and bucket.

        Called on the event loop that tallies (a scrape, the refresh task, the gateway's stop), so no tally is
        read while it is updated. A histogram has no public way to add several observations at once: its
        child's `_sum` and `_buckets` values take them (prometheus_client's own `observe()` updates the same;
        a unit test compares the two).
        """
        if self._added:
            added, self._added = self._added, {}
            for counter, amount in added.items():
                counter.inc(amount)
        if self._observed:
            observed, self._observed = self._observed, {}
            for histogram, tally in observed.items():
                child: Any = histogram
                child._sum.inc(tally.total)
                for bucket, count in zip(child._buckets, tally.buckets, strict=True):
                    if count:
                        bucket.inc(count)

    def ignored(self, model: str, columns: int) -> None:
        child = self._ignored.get(model)
        if child is None:
            child = self._ignored[model] = self.ignored_columns.labels(model)
        child.inc(columns)

    def render(self) -> bytes:
        self.flush()
        if self.shared_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self.shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
