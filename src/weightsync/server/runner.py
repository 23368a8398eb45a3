"""Run an ASGI app with uvicorn on a pre-bound socket (port 0 = any free port).

Binding the socket first tells us the real port before uvicorn starts, so a
ready file (or a test) learns the URL without guessing. Uvicorn's own signal
handling gives the graceful shutdown: stop accepting, finish in-flight
requests, run the app's lifespan shutdown.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from weightsync.errors import DeploymentError, InvalidInputError
from weightsync.server.processes import write_ready_file

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidInputError(f"cannot listen on {host}:{port}: {e}; pick another --port") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _config(app: Any, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_graceful_shutdown=30, lifespan="on"
    )


def serve(
    app: Any, sock: socket.socket, *, ready_file: Path | None = None, log_level: str = "info"
) -> None:
    """Serve until SIGTERM/SIGINT; write `ready_file` once the server answers."""
    server = uvicorn.Server(_config(app, log_level))
    url = socket_url(sock)
    if ready_file is not None:

        def announce() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.02)
            if server.started:
                write_ready_file(ready_file, url)
                logger.info("serving on %s (ready file %s)", url, ready_file)

        threading.Thread(target=announce, name="ready-file", daemon=True).start()
    server.run(sockets=[sock])


class ServerThread:
    """Uvicorn in a background thread (tests, embedding); `with ServerThread(app) as url:`."""

    def __init__(
        self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self.sock = bind_socket(host, port)
        self.url = socket_url(self.sock)
        self.server = uvicorn.Server(_config(app, log_level))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise DeploymentError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self.url

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
