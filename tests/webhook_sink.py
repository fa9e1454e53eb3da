"""A webhook sink: a real HTTP server on a loopback port that keeps what is POSTed to it, for the notification tests."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Sink:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/hook"
        self.received: list[tuple[str | None, dict[str, Any]]] = []  # (authorization header, JSON body)
        self.status = 200

    def bodies(self, event: str | None = None) -> list[dict[str, Any]]:
        return [body for _, body in self.received if event is None or body.get("event") == event]


@contextlib.contextmanager
def webhook_sink() -> Iterator[Sink]:
    """A sink serving in a thread until the block ends; set `status` to make it answer with an error."""
    sink: Sink

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            sink.received.append((self.headers.get("authorization"), body))
            self.send_response(sink.status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink = Sink(server.server_port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
