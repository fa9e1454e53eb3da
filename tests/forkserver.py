"""`airflow dags test` without paying its imports every time: a fork server for the test session.

A release's tasks import MLflow, Great Expectations and Evidently, about 20 s of CPU on this machine
before the first task does anything, and the suite runs dozens of `airflow dags test` processes (the
fleet of your own models alone runs fifteen). The server imports those libraries once; each run is
a fork of it that then sets its own environment, working directory, niceness and output, imports
Airflow (which reads its configuration from that environment) and runs Airflow's own command-line
entry point with the given arguments, exactly as the `airflow` script would. So every run is still
`airflow dags test` in a process of its own, with a process group of its own (killable as one) and
an exit code; only the third-party imports it would have repeated are inherited.

Nothing in Airflow or releasegate is imported before the fork: both read their settings from the
environment at import, and each run has its own. Python's standard library does not offer this for
arbitrary command lines (multiprocessing's forkserver runs functions, in the server's environment).

Used through `run` and `start`, which fall back to a plain subprocess when RELEASEGATE_TEST_FORKSERVER=0
or the command is not `airflow`.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the tasks import lazily (the DAG files import none of it at top level).
PRELOAD = (
    "numpy",
    "pandas",
    "pyarrow",
    "sklearn.linear_model",
    "sklearn.ensemble",
    "scipy.stats",
    "sqlalchemy",
    "httpx",
    "mlflow",
    "mlflow.pyfunc",
    "mlflow.sklearn",
    "great_expectations",
    "evidently",
    "evidently.presets",
    "evidently.metrics",
    "model_signing",
    "onnxruntime",
    # What Airflow itself imports from third parties for `dags test` (its CLI, logging and the in-process execution
    # API's FastAPI app): ~2.8 s of CPU a run on this machine, paid once here instead.
    "svcs",
    "cadwyn",
    "libcst",
    "httpcore",
    "structlog",
    "pendulum",
    "pathspec",
    "a2wsgi",
)


# --- the server ------------------------------------------------------------------------------


def _child(conn: socket.socket, listener: socket.socket, request: dict) -> None:
    """In the fork: become the requested `airflow` process. Never returns."""
    code = 1
    try:
        listener.close()
        conn.close()
        os.setsid()
        if request.get("nice"):
            os.nice(int(request["nice"]))
        out = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        for entry in reversed(request["env"].get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)
        import numpy

        numpy.random.seed()  # the fork inherits the server's generator state; `random` reseeds itself
        sys.argv = ["airflow", *request["argv"][1:]]
        from airflow.__main__ import main

        try:
            result = main()
            code = result if isinstance(result, int) else 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int) and exit_.code is not None:
                print(exit_.code, file=sys.stderr)
        import atexit as _atexit

        _atexit._run_exitfuncs()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(path: str) -> None:
    """Import PRELOAD, say ready on stdout, then fork one `airflow` process per request on the socket."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    assert "airflow" not in sys.modules and "releasegate" not in sys.modules, "imported before the fork"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".binding")
    listener.listen(64)
    os.rename(path + ".binding", path)  # the socket appears, ready, at once
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while True:
        readable, _, _ = select.select([listener], [], [], 0.1)
        if readable:
            conn, _ = listener.accept()
            request = json.loads(conn.makefile("rb").readline())
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(conn, listener, request)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass  # the asker is gone
                conn.close()


# --- the client ------------------------------------------------------------------------------


class Forked:
    """A run forked by the server: the parts of subprocess.Popen the tests use."""

    def __init__(self, conn: socket.socket, argv: list[str]):
        self._conn, self.args = conn, argv
        self._file = conn.makefile("rb")
        self.pid: int = json.loads(self._file.readline())["pid"]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._read()
        assert self.returncode is not None
        return self.returncode

    def _read(self) -> None:
        line = self._file.readline()
        self.returncode = json.loads(line)["returncode"] if line else -signal.SIGKILL  # server gone
        self._file.close()
        self._conn.close()

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_PRIVATE = ("AIRFLOW", "RELEASEGATE_", "MLFLOW_", "PROMETHEUS_", "GX_", "FEAST_")


class _Server:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.path = ""

    def socket(self, timeout: float = 600) -> socket.socket:
        with self.lock:
            if self.proc is None:
                folder = tempfile.mkdtemp(prefix="rg-fork-")
                self.path = os.path.join(folder, "s")
                # Started without the test's own settings: a library that reads one at import must not keep it.
                env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE)}
                with open(os.path.join(folder, "server.log"), "w") as log:
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "tests.forkserver", self.path],
                        cwd=ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                atexit.register(self.stop)
                deadline = time.monotonic() + timeout
                while not os.path.exists(self.path):  # bound once the libraries are imported
                    assert self.proc.poll() is None, "the fork server exited: " + Path(folder, "server.log").read_text()
                    assert time.monotonic() < deadline, f"the fork server did not start within {timeout:.0f} s"
                    time.sleep(0.2)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self.path)
            return conn

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


_server = _Server()


Process = Forked | subprocess.Popen


def enabled() -> bool:
    return os.environ.get("RELEASEGATE_TEST_FORKSERVER", "1") != "0"


def start(argv: list[str], *, env: dict[str, str], output: Path, nice: int = 0) -> Process:
    """Start `argv` (an `airflow` command) with its stdout and stderr appended to `output`, in a session of its own."""
    if not enabled() or argv[0] != "airflow":
        with open(output, "a") as log:
            return subprocess.Popen(
                (["nice", "-n", str(nice)] if nice else []) + argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    conn = _server.socket()
    request = {"argv": argv, "env": env, "cwd": os.getcwd(), "output": str(output), "nice": nice}
    conn.sendall(json.dumps(request).encode() + b"\n")
    return Forked(conn, argv)


def run(argv: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Like subprocess.run(argv, capture_output=True, text=True): stdout and stderr together in `stdout`."""
    with tempfile.NamedTemporaryFile(prefix="rg-run-", suffix=".log", delete=False) as f:
        output = Path(f.name)
    try:
        proc = start(argv, env=env, output=output)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, output.read_text(errors="replace"), "")
    finally:
        output.unlink(missing_ok=True)


if __name__ == "__main__":
    serve(sys.argv[1])
