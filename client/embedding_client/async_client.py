"""asyncio client on grpc.aio."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client import splitting
from embedding_client.auth import auth_metadata
from embedding_client.channel import channel_options, check_connections
from embedding_client.codec import Options, OptionsKwargs
from embedding_client.requests import (
    ITEMS_PER_MESSAGE,
    RerankOptions,
    embed_request,
    rerank_request,
    rerank_slices,
    rerank_stream_requests,
    similarity_request,
    stream_requests,
    tokenize_request,
)
from embedding_client.results import (
    EmbedResult,
    RerankResult,
    RerankStreamResult,
    SimilarityResult,
    StreamResult,
    TokenizedResult,
)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
R = TypeVar("R")


class AsyncEmbeddingClient:
    """Async client; same methods as EmbeddingClient, as coroutines, and the same
    constructor: `api_key` (else $EMBED_API_KEY; "" for none) goes as
    `authorization: Bearer <key>` on every call, streams included."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 60.0,
        service_config: dict[str, Any] | None = None,
        max_concurrency: int = splitting.DEFAULT_MAX_CONCURRENCY,
        connections: int = 1,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        check_connections(connections)
        sent = auth_metadata(metadata, api_key)  # before opening the channel: may raise
        opts = channel_options(service_config, own_connections=connections > 1)
        self._channels = [
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
            for _ in range(connections)
        ]
        self._stubs = itertools.cycle([pb_grpc.EmbeddingServiceStub(c) for c in self._channels])
        self._metadata = sent  # with every call, streams included
        self._timeout = timeout
        self._max_concurrency = max_concurrency
        self._info: pb.GetModelInfoResponse | None = None
        self._info_lock = asyncio.Lock()

    @property
    def _stub(self) -> pb_grpc.EmbeddingServiceAsyncStub:
        """The next connection's stub: calls take the connections in turn."""
        return next(self._stubs)

    async def embed(self, inputs: Sequence[str], **options: Unpack[OptionsKwargs]) -> EmbedResult:
        """Embed `inputs`; a list over the server's limits goes as several calls, and the
        result is as from one call."""
        opts = Options(**options)
        texts = list(inputs)
        return await self._split(
            texts,
            plan=lambda info: splitting.plan_embed(texts, opts, info, self._max_concurrency),
            method=self._stub.Embed,
            build=lambda part: embed_request(part, opts),
            convert=EmbedResult.from_proto,
            merge=EmbedResult.concat,
        )

    async def tokenize(
        self, inputs: Sequence[str], **options: Unpack[OptionsKwargs]
    ) -> list[TokenizedResult]:
        """The token ids Embed would send the engine for each input, with their spans.

        instruction, prompt_name and truncate apply as in embed; the rest is ignored.
        """
        opts = Options(**options)
        texts = list(inputs)
        return await self._split(
            texts,
            plan=lambda info: splitting.plan_tokenize(texts, info),
            method=self._stub.Tokenize,
            build=lambda part: tokenize_request(part, opts),
            convert=TokenizedResult.all_from_proto,
            merge=lambda parts: [r for part in parts for r in part],
        )

    async def embed_stream(
        self,
        items: Iterable[tuple[str, str]],
        *,
        items_per_message: int = ITEMS_PER_MESSAGE,
        **options: Unpack[OptionsKwargs],
    ) -> AsyncIterator[StreamResult]:
        """Stream (id, text) pairs; yields results as the server finishes them.

        Items go `items_per_message` to a message, which is cheapest for bulk jobs. Use 1
        when the iterable yields slowly and each item should leave at once.
        """
        call = self._stub.EmbedStream(
            stream_requests(items, Options(**options), items_per_message),
            metadata=self._metadata,
        )
        async for resp in call:
            for result in StreamResult.all_from_proto(resp):
                yield result

    async def similarity(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        top_k: int = 0,
        **options: Unpack[OptionsKwargs],
    ) -> SimilarityResult:
        req = similarity_request(queries, documents, Options(**options), top_k)
        resp = await self._stub.Similarity(req, timeout=self._timeout, metadata=self._metadata)
        return SimilarityResult.from_proto(resp)

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_k: int = 0,
        return_documents: bool = False,
        instruction: str = "",
        max_tokens_per_doc: int = 0,
        model: str = "",
    ) -> RerankResult:
        """Documents scored for `query` by the server's rerank model (or its embedding
        model's cosine when it runs none); every document in document order, or the top_k
        best. More documents than the server takes in one call are split into sub-calls."""
        info = await self._limits() if len(documents) >= splitting.SMALL_CALL_INPUTS else None
        parts = []
        for part in rerank_slices(len(documents), info):
            request = rerank_request(
                query,
                documents[part.start : part.stop],
                return_documents=return_documents,
                instruction=instruction,
                max_tokens_per_doc=max_tokens_per_doc,
                model=model,
            )
            reply = await self._stub.Rerank(request, timeout=self._timeout, metadata=self._metadata)
            parts.append((part.start, reply))
        return RerankResult.merge(parts, top_k)

    async def rerank_stream(
        self,
        items: Iterable[tuple[str, str, Sequence[str]]],
        **options: Unpack[RerankOptions],
    ) -> AsyncIterator[RerankStreamResult]:
        """Stream (id, query, documents) items; yields each item's ranking as the server
        finishes it (see EmbeddingClient.rerank_stream)."""
        call = self._stub.RerankStream(
            rerank_stream_requests(items, **options), metadata=self._metadata
        )
        async for resp in call:
            yield RerankStreamResult.from_proto(resp)

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata
        )

    async def _limits(self) -> pb.GetModelInfoResponse:
        """GetModelInfo, asked once per client (the first large call) and kept; concurrent
        first calls wait for the one asking."""
        async with self._info_lock:
            if self._info is None:
                self._info = await self.model_info()
            return self._info

    async def _split(
        self,
        texts: list[str],
        *,
        plan: Callable[[pb.GetModelInfoResponse | None], list[range]],
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        build: Callable[[Sequence[str]], Req],
        convert: Callable[[Resp], R],
        merge: Callable[[list[R]], R],
    ) -> R:
        """One call of `method` on `texts`, or several on slices of them as `plan` says."""
        info = await self._limits() if splitting.needs_limits(texts) else self._info
        pieces = plan(info)
        if len(pieces) == 1:
            # Within the limits: one plain call, as the client always made.
            try:
                resp = await method(build(texts), timeout=self._timeout, metadata=self._metadata)
                return convert(resp)
            except grpc.aio.AioRpcError as exc:
                if not splitting.can_split(exc, pieces[0]):
                    raise
            pieces = splitting.replan(plan(await self._limits()), pieces[0])

        async def send(piece: range) -> R:
            part = build(texts[piece.start : piece.stop])
            return convert(await method(part, timeout=self._timeout, metadata=self._metadata))

        return await self._run(splitting.SplitRun(pieces, merge), send)

    async def _run(self, run: splitting.SplitRun[R], send: Callable[[range], Awaitable[R]]) -> R:
        """Drive `run` with at most max_concurrency calls in flight; the first failure that
        splitting cannot help cancels the rest and is raised."""
        inflight: dict[asyncio.Task[R], range] = {}
        try:
            while run.has_work or inflight:
                while run.has_work and len(inflight) < self._max_concurrency:
                    piece = run.take()
                    inflight[asyncio.ensure_future(send(piece))] = piece
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    piece = inflight.pop(task)
                    exc = task.exception()
                    if exc is None:
                        run.succeeded(piece, task.result())
                    else:
                        run.failed(piece, exc)
        finally:
            for task in inflight:
                task.cancel()
            # Collect the cancelled calls so none is left with an unretrieved exception.
            await asyncio.gather(*inflight, return_exceptions=True)
        return run.result()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
