"""Request builders shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from embedding.v1 import embedding_pb2 as pb
from embedding_client.codec import Options


def embed_request(inputs: Sequence[str], options: Options) -> pb.EmbedRequest:
    return pb.EmbedRequest(inputs=list(inputs), options=options.to_proto())


def stream_requests(
    items: Iterable[tuple[str, str]], options: Options
) -> Iterator[pb.EmbedStreamRequest]:
    opts = options.to_proto()
    for item_id, text in items:
        yield pb.EmbedStreamRequest(id=item_id, input=text, options=opts)


def similarity_request(
    queries: Sequence[str], documents: Sequence[str], options: Options, top_k: int
) -> pb.SimilarityRequest:
    return pb.SimilarityRequest(
        queries=list(queries), documents=list(documents), options=options.to_proto(), top_k=top_k
    )
