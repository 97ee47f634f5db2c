"""gRPC embedding service: servicer -> tokenization -> batching -> engine -> post-processing."""
