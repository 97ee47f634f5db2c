"""Load generators: bounded in count and time, loopback only, each stops by itself.

Two clients with one interface, so every scenario drives every server the same way:
- GrpcClient: the service's Embed (raw generated stubs, vectors as float32 bytes);
- HttpClient: an OpenAI /v1/embeddings, the service's HTTP face or vLLM's own, with base64
  vectors (what the openai SDK asks for by default) or float lists.
Both decode the vectors they get, as a real caller would, and count the inputs the service
says came from its vector cache (vLLM's server says nothing: 0).

Tags. The service keeps a cache of vectors, so a text sent twice in one run is a cache hit
the second time, and any point after the first to send it would measure the cache. Every
load therefore takes a `tag` and sends each text as `"{tag}.{lap} {text}"`, where `lap`
counts how often the load has wrapped around its texts, so a load never repeats a text
either. `Tags` hands out a fresh point number per point; the run builds each point's tags
from it (benchmarks/run.py), and only the Zipf point, which measures the cache, sends its
texts bare. A tag costs the same few tokens on every server (`tag(n, lane)` differs only
in a digit between the lanes of one point).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Protocol

import aiohttp
import grpc.aio
import numpy as np

from benchmarks.measure import Point
from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client.requests import ITEMS_PER_MESSAGE
from service.telemetry.names import CACHED_INPUTS_HEADER

CALL_TIMEOUT_S = 300.0


class Tags:
    """Point numbers for one run: a text tagged with one is sent by no other point."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)

    def point(self) -> int:
        return next(self._numbers)


def tag(point: int, lane: int = 0, part: str = "") -> str:
    """The tag of one point's texts on one lane (a face of a server) and part of the load
    (the measured calls, or "b": the background bulk job)."""
    return f"p{point}.{lane}{part}"


def mark(text: str, tag: str, lap: int = 0) -> str:
    """`text` as sent under `tag` on the `lap`th pass over its texts; bare when `tag` is ""."""
    return f"{tag}.{lap} {text}" if tag else text


def tagged(texts: Sequence[str], tag: str) -> list[str]:
    """One pass over `texts`, tagged (a finite job: a bulk stream, a small job)."""
    return [mark(t, tag) for t in texts]


class Client(Protocol):
    cached: int  # inputs the server answered from its vector cache, over the client's life

    async def embed(self, texts: Sequence[str]) -> int:
        """Embed `texts`; return the prompt tokens the server counted."""
        ...

    async def close(self) -> None: ...


class GrpcClient:
    """`channels` > 1: calls go round the channels, each its own connection (a local
    subchannel pool), as many callers would come over many connections. A server with
    several front-end processes gets each connection served by one of them."""

    def __init__(self, port: int, channels: int = 1) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else []
        self._channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(channels)
        ]
        self._stubs = [pb_grpc.EmbeddingServiceStub(c) for c in self._channels]
        self._turn = itertools.cycle(self._stubs)
        self.stub = self._stubs[0]
        self.cached = 0

    async def embed(self, texts: Sequence[str]) -> int:
        stub = next(self._turn)
        reply = await stub.Embed(pb.EmbedRequest(inputs=texts), timeout=CALL_TIMEOUT_S)
        for e in reply.embeddings:
            np.frombuffer(e.data, np.float32)
        self.cached += reply.timing.cached
        return int(reply.usage.prompt_tokens)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class HttpClient:
    def __init__(
        self, port: int, model: str, connections: int, encoding_format: str = "base64"
    ) -> None:
        self._url = f"http://127.0.0.1:{port}/v1/embeddings"
        self._model = model
        self._format = encoding_format
        self.cached = 0
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
        )

    async def embed(self, texts: Sequence[str]) -> int:
        body = {"model": self._model, "input": list(texts), "encoding_format": self._format}
        async with self._session.post(self._url, json=body) as reply:
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {(await reply.text())[:200]}")
            out = await reply.json()
            self.cached += int(reply.headers.get(CACHED_INPUTS_HEADER, 0))
        for item in out["data"]:
            if self._format == "base64":
                np.frombuffer(base64.b64decode(item["embedding"]), np.float32)
            else:
                np.asarray(item["embedding"], np.float32)
        return int(out["usage"]["prompt_tokens"])

    async def close(self) -> None:
        await self._session.close()


def _slices(texts: Sequence[str], batch: int, cycle: bool, tag: str) -> Iterator[list[str]]:
    """Calls of up to `batch` texts, each text marked with `tag` and its lap."""
    starts = itertools.count(0, batch) if cycle else iter(range(0, len(texts), batch))
    for start in starts:
        lap, i = divmod(start, len(texts))
        yield [mark(t, tag, lap) for t in texts[i : i + batch]]


async def closed_loop(
    client: Client,
    texts: Sequence[str],
    *,
    batch: int,
    concurrency: int,
    seconds: float,
    cycle: bool = False,
    tag: str = "",
) -> Point:
    """`concurrency` callers, each sending its next `batch` texts as soon as the last returns.

    Stops after `seconds`, or when the texts run out (unless `cycle`); calls that finish
    count, and throughput is over the time until the last of them returned. Texts go out
    marked with `tag` (and their lap, when cycling), bare when it is "".
    """
    work = _slices(texts, batch, cycle, tag)
    point = Point()
    cached_before = client.cached
    began = time.perf_counter()
    end = began + seconds

    async def caller() -> None:
        for chunk in work:
            if time.perf_counter() >= end:
                return
            t0 = time.perf_counter()
            try:
                tokens = await client.embed(chunk)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, RuntimeError):
                point.errors += 1
                continue
            point.latencies.append(time.perf_counter() - t0)
            point.calls += 1
            point.texts += len(chunk)
            point.tokens += tokens

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    point.seconds = time.perf_counter() - began
    point.cached = client.cached - cached_before
    return point


async def stream(
    stub: pb_grpc.EmbeddingServiceAsyncStub,
    texts: Sequence[str],
    *,
    stop: asyncio.Event | None = None,
    items_per_message: int = ITEMS_PER_MESSAGE,
    options: pb.EmbedOptions | None = None,
    tag: str = "",
) -> Point:
    """One EmbedStream carrying `texts` (over and over until `stop`, when given, each pass
    a lap of `tag`), in messages of `items_per_message` items, as the client library
    sends them.

    The writer sends as fast as the server's flow control lets it; latency is per item,
    from the moment its message went out to its result.
    """
    sent: dict[str, float] = {}
    point = Point()

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        total = len(texts) if stop is None else None  # None: until `stop` is set
        for start in itertools.count(0, items_per_message):
            if (total is not None and start >= total) or (stop is not None and stop.is_set()):
                return
            end = (
                start + items_per_message
                if total is None
                else min(start + items_per_message, total)
            )
            now = time.perf_counter()
            items = []
            for n in range(start, end):
                sent[str(n)] = now
                lap, i = divmod(n, len(texts))
                items.append(pb.StreamItem(id=str(n), input=mark(texts[i], tag, lap)))
            yield pb.EmbedStreamRequest(items=items, options=options)

    began = time.perf_counter()
    call = stub.EmbedStream(requests(), timeout=CALL_TIMEOUT_S * 10)
    async for response in call:
        for result in response.results:
            point.latencies.append(time.perf_counter() - sent.pop(result.id))
            if result.HasField("error"):
                point.errors += 1
                continue
            np.frombuffer(result.embedding.data, np.float32)
            point.cached += result.timing.cached
            point.texts += 1
            point.tokens += result.embedding.token_count
    point.calls = 1
    point.seconds = time.perf_counter() - began
    return point


async def mixed(
    unary: Client,
    queries: Sequence[str],
    bulk: AsyncIterator[None] | None,
    *,
    concurrency: int,
    seconds: float,
    ramp_s: float,
    tag: str = "",
) -> Point:
    """Single-query unary calls while `bulk` (an async job, or None for idle) runs.

    The bulk job starts `ramp_s` before the measured window so the engine is saturated
    when it opens, and is cancelled when the window closes.
    """
    runner: asyncio.Task[None] | None = None
    if bulk is not None:
        runner = asyncio.ensure_future(_drain(bulk))
        await asyncio.sleep(ramp_s)
    try:
        return await closed_loop(
            unary, queries, batch=1, concurrency=concurrency, seconds=seconds, cycle=True, tag=tag
        )
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def sporadic(
    unary: Client,
    queries: Sequence[str],
    bulk: AsyncIterator[None],
    *,
    gap_s: float,
    calls: int,
    ramp_s: float,
    tag: str = "",
) -> Point:
    """Single-query calls `gap_s` apart while `bulk` saturates the engine: a service that
    calls now and then during a nightly job. Each call meets the engine after a quiet
    spell, unlike `mixed`, whose callers keep the interactive class busy."""
    runner = asyncio.ensure_future(_drain(bulk))
    point = Point()
    cached_before = unary.cached
    try:
        await asyncio.sleep(ramp_s)
        began = time.perf_counter()
        for n in range(calls):
            lap, i = divmod(n, len(queries))
            t0 = time.perf_counter()
            point.tokens += await unary.embed([mark(queries[i], tag, lap)])
            point.latencies.append(time.perf_counter() - t0)
            point.calls += 1
            point.texts += 1
            await asyncio.sleep(gap_s)
        point.seconds = time.perf_counter() - began
        point.cached = unary.cached - cached_before
        return point
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def behind(
    job: Callable[[Sequence[str]], Awaitable[Point]],
    large: Sequence[str],
    small: Sequence[str],
    *,
    delay_s: float,
) -> Point:
    """A small bulk job started `delay_s` after a large one, on the same server: the
    small one's point (its seconds are its time to finish). The large job is cancelled
    once the small one is done."""
    runner = asyncio.ensure_future(job(large))
    try:
        await asyncio.sleep(delay_s)
        return await job(small)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def _drain(job: AsyncIterator[None]) -> None:
    async for _ in job:
        pass


async def http_bulk(
    port: int, model: str, texts: Sequence[str], *, batch: int, workers: int, tag: str = ""
) -> AsyncIterator[None]:
    """The HTTP peer's bulk load: `workers` requests of `batch` texts at a time, on a
    connection pool of its own (a bulk job is another client than the interactive ones)."""
    client = HttpClient(port, model, workers)
    work = _slices(texts, batch, cycle=True, tag=tag)

    async def worker() -> None:
        for chunk in work:
            await client.embed(chunk)

    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        await client.close()
    yield


async def grpc_bulk(port: int, texts: Sequence[str], tag: str = "") -> AsyncIterator[None]:
    """The service's bulk load: one EmbedStream that never runs out, on its own channel."""
    client = GrpcClient(port)
    try:
        await stream(client.stub, texts, stop=asyncio.Event(), tag=tag)
    finally:
        await client.close()
    yield
