"""Off-the-request-path writers for the `predictions` and `feedback` tables.

The request path only appends to a bounded in-memory queue; a thread writes in batches.
What cannot be queued or written is counted in metrics, never silently lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)

_STOP = object()


class LogWriter:
    """A thread that inserts entries into `table` every `flush_interval` s or `batch_rows` rows.

    An entry is whatever `expand` turns into row dicts, so the request path can hand over one
    object per request and the JSON encoding of inputs happens here, off the event loop.
    """

    def __init__(self, engine, table, metrics, *, expand: Callable[[object], Iterable[dict]] = lambda e: (e,),
                 flush_interval: float = 0.2, batch_rows: int = 500, max_buffer: int = 20_000, retries: int = 3):
        self._engine = engine
        self._table = table
        self._expand = expand
        self._flush_interval = flush_interval
        self._batch_rows = batch_rows
        self._retries = retries
        self._queue: queue.Queue = queue.Queue(maxsize=max_buffer)
        self._dropped = metrics.log_dropped
        self._written = metrics.log_written.labels(table.name)
        metrics.log_queue.labels(table.name).set_function(self._queue.qsize)
        self._thread = threading.Thread(target=self._run, name=f"logwriter-{table.name}", daemon=True)
        self._closed = False

    def start(self) -> "LogWriter":
        self._thread.start()
        return self

    def put(self, entry, rows: int = 1) -> bool:
        """Queue an entry of `rows` rows without blocking; False (and counted) if the buffer is full."""
        if self._closed:
            self._dropped.labels(self._table.name, "closed").inc(rows)
            return False
        try:
            self._queue.put_nowait(entry)
            return True
        except queue.Full:
            self._dropped.labels(self._table.name, "buffer_full").inc(rows)
            return False

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        # The stop marker may have to wait for room; the thread keeps draining meanwhile.
        self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            rows: list[dict] = []
            deadline = time.monotonic() + self._flush_interval
            while len(rows) < self._batch_rows:
                try:
                    entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if entry is _STOP:
                    stopping = True
                    break
                try:
                    rows.extend(self._expand(entry))
                except Exception:  # a bad entry must not stop the writer
                    log.exception("could not encode a %s log entry", self._table.name)
                    self._dropped.labels(self._table.name, "encode_error").inc()
            if rows:
                self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        for attempt in range(self._retries):
            try:
                with self._engine.begin() as conn:
                    conn.execute(self._table.insert(), rows)
                self._written.inc(len(rows))
                return
            except Exception as err:  # the database may be briefly locked or down
                log.warning("writing %d %s rows failed (attempt %d): %s", len(rows), self._table.name,
                            attempt + 1, err)
                time.sleep(0.2 * (attempt + 1))
        self._dropped.labels(self._table.name, "db_error").inc(len(rows))
