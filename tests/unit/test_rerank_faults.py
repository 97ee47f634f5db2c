"""The rerank path keeps the service's reliability rules (issue 20): the real grpc.aio server
and HTTP face, a cross-encoder reranker beside the embedding model, both on fake engines.

The scorer is a FakeEngine too: the Reranker reads row[0] of each pair's vector as the
pair's logit, so fake_vector on the pair's ids gives every expected score. Tests that hold
the scorer run it with max_inflight_batches=1 and rerank_max_batch_tokens=1: one pair per
batch and one batch in the engine, so while the engine holds a "blocker" pair every later
pair waits in the rerank model's queue, where the tests can count it.

No assertion is on time: gates decide when the engine answers, and waits are bounded only
to turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.batching import Priority
from service.config import ServiceConfig
from service.server import SERVICE_NAME, EmbeddingServer, ScoringParts
from tests.fakes import FakeEngine, factory, fake_vector
from tests.models.tiny_bert_reranker import build_tiny_bert_reranker
from tests.servers import free_port
from tests.unit.test_server_faults import until

# Bounds on RPCs and condition polls: only a hang reaches them. Where a test is about a
# deadline, it sets its own.
PATIENCE_S = 60.0
RERANKER = "tiny-bert-reranker"  # the model folder's name: the rerank model's served name
# One pair per batch, one batch in the engine: whatever the engine holds, the rest queues.
HELD = {"max_inflight_batches": 1, "rerank_max_batch_tokens": 1}
QUERY = "where does the river flow"
DOCS = ["The Seine flows through Paris.", "Bananas are yellow.", "Rivers flow to the sea."]
LONG = "A document far longer than the window of the fake engine, cut to fit it. " * 60


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert_reranker(tmp_path_factory.mktemp("rerank") / RERANKER, weights=False)


@pytest.fixture(scope="module")
def pair_tokenizer(reranker_dir: Path) -> Tokenizer:
    """The reranker's own tokenizer: its pair template is what the server must send."""
    tokenizer = Tokenizer.from_file(str(reranker_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


@dataclass
class Rig:
    server: EmbeddingServer
    embedder: FakeEngine
    scorer: FakeEngine
    warm_up: int  # batches the scorer ran while the server started (its warm-up call)
    stopped: bool = False

    @property
    def scoring(self) -> ScoringParts:
        components = self.server._components
        assert components is not None and components.scoring is not None
        return components.scoring

    def sent(self) -> list[list[int]]:
        """Every pair the scorer engine received since the server started, in order."""
        return [ids for batch in self.scorer.batches[self.warm_up :] for ids in batch]

    def hold(self) -> asyncio.Event:
        """From now on the scorer keeps each batch until the returned event is set."""
        self.scorer.gate = asyncio.Event()
        return self.scorer.gate

    def stub(self) -> tuple[grpc.aio.Channel, pb_grpc.EmbeddingServiceAsyncStub]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
        return channel, pb_grpc.EmbeddingServiceStub(channel)

    def http(self) -> httpx.AsyncClient:
        base = f"http://127.0.0.1:{self.server.http_port}"
        return httpx.AsyncClient(base_url=base, timeout=PATIENCE_S)


RigMaker = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(reranker_dir: Path) -> AsyncIterator[RigMaker]:
    rigs: list[Rig] = []

    async def make(**settings: Any) -> Rig:
        embedder, scorer = FakeEngine(), FakeEngine()
        settings.setdefault("metrics_port", 0)  # no shared port to collide on
        config = ServiceConfig(
            port=0,
            http_port=free_port(),
            grace_s=1.0,
            rerank_model=str(reranker_dir),
            **settings,
        )
        server = EmbeddingServer(
            config,
            factory(embedder),  # type: ignore[arg-type]
            scorer_factory=factory(scorer),  # type: ignore[arg-type]
        )
        await server.start()
        rig = Rig(server, embedder, scorer, warm_up=len(scorer.batches))
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        if rig.scorer.gate is not None:
            rig.scorer.gate.set()
        if not rig.stopped:
            await rig.server.stop(grace_s=0)


def pairs(tokenizer: Tokenizer, query: str, documents: Sequence[str]) -> list[list[int]]:
    """The ids of each (query, document) pair, as the tokenizer's own template builds them."""
    return [list(tokenizer.encode(query, d).ids) for d in documents]


def logits(pair_ids: Sequence[Sequence[int]]) -> npt.NDArray[np.float64]:
    """What the fake scorer answers for each pair: row[0] of its vector."""
    return np.array([float(fake_vector(ids)[0]) for ids in pair_ids])


def sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-x))
    return result


def retry_info(err: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            for detail in status_pb2.Status.FromString(value).details:
                retry = error_details_pb2.RetryInfo()
                if detail.Unpack(retry):
                    return retry
    raise AssertionError(f"no RetryInfo in {err}")


async def health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PATIENCE_S)
        return int(reply.status)


def rerank(
    stub: pb_grpc.EmbeddingServiceAsyncStub,
    documents: Sequence[str],
    query: str = QUERY,
    timeout: float = PATIENCE_S,
) -> asyncio.Future[pb.RerankResponse]:
    """A Rerank call, started now."""
    request = pb.RerankRequest(query=query, documents=documents)
    return asyncio.ensure_future(stub.Rerank(request, timeout=timeout))


async def block(
    rig: Rig, stub: pb_grpc.EmbeddingServiceAsyncStub
) -> asyncio.Future[pb.RerankResponse]:
    """A one-document Rerank whose pair the (held) scorer engine keeps."""
    call = rerank(stub, ["the blocker"])
    await until(lambda: len(rig.sent()) == 1, "the blocker's pair reached the engine")
    return call


async def post_and_leave(port: int, body: dict[str, Any]) -> asyncio.StreamWriter:
    """POST /v1/rerank on a raw connection that the caller closes to leave."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/rerank HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    return writer


# ------------------------------------------------------------------------ 1. the scores


async def test_rerank_scores_are_the_cross_encoders_sigmoid_on_both_faces(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig()
    expected_ids = pairs(pair_tokenizer, QUERY, DOCS)
    raw = logits(expected_ids)
    embedded = len(rig.embedder.batches)
    channel, stub = rig.stub()
    async with channel:
        reply = await stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCS), timeout=PATIENCE_S)
    # One engine item per document, each the tokenizer's own pair, to the scorer only.
    assert rig.sent() == expected_ids
    assert len(rig.embedder.batches) == embedded
    assert reply.score_kind == pb.SCORE_KIND_CROSS_ENCODER
    assert reply.model == RERANKER
    assert [r.index for r in reply.results] == [0, 1, 2]  # top_k 0: document order
    np.testing.assert_allclose([r.raw_score for r in reply.results], raw, rtol=1e-6)
    np.testing.assert_allclose(
        [r.relevance_score for r in reply.results], sigmoid(raw), rtol=1e-6, atol=1e-7
    )
    assert reply.usage.prompt_tokens == sum(len(ids) for ids in expected_ids)

    async with rig.http() as http:
        answer = await http.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": True}
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert rig.sent() == expected_ids * 2
    assert body["score_kind"] == "cross-encoder"
    assert body["model"] == RERANKER
    best_first = np.argsort(-raw, kind="stable").tolist()
    assert [r["index"] for r in body["results"]] == best_first
    np.testing.assert_allclose(
        [r["relevance_score"] for r in body["results"]], sigmoid(raw)[best_first], rtol=1e-6
    )
    assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in best_first]
    assert answer.headers["x-truncated-inputs"] == "0"


# -------------------------------------------------------------------------------- 2. 429


async def test_a_full_rerank_queue_refuses_at_once_while_embeddings_keep_serving(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig(max_queue_items=4, **HELD)
    gate = rig.hold()
    batcher = rig.scoring.batcher
    channel, stub = rig.stub()
    async with channel, rig.http() as http:
        blocker = await block(rig, stub)
        filler_docs = [f"filler {i}" for i in range(4)]
        filler = rerank(stub, filler_docs)
        await until(lambda: batcher.queued_items == 4, "the filler's pairs fill the queue")

        # One more pair does not fit: refused at once, with advice on when to retry.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(pb.RerankRequest(query=QUERY, documents=["one more"]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in str(caught.value.details())
        assert retry_info(caught.value).retry_delay.ToTimedelta().total_seconds() > 0
        refused = await http.post("/v1/rerank", json={"query": QUERY, "documents": ["one more"]})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        # More documents than the queue holds at all: refused too, never queued.
        with pytest.raises(grpc.aio.AioRpcError) as never:
            await stub.Rerank(
                pb.RerankRequest(query=QUERY, documents=[f"d{i}" for i in range(5)]), timeout=30
            )
        assert never.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "can never be admitted" in str(never.value.details())
        assert batcher.queued_items == 4

        # The embedding model has a queue of its own: with the rerank queue full (and the
        # same max_queue_items), embeddings are served on both faces.
        embedded = await stub.Embed(
            pb.EmbedRequest(inputs=["an embedding meanwhile"]), timeout=PATIENCE_S
        )
        assert len(embedded.embeddings) == 1
        http_embedded = await http.post("/v1/embeddings", json={"input": "over HTTP too"})
        assert http_embedded.status_code == 200, http_embedded.text

        gate.set()
        first, rest = await asyncio.wait_for(asyncio.gather(blocker, filler), PATIENCE_S)
    assert len(first.results) == 1 and len(rest.results) == 4
    assert batcher.queued_items == 0
    # The refused calls' pairs never reached the engine.
    assert rig.sent() == pairs(pair_tokenizer, QUERY, ["the blocker", *filler_docs])


# ---------------------------------------------------------------------------- 3. deadlines


async def test_a_deadline_shorter_than_the_rerank_queues_wait_is_refused_at_once(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig(**HELD)
    gate = rig.hold()
    batcher = rig.scoring.batcher
    deadline_s = 20.0
    channel, stub = rig.stub()
    async with channel:
        blocker = await block(rig, stub)
        # Sixty window-long pairs queue behind the held engine: one batch each.
        backlog = rerank(stub, [LONG] * 60)
        await until(lambda: batcher.queued_items == 60, "the backlog is queued")
        # The premise: the queue's own estimate of the wait is well past the deadline (each
        # batch counts at least 0.8 of the 10 ms prior latency: ~120 s here).
        assert batcher.estimated_wait_s(Priority.INTERACTIVE) > 2 * deadline_s
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(
                pb.RerankRequest(query=QUERY, documents=["too late", "anyway"]), timeout=deadline_s
            )
        # Refused by the server at once (not timed out by the client), before queueing.
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "shorter than the expected wait" in str(caught.value.details())
        assert batcher.queued_items == 60
        gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, backlog), PATIENCE_S)
    refused = pairs(pair_tokenizer, QUERY, ["too late", "anyway"])
    assert len(rig.sent()) == 61
    assert not [ids for ids in rig.sent() if ids in refused]


async def test_a_rerank_whose_deadline_passes_in_the_queue_leaves_no_work(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig(**HELD)
    gate = rig.hold()
    batcher = rig.scoring.batcher
    channel, stub = rig.stub()
    async with channel:
        blocker = await block(rig, stub)
        # Long enough to pass the early check (nothing is queued), short enough to pass
        # while its pairs wait behind the held engine.
        late = rerank(stub, ["waits", "in vain"], timeout=5.0)
        await until(lambda: batcher.queued_items == 2, "its pairs are queued")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(late, PATIENCE_S)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: batcher.queued_items == 0, "its pairs are dropped from the queue")
        gate.set()
        await asyncio.wait_for(blocker, PATIENCE_S)
        # A later call's pairs go next: had the dropped ones stayed, they would go first.
        probe = await asyncio.wait_for(rerank(stub, ["the probe"]), PATIENCE_S)
    assert len(probe.results) == 1
    assert rig.sent() == pairs(pair_tokenizer, QUERY, ["the blocker", "the probe"])


# --------------------------------------------------------------------- 4. callers who leave


async def test_callers_that_leave_drop_their_queued_pairs(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig(**HELD)
    gate = rig.hold()
    batcher = rig.scoring.batcher
    channel, stub = rig.stub()
    async with channel:
        blocker = await block(rig, stub)
        # A gRPC caller that cancels its call.
        call = stub.Rerank(
            pb.RerankRequest(query=QUERY, documents=["grpc a", "grpc b", "grpc c"]),
            timeout=PATIENCE_S,
        )
        await until(lambda: batcher.queued_items == 3, "the gRPC call's pairs are queued")
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        await until(lambda: batcher.queued_items == 0, "the cancelled call's pairs are dropped")
        # An HTTP client that disconnects.
        writer = await post_and_leave(
            rig.server.http_port, {"query": QUERY, "documents": ["http a", "http b", "http c"]}
        )
        await until(lambda: batcher.queued_items == 3, "the HTTP call's pairs are queued")
        writer.close()
        await writer.wait_closed()
        await until(lambda: batcher.queued_items == 0, "the gone client's pairs are dropped")
        gate.set()
        await asyncio.wait_for(blocker, PATIENCE_S)
        probe = await asyncio.wait_for(rerank(stub, ["the probe"]), PATIENCE_S)
    assert len(probe.results) == 1
    assert rig.sent() == pairs(pair_tokenizer, QUERY, ["the blocker", "the probe"])


# ------------------------------------------------------------------------ 5. engine death


async def test_a_dead_scorer_turns_health_not_serving_and_rerank_unavailable(
    make_rig: RigMaker,
) -> None:
    rig = await make_rig(**HELD)
    server = rig.server
    gate = rig.hold()
    channel, stub = rig.stub()
    async with channel, rig.http() as http:
        assert await health(server.port, "") == health_pb2.HealthCheckResponse.SERVING
        blocker = await block(rig, stub)
        queued = rerank(stub, ["queued behind"])
        await until(lambda: rig.scoring.batcher.queued_items == 1, "a pair is queued")
        rig.scorer.dead = True
        # HTTP readiness asks every engine directly: not ready at once.
        ready = await http.get("/health")
        assert ready.status_code == 503, ready.text
        # The pair in the engine and the one queued behind it both fail as unavailable.
        gate.set()
        for call in (blocker, queued):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(call, PATIENCE_S)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # The watchdog sees the scorer's death, though the embedding engine lives on.
        assert rig.embedder.alive
        reason = await asyncio.wait_for(server.watch_engine(interval_s=0.05), PATIENCE_S)
        assert "died" in reason
        await server.fail(reason)
        for service in ("", SERVICE_NAME, "liveness"):
            status = await health(server.port, service)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(pb.RerankRequest(query=QUERY, documents=["d"]), timeout=PATIENCE_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        refused = await http.post("/v1/rerank", json={"query": QUERY, "documents": ["d"]})
        assert refused.status_code == 503, refused.text
        assert "retry-after" in refused.headers


async def test_a_hung_scorer_is_caught_by_the_watchdog(make_rig: RigMaker) -> None:
    rig = await make_rig(engine_timeout_s=0.3)
    server = rig.server
    rig.scorer.hang = True
    channel, stub = rig.stub()
    async with channel:
        call = rerank(stub, ["never answered"])
        reason = await asyncio.wait_for(server.watch_engine(interval_s=0.05), PATIENCE_S)
        assert "has run for over" in reason
        await server.fail(reason)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call, PATIENCE_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rig.scorer.cancelled == 1  # the hung batch was aborted
    assert await health(server.port, "") == health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------------------------- 6. drain


async def test_drain_refuses_new_reranks_and_finishes_those_in_flight(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig(**HELD)
    server = rig.server
    gate = rig.hold()
    channel, stub = rig.stub()
    async with channel, rig.http() as http:
        blocker = await block(rig, stub)  # in the engine
        in_flight_http = asyncio.ensure_future(
            http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        )
        await until(lambda: rig.scoring.batcher.queued_items == 3, "the HTTP call is queued")

        rig.stopped = True
        stopping = asyncio.ensure_future(server.stop(grace_s=PATIENCE_S))
        await until(lambda: not server.gate.serving, "the drain began")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Rerank(pb.RerankRequest(query=QUERY, documents=["new"]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        refused = await http.post("/v1/rerank", json={"query": QUERY, "documents": ["new"]})
        assert refused.status_code == 503, refused.text
        assert "draining" in refused.json()["error"]["message"]
        assert not stopping.done()  # it waits for the calls in flight

        gate.set()
        first = await asyncio.wait_for(blocker, PATIENCE_S)
        answered = await asyncio.wait_for(in_flight_http, PATIENCE_S)
        await asyncio.wait_for(stopping, PATIENCE_S)
    assert first.score_kind == pb.SCORE_KIND_CROSS_ENCODER and len(first.results) == 1
    assert answered.status_code == 200, answered.text
    assert sorted(r["index"] for r in answered.json()["results"]) == [0, 1, 2]
    assert rig.sent() == pairs(pair_tokenizer, QUERY, ["the blocker", *DOCS])


# ----------------------------------------------------------------------- 7. both models


async def test_model_info_and_models_list_both_models_with_their_kinds(
    make_rig: RigMaker,
) -> None:
    rig = await make_rig(
        served_model_name="embedder,embedder-alias",
        rerank_served_model_name="ranker,ranker-alias",
    )
    channel, stub = rig.stub()
    async with channel, rig.http() as http:
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=PATIENCE_S)
        listed = await http.get("/v1/models")
        by_alias = await stub.Rerank(
            pb.RerankRequest(query=QUERY, documents=DOCS, model="ranker-alias"),
            timeout=PATIENCE_S,
        )
        by_embedder = await stub.Rerank(
            pb.RerankRequest(query=QUERY, documents=DOCS, model="embedder"), timeout=PATIENCE_S
        )
    assert info.model == "embedder"
    assert [(list(m.names), m.kind, m.max_input_tokens) for m in info.models] == [
        (["embedder", "embedder-alias"], "embed", 256),
        (["ranker", "ranker-alias"], "score", 256),
    ]
    assert listed.status_code == 200, listed.text
    assert [(card["id"], card["kind"]) for card in listed.json()["data"]] == [
        ("embedder", "embed"),
        ("embedder-alias", "embed"),
        ("ranker", "score"),
        ("ranker-alias", "score"),
    ]
    # Each name reaches its own model: the reranker's alias scores with the cross-encoder,
    # the embedding model's name ranks by cosine.
    assert by_alias.score_kind == pb.SCORE_KIND_CROSS_ENCODER and by_alias.model == "ranker"
    assert by_embedder.score_kind == pb.SCORE_KIND_COSINE and by_embedder.model == "embedder"


async def test_a_rerank_only_server_ranks_and_says_why_it_cannot_embed(
    make_rig: RigMaker, pair_tokenizer: Tokenizer
) -> None:
    rig = await make_rig(model="", rerank_max_batch_tokens=512)
    assert rig.embedder.batches == []  # no embedding engine was loaded, nor warmed
    raw = logits(pairs(pair_tokenizer, QUERY, DOCS))
    channel, stub = rig.stub()
    health_stub = health_pb2_grpc.HealthStub(channel)
    async with channel, rig.http() as http:
        health = await health_stub.Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=PATIENCE_S
        )
        reply = await stub.Rerank(pb.RerankRequest(query=QUERY, documents=DOCS), timeout=PATIENCE_S)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=PATIENCE_S)
        listed = await http.get("/v1/models")
        ranked = await http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        embedded = await http.post("/v1/embeddings", json={"input": "hello"})
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Embed(pb.EmbedRequest(inputs=["hello"]), timeout=PATIENCE_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert reply.score_kind == pb.SCORE_KIND_CROSS_ENCODER and reply.model == RERANKER
    np.testing.assert_allclose([r.raw_score for r in reply.results], raw, rtol=1e-6)
    assert ranked.status_code == 200, ranked.text
    assert ranked.json()["model"] == RERANKER
    # No embedding model: the top-level facts are empty, the one model is listed.
    assert info.model == "" and info.dimension == 0
    assert [(list(m.names), m.kind) for m in info.models] == [([RERANKER], "score")]
    assert info.limits.max_batch_tokens == 512  # the rerank model's batcher's, as enforced
    assert [(c["id"], c["kind"]) for c in listed.json()["data"]] == [(RERANKER, "score")]
    message = (
        f"model: this server serves no embedding model, only the rerank model {RERANKER!r};"
        " this task needs one (start the server with --model)"
    )
    assert embedded.status_code == 400, embedded.text
    assert embedded.json()["error"]["message"] == message
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == message
