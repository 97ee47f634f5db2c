"""embedding.v1.EmbeddingService: validate, run the pipeline, build responses, map errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
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


@dataclass(frozen=True, slots=True)
class _Item:
    """One item read from a stream: a whole single-item message, or one of its `items`."""

    id: str
    input: str
    options: pb.EmbedOptions
    batched: bool  # came in `items`, so it is answered in a response's `results`


# (response, stream slots it frees, item ids it takes out of flight)
_Reply = tuple[pb.EmbedStreamResponse, int, Sequence[str]]


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
        # A message never needs more slots than exist, or its reader would wait forever.
        self._max_items = min(rt.validator.max_inputs, rt.stream_max_inflight)
        self._results: asyncio.Queue[_Reply | None] = asyncio.Queue()
        self._inflight_ids: set[str] = set()
        self._pending: list[_Item] = []  # read, not yet in a group
        self._arrived = asyncio.Event()
        self._reading = True
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(
        self, requests: AsyncIterator[pb.EmbedStreamRequest]
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        reader = asyncio.create_task(self._read(requests))
        grouper = asyncio.create_task(self._group())
        try:
            while (reply := await self._results.get()) is not None:
                response, slots, ids = reply
                yield response
                self._inflight_ids.difference_update(ids)
                for _ in range(slots):
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
                if isinstance(request, Undecodable):
                    # No id can be read from it; answer with an empty id and go on.
                    await self._slots.acquire()
                    error = to_status(request.invalid("request"))
                    self._results.put_nowait((pb.EmbedStreamResponse(error=error), 1, ()))
                elif request.items:
                    await self._read_items(request)
                else:
                    await self._slots.acquire()
                    item = _Item(request.id, request.input, request.options, False)
                    if self._accept(item):
                        self._arrived.set()
                    else:
                        response = pb.EmbedStreamResponse(id=item.id, error=_duplicate(item.id))
                        self._results.put_nowait((response, 1, ()))
        finally:
            self._reading = False
            self._arrived.set()

    async def _read_items(self, request: pb.EmbedStreamRequest) -> None:
        items = request.items
        refusal = None
        if request.id or request.input:
            refusal = "set either items or id and input, not both"
        elif len(items) > self._max_items:
            refusal = f"{len(items)} items exceed the limit of {self._max_items} per message"
        if refusal is not None:
            # Like an undecodable message: one error with no id, and the stream goes on.
            await self._slots.acquire()
            error = to_status(InvalidInputError("items", f"{refusal} (first id {items[0].id!r})"))
            self._results.put_nowait((pb.EmbedStreamResponse(error=error), 1, ()))
            return
        for _ in range(len(items)):
            await self._slots.acquire()
        duplicates = []
        for it in items:
            if not self._accept(_Item(it.id, it.input, request.options, True)):
                duplicates.append(pb.StreamItemResult(id=it.id, error=_duplicate(it.id)))
        if duplicates:
            response = pb.EmbedStreamResponse(results=duplicates)
            self._results.put_nowait((response, len(duplicates), ()))
        self._arrived.set()

    def _accept(self, item: _Item) -> bool:
        """Queue the item for a group, unless its id is in flight (then only it is refused)."""
        if item.id in self._inflight_ids:
            return False
        self._inflight_ids.add(item.id)
        self._pending.append(item)
        return True

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

    async def _items(self, group: list[_Item]) -> None:
        started = time.perf_counter()
        rt = self._rt
        answers = _Answers(started)
        specs: dict[int, EmbedSpec] = {}  # the items of one message share its options
        by_spec: dict[EmbedSpec, list[_Item]] = {}
        for item in group:
            try:
                rt.validator.text(item.input, "input")  # the result's id names the item
                spec = specs.get(id(item.options))
                if spec is None:
                    spec = specs[id(item.options)] = rt.validator.options(item.options)
            except Exception as exc:
                answers.error(item, exc)
                continue
            by_spec.setdefault(spec, []).append(item)
        await asyncio.gather(
            *(self._embed(spec, items, answers) for spec, items in by_spec.items())
        )
        for reply in answers.replies():
            self._results.put_nowait(reply)

    async def _embed(self, spec: EmbedSpec, items: list[_Item], answers: _Answers) -> None:
        """Items with the same options: one pipeline call, one encoding pass."""
        texts = [item.input for item in items]
        try:
            outcomes = await self._rt.embedder.embed_bulk(texts, spec, "input", self._deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcomes = [exc] * len(items)
        good = [
            (item, o)
            for item, o in zip(items, outcomes, strict=True)
            if not isinstance(o, Exception)
        ]
        if good:
            merged = EmbedOutcome(
                vectors=np.concatenate([o.vectors for _, o in good]),
                inputs=[o.inputs[0] for _, o in good],
                timing=good[0][1].timing,
            )
            for (item, ok), embedding in zip(good, _embeddings(merged, spec), strict=True):
                answers.embedding(item, embedding, ok)
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Exception):
                answers.error(item, outcome)


def _duplicate(item_id: str) -> status_pb2.Status:
    return to_status(InvalidInputError("id", f"id {item_id!r} is already in flight on this stream"))


class _Answers:
    """The results of one group: a response per single item, one response for the rest."""

    def __init__(self, started: float) -> None:
        self._started = started
        self._singles: list[_Reply] = []
        self._batched: list[pb.StreamItemResult] = []

    def embedding(self, item: _Item, embedding: pb.Embedding, outcome: EmbedOutcome) -> None:
        self._add(item, _timing(outcome, self._started), embedding=embedding)

    def error(self, item: _Item, error: Exception) -> None:
        self._add(item, _timing(None, self._started), error=to_status(error))

    def _add(
        self,
        item: _Item,
        timing: pb.Timing,
        embedding: pb.Embedding | None = None,
        error: status_pb2.Status | None = None,
    ) -> None:
        if item.batched:
            result = pb.StreamItemResult(
                id=item.id, embedding=embedding, error=error, timing=timing
            )
            self._batched.append(result)
        else:
            response = pb.EmbedStreamResponse(
                id=item.id, embedding=embedding, error=error, timing=timing
            )
            self._singles.append((response, 1, (item.id,)))

    def replies(self) -> list[_Reply]:
        if not self._batched:
            return self._singles
        response = pb.EmbedStreamResponse(results=self._batched)
        return [*self._singles, (response, len(self._batched), [r.id for r in self._batched])]
