"""Request builders shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TypedDict, Unpack

from embedding.v1 import embedding_pb2 as pb
from embedding_client.codec import Options


def embed_request(inputs: Sequence[str], options: Options) -> pb.EmbedRequest:
    return pb.EmbedRequest(inputs=list(inputs), options=options.to_proto())


# Items per EmbedStreamRequest: a message per item costs the server more than embedding a
# short text, while 64 items of 32k tokens still fit the server's 32 MiB message limit.
ITEMS_PER_MESSAGE = 64


def stream_requests(
    items: Iterable[tuple[str, str]], options: Options, items_per_message: int
) -> Iterator[pb.EmbedStreamRequest]:
    """`items_per_message` 1 sends the single-item form (each item leaves as soon as the
    iterable yields it); more send the multi-item form, waiting for that many items."""
    if items_per_message < 1:
        raise ValueError(f"items_per_message must be at least 1, not {items_per_message}")
    opts = options.to_proto()
    if items_per_message == 1:
        return (
            pb.EmbedStreamRequest(id=item_id, input=text, options=opts) for item_id, text in items
        )
    return _multi_item_requests(iter(items), opts, items_per_message)


def _multi_item_requests(
    items: Iterator[tuple[str, str]], opts: pb.EmbedOptions, n: int
) -> Iterator[pb.EmbedStreamRequest]:
    while chunk := list(islice(items, n)):
        yield pb.EmbedStreamRequest(
            items=[pb.StreamItem(id=item_id, input=text) for item_id, text in chunk], options=opts
        )


def similarity_request(
    queries: Sequence[str], documents: Sequence[str], options: Options, top_k: int
) -> pb.SimilarityRequest:
    return pb.SimilarityRequest(
        queries=list(queries), documents=list(documents), options=options.to_proto(), top_k=top_k
    )


def tokenize_request(inputs: Sequence[str], options: Options) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(inputs=list(inputs), options=options.to_proto())


class RerankOptions(TypedDict, total=False):
    """RerankRequest's fields besides the query and the documents."""

    top_k: int
    return_documents: bool
    instruction: str
    max_tokens_per_doc: int
    model: str


def rerank_request(
    query: str, documents: Sequence[str], **options: Unpack[RerankOptions]
) -> pb.RerankRequest:
    return pb.RerankRequest(query=query, documents=list(documents), **options)


def rerank_stream_requests(
    items: Iterable[tuple[str, str, Sequence[str]]], **options: Unpack[RerankOptions]
) -> Iterator[pb.RerankStreamRequest]:
    """A message per (id, query, documents) item, each leaving as the iterable yields it;
    `options` apply to every item."""
    for item_id, query, documents in items:
        yield pb.RerankStreamRequest(
            id=item_id, request=rerank_request(query, documents, **options)
        )


def rerank_slices(n_documents: int, info: pb.GetModelInfoResponse | None) -> list[range]:
    """Document ranges of the sub-calls of one rerank: the query and the documents of each
    must fit in the server's max_inputs_per_request."""
    per_call = max(1, (info.limits.max_inputs_per_request - 1) if info else n_documents)
    return [range(i, min(i + per_call, n_documents)) for i in range(0, n_documents, per_call)]
