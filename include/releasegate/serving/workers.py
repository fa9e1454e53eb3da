"""Several gateway processes behind one port (docs/gateway.md, "Workers").

uvicorn's supervisor binds the port once and starts the workers, each a whole gateway (its own model slots,
log writer process and route poller). What they share lives in a directory made fresh for each start and
named in the environment they inherit: prometheus_client's multiprocess files, so `/metrics` from any
worker answers for all of them, and each worker's applied route revisions, so an admin PUT answers once
every worker serves the new route.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson

from releasegate.settings import environ_restored

log = logging.getLogger(__name__)

RUN_DIR = "RELEASEGATE_GATEWAY_RUN_DIR"  # set by the supervisor for its workers; not a setting
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode reads it at import
_PID_IN_NAME = re.compile(r"_(\d+)\.db$|^(\d+)\.json$")


def cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A fresh directory for one start's workers, named in the environment they inherit; removed at the end.

    Fresh per start: prometheus_client's files must not carry a previous run's counts.
    """
    path = Path(tempfile.mkdtemp(prefix="releasegate-gateway-"))
    (path / "metrics").mkdir()
    (path / "routes").mkdir()
    try:
        with environ_restored(RUN_DIR, METRICS_DIR):
            os.environ[RUN_DIR] = str(path)
            os.environ[METRICS_DIR] = str(path / "metrics")
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` without the workers' shared directory: for a worker's own child processes (its log writer
    counts through its parent, and must not add to the shared metrics a second time)."""
    return {name: value for name, value in env.items() if name not in (RUN_DIR, METRICS_DIR)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Siblings:
    """One worker's view of the workers of its start: what each has applied, through files in the shared directory."""

    def __init__(self, path: Path):
        self.metrics = path / "metrics"
        self.routes = path / "routes"
        self.pid = os.getpid()
        self._announced: bytes | None = None

    @classmethod
    def of_environment(cls) -> Siblings | None:
        """This process's siblings when it is one of several workers, else None."""
        path = os.environ.get(RUN_DIR)
        return cls(Path(path)) if path else None

    def start(self) -> None:
        """Forget workers that are gone (a worker the supervisor replaced), then announce this one."""
        from prometheus_client import multiprocess

        pids: set[int] = set()
        for folder in (self.metrics, self.routes):
            for entry in os.scandir(folder):
                found = _PID_IN_NAME.search(entry.name)
                if found:
                    pids.add(int(found.group(1) or found.group(2)))
        for pid in pids - {self.pid}:
            if not _alive(pid):
                # Its counters stay (they counted what it served); its live gauges and route file go.
                multiprocess.mark_process_dead(pid, str(self.metrics))  # type: ignore[no-untyped-call]
                (self.routes / f"{pid}.json").unlink(missing_ok=True)
        self.announce({}, {})

    def announce(self, applied: dict[str, int], failed: dict[str, int]) -> None:
        """Publish the route revisions this worker serves and those it could not load (atomically)."""
        data = orjson.dumps({"applied": applied, "failed": failed}, option=orjson.OPT_SORT_KEYS)
        if data == self._announced:
            return
        target = self.routes / f"{self.pid}.json"
        temporary = target.with_name(f".{self.pid}.tmp")
        temporary.write_bytes(data)
        temporary.replace(target)
        self._announced = data

    def settled(self, model: str, revision: int) -> tuple[int, int]:
        """(live workers serving `revision` of the model's route or newer, or that failed to load it; live workers)."""
        settled = live = 0
        for entry in os.scandir(self.routes):
            found = _PID_IN_NAME.search(entry.name)
            if not found or not found.group(2) or not _alive(int(found.group(2))):
                continue
            try:
                state = orjson.loads(Path(entry.path).read_bytes())
            except (OSError, orjson.JSONDecodeError):  # replaced meanwhile: read at the next look
                continue
            live += 1
            if state["applied"].get(model, 0) >= revision or state["failed"].get(model) == revision:
                settled += 1
        return settled, live
