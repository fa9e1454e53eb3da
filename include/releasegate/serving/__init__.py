"""The gateway (embedded serving plane): verified model slots, sticky routing, micro-batching, logging.

Submodules import their heavy dependencies lazily, so `from releasegate.serving import auth`
stays cheap for the CLI.
"""

from __future__ import annotations

import logging
import os


def run(host: str = "127.0.0.1", port: int = 8765, settings=None) -> None:
    """Serve the gateway with uvicorn (one worker) until SIGTERM/SIGINT; the prediction log is flushed on the way out."""
    import uvicorn

    from releasegate.serving.app import create_app

    # Progress bars from artifact downloads would drown the gateway's own log lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(create_app(settings), host=host, port=port, workers=1, lifespan="on",
                            access_log=False, timeout_graceful_shutdown=10, log_config=None)
    uvicorn.Server(config).run()
