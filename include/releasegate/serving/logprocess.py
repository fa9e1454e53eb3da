"""The gateway's prediction log, written by a child process.

A thread in the gateway's own process (`LogWriter`) shares the GIL with the event loop. At a few
thousand requests a second its per-row Python work (JSON encoding, parameter binding) both
starved it (it fell behind and dropped rows) and stalled requests while it held the GIL (p99
9 ms → 30 ms); measured on this machine with benchmarks/gateway.py. Here the request path only
appends its entry to a list; a thread ships the list every `flush_interval` as one orjson
document (C, no per-row Python) down a pipe; the child (`python -m releasegate.serving.logprocess`)
expands the entries into rows and writes them with an ordinary `LogWriter`, with its outage
handling: a locked or unreachable database is retried, and rows are held up to the buffer's bound.

Nothing is dropped silently: rows the gateway cannot hand over (its buffer is full, the child is
gone) are counted here; rows the child cannot write are counted there and reported back on its
stdout, one JSON status line at a time, into the same metrics. The child ignores SIGTERM/SIGINT
(they reach the whole process group): it finishes when its stdin closes, after writing what it holds.

No value kills the writer. The gateway refuses what JSON cannot carry before a request is accepted
(`payloads.parse_json`), and the log is still built to survive one: an entry orjson cannot encode is
shipped through the standard library's encoder; a frame the child cannot read with orjson is read
with the standard library's; a row whose values cannot be encoded is dropped alone (`encode_error`),
a frame that cannot be read at all is dropped with its rows counted (`bad_frame`, each frame's
header carries its row count); the rest is written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson

from releasegate.serving import workers

if TYPE_CHECKING:
    from releasegate.serving.logwriter import PredictionEntry, Row
    from releasegate.serving.metrics import Metrics

log = logging.getLogger(__name__)

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
# Each frame: its length and its rows, then a JSON list of [base, columns, n, outputs].
_FRAME = struct.Struct("!II")
_STATUS_EVERY = 0.25
_RESTART_AFTER = 1.0  # seconds between attempts to restart a child that died
_CHUNK = 128  # entries per frame: ~0.1 ms of encoding
# An entry as shipped: (base row, columns, row count, outputs), a PredictionEntry with its Rows taken apart.
_Shipped: TypeAlias = "tuple[Row, dict[str, list[Any]], int, list[Any] | None]"


def _encode(entries: list[_Shipped]) -> tuple[bytes, int]:
    """The entries as one JSON list, and how many rows could not be encoded (each entry on its own, stdlib as
    fallback: its text may hold what orjson refuses, like a lone surrogate, and the child sorts that out)."""
    try:
        return orjson.dumps(entries, option=_JSON_OPTS), 0
    except TypeError:  # e.g. an integer beyond 64 bits in a column without a signature
        parts, bad = [], 0
        for entry in entries:
            try:
                parts.append(orjson.dumps(entry, option=_JSON_OPTS))
            except TypeError:
                try:
                    parts.append(json.dumps(entry, default=str).encode())
                except Exception:  # nested too deep for it too (RecursionError), or a circular value
                    bad += entry[2]
        return b"[" + b",".join(parts) + b"]", bad


class ProcessLogWriter:
    """`LogWriter`'s interface (start, put, lag, close) for the predictions table, written by a child process."""

    def __init__(
        self,
        db_url: str,
        table: str,
        metrics: Metrics,
        *,
        flush_interval: float = 0.2,
        batch_rows: int = 500,
        max_buffer: int = 20_000,
    ) -> None:
        self._db_url = db_url
        self._table = table
        self._flush_interval = flush_interval
        self._batch_rows = batch_rows
        self._max_buffer = max_buffer
        self._buffer: list[_Shipped] = []
        self._buffered_rows = 0
        self._oldest: float | None = None  # monotonic time of the oldest entry not yet handed over
        self._lock = threading.Lock()  # guards the buffer swap against put() from another thread
        self._wake = threading.Event()
        self._closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._child_lag = 0.0
        self._child_queued = 0
        self._child_written = 0
        self._child_dropped: dict[str, int] = {}
        self._written = metrics.log_written.labels(table)
        self._dropped_metric = metrics.log_dropped
        self._dropped_here = 0
        self._last_start = 0.0
        self._readers: list[threading.Thread] = []
        metrics.follow(metrics.log_queue, lambda: len(self._buffer) + self._child_queued, table)
        metrics.follow(metrics.log_lag, self.lag, table)
        self._shipper = threading.Thread(target=self._ship_loop, name=f"logship-{table}", daemon=True)

    # --- request path ---------------------------------------------------------------------------

    def put(self, entry: PredictionEntry, rows: int = 1) -> bool:
        """Queue an entry (base row, Rows, outputs) without blocking; False (and counted) if the buffer is full."""
        if self._closed:
            self._drop(rows, "closed")
            return False
        if self._buffered_rows + rows > self._max_buffer:
            self._drop(rows, "buffer_full")
            return False
        base, data, outputs = entry
        with self._lock:
            self._buffer.append((base, data.columns, data.n, outputs))
            self._buffered_rows += rows
            if self._oldest is None:
                self._oldest = time.monotonic()
            full = self._buffered_rows >= self._batch_rows
        if full:
            self._wake.set()
        return True

    def lag(self) -> float:
        oldest = self._oldest
        here = time.monotonic() - oldest if oldest is not None else 0.0
        return max(here, self._child_lag)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> ProcessLogWriter:
        self._spawn()
        self._shipper.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Hand over what is buffered, let the child write it (giving up after `timeout` s), then stop."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._shipper.join(timeout + 5)
        proc = self._proc
        if proc is not None:
            assert proc.stdin is not None  # spawned with stdin=PIPE
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout + 5)
            except subprocess.TimeoutExpired:
                log.error("%s log writer did not finish in %.0f s; stopping it", self._table, timeout)
                proc.kill()
                proc.wait()
            for reader in self._readers:
                reader.join(5)
        if self._dropped_here:
            log.error(
                "%s log: %d rows not handed to the writer process (see releasegate_gateway_log_dropped_rows_total)",
                self._table,
                self._dropped_here,
            )

    # --- the child ------------------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._last_start = time.monotonic()
        # The URL not in `ps`; no workers' shared metrics: the child's counts reach them through this process.
        env = workers.child_environment(dict(os.environ, PYTHONUNBUFFERED="1", RELEASEGATE_LOG_DB_URL=self._db_url))
        args = [
            sys.executable,
            "-m",
            "releasegate.serving.logprocess",
            self._table,
            str(self._flush_interval),
            str(self._batch_rows),
            str(self._max_buffer),
        ]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self._proc = proc
        reader = threading.Thread(target=self._read_status, args=(proc,), name=f"logstatus-{self._table}", daemon=True)
        reader.start()
        self._readers.append(reader)
        return proc

    def _read_status(self, proc: subprocess.Popen[bytes]) -> None:
        """Fold the child's status lines (cumulative counts) into this process's metrics."""
        assert proc.stdout is not None  # spawned with stdout=PIPE
        for line in proc.stdout:
            try:
                status = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            written = status.get("written", 0)
            if written > self._child_written:
                self._written.inc(written - self._child_written)
                self._child_written = written
            for reason, count in status.get("dropped", {}).items():
                before = self._child_dropped.get(reason, 0)
                if count > before:
                    self._dropped_metric.labels(self._table, reason).inc(count - before)
                    self._child_dropped[reason] = count
            self._child_lag = status.get("lag", 0.0)
            self._child_queued = status.get("queued", 0)
        # The child has exited: a new one starts from zero.
        self._child_written, self._child_dropped, self._child_lag, self._child_queued = 0, {}, 0.0, 0

    def _ship_loop(self) -> None:
        while True:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            with self._lock:
                entries, self._buffer = self._buffer, []
                self._buffered_rows = 0
                self._oldest = None
            # In frames of _CHUNK entries: orjson holds the GIL while it encodes (4,000 entries took 4 ms here,
            # a stall of every request; a full buffer would take ~20), and between frames the loop gets it back.
            for at in range(0, len(entries), _CHUNK):
                chunk = entries[at : at + _CHUNK]
                rows = sum(entry[2] for entry in chunk)
                try:
                    self._ship(chunk, rows)
                except Exception:  # this thread is the only way to the child: it must outlive any frame
                    log.exception("%s log: a frame of %d rows could not be shipped", self._table, rows)
                    self._drop(rows, "encode_error")
            if self._closed and not self._buffer:
                return

    def _ship(self, entries: list[_Shipped], rows: int) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if proc is not None and time.monotonic() - self._last_start > _RESTART_AFTER and not self._closed:
                log.error("%s log writer process exited (%s); starting another", self._table, proc.returncode)
                proc = self._spawn()
            else:
                self._drop(rows, "writer_down")
                return
        data, bad = _encode(entries)
        if bad:
            self._drop(bad, "encode_error")
        frame = memoryview(_FRAME.pack(len(data), rows - bad) + data)
        stdin = proc.stdin
        assert stdin is not None  # spawned with stdin=PIPE
        try:
            while frame:
                frame = frame[stdin.write(frame) :]
        except (OSError, ValueError):  # the child is gone (broken pipe) or its pipe was closed
            self._drop(rows, "writer_down")

    def _drop(self, rows: int, reason: str) -> None:
        self._dropped_metric.labels(self._table, reason).inc(rows)
        self._dropped_here += rows


# --- the child process --------------------------------------------------------------------------


def _decode(data: bytes) -> list[Any] | None:
    """A frame's entries: orjson, else the standard library (which reads lone surrogates, big integers and
    NaN); None if neither can read it."""
    try:
        entries = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            entries = json.loads(data.decode("utf-8", "surrogatepass"))
        except (ValueError, RecursionError):
            return None
    return entries if isinstance(entries, list) else None


def _entry_rows(entry: object) -> int:
    """How many rows a shipped entry says it has (1 for one too broken to say)."""
    if isinstance(entry, list) and len(entry) == 4 and type(entry[2]) is int and entry[2] > 0:
        return entry[2]
    return 1


def _child(db_url: str, table_name: str, flush_interval: float, batch_rows: int, max_buffer: int) -> None:
    from releasegate import storage
    from releasegate.serving.logwriter import LogWriter, expand_predictions_keeping
    from releasegate.serving.metrics import Metrics
    from releasegate.serving.payloads import Rows

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the gateway decides when we stop: stdin closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s (log writer): %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the gateway has migrated the database already
    metrics = Metrics()
    table = getattr(storage, table_name)
    predictions = table_name == "predictions"

    # Entries arrive expanded into their rows (below): the writer's thread only inserts them.
    def same(rows: list[Row]) -> list[Row]:
        return rows

    writer: LogWriter[list[Row]] = LogWriter(
        storage.engine(db_url),
        table,
        metrics,
        expand=same,
        flush_interval=flush_interval,
        batch_rows=batch_rows,
        max_buffer=max_buffer,
    ).start()

    def expand(entry: Any) -> tuple[list[Row], int]:  # a shipped entry, decoded from JSON: (rows, rows dropped)
        if not predictions:
            return [entry], 0
        base, columns, n, outputs = entry
        if not isinstance(base, dict) or not isinstance(columns, dict) or (outputs is not None and len(outputs) != n):
            raise ValueError("not a prediction entry")
        if isinstance(base.get("error"), str) and "\x00" in base["error"]:
            base["error"] = base["error"].replace("\x00", "\ufffd")  # PostgreSQL refuses NUL in text
        return expand_predictions_keeping((base, Rows(columns, n), outputs))

    out = sys.stdout.buffer
    stop = threading.Event()

    def status() -> bytes:
        dropped: dict[str, int] = {}
        for metric in metrics.log_dropped.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    dropped[sample.labels["reason"]] = int(sample.value)
        written = (
            metrics.registry.get_sample_value("releasegate_gateway_log_written_rows_total", {"table": table_name}) or 0
        )
        return (
            orjson.dumps({"written": int(written), "dropped": dropped, "lag": writer.lag(), "queued": writer.queued()})
            + b"\n"
        )

    def report() -> None:
        while not stop.wait(_STATUS_EVERY):
            out.write(status())

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    source = sys.stdin.buffer
    while True:
        head = source.read(_FRAME.size)
        if len(head) < _FRAME.size:
            break
        size, frame_rows = _FRAME.unpack(head)
        data = source.read(size)
        if len(data) < size:
            break
        entries = _decode(data)
        if entries is None:
            log.error("a frame of %d %s rows could not be read; dropped", frame_rows, table_name)
            writer.drop(frame_rows, "bad_frame")
            continue
        for entry in entries:
            try:
                rows, bad = expand(entry)
            except Exception as err:  # a malformed entry: its rows are counted, the frame's others written
                log.error("a %s log entry could not be read: %s: %s", table_name, type(err).__name__, err)
                writer.drop(_entry_rows(entry) if predictions else 1, "encode_error")
                continue
            if bad:
                writer.drop(bad, "encode_error")
            # Never blocks: a full queue (a long outage) drops and counts here, so this loop keeps reading
            # and the gateway never waits on the pipe.
            if rows:
                writer.put(rows, rows=len(rows))
    writer.close()
    stop.set()
    reporter.join()
    out.write(status())
    out.flush()


if __name__ == "__main__":
    _child(os.environ["RELEASEGATE_LOG_DB_URL"], sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
