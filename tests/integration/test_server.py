"""Health, reflection and the async client against the real server."""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embedding_client import AsyncEmbeddingClient, EmbeddingClient
from tests.servers import ServerProcess, health_status
from tests.texts import TEXTS

# RPC and HTTP deadlines: only a hang reaches them, however loaded the machine.
PATIENCE_S = 600.0


def test_health_is_serving_for_the_server_and_the_service(minilm_server: ServerProcess) -> None:
    for name in ("", "embedding.v1.EmbeddingService"):
        assert health_status(minilm_server.address, name) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(minilm_server: ServerProcess) -> None:
    with grpc.insecure_channel(minilm_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=PATIENCE_S)))
    names = {s.name for s in response.list_services_response.service}
    assert {"embedding.v1.EmbeddingService", "grpc.health.v1.Health"} <= names


async def test_async_client_matches_sync_client(
    minilm_server: ServerProcess, minilm: EmbeddingClient
) -> None:
    async with AsyncEmbeddingClient(minilm_server.address) as client:
        result = await client.embed(TEXTS, dimensions=64)
        stream = [r async for r in client.embed_stream([("a", TEXTS[0]), ("b", TEXTS[1])])]
        scores = await client.similarity(TEXTS[:2], TEXTS[2:4])
        info = await client.model_info()
    np.testing.assert_allclose(
        result.vectors, minilm.embed(TEXTS, dimensions=64).vectors, atol=1e-5
    )
    assert sorted(r.id for r in stream) == ["a", "b"] and all(r.ok for r in stream)
    assert scores.scores.shape == (2, 2)
    assert info.dimension == 384
