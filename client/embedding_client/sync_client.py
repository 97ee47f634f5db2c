"""Blocking client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc

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


class EmbeddingClient:
    """Sync client. `target` is host:port, or dns:///name:port to balance over pods.

    Keyword options (instruction, prompt_name, dimensions, normalize, truncate, encoding)
    are those of embedding.v1.EmbedOptions.
    """

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
            grpc.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._metadata = tuple(metadata)
        self._timeout = timeout

    def embed(self, inputs: Sequence[str], **options: Unpack[OptionsKwargs]) -> EmbedResult:
        req = embed_request(inputs, Options(**options))
        resp = self._stub.Embed(req, timeout=self._timeout, metadata=self._metadata)
        return EmbedResult.from_proto(resp)

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

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
