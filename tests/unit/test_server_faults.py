"""The real grpc.aio server and servicer with a fake engine: faults that need injecting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.config import ServiceConfig
from service.server import EmbeddingServer
from tests.fakes import FakeEngine, factory
from tests.servers import free_port

ServerMaker = Callable[..., Awaitable[tuple[EmbeddingServer, FakeEngine]]]

# RPC deadlines and bounds on condition polls: long enough that only a hang reaches them,
# however loaded the machine. Where a test is about a deadline, it sets its own.
PATIENCE_S = 120.0


async def until(check: Callable[[], bool], what: str) -> None:
    """Polls `check` until it holds; fails after PATIENCE_S (a hang, not slowness)."""
    try:
        async with asyncio.timeout(PATIENCE_S):
            while not check():  # noqa: ASYNC110 - the conditions live in other objects
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


@pytest.fixture
async def make_server() -> AsyncIterator[ServerMaker]:
    servers: list[EmbeddingServer] = []

    async def make(
        engine: FakeEngine | None = None, **settings: Any
    ) -> tuple[EmbeddingServer, FakeEngine]:
        engine = engine or FakeEngine()
        settings.setdefault("http_port", free_port())
        config = ServiceConfig(port=0, grace_s=1.0, **settings)
        server = EmbeddingServer(config, factory(engine))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server, engine

    yield make
    for server in servers:
        await server.stop(grace_s=0)


def _stub(server: EmbeddingServer) -> tuple[grpc.aio.Channel, pb_grpc.EmbeddingServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, pb_grpc.EmbeddingServiceStub(channel)


def _details(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError("no rich status details")


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PATIENCE_S)
        return int(reply.status)


async def test_api_keys(make_server: ServerMaker) -> None:
    server, _ = await make_server(api_keys="alpha-key,beta-key")
    channel, stub = _stub(server)
    request = pb.EmbedRequest(inputs=["hello"])
    async with channel:
        for metadata in [(), (("x-api-key", "wrong"),), (("authorization", "Bearer nope"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(request, metadata=metadata, timeout=PATIENCE_S)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "alpha-key" not in (caught.value.details() or "")
        ok = await stub.Embed(
            request, metadata=(("authorization", "Bearer beta-key"),), timeout=PATIENCE_S
        )
        assert len(ok.embeddings) == 1
        ok = await stub.Embed(request, metadata=(("x-api-key", "alpha-key"),), timeout=PATIENCE_S)
        assert len(ok.embeddings) == 1
    # Probes carry no key.
    assert await _health(server.port, "") == health_pb2.HealthCheckResponse.SERVING
    assert "alpha-key" not in repr(server.config)


async def test_overload_answers_ok_or_resource_exhausted(make_server: ServerMaker) -> None:
    server, engine = await make_server(
        FakeEngine(),
        vector_cache_mb=0,  # the same texts every call: the cache would answer them
        max_batch_tokens=256,
        max_queue_tokens=256,
        max_request_tokens=256,
        max_queue_items=40,
        max_batch_items=8,
    )
    channel, stub = _stub(server)
    texts = [f"flood text number {i}" for i in range(4)]

    async def call() -> grpc.StatusCode:
        try:
            reply = await stub.Embed(pb.EmbedRequest(inputs=texts), timeout=PATIENCE_S)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry = error_details_pb2.RetryInfo()
                assert any(d.Unpack(retry) for d in _details(err).details)
                assert retry.retry_delay.ToTimedelta().total_seconds() > 0
            return err.code()
        assert len(reply.embeddings) == 4
        return grpc.StatusCode.OK

    # The engine answers nothing until every call has been queued or refused: the flood
    # meets a full queue however slowly it arrives.
    engine.gate = asyncio.Event()
    components = server._components
    assert components is not None

    warm_up = len(engine.batches)  # the server's own, at start

    def settled() -> bool:
        refused = sum(1 for c in calls if c.done())
        in_engine = sum(len(b) for b in engine.batches[warm_up:])
        return 4 * refused + components.batchers[0].queued_items + in_engine == 4 * len(calls)

    async with channel:
        calls = [asyncio.ensure_future(call()) for _ in range(200)]
        await until(settled, "every call queued or refused")
        engine.gate.set()
        codes = await asyncio.gather(*calls)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert server._components is not None and server._components.batchers[0].queued_items == 0


async def test_short_deadline_is_refused_early(make_server: ServerMaker) -> None:
    server, engine = await make_server(FakeEngine(delay_s=0.3))
    channel, stub = _stub(server)
    async with channel:
        await stub.Embed(pb.EmbedRequest(inputs=["teach the latency estimate"]), timeout=PATIENCE_S)
        batches = len(engine.batches)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["x"]), timeout=0.05)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(engine.batches) == batches, "refused before reaching the engine"


async def test_gone_callers_abort_engine_work(make_server: ServerMaker) -> None:
    server, engine = await make_server(FakeEngine())
    engine.hang = True
    components = server._components
    assert components is not None
    warm_up = len(engine.batches)  # the server's own, at start
    channel, stub = _stub(server)
    async with channel:
        # A caller that leaves once its batch is in the engine: the batch is cancelled.
        call = stub.Embed(pb.EmbedRequest(inputs=["a", "b"]), timeout=PATIENCE_S)
        await until(lambda: len(engine.batches) == warm_up + 1, "the batch reached the engine")
        call.cancel()
        await until(lambda: engine.cancelled == 1, "the engine's work was cancelled")
        # A deadline that passes: whatever of the call reached the engine is cancelled too
        # (how far it got before its second passed depends on the machine, not the code).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["c", "d"]), timeout=1.0)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: components.batchers[0].inflight_batches == 0, "no batch left running")
    assert engine.cancelled == len(engine.batches) - warm_up
    assert components.batchers[0].queued_items == 0


async def test_engine_death_gives_unavailable_and_not_serving(make_server: ServerMaker) -> None:
    server, engine = await make_server(FakeEngine())
    warm_up = len(engine.batches)  # the server's own, at start
    engine.gate = asyncio.Event()  # the batch stays in the engine until the engine dies
    channel, stub = _stub(server)
    async with channel:
        call = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=["x"]), timeout=PATIENCE_S))
        await until(lambda: len(engine.batches) == warm_up + 1, "the batch reached the engine")
        engine.dead = True
        engine.gate.set()  # it dies mid-batch
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        reason = await asyncio.wait_for(server.watch_engine(interval_s=0.05), PATIENCE_S)
        assert "died" in reason
        await server.fail(reason)
        assert await _health(server.port, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["y"]), timeout=PATIENCE_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_hung_engine_is_caught_by_the_watchdog(make_server: ServerMaker) -> None:
    server, engine = await make_server(FakeEngine(), engine_timeout_s=0.3)
    engine.hang = True
    channel, stub = _stub(server)
    async with channel:
        call = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=["x"]), timeout=PATIENCE_S))
        reason = await asyncio.wait_for(server.watch_engine(interval_s=0.05), PATIENCE_S)
        assert "has run for over" in reason
        await server.fail(reason)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert engine.cancelled == 1


async def test_invalid_utf8_is_invalid_argument(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    # EmbedRequest{inputs: [b"\xff\xfe"]} by hand: field 1, wire type 2, length 2.
    raw = bytes([0x0A, 0x02, 0xFF, 0xFE])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(
            "/embedding.v1.EmbeddingService/Embed",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(raw, timeout=PATIENCE_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = await pb_grpc.EmbeddingServiceStub(channel).Embed(
            pb.EmbedRequest(inputs=["fine"]), timeout=PATIENCE_S
        )
        assert len(ok.embeddings) == 1


async def test_oversized_message_is_resource_exhausted(make_server: ServerMaker) -> None:
    server, _ = await make_server(max_request_bytes=64 * 1024)
    channel, stub = _stub(server)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(pb.EmbedRequest(inputs=["x" * 100_000]), timeout=PATIENCE_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_request_token_limit(make_server: ServerMaker) -> None:
    server, _ = await make_server(max_request_tokens=300, max_queue_tokens=9000)
    channel, stub = _stub(server)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(
                pb.EmbedRequest(inputs=["one two three four"] * 100), timeout=PATIENCE_S
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit of 300" in (caught.value.details() or "")


async def test_stream_vectors_match_unary(make_server: ServerMaker) -> None:
    server, _ = await make_server(stream_max_inflight=4)
    channel, stub = _stub(server)
    texts = [f"item {i}" for i in range(50)]

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        for i, text in enumerate(texts):
            yield pb.EmbedStreamRequest(id=str(i), input=text)

    async with channel:
        results = [r async for r in stub.EmbedStream(requests(), timeout=PATIENCE_S)]
        unary = await stub.Embed(pb.EmbedRequest(inputs=texts), timeout=PATIENCE_S)
    assert sorted(int(r.id) for r in results) == list(range(50))
    for r in results:
        expected = unary.embeddings[int(r.id)].data
        assert r.embedding.data == expected
    assert np.frombuffer(unary.embeddings[0].data, "<f4").shape == (384,)


async def test_stream_multi_item_messages_mixed_with_single_items(make_server: ServerMaker) -> None:
    # Messages of up to 8 items against 8 slots: the reader must never wait on itself.
    server, _ = await make_server(stream_max_inflight=8)
    channel, stub = _stub(server)
    texts = [f"item {i}" for i in range(60)]
    int8 = pb.EmbedOptions(encoding=pb.ENCODING_INT8)

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        i = 0
        while i < len(texts):
            if i % 3 == 0:
                yield pb.EmbedStreamRequest(id=str(i), input=texts[i])
                i += 1
                continue
            chunk = range(i, min(i + 8, len(texts)))
            items = [pb.StreamItem(id=str(j), input=texts[j]) for j in chunk]
            yield pb.EmbedStreamRequest(items=items, options=int8 if i % 2 else None)
            i += len(chunk)
        # Bad items fail alone: an empty text, an id already in flight in the same message.
        bad = [pb.StreamItem(id="empty", input=""), pb.StreamItem(id="twice", input="a")]
        yield pb.EmbedStreamRequest(items=[*bad, pb.StreamItem(id="twice", input="b")])

    async with channel:
        responses = [r async for r in stub.EmbedStream(requests(), timeout=PATIENCE_S)]
        unary = await stub.Embed(pb.EmbedRequest(inputs=texts), timeout=PATIENCE_S)
        unary8 = await stub.Embed(pb.EmbedRequest(inputs=texts, options=int8), timeout=PATIENCE_S)
    singles = [r for r in responses if not r.results]
    assert all(not r.id or int(r.id) % 3 == 0 for r in singles)
    results: list[pb.EmbedStreamResponse | pb.StreamItemResult] = [
        *singles,
        *(x for r in responses for x in r.results),
    ]
    by_id: dict[str, list[Any]] = {}
    for r in results:
        by_id.setdefault(r.id, []).append(r)
    assert sorted(by_id) == sorted([*map(str, range(60)), "empty", "twice"])
    for i in range(60):
        (r,) = by_id[str(i)]
        expected = unary8 if r.embedding.encoding == pb.ENCODING_INT8 else unary
        assert r.embedding.data == expected.embeddings[i].data
    assert by_id["empty"][0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    twice = sorted(by_id["twice"], key=lambda r: r.HasField("error"))
    assert [r.HasField("error") for r in twice] == [False, True]
    assert "already in flight" in twice[1].error.message


async def test_stream_refuses_malformed_multi_item_messages_and_goes_on(
    make_server: ServerMaker,
) -> None:
    server, _ = await make_server(stream_max_inflight=4, max_inputs_per_request=16)
    channel, stub = _stub(server)
    five = [pb.StreamItem(id=f"x{i}", input="text") for i in range(5)]

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        yield pb.EmbedStreamRequest(items=five)  # more than the 4 slots
        yield pb.EmbedStreamRequest(id="both", input="text", items=five[:2])
        yield pb.EmbedStreamRequest(items=five[:4])

    async with channel:
        responses = [r async for r in stub.EmbedStream(requests(), timeout=PATIENCE_S)]
    errors = [r.error for r in responses if r.HasField("error")]
    assert [e.code for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2
    assert "5 items exceed the limit of 4 per message (first id 'x0')" in errors[0].message
    assert "either items or id and input" in errors[1].message
    assert all(not r.id for r in responses if r.HasField("error"))
    assert sorted(x.id for r in responses for x in r.results if x.HasField("embedding")) == [
        "x0",
        "x1",
        "x2",
        "x3",
    ]


async def test_streams_that_never_read_hold_only_the_shared_budget(
    make_server: ServerMaker,
) -> None:
    server, _ = await make_server(streams_max_inflight=40, stream_max_inflight=1024)
    budget = server.servicer._streams
    channel, stub = _stub(server)

    async def requests(n: int) -> AsyncIterator[pb.EmbedStreamRequest]:
        for i in range(400):
            yield pb.EmbedStreamRequest(id=str(i), input=f"stream {n} item {i} " * 20)

    async with channel:
        # Calls whose responses are never read: their clients' windows fill, and the
        # server's writes block with the items' room still held.
        calls = [stub.EmbedStream(requests(n), timeout=PATIENCE_S) for n in range(20)]
        # The room fills; then every sample of it for a while stays within the shared bound.
        await until(lambda: budget.held > 0, "the streams hold items")
        samples = []
        for _ in range(100):
            samples.append(budget.held)
            await asyncio.sleep(0.02)
        assert 0 < max(samples) <= 40, samples
        reply = await stub.Embed(
            pb.EmbedRequest(inputs=["a unary call meanwhile"]), timeout=PATIENCE_S
        )
        assert len(reply.embeddings) == 1
        for call in calls:
            call.cancel()
        await until(lambda: budget.held == 0, "the cancelled streams' room is freed")
