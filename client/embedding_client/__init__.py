"""Client for the embedding.v1 gRPC service: generated stubs plus typed sync/async clients."""

from embedding_client.async_client import AsyncEmbeddingClient
from embedding_client.channel import DEFAULT_SERVICE_CONFIG, channel_options
from embedding_client.codec import Options, decode, decode_all
from embedding_client.results import EmbedResult, SimilarityResult, StreamResult
from embedding_client.sync_client import EmbeddingClient

__all__ = [
    "DEFAULT_SERVICE_CONFIG",
    "AsyncEmbeddingClient",
    "EmbedResult",
    "EmbeddingClient",
    "Options",
    "SimilarityResult",
    "StreamResult",
    "channel_options",
    "decode",
    "decode_all",
]
