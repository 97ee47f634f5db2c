"""embed-files' stream runner against a fake in-process EmbedStream server: the window it
keeps, resending after a lost stream, item errors, and giving up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import numpy as np
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client.cli.connection import Backoff, FatalError
from embedding_client.cli.documents import Document, Failure
from embedding_client.cli.stream import Feed, StreamLimits, StreamRunner

FAST = Backoff(initial=0.01, cap=0.05)
# With answer_at, a lull this long means the client stopped short of its window (a bug):
# the fake then answers, and the test fails on the peak instead of hanging.
LONG_LULL_S = 60.0
SERVICE = "embedding.v1.EmbeddingService"


@dataclass
class FakeService:
    """Holds answers while items keep coming, so the client's window shows in `peak`."""

    fail_after: list[int] = field(default_factory=list)  # per stream: abort after n items
    abort_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    peak: int = 0
    streams: int = 0
    busy_once: set[str] = field(default_factory=set)
    hang: bool = False  # read everything, answer nothing
    # Hold answers until this many items are held, not until a 50 ms lull, so a slow
    # client machine cannot make the fake answer before the client's window is full.
    answer_at: int = 0

    def _result(self, item: pb.StreamItem) -> pb.StreamItemResult:
        if not item.input:
            error = pb.StreamItemResult(id=item.id).error
            error.code, error.message = grpc.StatusCode.INVALID_ARGUMENT.value[0], "empty"
            return pb.StreamItemResult(id=item.id, error=error)
        if item.input.startswith("busy") and item.input not in self.busy_once:
            self.busy_once.add(item.input)
            error = pb.StreamItemResult(id=item.id).error
            error.code, error.message = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "later"
            return pb.StreamItemResult(id=item.id, error=error)
        data = np.full(4, len(item.input), "<f4").tobytes()
        embedding = pb.Embedding(data=data, dimensions=4, encoding=pb.ENCODING_FLOAT32)
        return pb.StreamItemResult(id=item.id, embedding=embedding)

    async def embed_stream(
        self,
        request_iterator: AsyncIterator[pb.EmbedStreamRequest],
        context: grpc.aio.ServicerContext[pb.EmbedStreamRequest, pb.EmbedStreamResponse],
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        limit = self.fail_after[self.streams] if self.streams < len(self.fail_after) else None
        self.streams += 1
        if self.hang:
            async for _ in request_iterator:
                pass
            await asyncio.Event().wait()
        queue: asyncio.Queue[pb.EmbedStreamRequest | None] = asyncio.Queue()

        async def pump() -> None:
            async for request in request_iterator:
                await queue.put(request)
            await queue.put(None)

        task = asyncio.create_task(pump())
        held: list[pb.StreamItem] = []
        received = 0
        try:
            while True:
                lull = (LONG_LULL_S if self.answer_at else 0.05) if held else None
                try:
                    request = await asyncio.wait_for(queue.get(), lull)
                except TimeoutError:
                    request = None if task.done() and queue.empty() else pb.EmbedStreamRequest()
                if request is not None and request.items:
                    held.extend(request.items)
                    received += len(request.items)
                    self.peak = max(self.peak, len(held))
                    if limit is not None and received >= limit:
                        await context.abort(self.abort_code, "going away")
                    if not self.answer_at or len(held) < self.answer_at:
                        continue
                if held:
                    yield pb.EmbedStreamResponse(results=[self._result(i) for i in held])
                    held = []
                if request is None:
                    return
        finally:
            task.cancel()


@dataclass
class Sink:
    embedded_ids: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def embedded(self, pairs: list[tuple[Document, pb.Embedding]]) -> None:
        for doc, embedding in pairs:
            assert np.frombuffer(embedding.data, "<f4")[0] == len(doc.text)
            self.embedded_ids.append(doc.id)

    def failed(self, failure: Failure) -> None:
        self.failures.append(failure)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeService, grpc.aio.Channel]]:
    service = FakeService()
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        service.embed_stream,
        request_deserializer=pb.EmbedStreamRequest.FromString,
        response_serializer=pb.EmbedStreamResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"EmbedStream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield service, channel
    await channel.close()
    await server.stop(None)


def _docs(n: int, texts: dict[int, str] | None = None) -> Iterator[Document]:
    for i in range(n):
        text = (texts or {}).get(i, f"document {i}")
        yield Document(f"doc-{i}", text, "in.jsonl", i + 1, size=len(text))


async def _run(
    channel: grpc.aio.Channel,
    docs: Iterator[Document],
    limits: StreamLimits,
    refused: Callable[[], FatalError] | None = None,
    **kw: float,
) -> tuple[Sink, StreamRunner]:
    feed = Feed(asyncio.get_running_loop(), read_ahead=4)
    sink = Sink()
    runner = StreamRunner(
        pb_grpc.EmbeddingServiceStub(channel),
        (),
        options=pb.EmbedOptions(),
        feed=feed,
        sink=sink,
        limits=limits,
        backoff=FAST,
        # Long unless a test is about giving up: a loaded machine is not a stalled server.
        retry_timeout=kw.get("retry_timeout", 300.0),
        refused=refused,
    )
    thread = threading.Thread(target=feed.fill, args=(docs,), kwargs={"batch_docs": 16})
    thread.start()
    try:
        await runner.run()
    finally:
        feed.close()
        thread.join()
    return sink, runner


async def test_the_window_bounds_unanswered_items_and_every_document_comes_back(
    fake: tuple[FakeService, grpc.aio.Channel],
) -> None:
    service, channel = fake
    service.answer_at = 100  # a whole window, then all its answers at once: 10 rounds
    limits = StreamLimits(max_inflight=100, items_per_message=10)
    sink, runner = await _run(channel, _docs(1000), limits)
    assert sorted(sink.embedded_ids) == sorted(f"doc-{i}" for i in range(1000))
    assert service.peak == 100  # filled, never exceeded
    assert runner.streams == 1 and not sink.failures


async def test_messages_respect_the_byte_budget_and_oversized_documents_fail_alone(
    fake: tuple[FakeService, grpc.aio.Channel],
) -> None:
    _, channel = fake
    limits = StreamLimits(
        max_inflight=50, items_per_message=10, message_bytes=100, max_request_bytes=(64 << 10) + 500
    )
    sink, _ = await _run(channel, _docs(30, {5: "x" * 1000}), limits)
    assert len(sink.embedded_ids) == 29
    [failure] = sink.failures
    assert (failure.id, failure.code) == ("doc-5", "TOO_LARGE")


async def test_a_lost_stream_resends_what_had_no_answer_exactly_once(
    fake: tuple[FakeService, grpc.aio.Channel],
) -> None:
    service, channel = fake
    service.fail_after = [150, 30]  # two streams die mid-way; the third finishes
    limits = StreamLimits(max_inflight=64, items_per_message=8)
    sink, runner = await _run(channel, _docs(500), limits)
    assert sorted(sink.embedded_ids) == sorted(f"doc-{i}" for i in range(500))  # each once
    assert runner.streams == 3


async def test_item_errors_are_final_unless_they_say_later(
    fake: tuple[FakeService, grpc.aio.Channel],
) -> None:
    _, channel = fake
    sink, _ = await _run(channel, _docs(20, {3: "", 7: "busy now"}), StreamLimits())
    assert len(sink.embedded_ids) == 19 and "doc-7" in sink.embedded_ids  # retried, then fine
    [failure] = sink.failures
    assert (failure.id, failure.code, failure.message, failure.line) == (
        "doc-3",
        "INVALID_ARGUMENT",
        "empty",
        4,
    )


async def test_refusals_stop_the_run_and_a_dead_server_is_given_up_on(
    fake: tuple[FakeService, grpc.aio.Channel],
) -> None:
    service, channel = fake
    service.fail_after, service.abort_code = [1], grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(FatalError, match="UNAUTHENTICATED"):
        await _run(channel, _docs(10), StreamLimits())
    # embed-files passes its own words for a key the server stopped taking mid-run.
    service.fail_after, service.streams = [1], 0
    with pytest.raises(FatalError, match=r"^key refused$"):
        await _run(channel, _docs(10), StreamLimits(), refused=lambda: FatalError("key refused"))
    service.fail_after, service.abort_code = [1] * 1000, grpc.StatusCode.UNAVAILABLE
    with pytest.raises(FatalError, match=r"gave up after \d+ s .* 10 documents not embedded"):
        await _run(channel, _docs(10), StreamLimits(), retry_timeout=0.3)


async def test_a_stream_that_never_answers_counts_as_lost(
    fake: tuple[FakeService, grpc.aio.Channel],
) -> None:
    service, channel = fake
    service.hang = True
    with pytest.raises(FatalError, match=r"no answer for 0 s.* 5 documents not embedded"):
        await _run(channel, _docs(5), StreamLimits(), retry_timeout=0.3)
    assert service.streams == 2  # tried again once before the timeout ran out
