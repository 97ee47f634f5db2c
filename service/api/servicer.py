"""embedding.v1.EmbeddingService: validate, run the pipeline, build responses, map errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service import postprocess
from service.api.status import to_status
from service.api.validation import RequestValidator
from service.engines.base import EngineInfo
from service.errors import InvalidInputError, NotReadyError
from service.model_card import ModelCard
from service.pipeline import Embedder, EmbedOutcome, EmbedSpec
from service.telemetry import names

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[object, object]

_WIRE_ENCODING = {
    postprocess.Encoding.FLOAT32: pb.ENCODING_FLOAT32,
    postprocess.Encoding.FLOAT16: pb.ENCODING_FLOAT16,
    postprocess.Encoding.INT8: pb.ENCODING_INT8,
    postprocess.Encoding.BINARY: pb.ENCODING_BINARY,
}


@dataclass(frozen=True)
class Runtime:
    """Everything a call needs once the engine is loaded."""

    embedder: Embedder
    validator: RequestValidator
    card: ModelCard
    info: EngineInfo
    model_info: pb.GetModelInfoResponse
    stream_max_inflight: int


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _us(seconds: float) -> int:
    return max(int(seconds * 1e6), 0)


def _timing(outcome: EmbedOutcome | None, started: float) -> pb.Timing:
    total = _us(time.perf_counter() - started)
    if outcome is None:
        return pb.Timing(total_us=total)
    t = outcome.timing
    return pb.Timing(
        tokenize_us=_us(t.tokenize_s),
        queue_us=_us(t.queue_s),
        inference_us=_us(t.inference_s),
        total_us=total,
    )


def _embeddings(outcome: EmbedOutcome, spec: EmbedSpec) -> list[pb.Embedding]:
    encoded = postprocess.encode(outcome.vectors, spec.encoding)
    wire = _WIRE_ENCODING[spec.encoding]
    return [
        pb.Embedding(
            data=e.data,
            dimensions=spec.dimensions,
            encoding=wire,
            scale=e.scale,
            token_count=len(inp.ids),
            truncated=inp.truncated,
        )
        for e, inp in zip(encoded, outcome.inputs, strict=True)
    ]


class Undecodable:
    """Stands in for a request protobuf could not parse (for example invalid UTF-8).

    grpc would answer such a request with a bare INTERNAL/UNKNOWN before any handler runs;
    deferring the failure lets the handler answer INVALID_ARGUMENT (or, in a stream, fail
    just that item).
    """

    def __init__(self, error: DecodeError) -> None:
        self.error = error

    def invalid(self, field: str) -> InvalidInputError:
        return InvalidInputError(field, f"not a valid message: {self.error}")


def _lenient(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Undecodable(exc)

    return parse


HandlerWrapper = Callable[
    ["grpc.RpcMethodHandler[Any, Any]", str], "grpc.RpcMethodHandler[Any, Any]"
]


def add_servicer(
    servicer: EmbeddingServicer, server: grpc.aio.Server, wrap: HandlerWrapper | None = None
) -> None:
    """Like the generated add_EmbeddingServiceServicer_to_server, with lenient parsing.

    `wrap(handler, "/package.Service/Method")` decorates each method's handler once, here,
    instead of an interceptor doing it on every call (telemetry without the cost).
    """
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Embed": unary(servicer.Embed, _lenient(pb.EmbedRequest), _serialize),
        "Similarity": unary(servicer.Similarity, _lenient(pb.SimilarityRequest), _serialize),
        "GetModelInfo": unary(servicer.GetModelInfo, _lenient(pb.GetModelInfoRequest), _serialize),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(
            servicer.EmbedStream, _lenient(pb.EmbedStreamRequest), _serialize
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    if wrap is not None:
        handlers = {name: wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _ms(us: int) -> str:
    return f"{us / 1000:.3f}"


def timing_metadata(timing: pb.Timing) -> tuple[tuple[str, str], ...]:
    """The response body's timing, in milliseconds, for callers that read only metadata."""
    return (
        (names.TOTAL_TIME_HEADER, _ms(timing.total_us)),
        (names.QUEUE_TIME_HEADER, _ms(timing.queue_us)),
        (names.INFERENCE_TIME_HEADER, _ms(timing.inference_us)),
        (names.TOKENIZE_TIME_HEADER, _ms(timing.tokenize_us)),
    )


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, send_timing_metadata: bool = True) -> None:
        self._runtime: Runtime | None = None
        # Metadata on a unary response costs grpc.aio about as much as the rest of a
        # null-engine call's telemetry (see benchmarks/README.md); operators may drop it.
        self._send_timing = send_timing_metadata

    def attach(self, runtime: Runtime) -> None:
        """Called by the server once the engine is loaded and warm."""
        self._runtime = runtime

    def _ready(self) -> Runtime:
        if self._runtime is None:
            raise NotReadyError("the model is still loading")
        return self._runtime

    async def _answer(
        self, request: object, context: Context, handler: Callable[[Runtime], Awaitable[T]]
    ) -> T:
        """Run a unary handler; every failure leaves as one precise status."""
        try:
            if isinstance(request, Undecodable):
                raise request.invalid("request")
            response = await handler(self._ready())
            timing = getattr(response, "timing", None)
            if self._send_timing and isinstance(timing, pb.Timing):
                context.set_trailing_metadata(timing_metadata(timing))
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # mapped, never leaked as UNKNOWN
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            raise  # abort_with_status raises; this keeps type checkers honest

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        started = time.perf_counter()

        async def handle(rt: Runtime) -> pb.EmbedResponse:
            rt.validator.texts(request.inputs, "inputs")
            spec = rt.validator.options(request.options)
            outcome = await rt.embedder.embed(request.inputs, spec, "inputs", _deadline(context))
            tokens = outcome.prompt_tokens
            return pb.EmbedResponse(
                embeddings=_embeddings(outcome, spec),
                model=rt.info.model_name,
                usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
                timing=_timing(outcome, started),
            )

        return await self._answer(request, context, handle)

    async def Similarity(
        self, request: pb.SimilarityRequest, context: Context
    ) -> pb.SimilarityResponse:
        started = time.perf_counter()

        async def handle(rt: Runtime) -> pb.SimilarityResponse:
            v = rt.validator
            v.texts(request.queries, "queries")
            v.texts(request.documents, "documents")
            v.texts([*request.queries, *request.documents], "queries+documents")
            spec = v.options(request.options)
            if spec.encoding is not postprocess.Encoding.FLOAT32:
                raise InvalidInputError("options.encoding", "does not apply to Similarity")
            doc_spec = EmbedSpec("", spec.dimensions, True, spec.truncation, spec.encoding)
            deadline = _deadline(context)
            queries, docs = await asyncio.gather(
                rt.embedder.embed(request.queries, spec, "queries", deadline),
                rt.embedder.embed(request.documents, doc_spec, "documents", deadline),
            )
            scores = postprocess.cosine(queries.vectors, docs.vectors)
            tokens = queries.prompt_tokens + docs.prompt_tokens
            return pb.SimilarityResponse(
                results=_similarity_results(scores, request.top_k),
                model=rt.info.model_name,
                usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
                timing=_timing(queries, started),
            )

        return await self._answer(request, context, handle)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        async def handle(rt: Runtime) -> pb.GetModelInfoResponse:
            return rt.model_info

        return await self._answer(request, context, handle)

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        try:
            rt = self._ready()
        except NotReadyError as exc:
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            return
        stream = _Stream(rt, _deadline(context))
        async for response in stream.run(request_iterator):
            yield response


def _similarity_results(scores: postprocess.FloatMatrix, k: int) -> list[pb.SimilarityResult]:
    if k <= 0:
        return [pb.SimilarityResult(scores=row.tolist()) for row in scores]
    order, best = postprocess.top_k(scores, k)
    return [
        pb.SimilarityResult(
            top_k=[
                pb.ScoredDocument(index=i, score=s)
                for i, s in zip(idx.tolist(), sc.tolist(), strict=True)
            ]
        )
        for idx, sc in zip(order, best, strict=True)
    ]


# A stream's items go to the pipeline in groups: tokenizing, post-processing and encoding
# once per group costs a fraction of doing it per item. A group is what arrived within
# _GROUP_WAIT_S of its first item, at most _GROUP_ITEMS.
_GROUP_ITEMS = 256
_GROUP_WAIT_S = 0.001


class _Stream:
    """One EmbedStream call: a reader feeds items in, results go out as they finish.

    At most `stream_max_inflight` items are read but not yet answered. The reader stops
    pulling requests when that many are out, so a client that sends faster than the engine
    works, or stops reading its results, is slowed by HTTP/2 flow control instead of making
    the server buffer.
    """

    def __init__(self, rt: Runtime, deadline: float | None) -> None:
        self._rt = rt
        self._deadline = deadline
        self._slots = asyncio.Semaphore(rt.stream_max_inflight)
        # (response, whether it answers an item that holds its id in _inflight_ids)
        self._results: asyncio.Queue[tuple[pb.EmbedStreamResponse, bool] | None] = asyncio.Queue()
        self._inflight_ids: set[str] = set()
        self._pending: list[pb.EmbedStreamRequest] = []  # read, not yet in a group
        self._arrived = asyncio.Event()
        self._reading = True
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(
        self, requests: AsyncIterator[pb.EmbedStreamRequest]
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        reader = asyncio.create_task(self._read(requests))
        grouper = asyncio.create_task(self._group())
        try:
            while (result := await self._results.get()) is not None:
                response, holds_id = result
                yield response
                if holds_id:
                    self._inflight_ids.discard(response.id)
                self._slots.release()
            await reader  # re-raise a failure of the request stream itself
        finally:
            for task in (reader, grouper, *self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, grouper, *self._tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.EmbedStreamRequest]) -> None:
        try:
            async for request in requests:
                await self._slots.acquire()
                if isinstance(request, Undecodable):
                    # No id can be read from it; answer with an empty id and go on.
                    error = to_status(request.invalid("request"))
                    self._results.put_nowait((pb.EmbedStreamResponse(error=error), False))
                elif request.id in self._inflight_ids:
                    # Refused for this item only; the first item with that id goes on.
                    error = to_status(
                        InvalidInputError(
                            "id", f"id {request.id!r} is already in flight on this stream"
                        )
                    )
                    response = pb.EmbedStreamResponse(id=request.id, error=error)
                    self._results.put_nowait((response, False))
                else:
                    self._inflight_ids.add(request.id)
                    self._pending.append(request)
                    self._arrived.set()
        finally:
            self._reading = False
            self._arrived.set()

    async def _group(self) -> None:
        """Hands read items to the pipeline a group at a time; ends the results when done."""
        while True:
            if not self._pending:
                if not self._reading:
                    break
                # Cleared right before waiting, with the state checked and no await between.
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self._reading and len(self._pending) < _GROUP_ITEMS:
                await asyncio.sleep(_GROUP_WAIT_S)  # let the rest of a burst arrive
            group = self._pending[:_GROUP_ITEMS]
            del self._pending[:_GROUP_ITEMS]
            task = asyncio.create_task(self._items(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self._results.put_nowait(None)

    async def _items(self, group: list[pb.EmbedStreamRequest]) -> None:
        started = time.perf_counter()
        rt = self._rt
        by_spec: dict[EmbedSpec, list[pb.EmbedStreamRequest]] = {}
        for request in group:
            try:
                rt.validator.text(request.input, "input")
                spec = rt.validator.options(request.options)
            except Exception as exc:
                self._answer(request.id, exc, started)
                continue
            by_spec.setdefault(spec, []).append(request)
        await asyncio.gather(
            *(self._embed(spec, requests, started) for spec, requests in by_spec.items())
        )

    async def _embed(
        self, spec: EmbedSpec, requests: list[pb.EmbedStreamRequest], started: float
    ) -> None:
        """Items with the same options: one pipeline call, one encoding pass."""
        texts = [r.input for r in requests]
        try:
            outcomes = await self._rt.embedder.embed_bulk(texts, spec, "input", self._deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcomes = [exc] * len(requests)
        good = [
            (r, o) for r, o in zip(requests, outcomes, strict=True) if not isinstance(o, Exception)
        ]
        if good:
            merged = EmbedOutcome(
                vectors=np.concatenate([o.vectors for _, o in good]),
                inputs=[o.inputs[0] for _, o in good],
                timing=good[0][1].timing,
            )
            for (request, ok), embedding in zip(good, _embeddings(merged, spec), strict=True):
                response = pb.EmbedStreamResponse(
                    id=request.id, embedding=embedding, timing=_timing(ok, started)
                )
                self._results.put_nowait((response, True))
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._answer(request.id, outcome, started)

    def _answer(self, item_id: str, error: Exception, started: float) -> None:
        response = pb.EmbedStreamResponse(
            id=item_id, error=to_status(error), timing=_timing(None, started)
        )
        self._results.put_nowait((response, True))
