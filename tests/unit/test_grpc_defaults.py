"""Server-wide defaults on the gRPC face, and reflection under both of its names."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from tests.unit.test_server_faults import ServerMaker, make_server

__all__ = ["make_server"]  # the fixture, shared with the fault tests

LONG = "Every word here is a token or two for the bundled tokenizer. " * 60


async def _embed(port: int, options: pb.EmbedOptions) -> pb.EmbedResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        reply: pb.EmbedResponse = await stub.Embed(
            pb.EmbedRequest(inputs=["short", LONG], options=options)
        )
        return reply


async def test_grpc_refuses_long_inputs_unless_told_and_the_flag_changes_that(
    make_server: ServerMaker,
) -> None:
    server, _ = await make_server()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _embed(server.port, pb.EmbedOptions())
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in str(caught.value.details())
    # A request that says still decides.
    cut = await _embed(server.port, pb.EmbedOptions(truncate=pb.TRUNCATE_END))
    assert [e.truncated for e in cut.embeddings] == [False, True]

    lenient, _ = await make_server(grpc_truncate="end")
    default = await _embed(lenient.port, pb.EmbedOptions())
    assert [e.truncated for e in default.embeddings] == [False, True]
    assert default.embeddings[1].data == cut.embeddings[1].data
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _embed(lenient.port, pb.EmbedOptions(truncate=pb.TRUNCATE_REFUSE))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("package", ["grpc.reflection.v1alpha", "grpc.reflection.v1"])
async def test_reflection_answers_under_v1alpha_and_v1(
    make_server: ServerMaker, package: str
) -> None:
    server, _ = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        # v1's messages are v1alpha's under another package name: the same bytes.
        call = channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        responses = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        reply = await responses.read()
    assert isinstance(reply, reflection_pb2.ServerReflectionResponse)
    names = {s.name for s in reply.list_services_response.service}
    assert {"embedding.v1.EmbeddingService", "grpc.health.v1.Health"} <= names
    assert {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"} <= (
        names
    )
