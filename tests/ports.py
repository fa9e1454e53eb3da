"""Loopback ports for the servers the tests start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_rng = random.SystemRandom()  # not the `random` module's state, which a test may seed
_given: set[int] = set()  # never the same port twice in one process: a server given one may not have bound it yet


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default range starts here


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's range of ephemeral ports.

    Why not the port the kernel picks for a bind to port 0: that one is in the ephemeral range, so between
    this check and the server's own bind any outgoing connection on the machine (to PostgreSQL, between the
    stack's processes) may be given it as its local port, and the server then fails with "address already in
    use" (CI, 2026-12-03: MLflow's port in the system stack). No outgoing connection gets a port below the range;
    a random one of ~20,000 makes two tests choosing the same one at once unlikely, and the bind here skips any
    port already taken.
    """
    low = _ephemeral_low()
    floor = 10_000 if low > 12_000 else 1_024
    for _ in range(100):
        port = _rng.randrange(floor, low)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    with socket.socket() as sock:  # every draw taken: the kernel's choice, as before
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
