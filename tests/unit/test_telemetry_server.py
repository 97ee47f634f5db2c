"""Telemetry through the real grpc.aio server and servicer, with an in-process engine.

Spans go to an InMemorySpanExporter and metrics to an InMemoryReader, passed in
explicitly (OpenTelemetry's global providers can be set only once per process). The engine
is a gate: tests hold a batch in the engine to make queueing and cancellation deterministic.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import HistogramDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.config import ServiceConfig
from service.engines.base import EngineInfo
from service.server import EmbeddingServer
from service.telemetry import QUEUE_ITEMS_METRIC, QUEUE_TOKENS_METRIC, Telemetry, names
from service.telemetry.histograms import InMemoryReader
from tests.servers import free_port

T = TypeVar("T")
DIM = 8
EMBED = "embedding.v1.EmbeddingService/Embed"
STREAM = "embedding.v1.EmbeddingService/EmbedStream"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_SPAN_ID:016x}-01"


class GatedEngine:
    """Ones at once while the gate is open; holds every batch while it is closed."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.batches: list[int] = []

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("gated", DIM, 128, "float32", "none")

    @property
    def alive(self) -> bool:
        return True

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        self.batches.append(len(batch))
        await self.gate.wait()
        return np.ones((len(batch), DIM), np.float32)

    async def close(self) -> None:
        return None


# A whole batch budget (128 tokens) in one call: with it in the engine, later unary calls
# must queue instead of going to the engine beside it.
FULL_BATCH = pb.EmbedRequest(
    inputs=["word " * 300], options=pb.EmbedOptions(truncate=pb.TRUNCATE_END)
)


@dataclass
class Harness:
    server: EmbeddingServer
    engine: GatedEngine
    spans: InMemorySpanExporter
    reader: InMemoryReader
    channel: grpc.aio.Channel
    stub: pb_grpc.EmbeddingServiceAsyncStub

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def queued_items(self) -> int:
        components = self.server._components
        assert components is not None
        return components.batchers[0].queued_items

    def metric_points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def value(self, name: str, **attrs: object) -> float:
        """Sum of a counter's points (or of a histogram's counts) matching `attrs`."""
        total = 0.0
        for point in self.metric_points(name):
            if all(point.attributes.get(k) == v for k, v in attrs.items()):
                total += point.count if isinstance(point, HistogramDataPoint) else point.value
        return total


Maker = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make() -> AsyncIterator[Maker]:
    made: list[Harness] = []

    async def build(telemetry: Telemetry | None = None, **settings: Any) -> Harness:
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider(sampler=ALWAYS_ON)
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        reader = InMemoryReader()
        telemetry = telemetry or Telemetry(tracer_provider=tracer_provider, metric_readers=[reader])
        engine = GatedEngine()
        settings = {"metrics_port": 0, **settings}
        settings.setdefault("http_port", free_port())
        config = ServiceConfig(port=0, grace_s=1.0, **settings)

        def factory(config: ServiceConfig, path: Path, name: str) -> GatedEngine:
            return engine

        server = EmbeddingServer(config, factory, telemetry=telemetry)
        await server.start()
        spans.clear()  # the warm-up call's batch
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        harness = Harness(
            server, engine, spans, reader, channel, pb_grpc.EmbeddingServiceStub(channel)
        )
        made.append(harness)
        return harness

    yield build
    for h in made:
        h.engine.gate.set()
        await h.channel.close()
        await h.server.stop(grace_s=0)


# RPC deadlines and the bound on condition polls: only a hang reaches them, however loaded
# the machine (a passing run takes milliseconds). Where a test is about a deadline, it sets
# its own.
PATIENCE_S = 120.0


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll: only a hang guard, a passing run returns as soon as `check` holds."""
    try:
        async with asyncio.timeout(PATIENCE_S):
            while not check():  # noqa: ASYNC110 - the conditions live in other objects
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


def only(things: list[T]) -> T:
    assert len(things) == 1, things
    return things[0]


def status_code(span: ReadableSpan) -> object:
    assert span.attributes is not None
    return span.attributes[names.RPC_STATUS_CODE]


async def test_embed_span_tree_follows_the_caller_trace(make: Maker) -> None:
    h = await make()
    call = h.stub.Embed(
        pb.EmbedRequest(inputs=["hello world", "second text"]),
        metadata=(("traceparent", TRACEPARENT),),
        timeout=PATIENCE_S,
    )
    reply = await call
    assert len(reply.embeddings) == 2
    await until(lambda: bool(h.finished(EMBED)), "server span ended")

    server = only(h.finished(EMBED))
    assert server.kind is SpanKind.SERVER
    assert server.context.trace_id == TRACE_ID, "W3C trace context from metadata honoured"
    assert server.parent is not None and server.parent.span_id == PARENT_SPAN_ID
    assert server.parent.is_remote
    assert server.attributes is not None
    assert server.attributes[names.RPC_SYSTEM] == "grpc"
    assert server.attributes[names.RPC_METHOD] == "Embed"
    assert server.attributes[names.INPUT_COUNT] == 2
    assert status_code(server) == 0
    assert server.status.status_code is StatusCode.UNSET

    stages = [names.SPAN_TOKENIZE, names.SPAN_QUEUE, names.SPAN_ENGINE, names.SPAN_POSTPROCESS]
    children = {name: only(h.finished(name)) for name in stages}
    for child in children.values():
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert child.context.trace_id == TRACE_ID
        assert child.start_time is not None and server.start_time is not None
        assert child.end_time is not None and server.end_time is not None
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time
    ordered = [children[name] for name in stages]
    for before, after in itertools.pairwise(ordered):
        assert before.end_time is not None and after.start_time is not None
        assert before.end_time <= after.start_time + 1_000_000  # 1 ms slack across clocks

    batch = only(h.finished(names.SPAN_BATCH))
    assert batch.parent is None, "a batch serves many calls: its own trace, with links"
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    engine = children[names.SPAN_ENGINE]
    assert [link.context.span_id for link in engine.links] == [batch.context.span_id]

    trailing = dict(await call.trailing_metadata() or ())
    times = {
        key: float(trailing[key])
        for key in (
            names.TOTAL_TIME_HEADER,
            names.QUEUE_TIME_HEADER,
            names.INFERENCE_TIME_HEADER,
            names.TOKENIZE_TIME_HEADER,
        )
    }
    assert times[names.TOTAL_TIME_HEADER] >= times[names.QUEUE_TIME_HEADER] >= 0
    assert times[names.TOTAL_TIME_HEADER] == pytest.approx(reply.timing.total_us / 1000, abs=0.002)


async def test_batch_span_links_two_concurrent_calls(make: Maker) -> None:
    h = await make(max_inflight_batches=1, max_wait_ms=0, max_batch_tokens=128)
    h.engine.gate.clear()
    blocker = asyncio.ensure_future(h.stub.Embed(FULL_BATCH, timeout=PATIENCE_S))
    await until(lambda: len(h.engine.batches) == 2, "blocker in the engine")  # warm-up + it
    a = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(inputs=["call a"]), timeout=PATIENCE_S))
    b = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(inputs=["call b"]), timeout=PATIENCE_S))
    await until(lambda: h.queued_items() == 2, "both calls queued behind the blocker")
    h.engine.gate.set()
    await asyncio.gather(blocker, a, b)
    await until(lambda: len(h.finished(EMBED)) == 3, "three server spans")

    assert h.engine.batches[-1] == 2, "a and b went to the engine together"
    servers = {s.context.span_id: s for s in h.finished(EMBED)}
    batches = h.finished(names.SPAN_BATCH)
    shared = only([s for s in batches if len(s.links) == 2])
    linked = {link.context.span_id for link in shared.links}
    assert linked <= set(servers) and len(linked) == 2
    assert shared.attributes is not None and shared.attributes[names.BATCH_SIZE] == 2
    for engine_span in h.finished(names.SPAN_ENGINE):
        assert engine_span.parent is not None
        if engine_span.parent.span_id in linked:
            assert [lk.context.span_id for lk in engine_span.links] == [shared.context.span_id]


async def test_invalid_argument_is_recorded(make: Maker) -> None:
    h = await make()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.Embed(
            pb.EmbedRequest(inputs=["x"], options=pb.EmbedOptions(dimensions=7)), timeout=PATIENCE_S
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await until(lambda: bool(h.finished(EMBED)), "server span ended")
    span = only(h.finished(EMBED))
    assert status_code(span) == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # A caller's mistake is not a server error (OpenTelemetry's gRPC conventions).
    assert span.status.status_code is StatusCode.UNSET
    assert h.value(names.RPC_DURATION[0], **{names.RPC_STATUS_CODE: 3}) == 1
    assert h.value(names.RPC_DURATION[0], **{names.RPC_STATUS_CODE: 0}) == 0


async def test_resource_exhausted_is_recorded(make: Maker) -> None:
    h = await make(max_queue_items=2, max_inflight_batches=1, max_wait_ms=0, max_batch_tokens=128)
    h.engine.gate.clear()
    blocker = asyncio.ensure_future(h.stub.Embed(FULL_BATCH, timeout=PATIENCE_S))
    await until(lambda: len(h.engine.batches) == 2, "blocker in the engine")
    filler = asyncio.ensure_future(
        h.stub.Embed(pb.EmbedRequest(inputs=["a", "b"]), timeout=PATIENCE_S)
    )
    await until(lambda: h.queued_items() == 2, "the queue is full")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.Embed(pb.EmbedRequest(inputs=["one too many"]), timeout=PATIENCE_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    h.engine.gate.set()
    await asyncio.gather(blocker, filler)
    await until(lambda: len(h.finished(EMBED)) == 3, "three server spans")

    codes = sorted(status_code(s) for s in h.finished(EMBED))  # type: ignore[type-var]
    assert codes == [0, 0, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert h.value(names.REJECTIONS[0], **{names.ERROR_TYPE: "queue_full"}) == 1
    assert h.value(names.RPC_DURATION[0], **{names.RPC_STATUS_CODE: 8}) == 1


async def test_client_cancel_is_recorded_as_cancelled(make: Maker) -> None:
    h = await make()
    h.engine.gate.clear()
    call = h.stub.Embed(pb.EmbedRequest(inputs=["never finishes"]), timeout=PATIENCE_S)
    await until(lambda: len(h.engine.batches) == 2, "the call is in the engine")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await until(lambda: bool(h.finished(EMBED)), "server span ended")
    span = only(h.finished(EMBED))
    assert status_code(span) == grpc.StatusCode.CANCELLED.value[0]
    assert h.value(names.RPC_DURATION[0], **{names.RPC_STATUS_CODE: 1}) == 1
    await until(lambda: bool(h.finished(names.SPAN_BATCH)), "the abandoned batch ended")
    error_type = {names.ERROR_TYPE: "cancelled"}
    assert h.value(names.ENGINE_DURATION[0], **error_type) == 1


async def test_metric_values_match_the_traffic(make: Maker) -> None:
    h = await make()
    interactive = {names.PRIORITY: "interactive"}
    inputs_before = h.value(names.INPUTS[0], **interactive)
    tokens_before = h.value(names.TOKENS[0], **interactive)
    waits_before = h.value(names.QUEUE_WAIT[0])
    texts = [f"input number {i}" for i in range(37)]
    reply = await h.stub.Embed(pb.EmbedRequest(inputs=texts), timeout=PATIENCE_S)
    assert h.value(names.INPUTS[0], **interactive) - inputs_before == 37
    assert h.value(names.TOKENS[0], **interactive) - tokens_before == reply.usage.prompt_tokens
    sizes = h.metric_points(names.BATCH_ITEMS[0])
    assert sum(p.sum for p in sizes) == 37 + 1  # + the warm-up input
    batches = sum(p.count for p in sizes)
    assert h.value(names.QUEUE_WAIT[0]) == batches, "one queue wait per batch"
    assert waits_before == 1  # the warm-up's batch

    long_text = "word " * 400  # over the engine's 128 tokens
    options = pb.EmbedOptions(truncate=pb.TRUNCATE_END)
    reply = await h.stub.Embed(
        pb.EmbedRequest(inputs=[long_text], options=options), timeout=PATIENCE_S
    )
    assert reply.embeddings[0].truncated
    assert h.value(names.TRUNCATIONS[0]) == 1
    await until(lambda: len(h.finished(EMBED)) == 2, "server spans ended")
    assert h.value(names.RPC_DURATION[0], **{names.RPC_METHOD: "Embed"}) == 2
    duration = only(
        [
            p
            for p in h.metric_points(names.RPC_DURATION[0])
            if p.attributes.get(names.RPC_METHOD) == "Embed"
        ]
    )
    assert duration.explicit_bounds[0] < 0.01, "buckets in seconds, not the SDK's milliseconds"


async def test_stream_gets_one_span_and_batches_link_to_it(make: Maker) -> None:
    h = await make()

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        for i in range(5):
            yield pb.EmbedStreamRequest(id=str(i), input=f"stream item {i}")

    results = [r async for r in h.stub.EmbedStream(requests(), timeout=PATIENCE_S)]
    assert sorted(r.id for r in results) == [str(i) for i in range(5)]
    assert all(r.timing.total_us > 0 for r in results)
    await until(lambda: bool(h.finished(STREAM)), "stream span ended")
    stream = only(h.finished(STREAM))
    assert status_code(stream) == 0
    linked = {lk.context.span_id for s in h.finished(names.SPAN_BATCH) for lk in s.links}
    assert linked == {stream.context.span_id}
    assert h.value(names.INPUTS[0], **{names.PRIORITY: "bulk"}) == 5


async def test_health_checks_are_not_traced(make: Maker) -> None:
    h = await make()
    health = health_pb2_grpc.HealthStub(h.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=PATIENCE_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await h.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=PATIENCE_S)
    await until(lambda: bool(h.spans.get_finished_spans()), "GetModelInfo span")
    assert [s.name for s in h.spans.get_finished_spans()] == [
        "embedding.v1.EmbeddingService/GetModelInfo"
    ]
    services = {
        p.attributes.get(names.RPC_SERVICE) for p in h.metric_points("rpc.server.call.duration")
    }
    assert services == {"embedding.v1.EmbeddingService"}


async def test_refused_api_key_is_measured_and_keys_never_logged(
    make: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    h = await make(api_keys="sekret-key-123")
    secret_text = "the quick SECRET-TEXT-42 fox"
    with caplog.at_level(logging.DEBUG, logger="service.rpc"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.stub.Embed(
                pb.EmbedRequest(inputs=[secret_text]), metadata=(("x-api-key", "wrong"),)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await h.stub.Embed(
            pb.EmbedRequest(inputs=[secret_text]),
            metadata=(("x-api-key", "sekret-key-123"), ("traceparent", TRACEPARENT)),
        )
        await until(lambda: len(h.finished(EMBED)) == 2, "server spans ended")
    lines = [r for r in caplog.records if r.name == "service.rpc"]
    assert [r.levelname for r in lines] == ["WARNING", "DEBUG"]
    assert "UNAUTHENTICATED" in lines[0].getMessage()
    assert getattr(lines[1], "trace_id", "") == f"{TRACE_ID:032x}"
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert "SECRET-TEXT-42" not in text and "sekret-key-123" not in text
    assert h.value(names.RPC_DURATION[0], **{names.RPC_STATUS_CODE: 16}) == 1


async def test_prometheus_endpoint_of_a_running_server(make: Maker) -> None:
    port = free_port()
    config = ServiceConfig(metrics_port=port, metrics_host="127.0.0.1")
    telemetry = Telemetry.from_config(config, environ={})
    h = await make(telemetry=telemetry, max_inflight_batches=1, max_batch_tokens=128)
    assert h.server.telemetry.metrics_port == port
    await h.stub.Embed(pb.EmbedRequest(inputs=["one", "two", "three"]), timeout=PATIENCE_S)
    h.engine.gate.clear()
    blocker = asyncio.ensure_future(h.stub.Embed(FULL_BATCH, timeout=PATIENCE_S))
    await until(lambda: len(h.engine.batches) == 3, "a batch held in the engine")
    queued = asyncio.ensure_future(
        h.stub.Embed(pb.EmbedRequest(inputs=["q1", "q2"]), timeout=PATIENCE_S)
    )
    await until(lambda: h.queued_items() == 2, "two inputs queued")

    def scrape() -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=PATIENCE_S
        ) as reply:
            assert reply.status == 200
            return str(reply.read().decode())

    families = {f.name: f for f in text_string_to_metric_families(await asyncio.to_thread(scrape))}
    h.engine.gate.set()
    await asyncio.gather(blocker, queued)

    assert families[QUEUE_ITEMS_METRIC].type == "gauge"
    assert [s.value for s in families[QUEUE_ITEMS_METRIC].samples] == [2]
    assert families[QUEUE_TOKENS_METRIC].samples[0].value > 2
    duration = families["rpc_server_call_duration_seconds"]
    assert duration.type == "histogram"
    ok_embed = [
        s
        for s in duration.samples
        if s.name.endswith("_count") and s.labels.get("rpc_method") == "Embed"
    ]
    assert [s.labels["rpc_grpc_status_code"] for s in ok_embed] == ["0"]
    assert ok_embed[0].value == 1
    inputs = families["embedding_inputs"]
    assert inputs.type == "counter"
    assert sum(s.value for s in inputs.samples if s.name == "embedding_inputs_total") == 1 + 3
    expected = {
        "embedding_queue_wait_duration_seconds",
        "embedding_engine_duration_seconds",
        "embedding_batch_items",
        "embedding_batch_tokens",
        "embedding_tokens",
        "embedding_batches_inflight",
        "embedding_engine_up",
        "embedding_engine_oldest_batch_age_seconds",
    }
    assert expected <= set(families)
    assert families["embedding_engine_up"].samples[0].value == 1


async def test_deadline_passing_in_the_engine_is_deadline_exceeded(make: Maker) -> None:
    h = await make()
    h.engine.gate.clear()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.Embed(pb.EmbedRequest(inputs=["too slow"]), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: bool(h.finished(EMBED)), "server span ended")
    span = only(h.finished(EMBED))
    assert status_code(span) == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert span.status.status_code is StatusCode.ERROR


async def test_cancelled_stream_is_recorded_and_its_context_detached(
    make: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    h = await make()
    h.engine.gate.clear()
    sent = asyncio.Event()

    async def requests() -> AsyncIterator[pb.EmbedStreamRequest]:
        yield pb.EmbedStreamRequest(id="0", input="held in the engine")
        sent.set()
        await asyncio.Event().wait()  # keep the request stream open

    call = h.stub.EmbedStream(requests(), timeout=PATIENCE_S)
    await sent.wait()
    await until(lambda: len(h.engine.batches) == 2, "the item is in the engine")
    with caplog.at_level(logging.WARNING):
        call.cancel()
        await until(lambda: bool(h.finished(STREAM)), "stream span ended")
    span = only(h.finished(STREAM))
    assert status_code(span) == grpc.StatusCode.CANCELLED.value[0]
    assert not [r for r in caplog.records if "detach" in r.getMessage().lower()]


async def test_http_request_span_tree_metric_and_logs(
    make: Maker, caplog: pytest.LogCaptureFixture
) -> None:
    h = await make()
    base = f"http://127.0.0.1:{h.server.http_port}"
    with caplog.at_level(logging.DEBUG, logger="service.http"):
        async with httpx.AsyncClient(base_url=base, timeout=PATIENCE_S) as http:
            ok = await http.post(
                "/v1/embeddings",
                json={"input": ["hello world", "second text"]},
                headers={"traceparent": TRACEPARENT},
            )
            bad = await http.post("/v1/embeddings", json={"input": "x", "dimensions": 7})
            await http.get("/health")  # neither traced nor measured
        await until(lambda: len(h.finished("POST /v1/embeddings")) == 2, "server spans ended")
    assert ok.status_code == 200 and bad.status_code == 400
    for header in (names.TOTAL_TIME_HEADER, names.QUEUE_TIME_HEADER):
        assert float(ok.headers[header]) >= 0

    spans = sorted(h.finished("POST /v1/embeddings"), key=lambda s: s.start_time or 0)
    server, refused = spans
    assert server.kind is SpanKind.SERVER
    assert server.context.trace_id == TRACE_ID and server.parent is not None
    assert server.parent.span_id == PARENT_SPAN_ID
    assert server.attributes is not None
    assert server.attributes[names.HTTP_ROUTE] == "/v1/embeddings"
    assert server.attributes[names.HTTP_METHOD] == "POST"
    assert server.attributes[names.HTTP_STATUS_CODE] == 200
    assert server.attributes[names.INPUT_COUNT] == 2
    assert refused.attributes is not None and refused.attributes[names.HTTP_STATUS_CODE] == 400
    assert refused.status.status_code is StatusCode.UNSET, "a 4xx is the caller's mistake"
    stages = [names.SPAN_TOKENIZE, names.SPAN_QUEUE, names.SPAN_ENGINE, names.SPAN_POSTPROCESS]
    for name in stages:
        child = only(h.finished(name))
        assert child.parent is not None and child.parent.span_id == server.context.span_id
    batch = only(h.finished(names.SPAN_BATCH))
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    assert not [s for s in h.spans.get_finished_spans() if "health" in s.name]

    duration = names.HTTP_DURATION[0]
    assert h.value(duration, **{names.HTTP_STATUS_CODE: 200, names.HTTP_ROUTE: "/v1/embeddings"})
    assert h.value(duration, **{names.HTTP_STATUS_CODE: 400}) == 1
    assert not h.value(duration, **{names.HTTP_ROUTE: "/health"})

    lines = [r for r in caplog.records if r.name == "service.http"]
    assert [r.levelname for r in lines] == ["DEBUG", "WARNING"]
    assert getattr(lines[0], "trace_id", "") == f"{TRACE_ID:032x}"
    assert "dimensions" in lines[1].getMessage() and "range" in lines[1].getMessage()
