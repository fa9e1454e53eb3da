"""Off-the-request-path writers for the `predictions` and `feedback` tables.

The request path only appends to a bounded in-memory queue; a thread writes in batches. While
the database is down, locked or read-only the thread holds its batch and retries, and the queue
absorbs new entries up to its bound; past that, entries are dropped. Every row that is not
written is counted (`releasegate_gateway_log_dropped_rows_total{table, reason}`) and reported in
a log line, never lost silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, Self, TypeAlias, TypeVar, overload

import orjson
import sqlalchemy as sa

from releasegate.serving.payloads import Rows

if TYPE_CHECKING:
    from prometheus_client import Counter

    from releasegate.serving.metrics import Metrics

log = logging.getLogger(__name__)

Row: TypeAlias = dict[str, Any]  # a row of a log table: column -> value
# A request's prediction log entry: its row's values but inputs and outputs, its input rows, one output per row
# (None: the call failed).
PredictionEntry: TypeAlias = tuple[Row, Rows, list[Any] | None]
Entry = TypeVar("Entry")

# Errors that mean "the database cannot take writes right now" (down, locked, read-only, connection
# lost): the batch is kept and retried. Any other error means the rows themselves were refused.
_TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
_MAX_BACKOFF = 2.0
_REPORT_EVERY = 5.0  # seconds between two log lines about dropped rows


_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def expand_predictions(entry: PredictionEntry) -> list[Row]:
    """A (row values, Rows, outputs) log entry as one `predictions` row per input row, JSON encoded off the request path."""
    base, rows, outputs = entry
    out = []
    for i in range(rows.n):
        row = base if rows.n == 1 else dict(base)  # the entry's own dict: one-row entries need no copy
        row["inputs"] = orjson.dumps(rows.record(i), option=_JSON_OPTS).decode()
        row["outputs"] = orjson.dumps(outputs[i], option=_JSON_OPTS).decode() if outputs is not None else None
        out.append(row)
    return out


def expand_predictions_keeping(entry: PredictionEntry) -> tuple[list[Row], int]:
    """`expand_predictions`, keeping the rows that encode: (those rows, how many could not be encoded)."""
    try:
        return expand_predictions(entry), 0
    except (TypeError, ValueError):  # orjson's errors: a lone surrogate, an integer beyond 64 bits, too deep
        pass
    base, rows, outputs = entry
    out, bad = [], 0
    for i in range(rows.n):
        try:
            inputs = orjson.dumps(rows.record(i), option=_JSON_OPTS).decode()
            output = orjson.dumps(outputs[i], option=_JSON_OPTS).decode() if outputs is not None else None
        except (TypeError, ValueError, IndexError, KeyError):
            bad += 1
            continue
        out.append(dict(base, inputs=inputs, outputs=output))
    return out, bad


class LogWriter(Generic[Entry]):
    """A thread that inserts entries into `table` every `flush_interval` s or `batch_rows` rows.

    An entry is whatever `expand` turns into row dicts (without `expand`: a row dict), so the request
    path can hand over one object per request and the JSON encoding of inputs happens here, off the
    event loop.
    """

    @overload
    def __init__(
        self: LogWriter[Row],
        engine: sa.Engine,
        table: sa.Table,
        metrics: Metrics,
        *,
        flush_interval: float = 0.2,
        batch_rows: int = 500,
        max_buffer: int = 20_000,
    ) -> None: ...

    @overload
    def __init__(
        self,
        engine: sa.Engine,
        table: sa.Table,
        metrics: Metrics,
        *,
        expand: Callable[[Entry], Iterable[Row]],
        flush_interval: float = 0.2,
        batch_rows: int = 500,
        max_buffer: int = 20_000,
    ) -> None: ...

    def __init__(
        self,
        engine: sa.Engine,
        table: sa.Table,
        metrics: Metrics,
        *,
        expand: Callable[[Any], Iterable[Row]] = lambda e: (e,),
        flush_interval: float = 0.2,
        batch_rows: int = 500,
        max_buffer: int = 20_000,
    ) -> None:
        self._engine = engine
        self._table = table
        self._expand: Callable[[Entry], Iterable[Row]] = expand
        self._flush_interval = flush_interval
        self._batch_rows = batch_rows
        self._queue: queue.Queue[Entry] = queue.Queue(maxsize=max_buffer)
        self._dropped_metric = metrics.log_dropped
        self._dropped_children: dict[str, Counter] = {}
        self._written = metrics.log_written.labels(table.name)
        self._pending_since: float | None = None  # monotonic time of the oldest unwritten entry
        metrics.follow(metrics.log_queue, self._queue.qsize, table.name)
        metrics.follow(metrics.log_lag, self.lag, table.name)
        # Every column but an autoincrement key: rows that give them all can skip SQLAlchemy (see _insert).
        self._order = [c.name for c in table.columns if not (c.primary_key and c.autoincrement)]
        self._names = set(self._order)
        self._sql = f"INSERT INTO {table.name} ({', '.join(self._order)}) VALUES ({', '.join('?' * len(self._order))})"
        self._thread = threading.Thread(target=self._run, name=f"logwriter-{table.name}", daemon=True)
        self._stopping = threading.Event()
        self._give_up_at = float("inf")
        self._closed = False
        self._drops_lock = threading.Lock()
        self._drops_unreported: dict[str, int] = {}
        self._last_report = 0.0

    def start(self) -> Self:
        self._thread.start()
        return self

    def lag(self) -> float:
        """Seconds the oldest unwritten entry has waited (0 when everything is written)."""
        since = self._pending_since
        return time.monotonic() - since if since is not None else 0.0

    def queued(self) -> int:
        """Entries waiting to be written."""
        return self._queue.qsize()

    def drop(self, rows: int, reason: str) -> None:
        """Count rows that will never be written (the metric, and the next report's log line)."""
        self._drop(rows, reason)

    def put(self, entry: Entry, rows: int = 1) -> bool:
        """Queue an entry of `rows` rows without blocking; False (and counted) if the buffer is full."""
        if self._closed:
            self._drop(rows, "closed")
            return False
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._drop(rows, "buffer_full")
            return False
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued (giving up after `timeout` s if the database stays down), then stop."""
        if self._closed:
            return
        self._closed = True
        self._give_up_at = time.monotonic() + timeout
        self._stopping.set()
        self._thread.join(timeout + 5)
        self._report(force=True)

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            rows = self._collect()
            if rows:
                self._write(rows)
            elif self._stopping.is_set() and self._queue.empty():
                return
            if self._queue.empty():  # every entry taken is written or counted as dropped: none waits
                self._pending_since = None
            self._report()

    def _collect(self) -> list[Row]:
        rows: list[Row] = []
        deadline = time.monotonic() + self._flush_interval
        while len(rows) < self._batch_rows:
            try:
                if self._stopping.is_set():
                    entry = self._queue.get_nowait()
                else:
                    entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            try:
                rows.extend(self._expand(entry))
            except Exception:  # a bad entry must not stop the writer
                log.exception("could not encode a %s log entry", self._table.name)
                self._drop(len(entry) if isinstance(entry, list) else 1, "encode_error")
        return rows

    def _write(self, rows: list[Row], split: bool = False) -> None:
        delay, outage_since = 0.2, None
        while True:
            try:
                with self._engine.begin() as conn:
                    self._insert(conn, rows)
            except _TRANSIENT as err:
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning(
                        "%s log: the database refuses writes (%s); holding %d rows and up to %d queued "
                        "entries, retrying",
                        self._table.name,
                        _first_line(err),
                        len(rows),
                        self._queue.maxsize,
                    )
                if self._stopping.is_set() and time.monotonic() > self._give_up_at:
                    lost = len(rows) + self._drain()
                    self._drop(lost, "db_unavailable")
                    log.error(
                        "%s log: shutting down with the database still refusing writes; %d rows not written",
                        self._table.name,
                        lost,
                    )
                    return
                self._report()
                time.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            except Exception as err:  # the rows themselves were refused: retrying them all would not help
                if len(rows) > 1:
                    # Keep what the database takes: each half in a transaction of its own, down to the rows it refuses.
                    if not split:
                        log.error(
                            "%s log: a batch of %d rows refused by the database (%s); writing it in parts",
                            self._table.name,
                            len(rows),
                            _first_line(err),
                        )
                    half = len(rows) // 2
                    self._write(rows[:half], split=True)
                    self._write(rows[half:], split=True)
                    return
                if not split:
                    log.error("%s log: a row refused by the database: %s", self._table.name, _first_line(err))
                self._drop(1, "db_error")
                return
            self._written.inc(len(rows))
            self._pending_since = None if self._queue.empty() else time.monotonic()
            if outage_since is not None:
                log.warning(
                    "%s log: the database takes writes again after %.1f s",
                    self._table.name,
                    time.monotonic() - outage_since,
                )
            return

    def _insert(self, conn: sa.Connection, rows: list[Row]) -> None:
        """One executemany of `rows`: on SQLite straight to the driver, elsewhere through SQLAlchemy.

        Why bypass SQLAlchemy on SQLite: its per-row parameter processing cost 10.6 µs a row against
        6.6 µs for sqlite3's own executemany of tuples (benchmarked here), and this thread shares the
        GIL with the request path. Rows missing a column (one left to a column default) take the
        SQLAlchemy path, which applies the defaults; so do PostgreSQL's (its insertmanyvalues batching
        is what makes executemany fast there).
        """
        if conn.dialect.name == "sqlite" and self._names.issubset(rows[0]):
            order = self._order
            conn.exec_driver_sql(self._sql, [tuple(map(row.get, order)) for row in rows])
        else:
            conn.execute(self._table.insert(), rows)

    def _drain(self) -> int:
        """Empty the queue, returning how many rows its entries held (for the drop count)."""
        lost = 0
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return lost
            try:
                lost += len(list(self._expand(entry)))
            except Exception:
                lost += 1

    # --- drops: counted at once, reported in a log line at most every few seconds ----------------

    def _drop(self, rows: int, reason: str) -> None:
        child = self._dropped_children.get(reason)
        if child is None:
            child = self._dropped_children[reason] = self._dropped_metric.labels(self._table.name, reason)
        child.inc(rows)
        with self._drops_lock:
            self._drops_unreported[reason] = self._drops_unreported.get(reason, 0) + rows

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._drops_unreported or (not force and now - self._last_report < _REPORT_EVERY):
            return
        with self._drops_lock:
            drops, self._drops_unreported = self._drops_unreported, {}
        self._last_report = now
        log.error(
            "%s log: rows not written since the last report: %s",
            self._table.name,
            ", ".join(f"{n} ({reason})" for reason, n in sorted(drops.items())),
        )


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200]
