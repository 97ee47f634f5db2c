"""Several stream runners on one feed (--streams N) against the fake EmbedStream server:
every document is answered exactly once, also when one of the streams is lost mid-run,
and a runner that gives up stops the others."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client.cli.connection import FatalError
from embedding_client.cli.stream import Feed, StreamLimits, StreamRunner, run_all
from tests.unit.test_cli_stream import FAST, SERVICE, FakeService, Sink, _docs

STREAMS = 4


@pytest.fixture
async def service() -> AsyncIterator[tuple[FakeService, str]]:
    fake = FakeService()
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        fake.embed_stream,
        request_deserializer=pb.EmbedStreamRequest.FromString,
        response_serializer=pb.EmbedStreamResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"EmbedStream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


async def _run_streams(address: str, n_docs: int, **kw: Any) -> tuple[Sink, list[StreamRunner]]:
    feed = Feed(asyncio.get_running_loop(), read_ahead=4)
    sink = Sink()
    async with grpc.aio.insecure_channel(address) as channel:
        runners = [
            StreamRunner(
                pb_grpc.EmbeddingServiceStub(channel),
                (),
                options=pb.EmbedOptions(),
                feed=feed,
                sink=sink,
                limits=StreamLimits(max_inflight=20, items_per_message=5),
                backoff=FAST,
                **kw,
            )
            for _ in range(STREAMS)
        ]
        thread = threading.Thread(target=feed.fill, args=(_docs(n_docs),), kwargs={"batch_docs": 8})
        thread.start()
        try:
            await run_all(runners)
        finally:
            feed.close()
            thread.join()
    return sink, runners


async def test_streams_share_the_documents_and_answer_each_once(
    service: tuple[FakeService, str],
) -> None:
    fake, address = service
    fake.fail_after = [30]  # the first stream opened is lost after 30 items
    sink, runners = await _run_streams(address, 1000)
    assert sorted(sink.embedded_ids) == sorted(f"doc-{i}" for i in range(1000))
    assert not sink.failures
    assert sum(r.streams for r in runners) == STREAMS + 1  # the lost one was reopened once
    assert fake.streams == STREAMS + 1


async def test_a_runner_that_gives_up_stops_the_others(service: tuple[FakeService, str]) -> None:
    fake, address = service
    fake.hang = True  # every stream takes items and never answers
    with pytest.raises(FatalError, match="gave up after"):
        await _run_streams(address, 200, retry_timeout=0.5)
