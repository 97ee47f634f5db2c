"""embedding.v1.EmbeddingService: translate each call to the pipeline and back, map errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service import postprocess
from service.api.calls.rerank import RerankCall, ScoreKind, rerank
from service.api.grpc import wire
from service.api.grpc.status import to_status
from service.api.grpc.stream import StreamSession, Undecodable
from service.api.grpc.stream_budget import StreamBudget
from service.api.runtime import Gate, Runtime
from service.errors import InvalidInputError
from service.pipeline import Inputs, TokenInputs

T = TypeVar("T")
_SCORE_KINDS = {
    ScoreKind.CROSS_ENCODER: pb.SCORE_KIND_CROSS_ENCODER,
    ScoreKind.COSINE: pb.SCORE_KIND_COSINE,
}
Context = grpc.aio.ServicerContext[object, object]


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
    }
    service = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    if wrap is not None:
        handlers = {name: wrap(h, f"/{service}/{name}") for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def model_info(rt: Runtime, stream_max_inflight: int) -> pb.GetModelInfoResponse:
    info, card, limits = rt.info, rt.card, rt.limits
    return pb.GetModelInfoResponse(
        model=info.model_name,
        dimension=info.dimension,
        min_dimensions=limits.min_dimensions,
        max_dimensions=info.dimension,
        max_input_tokens=info.max_input_tokens,
        default_instruction=card.default_instruction,
        instruction_template=card.instruction_template,
        prompts=card.prompts,
        dtype=info.dtype,
        pooling=card.pooling or info.pooling,
        limits=pb.ServerLimits(
            max_inputs_per_request=limits.max_inputs_per_request,
            max_input_chars=limits.max_input_chars,
            max_batch_tokens=limits.max_batch_tokens,
            max_batch_items=limits.max_batch_items,
            max_queue_tokens=limits.max_queue_tokens,
            max_queue_items=limits.max_queue_items,
            max_request_bytes=limits.max_request_bytes,
            max_request_tokens=limits.max_request_tokens,
            stream_max_inflight=stream_max_inflight,
        ),
        models=served_models(rt),
    )


def served_models(rt: Runtime) -> list[pb.ServedModel]:
    info = rt.info
    models = [
        pb.ServedModel(
            names=rt.model_names or [info.model_name],
            kind="embed",
            max_input_tokens=info.max_input_tokens,
        )
    ]
    if rt.scorer is not None:
        scorer = rt.scorer
        models.append(
            pb.ServedModel(
                names=scorer.names, kind="score", max_input_tokens=scorer.info.max_input_tokens
            )
        )
    return models


def _embed_inputs(request: pb.EmbedRequest, rt: Runtime) -> tuple[Inputs, str]:
    """The request's texts or token ids, checked, with the field that names them."""
    if request.inputs and request.tokens:
        raise InvalidInputError("tokens", "set either inputs or tokens, not both")
    if request.tokens:
        rt.validator.count(len(request.tokens), "tokens", "token-id inputs")
        return TokenInputs([t.ids for t in request.tokens]), "tokens"
    rt.validator.texts(request.inputs, "inputs")
    return request.inputs, "inputs"


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

    async def _answer(
        self, request: object, context: Context, handler: Callable[[Runtime], Awaitable[T]]
    ) -> T:
        """Run a unary handler; every failure leaves as one precise status."""
        try:
            if isinstance(request, Undecodable):
                raise request.invalid("request")
            response = await handler(self._gate.runtime())
            timing = getattr(response, "timing", None)
            if self._send_timing and isinstance(timing, pb.Timing):
                context.set_trailing_metadata(wire.timing_metadata(timing))
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # mapped, never leaked as UNKNOWN
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            raise  # abort_with_status raises; this keeps type checkers honest

    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        started = time.perf_counter()

        async def handle(rt: Runtime) -> pb.EmbedResponse:
            inputs, field = _embed_inputs(request, rt)
            spec = rt.validator.options(
                wire.request_options(request.options, self._truncate),
                token_inputs=isinstance(inputs, TokenInputs),
            )
            outcome = await rt.embedder.embed(inputs, spec, field, _deadline(context))
            tokens = outcome.prompt_tokens
            return pb.EmbedResponse(
                embeddings=wire.embeddings(outcome, spec),
                model=rt.info.model_name,
                usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
                timing=wire.timing(outcome.timing, started),
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
            v.count(len(request.queries) + len(request.documents), "queries+documents")
            spec = v.options(wire.request_options(request.options, self._truncate))
            for name, unused in (
                ("encoding", spec.encoding is not postprocess.Encoding.FLOAT32),
                ("chunking", spec.chunking is not None),
                ("views", bool(spec.views)),
            ):
                if unused:
                    raise InvalidInputError(f"options.{name}", "does not apply to Similarity")
            outcome = await rt.embedder.similarity(
                request.queries, request.documents, spec, _deadline(context)
            )
            tokens = outcome.prompt_tokens
            return pb.SimilarityResponse(
                results=_similarity_results(outcome.scores, request.top_k),
                model=rt.info.model_name,
                usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
                timing=wire.timing(outcome.timing, started),
            )

        return await self._answer(request, context, handle)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        async def handle(rt: Runtime) -> pb.GetModelInfoResponse:
            if self._model_info is None or self._model_info[0] is not rt:
                self._model_info = (rt, model_info(rt, self._streams.per_stream))
            return self._model_info[1]

        return await self._answer(request, context, handle)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Context) -> pb.TokenizeResponse:
        async def handle(rt: Runtime) -> pb.TokenizeResponse:
            rt.validator.texts(request.inputs, "inputs")
            spec = rt.validator.options(wire.request_options(request.options, self._truncate))
            results = await rt.embedder.tokenize(request.inputs, spec, "inputs")
            return pb.TokenizeResponse(
                results=[wire.tokenized(r) for r in results], model=rt.info.model_name
            )

        return await self._answer(request, context, handle)

    async def Rerank(self, request: pb.RerankRequest, context: Context) -> pb.RerankResponse:
        started = time.perf_counter()

        async def handle(rt: Runtime) -> pb.RerankResponse:
            answer = await rerank(
                rt,
                RerankCall(
                    query=request.query,
                    documents=request.documents,
                    top_k=request.top_k,
                    instruction=request.instruction,
                    max_tokens_per_doc=request.max_tokens_per_doc,
                    model=request.model or None,
                    deadline=_deadline(context),
                ),
            )
            tokens = answer.prompt_tokens
            return pb.RerankResponse(
                results=[
                    pb.RankedDocument(
                        index=r.index,
                        relevance_score=r.relevance,
                        raw_score=r.raw,
                        truncated=r.truncated,
                        document=request.documents[r.index] if request.return_documents else "",
                    )
                    for r in answer.results
                ],
                model=answer.model,
                score_kind=_SCORE_KINDS[answer.kind],
                usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
                timing=wire.timing(answer.timing, started),
            )

        return await self._answer(request, context, handle)

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        try:
            rt = self._gate.runtime()
        except Exception as exc:
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            return
        session = StreamSession(rt, self._streams, _deadline(context), self._truncate)
        async for response in session.run(request_iterator):
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
