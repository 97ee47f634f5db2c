"""RerankStream against fake engines: each item answered as Rerank would, per-item errors,
bulk priority behind unary calls, the stream budget per document, and a caller that leaves.

The cross-encoder rig and its helpers are the rerank fault tests' (a FakeEngine scorer whose
logit for a pair is row[0] of fake_vector on its ids); the cosine case uses the plain fake
server, which serves no rerank model. No assertion is on time: gates decide when the engine
answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Unpack

import grpc
import grpc.aio
import numpy as np
from tokenizers import Tokenizer

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client.requests import RerankOptions, rerank_request
from tests.unit.test_rerank_faults import (
    DOCS,
    HELD,
    LONG,
    PATIENCE_S,
    QUERY,
    RigMaker,
    logits,
    make_rig,
    pair_tokenizer,
    pairs,
    reranker_dir,
)
from tests.unit.test_server_faults import ServerMaker, make_server, until

# The fixtures, shared with the fault tests.
__all__ = ["make_rig", "make_server", "pair_tokenizer", "reranker_dir"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def item(
    item_id: str, query: str, documents: Sequence[str], **options: Unpack[RerankOptions]
) -> pb.RerankStreamRequest:
    return pb.RerankStreamRequest(id=item_id, request=rerank_request(query, documents, **options))


async def feed(
    items: Iterable[pb.RerankStreamRequest], more: asyncio.Event | None = None
) -> AsyncIterator[pb.RerankStreamRequest]:
    """The items; then, with `more`, the stream stays open until it is set."""
    for request in items:
        yield request
    if more is not None:
        await more.wait()


def same_ranking(got: pb.RerankResponse, unary: pb.RerankResponse) -> None:
    """Everything but the timing, which is each call's own."""
    assert list(got.results) == list(unary.results)
    assert (got.model, got.score_kind, got.usage) == (unary.model, unary.score_kind, unary.usage)


def queries(n: int) -> list[pb.RerankStreamRequest]:
    """n items of 1 to 3 documents, some asking for the top 2 with their texts."""
    return [
        item(
            f"q{i}",
            f"{QUERY} {i}",
            [f"{DOCS[(i + j) % 3]} ({i})" for j in range(1 + i % 3)],
            **(RerankOptions(top_k=2, return_documents=True) if i % 4 == 0 else {}),
        )
        for i in range(n)
    ]


async def test_each_item_is_answered_as_rerank_answers_it_and_bad_items_fail_alone(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    # Six slots: items of up to three documents share them, and the reader waits for room.
    rig = await make_rig(stream_max_inflight=6)
    good = queries(24)
    bad = [
        item("empty", "", ["a document"]),
        item("no documents", QUERY, []),
        item("long query", LONG, ["a document"]),
        item("over the stream", QUERY, [f"d{i}" for i in range(7)]),
        item("over the request", QUERY, ["d"] * 2048),
    ]
    channel, stub = rig.stub()
    async with channel:
        responses = [
            r
            async for r in stub.RerankStream(
                feed([*good[:12], *bad, *good[12:]]), timeout=PATIENCE_S
            )
        ]
        unary = [await stub.Rerank(it.request, timeout=PATIENCE_S) for it in good]
    by_id = {r.id: r for r in responses}
    assert len(by_id) == len(responses) == len(good) + len(bad)
    for it, expected in zip(good, unary, strict=True):
        answer = by_id[it.id]
        assert answer.HasField("response"), answer.error
        same_ranking(answer.response, expected)
        assert answer.response.timing.total_us > 0
    # The top k of the fake scorer's logits, best first, with their texts.
    first = good[0].request
    raw = logits(pairs(pair_tokenizer, first.query, first.documents))
    best = np.argsort(-raw, kind="stable")[:2].tolist()
    assert [r.index for r in by_id["q0"].response.results] == best
    assert [r.document for r in by_id["q0"].response.results] == [first.documents[i] for i in best]
    errors = {i: by_id[i].error for i in ("empty", "no documents", "long query")}
    errors |= {i: by_id[i].error for i in ("over the stream", "over the request")}
    assert {e.code for e in errors.values()} == {INVALID}
    assert errors["empty"].message == "query: text is empty"
    assert errors["no documents"].message.startswith("documents: at least one input")
    assert errors["long query"].message.startswith("query: query has 1860 tokens")
    assert "under the limit of 256 tokens" in errors["long query"].message
    assert errors["over the stream"].message.startswith(
        "documents: 7 documents exceed the limit of 6 per item of a stream"
    )
    assert errors["over the request"].message == (
        "query+documents: 2049 texts exceed the limit of 2048 per request"
    )


async def test_the_cosine_ranking_without_a_rerank_model(make_server: ServerMaker) -> None:
    server, _ = await make_server(stream_max_inflight=4)
    good = queries(10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        responses = [r async for r in stub.RerankStream(feed(good), timeout=PATIENCE_S)]
        unary = [await stub.Rerank(it.request, timeout=PATIENCE_S) for it in good]
    by_id = {r.id: r.response for r in responses}
    assert sorted(by_id) == sorted(it.id for it in good)
    for it, expected in zip(good, unary, strict=True):
        assert by_id[it.id].score_kind == pb.SCORE_KIND_COSINE
        same_ranking(by_id[it.id], expected)


async def test_items_are_bulk_work_that_unary_calls_go_ahead_of(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig(**HELD)  # one pair per batch, one batch in the engine
    gate = rig.hold()
    batcher = rig.scoring.batcher
    stream_docs = ["stream a", "stream b", "stream c"]
    more = asyncio.Event()
    channel, stub = rig.stub()
    async with channel:
        call = stub.RerankStream(feed([item("s", QUERY, stream_docs)], more), timeout=PATIENCE_S)
        await until(lambda: len(rig.sent()) == 1, "the stream's first pair reached the engine")
        await until(lambda: batcher.queued_items == 2, "its other pairs are queued")
        unary = asyncio.ensure_future(
            stub.Rerank(pb.RerankRequest(query=QUERY, documents=["unary"]), timeout=PATIENCE_S)
        )
        await until(lambda: batcher.queued_items == 3, "the unary call's pair is queued")
        gate.set()
        answered = await asyncio.wait_for(unary, PATIENCE_S)
        more.set()
        (streamed,) = [r async for r in call]
    assert len(answered.results) == 1 and streamed.id == "s"
    assert [r.index for r in streamed.response.results] == [0, 1, 2]
    # The unary call's pair ran before the stream's queued ones, though it came later.
    a, b, c = pairs(pair_tokenizer, QUERY, stream_docs)
    assert rig.sent() == [a, *pairs(pair_tokenizer, QUERY, ["unary"]), b, c]


async def test_an_item_holds_a_slot_per_document_and_a_cancel_drops_its_pairs(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    items = [item(f"i{n}", QUERY, [f"doc {n} a", f"doc {n} b"]) for n in range(5)]
    rig = await make_rig(stream_max_inflight=4, **HELD)
    budget, batcher = rig.server.servicer._streams, rig.scoring.batcher
    gate = rig.hold()
    channel, stub = rig.stub()
    async with channel:
        call = stub.RerankStream(feed(items), timeout=PATIENCE_S)
        # Two items of two documents fill the four slots: one pair in the engine, three
        # queued, and the reader waits (the other items stay in the client's stream).
        await until(lambda: batcher.queued_items == 3, "the first two items' pairs are queued")
        for _ in range(20):
            assert (budget.held, batcher.queued_items, len(rig.sent())) == (4, 3, 1)
            await asyncio.sleep(0.01)
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        await until(lambda: batcher.queued_items == 0, "the cancelled stream's pairs are dropped")
        await until(lambda: rig.scorer.cancelled == 1, "the pair in the engine is cancelled")
        await until(lambda: budget.held == 0, "the cancelled stream's room is freed")
        gate.set()
        probe = await stub.Rerank(
            pb.RerankRequest(query=QUERY, documents=["the probe"]), timeout=PATIENCE_S
        )
    assert len(probe.results) == 1
    first = pairs(pair_tokenizer, QUERY, ["doc 0 a"])
    assert rig.sent() == [*first, *pairs(pair_tokenizer, QUERY, ["the probe"])]


async def test_a_duplicate_id_in_flight_fails_alone(make_rig: RigMaker) -> None:
    rig = await make_rig(**HELD)
    gate = rig.hold()
    more = asyncio.Event()
    channel, stub = rig.stub()
    async with channel:
        requests = asyncio.Queue[pb.RerankStreamRequest | None]()

        async def requests_() -> AsyncIterator[pb.RerankStreamRequest]:
            while (request := await requests.get()) is not None:
                yield request
            await more.wait()

        call = stub.RerankStream(requests_(), timeout=PATIENCE_S)
        requests.put_nowait(item("same", QUERY, ["held"]))
        await until(lambda: len(rig.sent()) == 1, "the first item's pair is in the engine")
        requests.put_nowait(item("same", QUERY, ["again"]))
        refused = await asyncio.wait_for(call.read(), PATIENCE_S)
        assert isinstance(refused, pb.RerankStreamResponse)
        assert refused.id == "same" and refused.error.code == INVALID
        assert "'same' is already in flight on this stream" in refused.error.message
        gate.set()
        answered = await asyncio.wait_for(call.read(), PATIENCE_S)
        assert isinstance(answered, pb.RerankStreamResponse)
        assert answered.id == "same" and answered.HasField("response")
        # Answered, the id is free again.
        requests.put_nowait(item("same", QUERY, ["once more"]))
        again = await asyncio.wait_for(call.read(), PATIENCE_S)
        assert isinstance(again, pb.RerankStreamResponse) and again.HasField("response")
        requests.put_nowait(None)
        more.set()
        assert await call.read() is grpc.aio.EOF


async def test_the_clients_rerank_stream(make_rig: RigMaker, pair_tokenizer: Tokenizer) -> None:
    from embedding_client import AsyncEmbeddingClient, EmbeddingClient, RerankStreamResult

    rig = await make_rig(stream_max_inflight=8)
    address = f"127.0.0.1:{rig.server.port}"
    items = [(f"q{i}", f"{QUERY} {i}", DOCS) for i in range(6)]
    async with AsyncEmbeddingClient(address) as client:
        expected = {i: await client.rerank(q, d, top_k=2) for i, q, d in items}
        got = [r async for r in client.rerank_stream([*items, ("bad", "", DOCS)], top_k=2)]

    def blocking() -> list[RerankStreamResult]:
        with EmbeddingClient(address) as sync:
            return list(sync.rerank_stream(iter(items), top_k=2, return_documents=True))

    by_id = {r.id: r for r in got}
    assert sorted(by_id) == sorted([*expected, "bad"])
    for i, ranking in expected.items():
        assert by_id[i].ok and by_id[i].ranking == ranking
    assert not by_id["bad"].ok and by_id["bad"].ranking is None
    assert by_id["bad"].error is not None and by_id["bad"].error.message.startswith("query:")
    synced = await asyncio.to_thread(blocking)
    assert sorted(r.id for r in synced) == sorted(expected)
    for r in synced:
        assert r.ranking is not None
        assert [x.index for x in r.ranking.results] == [x.index for x in expected[r.id].results]
        assert [x.document for x in r.ranking.results] == [DOCS[x.index] for x in r.ranking.results]
