"""embedding.v1.EmbeddingService: translate each call to the pipeline and back, map errors."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.api.calls.embed import EmbedCall, choose_inputs, embed
from service.api.calls.rerank import rerank
from service.api.calls.similarity import SimilarityCall, similarity
from service.api.calls.tokenize import TokenizeCall, tokenize
from service.api.grpc import wire
from service.api.grpc.rerank_stream import RerankStreamSession
from service.api.grpc.status import to_status
from service.api.grpc.stream import ItemStream, Response, StreamSession, Undecodable
from service.api.grpc.stream_budget import StreamBudget
from service.api.runtime import Gate, Runtime
from service.api.validation import RequestOptions

T = TypeVar("T")
R = TypeVar("R")
Context = grpc.aio.ServicerContext[object, object]


@dataclass(frozen=True)
class _Call:
    started: float  # perf_counter() as the call began: its total time runs from here
    deadline: float | None  # monotonic(), from the caller's gRPC deadline


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


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
        "Tokenize": unary(servicer.Tokenize, _lenient(pb.TokenizeRequest), _serialize),
        "Rerank": unary(servicer.Rerank, _lenient(pb.RerankRequest), _serialize),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(
            servicer.EmbedStream, _lenient(pb.EmbedStreamRequest), _serialize
        ),
        "RerankStream": grpc.stream_stream_rpc_method_handler(
            servicer.RerankStream, _lenient(pb.RerankStreamRequest), _serialize
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    if wrap is not None:
        handlers = {name: wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def model_info(rt: Runtime, stream_max_inflight: int) -> pb.GetModelInfoResponse:
    """The embedding model's facts at the top level (empty on a rerank-only server), every
    served model in `models`, and the limits both share."""
    limits = rt.limits
    # The same names as ServerLimits' fields; min_dimensions is reported at the top level.
    fields = {k: v for k, v in dataclasses.asdict(limits).items() if k != "min_dimensions"}
    served = pb.ServerLimits(**fields, stream_max_inflight=stream_max_inflight)
    models = [
        pb.ServedModel(names=model.names, kind=kind, max_input_tokens=model.info.max_input_tokens)
        for kind, model in rt.served
    ]
    embedding = rt.embedding
    if embedding is None:
        return pb.GetModelInfoResponse(limits=served, models=models)
    info, card = embedding.info, embedding.card
    return pb.GetModelInfoResponse(
        model=embedding.name,
        dimension=info.dimension,
        min_dimensions=limits.min_dimensions,
        max_dimensions=info.dimension,
        max_input_tokens=info.max_input_tokens,
        default_instruction=card.default_instruction,
        instruction_template=card.instruction_template,
        prompts=card.prompts,
        dtype=info.dtype,
        pooling=card.pooling or info.pooling,
        limits=served,
        models=models,
    )


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(
        self,
        gate: Gate,
        streams: StreamBudget,
        send_timing_metadata: bool = True,
        default_truncate: str = "refuse",
    ) -> None:
        self._gate = gate
        # What an input over the window gets when the call leaves truncate unspecified.
        self._truncate = default_truncate
        self._streams = streams
        # Metadata on a unary response costs grpc.aio about as much as the rest of a
        # null-engine call's telemetry (see benchmarks/README.md); operators may drop it.
        self._send_timing = send_timing_metadata
        self._model_info: tuple[Runtime, pb.GetModelInfoResponse] | None = None

    def _options(self, options: pb.EmbedOptions) -> RequestOptions:
        return wire.request_options(options, self._truncate)

    async def _answer(
        self, request: R, context: Context, handler: Callable[[Runtime, R, _Call], Awaitable[T]]
    ) -> T:
        """Run a unary handler; every failure leaves as one precise status."""
        call = _Call(time.perf_counter(), _deadline(context))
        try:
            if isinstance(request, Undecodable):
                raise request.invalid("request")
            response = await handler(self._gate.runtime(), request, call)
            timing = getattr(response, "timing", None)
            if self._send_timing and isinstance(timing, pb.Timing):
                context.set_trailing_metadata(wire.timing_metadata(timing))
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # mapped, never leaked as UNKNOWN
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            raise  # abort_with_status raises; this keeps type checkers honest

    # The RPCs: each decodes its request into a call, and encodes the call's answer.

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        return await self._answer(request, context, self._embed)

    async def Similarity(
        self, request: pb.SimilarityRequest, context: Context
    ) -> pb.SimilarityResponse:
        return await self._answer(request, context, self._similarity)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        return await self._answer(request, context, self._get_model_info)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        return await self._answer(request, context, self._tokenize)

    async def Rerank(self, request: pb.RerankRequest, context: Context) -> pb.RerankResponse:
        return await self._answer(request, context, self._rerank)

    async def _embed(self, rt: Runtime, request: pb.EmbedRequest, call: _Call) -> pb.EmbedResponse:
        answer = await embed(
            rt,
            EmbedCall(
                inputs=choose_inputs(request.inputs, [t.ids for t in request.tokens]),
                options=self._options(request.options),
                field="tokens" if request.tokens else "inputs",
                deadline=call.deadline,
            ),
        )
        return pb.EmbedResponse(
            embeddings=[wire.embedding(e) for e in answer.embeddings],
            **wire.metadata(answer.meta, call.started),
        )

    async def _similarity(
        self, rt: Runtime, request: pb.SimilarityRequest, call: _Call
    ) -> pb.SimilarityResponse:
        options = self._options(request.options)
        answer = await similarity(
            rt,
            SimilarityCall(
                request.queries, request.documents, options, request.top_k, deadline=call.deadline
            ),
        )
        rows = [pb.SimilarityResult(scores=row) for row in answer.rows]
        tops = [
            pb.SimilarityResult(
                top_k=[pb.ScoredDocument(index=d.index, score=d.score) for d in best]
            )
            for best in answer.top
        ]
        return pb.SimilarityResponse(
            results=rows + tops, **wire.metadata(answer.meta, call.started)
        )

    async def _get_model_info(
        self, rt: Runtime, request: pb.GetModelInfoRequest, call: _Call
    ) -> pb.GetModelInfoResponse:
        if self._model_info is None or self._model_info[0] is not rt:
            self._model_info = (rt, model_info(rt, self._streams.per_stream))
        return self._model_info[1]

    async def _tokenize(
        self, rt: Runtime, request: pb.TokenizeRequest, call: _Call
    ) -> pb.TokenizeResponse:
        answer = await tokenize(rt, TokenizeCall(request.inputs, self._options(request.options)))
        results = [wire.tokenized(r) for r in answer.results]
        return pb.TokenizeResponse(results=results, model=answer.model)

    async def _rerank(
        self, rt: Runtime, request: pb.RerankRequest, call: _Call
    ) -> pb.RerankResponse:
        answer = await rerank(rt, wire.rerank_call(request, call.deadline))
        return wire.rerank_response(request, answer, call.started)

    # The streams: each runs one session over its requests.

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        def session(rt: Runtime, deadline: float | None) -> StreamSession:
            return StreamSession(rt, self._streams, deadline, self._truncate)

        async for response in self._stream(request_iterator, context, session):
            yield response

    async def RerankStream(
        self, request_iterator: AsyncIterator[pb.RerankStreamRequest], context: Context
    ) -> AsyncIterator[pb.RerankStreamResponse]:
        def session(rt: Runtime, deadline: float | None) -> RerankStreamSession:
            return RerankStreamSession(rt, self._streams, deadline)

        async for response in self._stream(request_iterator, context, session):
            yield response

    async def _stream(
        self,
        requests: AsyncIterator[Any],
        context: Context,
        start: Callable[[Runtime, float | None], ItemStream[Any, Any, Response]],
    ) -> AsyncIterator[Response]:
        """Run a stream's session; a stream the server cannot take fails whole."""
        try:
            session = start(self._gate.runtime(), _deadline(context))
        except Exception as exc:
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            return
        async for response in session.run(requests):
            yield response
