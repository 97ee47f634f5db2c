"""uvicorn serving the HTTP face inside the process's own event loop, beside grpc.aio.

One loop, one Embedder, one batcher: an HTTP call is interactive traffic exactly like a
unary gRPC call. uvicorn normally owns the process (its loop, its signal handlers); here it
only gets a socket the server bound itself, so a port taken is a clear start-up error and
SIGTERM stays with the server's own drain.

uvicorn bounds only idle keep-alive connections; the protocol here also bounds the slow
ones (a request head that trickles in, a body that keeps arriving after its answer went
out) and the number of connections, so a few thousand slow clients cannot hold the
process's file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from asyncio import TimerHandle, Transport
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.api.http.errors import protocol_error_body
from service.telemetry.http import App

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str = ""  # set: clients must present a certificate it signed


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float  # a request head must arrive whole within this
    body_timeout_s: float  # a body still arriving this long after its head is cut off
    max_connections: int  # open connections at most; 0: no limit


# A refusal over the connection limit is logged at most this often (a flood would
# otherwise write a line per connection).
_WARN_EVERY_S = 10.0


class _Refusals:
    def __init__(self) -> None:
        self._count = 0
        self._warned_at = -math.inf

    def add(self, limit: int) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            log.warning(
                "refused %d HTTP connection(s) over the limit of %d open connections "
                "(--http-max-connections)",
                self._count,
                limit,
            )
            self._count, self._warned_at = 0, now


class _BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on slow and surplus connections.

    - A request head (the first, or one after a keep-alive pause) that has not arrived
      whole `header_timeout_s` after it began (or after the connection opened) closes the
      connection; uvicorn would wait forever.
    - A body still arriving `body_timeout_s` after its head closes the connection once the
      answer went out (a 401 or 404 answers without reading it). A body the face is still
      reading is cut off there: the face answers 408 itself (HttpApi._read).
    - A connection over `max_connections` is answered 503 and closed at once.

    Timers are armed only when a head or body spans several reads, so a request that
    arrives in one piece costs nothing more.
    """

    limits: ClassVar[ConnectionLimits]
    refusals: ClassVar[_Refusals]
    _head_timer: TimerHandle | None = None
    _body_timer: TimerHandle | None = None
    _in_head = False  # a request head has begun and not ended
    _in_body = False  # a request body has begun and not ended

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.limits.max_connections
        if limit and len(self.connections) > limit:
            self.refusals.add(limit)
            self._answer_and_close(
                503, f"the server holds its limit of {limit} open connections; retry shortly"
            )
            return
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout_s, self._head_late
                )
        elif self._in_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._stop_body_timer()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request that is not HTTP/1.1, answered in the face's error shape."""
        self._answer_and_close(400, f"{msg.rstrip('.')}: the request is not valid HTTP/1.1")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_late(self) -> None:
        log.debug(
            "closed an HTTP connection: its request head took over %ss",
            self.limits.header_timeout_s,
        )
        self.transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        if self.cycle.response_complete:
            self.transport.close()

    def _answer_and_close(self, status: int, message: str) -> None:
        body = protocol_error_body(status, message)
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(STATUS_LINE[status] + head % len(body) + body)
        self.transport.close()


def _protocol(bounds: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to these limits."""

    class BoundedProtocol(_BoundedProtocol):
        limits = bounds
        refusals = _Refusals()

    return BoundedProtocol


class _InLoopServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: SIGTERM belongs to the process's drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP face's listening socket; raises OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Reuse a port in TIME_WAIT after a restart; a second live listener still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve HTTP on {host}:{port}: {exc}") from exc
    sock.set_inheritable(True)
    return sock


class HttpServer:
    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        tls: TlsFiles | None = None,
        *,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 60.0,
        max_connections: int = 2048,
        sock: socket.socket | None = None,
    ) -> None:
        """`sock`: a listening socket bound by a supervisor and shared by several front-end
        processes (--api-processes), instead of binding host:port here."""
        if not log.isEnabledFor(logging.DEBUG):
            # "Started server process" and the like; the server logs its own ready line.
            logging.getLogger("uvicorn").setLevel(logging.WARNING)
        self._config = uvicorn.Config(
            app,
            loop="none",  # the running loop (uvloop) is used as it is
            http=_protocol(ConnectionLimits(header_timeout_s, body_timeout_s, max_connections)),
            ws="none",  # no WebSocket routes: an upgrade request is answered as plain HTTP
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
        self._sock = sock
        self.scheme = "https" if tls else "http"
        self._server = _InLoopServer(self._config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen; raises OSError naming the address when it cannot bind."""
        sock = self._sock or bind_http(self._host, self._port)
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
