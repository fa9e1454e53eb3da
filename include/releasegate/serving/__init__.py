"""The gateway (embedded serving plane): verified model slots, sticky routing, micro-batching, logging.

Submodules import their heavy dependencies lazily, so `from releasegate.serving import auth`
stays cheap for the CLI.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from releasegate.settings import Settings

log = logging.getLogger(__name__)

# The gateway already predicts in parallel (a pool of predict threads) and micro-batches; an OpenMP or BLAS
# pool of one thread per core inside each call oversubscribes the CPU, and latency then measures contention.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_NUMERIC_MODULES = ("numpy", "scipy", "sklearn", "onnxruntime")


def one_thread_per_call() -> dict[str, str]:
    """Default OMP/OpenBLAS/MKL threads to 1 where unset (an operator's own value wins); {variable: value set}.

    These libraries read the variables when they load: call it before numpy or sklearn is imported.
    """
    chosen = {name: "1" for name in _THREAD_VARIABLES if not os.environ.get(name)}
    os.environ.update(chosen)
    return chosen


def run(
    host: str = "127.0.0.1",
    port: int = 8765,
    settings: Settings | None = None,
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    workers: int | None = None,
) -> None:
    """Serve the gateway with uvicorn until SIGTERM/SIGINT; the prediction log is flushed on the way out.

    The TLS arguments override RELEASEGATE_GATEWAY_TLS_*; a client CA turns on mutual TLS. `workers` overrides
    RELEASEGATE_GATEWAY_WORKERS (default: one per core); several read their settings from the environment.
    """
    threads = one_thread_per_call()  # first: nothing numeric is imported yet (`python -m` and the CLI alike)
    loaded_early = [m for m in _NUMERIC_MODULES if m in sys.modules]
    import ssl

    import uvicorn

    from releasegate.serving import workers as shared
    from releasegate.serving.config import GatewayConfig

    overrides: dict[str, Any] = {
        k: v for k, v in (("tls_cert", tls_cert), ("tls_key", tls_key), ("tls_client_ca", tls_client_ca)) if v
    }
    if workers is not None:
        overrides["workers"] = workers
    config = GatewayConfig.from_env()
    config = GatewayConfig(**config.model_dump() | overrides)
    processes = config.workers or shared.cores()
    if processes > 1 and settings is not None:
        raise ValueError("several workers read their settings from the environment: pass no Settings, or one worker")
    # Progress bars from artifact downloads would drown the gateway's own log lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _tune_process(processes > 1)
    log.info(
        "OpenMP/BLAS threads per predict call: %s",
        ", ".join(
            f"{name}={os.environ[name]}" + ("" if name in threads else " (from the environment)")
            for name in _THREAD_VARIABLES
        ),
    )
    if loaded_early and threads:
        log.warning(
            "%s imported before the gateway started: the thread defaults may not apply to it", ", ".join(loaded_early)
        )
    tls: dict[str, Any] = {}  # uvicorn's ssl_* arguments
    if config.tls_cert:
        tls = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
        if config.tls_client_ca:
            tls |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    # httptools + uvloop are uvicorn's fast paths (both installed); no access log on the request path.
    # No proxy-header rewriting (nothing here reads the client's address) and no `server` header.
    options: dict[str, Any] = dict(
        host=host,
        port=port,
        lifespan="on",
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=10,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        **tls,
    )
    if processes == 1:
        from releasegate.serving.app import create_app

        uvicorn.Server(uvicorn.Config(create_app(settings, config), workers=1, **options)).run()
        return
    # uvicorn's supervisor: binds the port once, starts the workers (spawned: each imports the app afresh),
    # replaces one that dies, and on SIGTERM stops them all, each answering its requests in flight first.
    log.info("starting %d workers behind %s:%d", processes, host, port)
    from releasegate import storage
    from releasegate.settings import get_settings

    storage.engine(get_settings().db_url)  # migrated here once, not by the workers at the same moment
    storage.dispose_all()
    with shared.shared_dir():
        os.environ.update({f"RELEASEGATE_GATEWAY_{k.upper()}": str(v) for k, v in overrides.items()})
        uvicorn.run(
            "releasegate.serving:worker_app", factory=True, workers=processes, timeout_worker_healthcheck=30, **options
        )


def worker_app() -> Any:
    """One worker's gateway (uvicorn's app factory, in a process of its own): the process tuned, then the app."""
    _tune_process(True)
    from releasegate.serving.app import create_app

    return create_app()


def _tune_process(several: bool) -> None:
    # In a worker, the log names its process: several write to the same output.
    form = "%(asctime)s %(levelname)s %(name)s" + (" [%(process)d]" if several else "") + ": %(message)s"
    logging.basicConfig(level=logging.INFO, format=form)
    # The log writer's thread shares the GIL with the event loop: hand it back every 0.5 ms, not 5 ms,
    # so a log flush cannot hold a request that long.
    sys.setswitchinterval(0.0005)
    # Requests allocate many short-lived containers; at the default threshold (700) the collector ran
    # every few requests and its older generations stalled them (p99 87 ms against a p50 of 3 ms on
    # this machine; 13 ms at these thresholds, 7 ms with no collector at all). Cycles are still collected.
    gc.set_threshold(50_000, 50, 1000)
