"""Blocking client."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc

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


class EmbeddingClient:
    """Sync client. `target` is host:port, or dns:///name:port to balance over pods.

    Keyword options (instruction, prompt_name, dimensions, normalize, truncate, encoding,
    chunk_tokens, chunk_overlap, views) are those of embedding.v1.EmbedOptions.

    `embed` and `tokenize` split a call over the server's limits into sub-calls, at most
    `max_concurrency` in flight; `timeout` applies to each RPC.

    `connections` > 1 opens that many connections, which calls take in turn: a server with
    several front-end processes (--api-processes) serves each connection in one of them, so
    one busy client reaches all of them only over several.

    `api_key`, for a server started with --api-keys, goes as `authorization: Bearer <key>`
    on every call, streams included. When it is None the key comes from $EMBED_API_KEY (the
    variable embed-files reads too), if set; pass "" to send none whatever the environment
    says. A key already in `metadata` (authorization or x-api-key) beats the variable. A
    missing or refused key fails each call with grpc.StatusCode.UNAUTHENTICATED.
    """

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
            grpc.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.insecure_channel(target, options=opts)
            for _ in range(connections)
        ]
        self._stubs = itertools.cycle([pb_grpc.EmbeddingServiceStub(c) for c in self._channels])
        self._metadata = sent  # with every call, streams included
        self._timeout = timeout
        self._max_concurrency = max_concurrency
        self._info: pb.GetModelInfoResponse | None = None
        self._info_lock = threading.Lock()

    @property
    def _stub(self) -> pb_grpc.EmbeddingServiceStub:
        """The next connection's stub: calls take the connections in turn."""
        return next(self._stubs)

    def embed(self, inputs: Sequence[str], **options: Unpack[OptionsKwargs]) -> EmbedResult:
        """Embed `inputs`; a list over the server's limits goes as several calls, and the
        result is as from one call."""
        opts = Options(**options)
        texts = list(inputs)
        return self._split(
            texts,
            plan=lambda info: splitting.plan_embed(texts, opts, info, self._max_concurrency),
            method=self._stub.Embed,
            build=lambda part: embed_request(part, opts),
            convert=EmbedResult.from_proto,
            merge=EmbedResult.concat,
        )

    def tokenize(
        self, inputs: Sequence[str], **options: Unpack[OptionsKwargs]
    ) -> list[TokenizedResult]:
        """The token ids Embed would send the engine for each input, with their spans.

        instruction, prompt_name and truncate apply as in embed; the rest is ignored.
        """
        opts = Options(**options)
        texts = list(inputs)
        return self._split(
            texts,
            plan=lambda info: splitting.plan_tokenize(texts, info),
            method=self._stub.Tokenize,
            build=lambda part: tokenize_request(part, opts),
            convert=TokenizedResult.all_from_proto,
            merge=lambda parts: [r for part in parts for r in part],
        )

    def embed_stream(
        self,
        items: Iterable[tuple[str, str]],
        *,
        items_per_message: int = ITEMS_PER_MESSAGE,
        **options: Unpack[OptionsKwargs],
    ) -> Iterator[StreamResult]:
        """Stream (id, text) pairs; yields results as the server finishes them.

        Items go `items_per_message` to a message, which is cheapest for bulk jobs. Use 1
        when the iterable yields slowly and each item should leave at once.
        """
        responses = self._stub.EmbedStream(
            stream_requests(items, Options(**options), items_per_message),
            metadata=self._metadata,
        )
        for resp in responses:
            yield from StreamResult.all_from_proto(resp)

    def similarity(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        top_k: int = 0,
        **options: Unpack[OptionsKwargs],
    ) -> SimilarityResult:
        req = similarity_request(queries, documents, Options(**options), top_k)
        resp = self._stub.Similarity(req, timeout=self._timeout, metadata=self._metadata)
        return SimilarityResult.from_proto(resp)

    def rerank(
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
        info = self._limits() if len(documents) >= splitting.SMALL_CALL_INPUTS else None
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
            reply = self._stub.Rerank(request, timeout=self._timeout, metadata=self._metadata)
            parts.append((part.start, reply))
        return RerankResult.merge(parts, top_k)

    def rerank_stream(
        self,
        items: Iterable[tuple[str, str, Sequence[str]]],
        **options: Unpack[RerankOptions],
    ) -> Iterator[RerankStreamResult]:
        """Stream (id, query, documents) items: many queries, each ranked as `rerank` ranks
        one; yields each item's ranking as the server finishes it, in no set order.

        `options` (top_k, return_documents, instruction, max_tokens_per_doc, model) apply
        to every item. Items are bulk work on the server, behind unary calls. A failing item
        (an empty query, a query over the window, more documents than the server's
        stream_max_inflight) gets its own error and the others go on; an item's documents
        are not split into sub-calls as `rerank` splits them.
        """
        responses = self._stub.RerankStream(
            rerank_stream_requests(items, **options), metadata=self._metadata
        )
        for resp in responses:
            yield RerankStreamResult.from_proto(resp)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata
        )

    def _limits(self) -> pb.GetModelInfoResponse:
        """GetModelInfo, asked once per client (the first large call) and kept."""
        with self._info_lock:
            if self._info is None:
                self._info = self.model_info()
            return self._info

    def _split(
        self,
        texts: list[str],
        *,
        plan: Callable[[pb.GetModelInfoResponse | None], list[range]],
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        build: Callable[[Sequence[str]], Req],
        convert: Callable[[Resp], R],
        merge: Callable[[list[R]], R],
    ) -> R:
        """One call of `method` on `texts`, or several on slices of them as `plan` says."""
        info = self._limits() if splitting.needs_limits(texts) else self._info
        pieces = plan(info)
        if len(pieces) == 1:
            # Within the limits: one plain call, as the client always made.
            try:
                return convert(method(build(texts), timeout=self._timeout, metadata=self._metadata))
            except grpc.RpcError as exc:
                if not splitting.can_split(exc, pieces[0]):
                    raise
            pieces = splitting.replan(plan(self._limits()), pieces[0])
        run = splitting.SplitRun(pieces, merge)
        return self._run(
            run,
            lambda p: method.future(
                build(texts[p.start : p.stop]), timeout=self._timeout, metadata=self._metadata
            ),
            convert,
        )

    def _run(
        self,
        run: splitting.SplitRun[R],
        send: Callable[[range], grpc.Future[Resp]],
        convert: Callable[[Resp], R],
    ) -> R:
        """Drive `run` with at most max_concurrency futures in flight; the first failure
        that splitting cannot help cancels the rest and is raised."""
        inflight: dict[grpc.Future[Resp], range] = {}
        finished: queue.SimpleQueue[grpc.Future[Resp]] = queue.SimpleQueue()
        try:
            while run.has_work or inflight:
                while run.has_work and len(inflight) < self._max_concurrency:
                    piece = run.take()
                    future = send(piece)
                    inflight[future] = piece
                    future.add_done_callback(finished.put)
                future = finished.get()
                piece = inflight.pop(future)
                exc = future.exception()
                if exc is None:
                    run.succeeded(piece, convert(future.result()))
                else:
                    run.failed(piece, exc)
        finally:
            for future in inflight:
                future.cancel()
        return run.result()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
