"""The gRPC face: embedding.v1.EmbeddingService, its status mapping and API-key check."""
