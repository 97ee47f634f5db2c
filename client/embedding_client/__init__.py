"""Client for the embedding.v1 gRPC service: generated stubs plus typed sync/async clients."""

from embedding_client.async_client import AsyncEmbeddingClient
from embedding_client.channel import DEFAULT_SERVICE_CONFIG, channel_options
from embedding_client.codec import Options, decode, decode_all, decode_view, decode_views
from embedding_client.results import (
    ChunkResult,
    EmbedResult,
    Ranked,
    RerankResult,
    RerankStreamResult,
    SimilarityResult,
    StreamResult,
    TokenizedResult,
)
from embedding_client.sync_client import EmbeddingClient
from embedding_client.vectors import (
    hamming,
    hamming_matrix,
    int8_dot,
    int8_dot_matrix,
    int8_rows,
    packed_rows,
    unpack_binary,
)

__all__ = [
    "DEFAULT_SERVICE_CONFIG",
    "AsyncEmbeddingClient",
    "ChunkResult",
    "EmbedResult",
    "EmbeddingClient",
    "Options",
    "Ranked",
    "RerankResult",
    "RerankStreamResult",
    "SimilarityResult",
    "StreamResult",
    "TokenizedResult",
    "channel_options",
    "decode",
    "decode_all",
    "decode_view",
    "decode_views",
    "hamming",
    "hamming_matrix",
    "int8_dot",
    "int8_dot_matrix",
    "int8_rows",
    "packed_rows",
    "unpack_binary",
]
