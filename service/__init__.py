"""Embedding service: faces (gRPC, HTTP) -> tokenization -> batching -> engine -> postprocess."""

from importlib import metadata


def version() -> str:
    """The installed package's version ("unknown" when run from a bare checkout)."""
    try:
        return metadata.version("embedding-service")
    except metadata.PackageNotFoundError:
        return "unknown"
