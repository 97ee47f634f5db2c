"""The gRPC Rerank RPC on the embedding model (no rerank model): the same call layer as
HTTP's rerank routes, against the fake engine."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import grpc.aio
import numpy as np
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from tests.unit.test_server_faults import ServerMaker, make_server

__all__ = ["make_server"]  # the fixture, shared with the fault tests

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "The Seine flows in Paris."]
LONG = "A document far longer than the bundled model's window of 256 tokens. " * 60


async def test_rerank_ranks_by_the_mapped_cosine_and_says_so(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        query = "capital of France"
        similarity = await stub.Similarity(pb.SimilarityRequest(queries=[query], documents=DOCS))
        cosines = np.array(similarity.results[0].scores)
        every = await stub.Rerank(pb.RerankRequest(query=query, documents=DOCS))
        best = await stub.Rerank(
            pb.RerankRequest(query=query, documents=DOCS, top_k=2, return_documents=True)
        )
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert every.score_kind == pb.SCORE_KIND_COSINE
    # top_k 0: every document, in document order.
    assert [r.index for r in every.results] == [0, 1, 2]
    np.testing.assert_allclose([r.raw_score for r in every.results], cosines, atol=1e-6)
    np.testing.assert_allclose(
        [r.relevance_score for r in every.results], (1 + cosines) / 2, atol=1e-6
    )
    assert all(r.document == "" for r in every.results)
    order = np.argsort(-cosines, kind="stable")[:2].tolist()
    assert [r.index for r in best.results] == order
    assert [r.document for r in best.results] == [DOCS[i] for i in order]
    assert every.usage.prompt_tokens > 0 and every.model
    assert [(list(m.names)[:1], m.kind) for m in info.models] == [([info.model], "embed")]


async def test_rerank_cuts_long_documents_and_refuses_a_long_query_by_name(
    make_server: ServerMaker,
) -> None:
    server, _ = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        reply = await stub.Rerank(pb.RerankRequest(query="q", documents=["short", LONG]))
        capped = await stub.Rerank(
            pb.RerankRequest(query="q", documents=["short words here", LONG], max_tokens_per_doc=4)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(pb.RerankRequest(query=LONG, documents=["short"]))
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Rerank(pb.RerankRequest(query="q", documents=["d"], model="nope"))
    assert [r.truncated for r in reply.results] == [False, True]
    assert [r.truncated for r in capped.results] == [True, True]
    assert capped.usage.prompt_tokens < reply.usage.prompt_tokens
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = str(caught.value.details())
    assert details.startswith("query: has ") and "never cut" in details
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'nope'" in str(unknown.value.details())


async def test_the_clients_rerank_splits_over_the_servers_limit(make_server: ServerMaker) -> None:
    from embedding_client import AsyncEmbeddingClient, EmbeddingClient, Ranked

    documents = [f"document number {i} about {DOCS[i % 3]}" for i in range(70)]
    server, _ = await make_server()
    small, _ = await make_server(max_inputs_per_request=8)
    address = f"127.0.0.1:{server.port}"
    async with AsyncEmbeddingClient(address) as client:
        whole = await client.rerank("capital of France", documents)
        best = await client.rerank("capital of France", documents, top_k=5)
    async with AsyncEmbeddingClient(f"127.0.0.1:{small.port}") as client:
        split = await client.rerank("capital of France", documents, top_k=5, return_documents=True)
    assert [r.index for r in whole.results] == list(range(70))
    assert whole.score_kind == "cosine" and whole.prompt_tokens > 0
    order = np.argsort(-whole.scores, kind="stable")[:5].tolist()
    assert [r.index for r in best.results] == order
    # 70 documents over 8 inputs a call: ten sub-calls of 7, ranked together.
    assert [r.index for r in split.results] == order
    np.testing.assert_allclose(split.scores, whole.scores[order], atol=1e-6)
    assert [r.document for r in split.results] == [documents[i] for i in order]

    def blocking() -> list[Ranked]:
        # The sync client, off the event loop the server runs on.
        with EmbeddingClient(f"127.0.0.1:{small.port}") as sync:
            return sync.rerank("capital of France", documents, top_k=5).results

    assert await asyncio.to_thread(blocking) == [replace(r, document="") for r in split.results]
