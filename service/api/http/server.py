"""uvicorn serving the HTTP face inside the process's own event loop, beside grpc.aio.

One loop, one Embedder, one batcher: an HTTP call is interactive traffic exactly like a
unary gRPC call. uvicorn normally owns the process (its loop, its signal handlers); here it
only gets a socket the server bound itself, so a port taken is a clear start-up error and
SIGTERM stays with the server's own drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from service.telemetry.http import App

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str = ""  # set: clients must present a certificate it signed


class _InLoopServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: SIGTERM belongs to the process's drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Reuse a port in TIME_WAIT after a restart; a second live listener still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HttpServer:
    def __init__(self, app: App, host: str, port: int, tls: TlsFiles | None = None) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            # "Started server process" and the like; the server logs its own ready line.
            logging.getLogger("uvicorn").setLevel(logging.WARNING)
        self._config = uvicorn.Config(
            app,
            loop="none",  # the running loop (uvloop) is used as it is
            http="httptools",
            lifespan="off",
            access_log=False,  # one line per request comes from the telemetry middleware
            log_config=None,  # the process's logging stays as configured
            server_header=False,
            # The drain has waited for calls in flight already; this only bounds the rest.
            timeout_graceful_shutdown=1,
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
            ssl_ca_certs=tls.client_ca_file if tls and tls.client_ca_file else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
        )
        self._host = host
        self._port = port
        self.scheme = "https" if tls else "http"
        self._server = _InLoopServer(self._config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen; raises OSError naming the address when it cannot bind."""
        try:
            sock = _bind(self._host, self._port)
        except OSError as exc:
            raise OSError(f"cannot serve HTTP on {self._host}:{self._port}: {exc}") from exc
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its start-up failure
                raise RuntimeError("HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Close the listener and the connections (the drain happened before)."""
        if self._task is None:
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
