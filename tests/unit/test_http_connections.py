"""The HTTP face's bounds on slow and surplus connections, on a real uvicorn socket.

The bounds are tiny so the tests are quick, but no assertion is about time: a bound holds
when the server answers or closes the connection at all, where uvicorn alone would hold it
forever (a head or body that stops half-way; bytes trickling in, which also keep resetting
its keep-alive timer). Each wait for that is generous, so a slow machine only makes a test
slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from service.api.http.app import HttpApi
from service.api.http.server import HttpServer
from service.api.runtime import Gate
from service.config import ServiceConfig
from service.server import EmbeddingServer
from tests.fakes import FakeEngine, factory
from tests.servers import free_port

WAIT_S = 30.0  # how long a test waits for the server to answer or close
TICK_S = 0.05  # how often a trickling client sends another byte
Serve = Callable[..., Awaitable[HttpServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """HTTP servers with no engine behind them (the gate stays closed: the model is
    "loading"), which is all the connection bounds need."""
    servers: list[HttpServer] = []

    async def start(
        header_timeout_s: float = WAIT_S * 2,
        body_timeout_s: float = WAIT_S * 2,
        max_connections: int = 0,
    ) -> HttpServer:
        api = HttpApi(Gate(), keys=None, max_request_bytes=1 << 20, body_timeout_s=body_timeout_s)
        server = HttpServer(
            api.app(),
            "127.0.0.1",
            0,
            header_timeout_s=header_timeout_s,
            body_timeout_s=body_timeout_s,
            max_connections=max_connections,
        )
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


class _Client:
    """A raw connection that can trickle bytes and read what comes back until the close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, server: HttpServer, first: bytes = b"") -> _Client:
        """A connection that has sent `first` before the server can even accept it, so a
        tiny header timeout cannot run out before the bytes are there."""
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(first)  # a loopback connect and a small send complete without the server
        return cls(*await asyncio.open_connection(sock=sock))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def trickle(self, byte: bytes) -> None:
        """One `byte` every TICK_S until the server closes the connection. Only for tests
        that need no answer after the trickle began: a byte sent after the server's close
        makes it reset the connection, which can drop an answer not yet read."""
        with contextlib.suppress(ConnectionError):
            while not self.reader.at_eof():
                await self.send(byte)
                await asyncio.sleep(TICK_S)

    async def until_closed(self, trickling: bytes = b"") -> bytes:
        """Everything the server sends until it closes (failing after WAIT_S), while
        trickling `trickling` when given."""
        trickler = asyncio.create_task(self.trickle(trickling)) if trickling else None
        try:
            async with asyncio.timeout(WAIT_S):
                received = b""
                with contextlib.suppress(ConnectionError):
                    while chunk := await self.reader.read(65536):
                        received += chunk
                return received
        finally:
            if trickler is not None:
                trickler.cancel()
            self.writer.close()


def _answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and the JSON error of one HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return int(status_line.split()[1]), headers, error


async def test_a_request_head_that_never_ends_is_closed(serve: Serve) -> None:
    server = await serve(header_timeout_s=0.2)
    silent = await _Client.connect(server)
    assert await silent.until_closed() == b""
    slow = await _Client.connect(server, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert await slow.until_closed(trickling=b"a") == b""
    # A keep-alive connection: the second request's head is timed from its first byte.
    kept = await _Client.connect(server, b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await kept.reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    await kept.send(b"GET /openapi.json HTTP/1.1\r\nX-Slow: ")
    assert b"HTTP/1.1" not in await kept.until_closed(trickling=b"a")  # no second answer


async def test_a_body_that_never_ends_is_408_and_closed(serve: Serve) -> None:
    server = await serve(body_timeout_s=0.2)
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    # And no more: uvicorn alone would wait forever.
    client = await _Client.connect(server, head + b'{"input": "')
    status, headers, error = _answer(await client.until_closed())
    assert status == 408 and headers["connection"] == "close"
    assert (error["type"], error["code"]) == ("timeout_error", "request_timeout")
    assert "did not arrive within 0.2s" in error["message"]


async def test_a_body_nobody_reads_is_cut_off_after_its_answer(serve: Serve) -> None:
    """An unknown route answers at once without reading the body; a client that goes on
    sending it must not hold the connection forever."""
    server = await serve(body_timeout_s=0.2)
    head = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    client = await _Client.connect(server, head)
    received = await client.until_closed(trickling=b"a")
    assert received.startswith(b"HTTP/1.1 404")


async def test_connections_over_the_limit_are_answered_503_and_closed(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(max_connections=2)
    held = [await _Client.connect(server) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="service.api.http.server"):
        refused = await _Client.connect(server)  # accepted after the two: over the limit
        status, headers, error = _answer(await refused.until_closed())
    assert status == 503 and headers["connection"] == "close"
    assert (error["type"], error["code"]) == ("service_unavailable_error", "too_many_connections")
    assert "limit of 2 open connections" in error["message"]
    assert any("over the limit of 2" in r.getMessage() for r in caplog.records)
    # Room again once one of them leaves.
    held[0].writer.close()
    async with asyncio.timeout(WAIT_S):
        while True:
            request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            client = await _Client.connect(server, request)
            if (await client.until_closed()).startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(TICK_S)  # the server has not seen the close yet
    held[1].writer.close()


async def test_a_request_that_is_not_http_is_a_json_400(serve: Serve) -> None:
    server = await serve()
    client = await _Client.connect(server, b"NOT HTTP AT ALL\r\n\r\n")
    status, _, error = _answer(await client.until_closed())
    assert status == 400 and error["code"] == "invalid_http_request"


async def test_the_server_takes_the_bounds_from_its_config() -> None:
    async def start(**settings: Any) -> EmbeddingServer:
        config = ServiceConfig(port=0, http_port=free_port(), grace_s=0.0, **settings)
        server = EmbeddingServer(config, factory(FakeEngine()))  # type: ignore[arg-type]
        await server.start()
        return server

    quick = await start(http_header_timeout_s=0.2, http_body_timeout_s=0.2)
    # Timeouts far beyond the test: the held connection stays open.
    full = await start(http_max_connections=1, http_header_timeout_s=WAIT_S * 20)
    assert quick.http is not None and full.http is not None
    try:
        silent = await _Client.connect(quick.http)
        assert await silent.until_closed() == b""  # no head within 0.2 s
        head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n"
        slow = await _Client.connect(quick.http, head)
        status, _, error = _answer(await slow.until_closed())  # no body within 0.2 s
        assert status == 408 and "within 0.2s" in error["message"]
        held = await _Client.connect(full.http)
        status, _, error = _answer(await (await _Client.connect(full.http)).until_closed())
        assert status == 503 and "limit of 1 open connections" in error["message"]
        held.writer.close()
    finally:
        await quick.stop(grace_s=0)
        await full.stop(grace_s=0)
