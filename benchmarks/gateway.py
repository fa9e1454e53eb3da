"""Gateway throughput and latency beside its ceiling and beside `mlflow models serve`, in one run.

Cases, each on the demo's churn models (champion v1, better candidate v2) with one-row payloads,
`--connections` concurrent connections from a separate load process (wrk) for `--seconds` each:

    bare          a bare Starlette echo app on uvicorn (httptools, uvloop): the ceiling
    mlflow_serve  `mlflow models serve` of the champion
    single        the gateway, champion only, prediction log on (SQLite), every column logged as sent
    single_pii    the same under a classification: region pseudonymised, plan encrypted, channel dropped
    shadow        the gateway mirroring every request to the candidate, both arms logged
    canary        the gateway splitting 50 % to the candidate
    single_workers  `single` with one worker, then with `--workers` (default 2) behind the same port, each
                  with the CPU time the gateway's processes and wrk used per request; with --callgrind,
                  under valgrind, the instructions per request of all the gateway's processes instead
    single_features    the gateway, champion only, a version of the demo model that takes 5 of its features
                       from Feast's Redis online store: a request carries customer_id and its 4 own fields
    feast_per_request  the usual way, the baseline: a Starlette app calling get_online_features once per
                       request, then the same model's predict on a DataFrame

Every case but single_workers runs the gateway as one worker (`--workers 1`). The two feature cases need a
Redis at --redis (default 127.0.0.1:6379, database 9; the case's keys are under a Feast project of its own,
torn down after).

    apt-get install -y wrk
    nice -n 10 .venv/bin/python benchmarks/gateway.py --json bench-gateway.json
    .venv/bin/python benchmarks/gateway.py --seconds 3        # a smoke run

`mirrored_fraction` is the candidate's successful mirrored calls ÷ requests served, read from the
gateway's own /metrics before and after the case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median_high

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL = "churn"
CASES = (
    "bare",
    "mlflow_serve",
    "single",
    "single_pii",
    "shadow",
    "canary",
    "single_features",
    "feast_per_request",
    "single_workers",
)
FEAST_MODEL = "churn-feast"
# The classifications of the gateway cases (docs/operations.md, "Personal data"): only single_pii protects columns.
PUBLIC = {"strings": "public"}
PII = {"columns": {"region": "pseudonymise", "plan": "encrypt", "channel": "drop"}}

# wrk's Lua hooks: POSTs cycling through BENCH_BODIES (one JSON body a line, so no answer can be
# cached); done() prints the summary as one JSON line (latencies in µs).
_WRK_SCRIPT = """
local requests_ = {}
local i = 0
init = function(args)
  local headers = {["Content-Type"] = "application/json"}
  local key = os.getenv("BENCH_KEY")
  if key and key ~= "" then headers["Authorization"] = "Bearer " .. key end
  for body in io.lines(os.getenv("BENCH_BODIES")) do
    requests_[#requests_ + 1] = wrk.format("POST", nil, headers, body)
  end
end
request = function()
  i = i % #requests_ + 1
  return requests_[i]
end
-- Paced runs (BENCH_DELAY_MS > 0): each connection waits that long before each request, so the offered
-- load is about connections / delay, below saturation (wrk has no rate option; wrk2 is not packaged).
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
if pause > 0 then
  delay = function() return pause end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def echo_app():
    """The ceiling: parse the JSON body and answer it, nothing else."""
    import orjson
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request):
        body = orjson.loads(await request.body())
        return Response(orjson.dumps({"predictions": [0], "echo": body}), media_type="application/json")

    return Starlette(
        routes=[
            Route("/invocations", echo, methods=["POST"]),
            Route("/healthz", lambda r: Response(b"ok"), methods=["GET"]),
        ]
    )


def feast_per_request_app(repo: str, model_dir: str):
    """The baseline for features: one `get_online_features` per request, then the model's predict on a DataFrame."""
    import mlflow.pyfunc
    import orjson
    import pandas as pd

    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import FeatureStore
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response
    from starlette.routing import Route

    from releasegate.demo import data, feature_repo

    store = FeatureStore(repo_path=repo)
    service = store.get_feature_service(feature_repo.FEATURE_SERVICE)
    model = mlflow.pyfunc.load_model(model_dir)

    def predict(frame: pd.DataFrame) -> list:
        ids = {feature_repo.ENTITY: frame[feature_repo.ENTITY].tolist()}
        found = store.get_online_features(features=service, entity_rows=ids).to_dict()
        merged = frame.assign(**{name: found[name] for name in feature_repo.FEATURES})
        return model.predict(merged[data.FEATURES]).tolist()

    async def invocations(request):
        split = orjson.loads(await request.body())["dataframe_split"]
        frame = pd.DataFrame(split["data"], columns=split["columns"])
        return Response(orjson.dumps({"predictions": await run_in_threadpool(predict, frame)}))

    return Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/healthz", lambda r: Response(b"ok"), methods=["GET"]),
        ]
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Bench:
    def __init__(self, workdir: Path, seconds: float, connections: int, threads: int):
        self.workdir, self.seconds, self.connections, self.threads = workdir, seconds, connections, threads
        self.procs: list[subprocess.Popen] = []
        self.script = workdir / "bench.lua"
        self.script.write_text(_WRK_SCRIPT)

    def say(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ), start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 30) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)

    def wait_ready(self, url: str, proc: subprocess.Popen, name: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.workdir / (name + '.log')}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{name} not ready after {timeout:.0f}s; see {self.workdir / (name + '.log')}")

    def load(self, url: str, bodies: Path, key: str | None, seconds: float, rate: float = 0) -> dict:
        """One wrk run; rps, p50/p99 in ms, and every failed request (socket errors, non-2xx) as errors.
        `rate` > 0: paced at about that many requests/s over all connections instead of as fast as answered."""
        delay_ms = round(self.connections * 1000 / rate) if rate > 0 else 0
        env = dict(os.environ, BENCH_BODIES=str(bodies), BENCH_KEY=key or "", BENCH_DELAY_MS=str(delay_ms))
        out = subprocess.run(
            [
                "wrk",
                f"-t{min(self.threads, self.connections)}",  # wrk refuses more threads than connections
                f"-c{self.connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(self.script),
                url,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
        s = json.loads(line[6:])
        errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
        return {
            "rps": round(s["requests"] / (s["duration_us"] / 1e6), 1),
            "p50_ms": round(s["p50_us"] / 1000, 2),
            "p99_ms": round(s["p99_us"] / 1000, 2),
            "errors": errors,
            "requests": s["requests"],
        }

    def load_with_cpu(self, url: str, bodies: Path, key: str | None, seconds: float, server: int) -> dict:
        """`load`, with the CPU seconds used meanwhile by the server's process tree and by wrk."""
        before_server, before_wrk, started = tree_cpu(server), os.times(), time.monotonic()
        result = self.load(url, bodies, key, seconds)
        after_server, after_wrk, wall = tree_cpu(server), os.times(), time.monotonic() - started
        wrk = (after_wrk.children_user + after_wrk.children_system) - (
            before_wrk.children_user + before_wrk.children_system
        )
        server_cpu = after_server - before_server
        return result | {
            "server_cores": round(server_cpu / wall, 2),
            "wrk_cores": round(wrk / wall, 2),
            "server_cpu_us_per_request": round(server_cpu / result["requests"] * 1e6, 1)
            if result["requests"]
            else None,
            "wrk_cpu_us_per_request": round(wrk / result["requests"] * 1e6, 1) if result["requests"] else None,
        }

    def measure(self, url: str, body: Path, key: str | None = None) -> dict:
        self.load(url, body, key, min(3.0, self.seconds))  # warm-up: connections, caches, JIT-free paths
        return self.load(url, body, key, self.seconds)


def callgrind(out_dir: Path) -> list[str]:
    """valgrind's callgrind before a command: every process it starts counted too, nothing counted until
    `callgrind_control --instr=on`, each process's totals written to `out_dir` as it exits."""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian/Ubuntu: apt-get install -y valgrind)")
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--trace-children=yes",
        "--quiet",
        f"--callgrind-out-file={out_dir}/cg.%p",
    ]


def count_instructions(
    bench: Bench,
    url: str,
    body: Path,
    key: str,
    seconds: float,
    server: int,
    out_dir: Path,
    spread: threading.Thread | None = None,
    idle_seconds: float = 10,
) -> dict:
    """`load_with_cpu` under callgrind (`callgrind` before the gateway): the instructions all the gateway's
    processes execute per request. Counted three times: `idle_seconds` with no load (route polls, the log
    writers' timers: a cost per second, not per request), the load, and `idle_seconds` idle again; the mean
    idle rate over the load's duration is taken off the load's count before dividing by its requests, and the
    figures with the idle rate before and after alone bound how much that correction can move it. `spread`, if
    given, is started with the load."""

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=600)

    def idle(name: str) -> float:
        started = time.monotonic()
        time.sleep(idle_seconds)  # the idle window is a measurement, not a wait for a condition
        control(f"--dump={name}")
        return time.monotonic() - started

    control("--instr=on")
    before_wall = idle("idle-before")
    started = time.monotonic()
    if spread is not None:
        spread.start()
    result = bench.load_with_cpu(url, body, key, seconds, server)
    control("--dump=load")
    load_wall = time.monotonic() - started
    after_wall = idle("idle-after")
    control("--instr=off")
    rates = (_callgrind_dumps(out_dir, 1) / before_wall, _callgrind_dumps(out_dir, 3) / after_wall)
    loaded, requests = _callgrind_dumps(out_dir, 2), result["requests"]

    def per_request(per_second: float) -> int | None:
        return round((loaded - per_second * load_wall) / requests) if requests else None

    by_kind = {}
    for kind in ("workers", "log_writers", "supervisor"):
        rate = (_callgrind_dumps(out_dir, 1, kind) / before_wall + _callgrind_dumps(out_dir, 3, kind) / after_wall) / 2
        if requests:
            by_kind[kind] = round((_callgrind_dumps(out_dir, 2, kind) - rate * load_wall) / requests)
    return result | {
        "instructions_per_request_by_process": by_kind,
        "idle_instructions_per_second": round(sum(rates) / 2),
        "load_instructions": loaded,
        "instructions_per_request": per_request(sum(rates) / 2),
        "instructions_per_request_range": sorted(round((loaded - rate * load_wall) / requests) for rate in rates)
        if requests
        else None,
    }


def _callgrind_dumps(out_dir: Path, number: int, kind: str | None = None) -> int:
    """Instructions executed (Ir) in every process's `number`-th dump (of the processes of one `kind` only, see
    `_process_kind`): the sum of their `totals:` lines."""
    total = 0
    for path in out_dir.glob(f"cg.*.{number}"):
        text = path.read_text(errors="replace")
        if kind is not None and _process_kind(text) != kind:
            continue
        for line in text.splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def _process_kind(dump: str) -> str:
    """What a gateway process is, from the command line in its callgrind dump: a log writer, a worker spawned by
    the supervisor, or the gateway's first process (the worker itself when it runs one, else the supervisor)."""
    command = next((line for line in dump.splitlines() if line.startswith("cmd:")), "")
    if "releasegate.serving.logprocess" in command:
        return "log_writers"
    if "spawn_main" in command:
        return "workers"
    if "--workers 1" in command:
        return "workers"
    return "supervisor"


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by a process and its living descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(child for child, parent in parents.items() if parent == pid)
    return total


STEADY_ROUNDS = 3  # turns each case takes at the steady load
# The cases whose throughput is compared with another's, measured in turns (`benchmark`), and the ratios.
TURNS = ("bare", "single", "single_pii", "single_features")
RATIOS = (("single", "bare"), ("single_pii", "single"), ("single_features", "single"))
ROUNDS = 3


def _pooled(runs: list[dict]) -> dict:
    """A case's rounds as one: requests/s over all of them, the median round's p50 and p99, every error."""
    seconds = sum(r["requests"] / r["rps"] for r in runs if r["rps"])
    pooled = {
        "rps": round(sum(r["requests"] for r in runs) / seconds, 1) if seconds else 0.0,
        "p50_ms": median_high(r["p50_ms"] for r in runs),
        "p99_ms": median_high(r["p99_ms"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "rps_rounds": [r["rps"] for r in runs],
    }
    if all("feature_rows_per_lookup" in r for r in runs):
        pooled["feature_rows_per_lookup"] = median_high(r["feature_rows_per_lookup"] for r in runs)
    return pooled


def _rotated(cases: list[str], round_: int) -> list[str]:
    """The order `cases` take their turns in round `round_`: each round starts one case later."""
    at = round_ % len(cases)
    return cases[at:] + cases[:at]


def _median_ratio(a: list[dict], b: list[dict]) -> dict:
    """requests/s of `a` ÷ those of `b`, round by round (measured minutes apart at most), and their median."""
    rounds = [round(x["rps"] / y["rps"], 3) if y["rps"] else 0.0 for x, y in zip(a, b, strict=True)]
    return {"median": median_high(rounds), "rounds": rounds}


def _wait_for_log(admin: httpx.Client, say: Callable[[str], None], timeout: float = 120.0) -> None:
    """Until the gateway's log queues are empty (their depth gauge at 0), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        depths = re.findall(
            r"^releasegate_gateway_log_queue_depth{[^}]*} ([0-9.e+]+)$", admin.get("/metrics").text, re.M
        )
        if depths and all(float(d) == 0 for d in depths):
            return
        time.sleep(0.2)
    say(f"the log queue was not empty after {timeout:g} s; measuring anyway")


def _settled_calls(admin: httpx.Client, say: Callable[[str], None], timeout: float = 60.0) -> float:
    """Every model call so far (both arms), once no mirrored request waits and two reads 0.3 s apart agree: a
    shadow's mirrored calls are made up to `shadow_max_wait_ms` after the load ends, and each is logged."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        text = admin.get("/metrics").text
        waiting = re.findall(r"^releasegate_gateway_shadow_queue_depth ([0-9.e+]+)$", text, re.M)
        calls = sum(_calls(text, arm, ok_only=False) for arm in ("champion", "candidate"))
        if all(float(w) == 0 for w in waiting) and calls == last:
            return calls
        last = calls
        time.sleep(0.3)
    say(f"model calls still being made after {timeout:g} s; counting anyway")
    return last or 0.0


def _calls(metrics_text: str, arm: str, ok_only: bool = True) -> float:
    """Model calls of one arm in a /metrics page (minus its failed calls with ok_only)."""

    def total(name: str) -> float:
        return sum(
            float(m.group(1))
            for m in re.finditer(rf'^{name}{{[^}}]*arm="{arm}"[^}}]*}} ([0-9.e+]+)$', metrics_text, re.M)
        )

    calls = total("releasegate_gateway_model_calls_total")
    return calls - total("releasegate_gateway_model_errors_total") if ok_only else calls


def _batches(metrics_text: str) -> tuple[float, float]:
    """(rows, predict calls) of every served version so far, from the batch_rows histogram of a /metrics page."""

    def total(name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", metrics_text, re.M))

    return total("releasegate_gateway_batch_rows_sum"), total("releasegate_gateway_batch_rows_count")


class ConnectionCount(threading.Thread):
    """The established connections each of a server's processes holds on `port`, sampled once `expected`
    connections are up (wrk opens them as it starts), within `timeout` seconds: how a load spread over the
    workers (they accept from one shared socket, so whichever is waiting takes the next connection)."""

    def __init__(self, server: int, port: int, expected: int, timeout: float):
        super().__init__(daemon=True)
        self.server, self.port, self.expected, self.timeout = server, port, expected, timeout
        self.counts: list[int] = []

    def run(self) -> None:
        import psutil

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            counts = []
            try:
                # The benchmark's own connections (its admin client's) are not the load's.
                ours = {c.laddr.port for c in psutil.Process().net_connections(kind="tcp") if c.laddr}
                server = psutil.Process(self.server)  # one worker: the server itself; several: its workers
                for child in (server, *server.children(recursive=True)):
                    with contextlib.suppress(psutil.Error):
                        mine = [
                            c
                            for c in child.net_connections(kind="tcp")
                            if c.laddr
                            and c.laddr.port == self.port
                            and c.status == psutil.CONN_ESTABLISHED
                            and not (c.raddr and c.raddr.port in ours)
                        ]
                        if mine:
                            counts.append(len(mine))
            except psutil.Error:
                return
            if sum(counts) >= self.expected:
                self.counts = sorted(counts, reverse=True)
                return
            time.sleep(0.05)


def write_bodies(frame, path: Path) -> Path:
    """One `dataframe_split` payload of one row per line, a line per row of `frame` (wrk sends them in turn)."""
    import orjson

    columns = list(frame.columns)
    path.write_bytes(
        b"".join(
            orjson.dumps({"dataframe_split": {"columns": columns, "data": [row]}}) + b"\n"
            for row in frame.astype(object).values.tolist()
        )
    )
    return path


def _feast_setup(bench: Bench, workdir: Path, settings, redis: str) -> tuple[Path, str, Path]:
    """The demo's feature repository on Redis (a project of its own), the Feast-trained demo model registered
    and signed, and 1,000 one-row payloads of a customer_id and the request's own fields."""
    import pandas as pd

    from releasegate import signing
    from releasegate.demo import feature_repo

    sys.path.insert(0, str(REPO))
    from examples.train_with_feast import train_and_register

    bench.say(f"building the demo's feature repository on Redis {redis} and training on it")
    repo = workdir / "feature_repo"
    feature_repo.build(repo, n=5_000, online=redis, project=f"rg_bench_{secrets.token_hex(4)}")
    import mlflow

    mlflow.create_experiment("bench-feast", artifact_location=settings.mlflow_artifact_root.resolve().as_uri())
    mlflow.set_experiment("bench-feast")
    version = train_and_register(FEAST_MODEL, repo)
    signing.sign_version(FEAST_MODEL, version, settings)
    labelled = pd.read_parquet(repo / "labelled.parquet").sample(1000, random_state=99)
    columns = [feature_repo.ENTITY, *feature_repo.REQUEST_FIELDS]
    return repo, version, write_bodies(labelled[columns], workdir / "feast-bodies.jsonl")


def _rows_per_lookup(before: str, after: str) -> float:
    """Mean entity rows per feature-store lookup between two /metrics pages."""

    def total(text: str, name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))

    name = "releasegate_gateway_feature_lookup_rows"
    lookups = total(after, name + "_count") - total(before, name + "_count")
    return round((total(after, name + "_sum") - total(before, name + "_sum")) / lookups, 2) if lookups else 0.0


def _log_rows(calls: float) -> dict:
    """Prediction-log rows in the database after the gateway stopped, and how many of its model calls have none."""
    import sqlalchemy as sa

    from releasegate import storage

    with storage.engine().connect() as conn:
        written = conn.execute(sa.select(sa.func.count()).select_from(storage.predictions)).scalar_one()
    return {"written": written, "missing": int(calls) - written}


def environment(workdir: Path) -> dict:
    home = workdir / "home"
    home.mkdir(parents=True)
    env = {
        "RELEASEGATE_HOME": str(home),
        "RELEASEGATE_DB_URL": f"sqlite:///{home}/releasegate.db",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "RELEASEGATE_MLFLOW_ARTIFACTS": str(home / "mlartifacts"),
        "RELEASEGATE_ADMIN_KEY": "rg-bench-admin-" + secrets.token_urlsafe(24),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    for name in ("RELEASEGATE_SIGNING_KEY", "RELEASEGATE_TRUSTED_KEYS", "RELEASEGATE_GATEWAY_URL"):
        os.environ.pop(name, None)
    os.environ.update(env)
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="Measured seconds per case (default 15).")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads.")
    parser.add_argument(
        "--workers", type=int, default=2, help="Gateway workers in single_workers, against one (default 2)."
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="single_workers under valgrind's callgrind: instructions per request (every gateway process) with 1 "
        "and --workers workers, counted only while the load runs; for where `perf stat` has no counters (a VM).",
    )
    parser.add_argument(
        "--connections-per-worker",
        action="store_true",
        help="single_workers: --connections per worker (N workers get N times the connections), so each worker "
        "sees the load one worker sees, as when every worker has a core of its own; default: --connections in all.",
    )
    parser.add_argument(
        "--paced-rps",
        type=float,
        default=1000,
        help="Also time single, shadow and canary at this steady load (requests/s, below saturation); 0: skip.",
    )
    parser.add_argument("--cases", default=",".join(CASES), help="Comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--workdir", type=Path, default=None, help="Default: a fresh temporary directory.")
    parser.add_argument("--redis", default="127.0.0.1:6379,db=9", help="Redis for the feature cases (Feast's form).")
    parser.add_argument("--serve-echo", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-feast", nargs=3, default=None, help=argparse.SUPPRESS)  # port, repo, model dir
    args = parser.parse_args(argv)
    if args.serve_feast is not None:
        import uvicorn

        port, repo, model_dir = args.serve_feast
        app = feast_per_request_app(repo, model_dir)
        uvicorn.run(app, host="127.0.0.1", port=int(port), access_log=False, log_level="warning")
        return 0
    if args.serve_echo is not None:
        import uvicorn

        uvicorn.run(echo_app(), host="127.0.0.1", port=args.serve_echo, access_log=False, log_level="warning")
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; known: {', '.join(CASES)}")
    results = benchmark(args, cases)
    log_rows = results.pop("log", None)  # not a case: the gateway's prediction log over all its cases
    ratios = results.pop("ratios", {})  # the throughput cases' ratios, round by round
    print_table(results, ratios)
    if log_rows:
        print(f"prediction log: {log_rows['written']:,} rows written, {log_rows['missing']:,} model calls without one")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cases": results,
                    "ratios": ratios,
                    "log": log_rows,
                    "seconds": args.seconds,
                    "connections": args.connections,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def benchmark(args, cases: list[str]) -> dict:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rg-bench-gateway-")).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        sys.exit(f"{workdir} is not empty")
    workdir.mkdir(parents=True, exist_ok=True)
    env = environment(workdir)
    bench = Bench(workdir, args.seconds, args.connections, args.threads)
    results: dict[str, dict] = {}
    feast_cases = [c for c in ("single_features", "feast_per_request") if c in cases]
    feast_repo: Path | None = None
    try:
        from releasegate import signing, storage
        from releasegate.demo import data, models
        from releasegate.serving import auth
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        storage.engine()
        bench.say("registering and signing the demo models (champion, good candidate)")
        versions = models.register_demo_models(settings, model_name=MODEL)
        for role in ("champion", "good"):
            signing.sign_version(MODEL, versions[role], settings)
        _, predict_key = auth.create_key("predict", settings)
        import orjson

        frame = data.generate(1000, seed=99).drop(columns=[data.LABEL])
        body = write_bodies(frame, workdir / "bodies.jsonl")  # 1,000 different one-row payloads, sent in turn

        bare_url = None
        if "bare" in cases:  # measured in turns with the gateway's throughput cases below, or alone
            port = free_port()
            bare_proc = bench.start("bare", [sys.executable, __file__, "--serve-echo", str(port)])
            bare_url = f"http://127.0.0.1:{port}/invocations"
            bench.wait_ready(f"http://127.0.0.1:{port}/healthz", bare_proc, "bare")
            if not any(c in cases for c in TURNS if c != "bare"):
                bench.say("bare echo app")
                results["bare"] = bench.measure(bare_url, body)
                bench.stop(bare_proc)

        if "mlflow_serve" in cases:
            from releasegate import signing

            # A copy of the verified directory: `mlflow models serve -m models:/...` writes a
            # registered_model_meta file into a local artifact store, which breaks the signature.
            model_dir = workdir / "mlflow-serve-model"
            shutil.copytree(signing.fetch_verified(MODEL, versions["champion"], settings).path, model_dir)
            port = free_port()
            proc = bench.start(
                "mlflow_serve",
                [
                    str(Path(sys.executable).parent / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    str(model_dir),
                    "-p",
                    str(port),
                    "--env-manager",
                    "local",
                ],
            )
            bench.wait_ready(f"http://127.0.0.1:{port}/health", proc, "mlflow_serve")
            bench.say("mlflow models serve")
            results["mlflow_serve"] = bench.measure(f"http://127.0.0.1:{port}/invocations", body)
            bench.stop(proc)

        if feast_cases:
            feast_repo, feast_version, feast_body = _feast_setup(bench, workdir, settings, args.redis)
            os.environ["RELEASEGATE_FEAST_REPO"] = str(feast_repo)  # read by the gateway started below

        if "feast_per_request" in cases:
            from releasegate import signing

            model_dir = workdir / "feast-model"
            shutil.copytree(signing.fetch_verified(FEAST_MODEL, feast_version, settings).path, model_dir)
            port = free_port()
            proc = bench.start(
                "feast_per_request",
                [sys.executable, __file__, "--serve-feast", str(port), str(feast_repo), str(model_dir)],
            )
            bench.wait_ready(f"http://127.0.0.1:{port}/healthz", proc, "feast_per_request")
            bench.say("feast_per_request: get_online_features once per request")
            results["feast_per_request"] = bench.measure(f"http://127.0.0.1:{port}/invocations", feast_body)
            bench.stop(proc)

        gateway_cases = [c for c in ("single", "single_pii", "shadow", "canary", "single_features") if c in cases]
        if gateway_cases:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = bench.start(
                "gateway",
                [sys.executable, "-m", "releasegate.serving", "--port", str(port), "--workers", "1"],
                env=dict(os.environ),
            )
            bench.wait_ready(f"{url}/readyz", proc, "gateway")
            admin = httpx.Client(
                base_url=url, timeout=60, headers={"authorization": f"Bearer {env['RELEASEGATE_ADMIN_KEY']}"}
            )
            champion, candidate = versions["champion"], versions["good"]
            specs = {
                "single": {"champion_version": champion, "mode": "single"},
                "single_pii": {"champion_version": champion, "mode": "single"},
                "shadow": {"champion_version": champion, "candidate_version": candidate, "mode": "shadow"},
                "canary": {
                    "champion_version": champion,
                    "candidate_version": candidate,
                    "mode": "canary",
                    "candidate_weight": 50,
                },
            }
            if "single_features" in cases:
                specs["single_features"] = {"champion_version": feast_version, "mode": "single"}
            from releasegate import registry
            from releasegate.contract import CLASSIFICATION_TAG

            def route(case: str) -> tuple[str, Path]:
                """Serve `case`'s route (and its model's classification); its URL and payloads."""
                model, payloads = (FEAST_MODEL, feast_body) if case == "single_features" else (MODEL, body)
                classes = PII if case == "single_pii" else PUBLIC  # read by the gateway when the route is put
                registry.client(settings).set_registered_model_tag(model, CLASSIFICATION_TAG, json.dumps(classes))
                resp = admin.put(f"/admin/routes/{model}", json=specs[case], timeout=300)
                if resp.status_code != 200:
                    raise RuntimeError(f"route {specs[case]} refused: {resp.status_code} {resp.text}")
                return f"{url}/models/{model}/invocations", payloads

            def turn(case: str) -> tuple[str, Path, str | None]:
                """A throughput case's URL, payloads and key: bare echo's, or the gateway's with `case`'s route."""
                return (bare_url, body, None) if case == "bare" else (*route(case), predict_key)

            turns = [c for c in TURNS if c in cases]
            if any(c != "bare" for c in turns):
                # Throughput targets are ratios between these cases (single/bare, single_pii/single,
                # single_features/single): they take turns, ROUNDS rounds of --seconds / ROUNDS each, in an order
                # that rotates, so that a slow spell of the machine falls on all of them rather than on one;
                # each ratio is the median of its rounds' ratios. Each turn starts once the gateway's log backlog
                # is written, so that it pays for its own log rows and bare echo for none.
                bench.say(f"throughput in turns: {', '.join(turns)}; {ROUNDS} rounds")
                for case in turns:  # warm-up, each once
                    target, payloads, key = turn(case)
                    if case == "single_features":  # the first lookup waits for Feast to load: not the steady state
                        first = orjson.loads(feast_body.read_bytes().splitlines()[0])
                        headers = {"authorization": f"Bearer {predict_key}"}
                        answered = httpx.post(target, json=first, headers=headers, timeout=300)
                        if answered.status_code != 200:
                            raise RuntimeError(f"{case}: {answered.status_code} {answered.text}")
                    bench.load(target, payloads, key, min(3.0, args.seconds))
                taken: dict[str, list[dict]] = {case: [] for case in turns}
                for round_ in range(ROUNDS):
                    for case in _rotated(turns, round_):
                        target, payloads, key = turn(case)
                        _wait_for_log(admin, bench.say)
                        bench.say(f"{case}, round {round_ + 1}")
                        before = admin.get("/metrics").text
                        taken[case].append(bench.load(target, payloads, key, args.seconds / ROUNDS))
                        if case == "single_features":
                            taken[case][-1]["feature_rows_per_lookup"] = _rows_per_lookup(
                                before, admin.get("/metrics").text
                            )
                for case, measured in taken.items():
                    results[case] = _pooled(measured)
                results["ratios"] = {
                    f"{a}/{b}": _median_ratio(taken[a], taken[b]) for a, b in RATIOS if a in taken and b in taken
                }
                if "bare" in turns:
                    bench.stop(bare_proc)

            for case in [c for c in gateway_cases if c not in TURNS]:
                target, payloads = route(case)
                bench.say(f"gateway, {case}")
                bench.load(target, payloads, predict_key, min(3.0, args.seconds))
                time.sleep(1)  # let the warm-up's mirrored calls and log rows drain before counting
                before = admin.get("/metrics").text
                results[case] = bench.load(target, payloads, predict_key, args.seconds)
                if case == "shadow":
                    time.sleep(1)  # mirrored calls still queued at the end are answered, not dropped
                    after = admin.get("/metrics").text
                    mirrored = _calls(after, "candidate") - _calls(before, "candidate")
                    served = _calls(after, "champion", ok_only=False) - _calls(before, "champion", ok_only=False)
                    results[case]["mirrored_fraction"] = round(mirrored / served, 4) if served else 0.0
            steady = [c for c in ("single", "shadow", "canary") if c in gateway_cases]
            if steady and args.paced_rps > 0:
                # The latency a caller sees at a steady load below saturation: at saturation a p99 is mostly
                # the queue behind the extra work a shadow brings, which any added work lengthens. The cases
                # take turns for STEADY_ROUNDS rounds, in an order that rotates by round (as the throughput
                # turns do), so that a busy spell of the machine falls on all of them rather than on one, and
                # each case's p99 is the median of its rounds'. Each turn starts once the log backlog is
                # written, so that it pays for its own log rows, not for the run before it.
                registry.client(settings).set_registered_model_tag(MODEL, CLASSIFICATION_TAG, json.dumps(PUBLIC))
                target = f"{url}/models/{MODEL}/invocations"
                rounds: dict[str, list[dict]] = {case: [] for case in steady}
                for turn in range(STEADY_ROUNDS):
                    for case in _rotated(steady, turn):
                        resp = admin.put(f"/admin/routes/{MODEL}", json=specs[case], timeout=300)
                        if resp.status_code != 200:
                            raise RuntimeError(f"route {specs[case]} refused: {resp.status_code} {resp.text}")
                        bench.say(f"gateway, {case} at a steady {args.paced_rps:g} requests/s, round {turn + 1}")
                        _wait_for_log(admin, bench.say)
                        rounds[case].append(bench.load(target, body, predict_key, args.seconds / 1.5, args.paced_rps))
                for case, runs in rounds.items():
                    middle = sorted(runs, key=lambda r: r["p99_ms"])[len(runs) // 2]
                    results[case]["paced"] = middle | {"p99_ms_rounds": [r["p99_ms"] for r in runs]}
            # Every model call (one-row payloads: one row each) should have its row once the gateway has
            # flushed its log on SIGTERM. Counted once the calls have stopped: a shadow turn's last mirrored
            # calls come after its load (counted before them, one run read a row more than the calls).
            calls = _settled_calls(admin, bench.say)
            admin.close()
            bench.stop(proc)
            results["log"] = _log_rows(calls)
            bench.say(f"prediction log: {results['log']['written']:,} rows written for {calls:,.0f} model calls")

        if "single_workers" in cases:
            from releasegate import registry
            from releasegate.contract import CLASSIFICATION_TAG

            registry.client(settings).set_registered_model_tag(MODEL, CLASSIFICATION_TAG, json.dumps(PUBLIC))
            by_workers: dict[str, dict] = {}
            for n in sorted({1, args.workers}):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                name = f"gateway-{n}-workers"
                counted = workdir / f"callgrind-{n}"
                gateway = [sys.executable, "-m", "releasegate.serving", "--port", str(port), "--workers", str(n)]
                if args.callgrind:
                    counted.mkdir()
                    gateway = [*callgrind(counted), *gateway]
                proc = bench.start(name, gateway)
                bench.wait_ready(f"{url}/readyz", proc, name, timeout=1800 if args.callgrind else 180)
                with httpx.Client(
                    base_url=url,
                    timeout=1800 if args.callgrind else 180,  # loading a model under valgrind takes minutes
                    headers={"authorization": f"Bearer {env['RELEASEGATE_ADMIN_KEY']}"},
                ) as admin:
                    # Answered once every worker serves it (docs/gateway.md, "Workers").
                    resp = admin.put(f"/admin/routes/{MODEL}", json={"champion_version": versions["champion"]})
                    if resp.status_code != 200:
                        raise RuntimeError(f"route refused: {resp.status_code} {resp.text}")
                    bench.connections = args.connections * (n if args.connections_per_worker else 1)
                    bench.say(f"gateway, single, {n} worker(s), {bench.connections} connections")
                    target = f"{url}/models/{MODEL}/invocations"
                    bench.load(target, body, predict_key, min(3.0, args.seconds))
                    time.sleep(1)
                    rows, calls = _batches(admin.get("/metrics").text)
                    spread = ConnectionCount(proc.pid, port, bench.connections, timeout=args.seconds / 2)
                    if args.callgrind:
                        measured = count_instructions(
                            bench, target, body, predict_key, args.seconds, proc.pid, counted, spread
                        )
                    else:
                        spread.start()
                        measured = bench.load_with_cpu(target, body, predict_key, args.seconds, proc.pid)
                    spread.join()
                    rows_after, calls_after = _batches(admin.get("/metrics").text)
                    by_workers[str(n)] = measured | {
                        "connections": bench.connections,
                        # Idle windows serve nothing, so these are the load's own batches.
                        "rows_per_batch": round((rows_after - rows) / (calls_after - calls), 2)
                        if calls_after > calls
                        else None,
                        "connections_by_worker": spread.counts,
                    }
                    bench.connections = args.connections
                bench.stop(proc, timeout=600 if args.callgrind else 30)
            results["single_workers"] = {"workers": by_workers}
    finally:
        bench.stop_all()
        from releasegate import storage

        storage.dispose_all()
        if feast_repo is not None:
            from releasegate import feast_import

            feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
            from feast import FeatureStore

            FeatureStore(repo_path=str(feast_repo)).teardown()  # the case's Redis keys
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _ratio(ratios: dict, a: dict, b: dict, name: str) -> str:
    """`name`'s median of its rounds' ratios, with the rounds; from the pooled rates if not measured in turns."""
    if name in ratios:
        r = ratios[name]
        return f"{r['median']:.2f}x (median of {', '.join(f'{x:.2f}' for x in r['rounds'])})"
    return f"{a['rps'] / b['rps']:.2f}x"


def print_table(results: dict, ratios: dict | None = None) -> None:
    ratios = ratios or {}
    print(f"{'case':<18}{'rps':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}  notes")
    for case in CASES:
        r = results.get(case)
        if r is None or case == "single_workers":
            continue
        notes = f"mirrored {r['mirrored_fraction']:.1%}" if "mirrored_fraction" in r else ""
        if "feature_rows_per_lookup" in r:
            notes = f"{r['feature_rows_per_lookup']:g} rows per feature lookup"
        if "rps_rounds" in r:
            notes = f"rounds {', '.join(f'{x:,.0f}' for x in r['rps_rounds'])} rps" + (f"; {notes}" if notes else "")
        print(f"{case:<18}{r['rps']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}  {notes}")
    single, bare, mlf, shadow, pii = (
        results.get(c) for c in ("single", "bare", "mlflow_serve", "shadow", "single_pii")
    )
    if single and mlf and mlf["rps"]:
        print(f"single / mlflow_serve rps: {single['rps'] / mlf['rps']:.1f}x (target >= 25x)")
    if single and bare and bare["rps"]:
        print(f"single / bare rps:         {_ratio(ratios, single, bare, 'single/bare')} (target >= 0.5x)")
    if single and pii and single["rps"]:
        print(f"single_pii / single rps:   {_ratio(ratios, pii, single, 'single_pii/single')} (target >= 0.8x)")
    for n, r in (results.get("single_workers") or {}).get("workers", {}).items():
        print(
            f"single, {n} worker(s): {r['rps']:,.0f} rps, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
            f"{r['errors']} errors; gateway {r['server_cores']:.2f} cores, "
            f"{r['server_cpu_us_per_request']:.0f} µs CPU/request; wrk {r['wrk_cores']:.2f} cores, "
            f"{r['wrk_cpu_us_per_request']:.0f} µs CPU/request; {r.get('rows_per_batch')} rows per predict call, "
            f"connections by worker {r.get('connections_by_worker')}"
            + (
                f"; {r['instructions_per_request']:,} instructions/request (callgrind; the idle "
                f"{r['idle_instructions_per_second']:,}/s taken off; "
                f"{' to '.join(f'{x:,}' for x in r['instructions_per_request_range'])} with the rate before or after; "
                + ", ".join(f"{kind} {x:,}" for kind, x in r["instructions_per_request_by_process"].items())
                + ")"
                if r.get("instructions_per_request")
                else ""
            )
        )
    features, per_request = results.get("single_features"), results.get("feast_per_request")
    if single and features and single["rps"]:
        print(
            f"single_features / single rps: {_ratio(ratios, features, single, 'single_features/single')} "
            "(target >= 0.5x)"
        )
    if features and per_request and per_request["rps"]:
        print(f"single_features / feast_per_request rps: {features['rps'] / per_request['rps']:.1f}x (target >= 10x)")
    for case in ("single", "shadow", "canary"):
        paced = (results.get(case) or {}).get("paced")
        if paced:
            print(
                f"{case} at a steady {paced['rps']:,.0f} rps: p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms "
                f"(median of {', '.join(f'{p:.2f}' for p in paced['p99_ms_rounds'])}), {paced['errors']} errors"
            )
    if single and shadow and single.get("paced") and shadow.get("paced") and single["paced"]["p99_ms"]:
        print(
            f"shadow / single p99 at the steady load: {shadow['paced']['p99_ms'] / single['paced']['p99_ms']:.2f}x "
            f"(target <= 1.1x)"
        )
    if single and shadow and single["p99_ms"]:
        print(
            f"shadow / single p99 at saturation: {shadow['p99_ms'] / single['p99_ms']:.2f}x, "
            f"mirrored {shadow['mirrored_fraction']:.1%} (target >= 90%)"
        )


if __name__ == "__main__":
    sys.exit(main())
