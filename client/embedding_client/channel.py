"""Channel settings shared by the sync and async clients."""

from __future__ import annotations

import json
from typing import Any

SERVICE_NAME = "embedding.v1.EmbeddingService"

# Every RPC is a read-only computation, so retrying it is safe. EmbedStream is left out:
# a stream has already delivered results when it fails, and its caller resumes by id.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    # With a headless Service and a dns:/// target, spread calls over every pod.
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                {"service": SERVICE_NAME, "method": "Embed"},
                {"service": SERVICE_NAME, "method": "Similarity"},
                {"service": SERVICE_NAME, "method": "GetModelInfo"},
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2.0,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ],
}

# Responses of large batches exceed gRPC's 4 MiB default receive limit
# (2048 texts x 1024 float32 dimensions is 8 MiB).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_options(
    service_config: dict[str, Any] | None = None, own_connections: bool = False
) -> list[tuple[str, Any]]:
    """`own_connections`: the channel gets connections of its own instead of sharing those
    of every other channel to the same address (grpc's global subchannel pool)."""
    return [
        ("grpc.service_config", json.dumps(service_config or DEFAULT_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *([("grpc.use_local_subchannel_pool", 1)] if own_connections else []),
    ]


def check_connections(connections: int) -> None:
    if connections < 1:
        raise ValueError(f"connections must be at least 1, not {connections}")
