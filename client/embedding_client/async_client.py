"""asyncio client on grpc.aio."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc
import grpc.aio

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client.channel import channel_options
from embedding_client.codec import Options, OptionsKwargs
from embedding_client.requests import (
    ITEMS_PER_MESSAGE,
    embed_request,
    similarity_request,
    stream_requests,
)
from embedding_client.results import EmbedResult, SimilarityResult, StreamResult


class AsyncEmbeddingClient:
    """Async client; same methods as EmbeddingClient, as coroutines."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 60.0,
        service_config: dict[str, Any] | None = None,
    ) -> None:
        opts = channel_options(service_config)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._metadata = tuple(metadata)
        self._timeout = timeout

    async def embed(self, inputs: Sequence[str], **options: Unpack[OptionsKwargs]) -> EmbedResult:
        req = embed_request(inputs, Options(**options))
        resp = await self._stub.Embed(req, timeout=self._timeout, metadata=self._metadata)
        return EmbedResult.from_proto(resp)

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

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
