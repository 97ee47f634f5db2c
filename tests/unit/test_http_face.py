"""The HTTP face on the real server (uvicorn beside grpc.aio) with a fake engine: its
translations, every error status in OpenAI's shape, and the faults that need injecting."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc.aio
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.config import ServiceConfig
from service.server import EmbeddingServer
from tests.fakes import FakeEngine, factory
from tests.servers import free_port

MODEL = "fake"  # the fake engine's model name
ALIAS = "fake-alias"  # another name it answers to
ServerMaker = Callable[..., Awaitable[tuple[EmbeddingServer, FakeEngine]]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerMaker]:
    servers: list[EmbeddingServer] = []

    async def make(
        engine: FakeEngine | None = None, **settings: Any
    ) -> tuple[EmbeddingServer, FakeEngine]:
        engine = engine or FakeEngine()
        settings.setdefault("served_model_name", f"{MODEL},{ALIAS}")
        config = ServiceConfig(port=0, http_port=free_port(), grace_s=1.0, **settings)
        server = EmbeddingServer(config, factory(engine))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server, engine

    yield make
    for server in servers:
        await server.stop(grace_s=0)


def _http(server: EmbeddingServer, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", **kwargs)


async def _grpc_embed(server: EmbeddingServer, request: pb.EmbedRequest) -> pb.EmbedResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply: pb.EmbedResponse = await pb_grpc.EmbeddingServiceStub(channel).Embed(
            request, timeout=10
        )
        return reply


def _error(reply: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error object of `reply`, after checking its status and shape."""
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


async def _still_serving(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/embeddings", json={"input": "still here"})
    assert reply.status_code == 200, reply.text


async def test_vectors_are_the_grpc_vectors_in_every_format(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    texts = ["first text", "second text", "third"]
    grpc_f32 = await _grpc_embed(server, pb.EmbedRequest(inputs=texts))
    expected = np.stack([np.frombuffer(e.data, "<f4") for e in grpc_f32.embeddings])
    async with _http(server) as http:
        floats = (await http.post("/v1/embeddings", json={"input": texts, "model": MODEL})).json()
        b64 = (
            await http.post("/embeddings", json={"input": texts, "encoding_format": "base64"})
        ).json()
        sliced = (await http.post("/v1/embeddings", json={"input": texts, "dimensions": 64})).json()
    assert floats["object"] == "list" and floats["model"] == MODEL
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in floats["data"])
    np.testing.assert_array_equal(
        np.array([d["embedding"] for d in floats["data"]], "f4"), expected
    )
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]]
    np.testing.assert_array_equal(np.stack(decoded), expected)
    grpc_64 = await _grpc_embed(
        server, pb.EmbedRequest(inputs=texts, options=pb.EmbedOptions(dimensions=64))
    )
    np.testing.assert_array_equal(
        np.array(sliced["data"][0]["embedding"], "f4"),
        np.frombuffer(grpc_64.embeddings[0].data, "<f4"),
    )
    tokens = grpc_f32.usage.prompt_tokens
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize(
    ("encoding", "wire", "dtype"),
    [
        ("float16", pb.ENCODING_FLOAT16, "<f2"),
        ("int8", pb.ENCODING_INT8, "i1"),
        ("binary", pb.ENCODING_BINARY, "u1"),
    ],
)
async def test_other_encodings_as_numbers_and_base64(
    make_server: ServerMaker, encoding: str, wire: int, dtype: str
) -> None:
    server, _ = await make_server()
    grpc_reply = await _grpc_embed(
        server,
        pb.EmbedRequest(inputs=["a text"], options=pb.EmbedOptions(encoding=wire)),  # type: ignore[arg-type]
    )
    want = grpc_reply.embeddings[0]
    async with _http(server) as http:
        numbers = (
            await http.post("/v1/embeddings", json={"input": "a text", "encoding": encoding})
        ).json()
        packed = (
            await http.post(
                "/v1/embeddings",
                json={"input": "a text", "encoding": encoding, "encoding_format": "base64"},
            )
        ).json()
    np.testing.assert_array_equal(
        np.array(numbers["data"][0]["embedding"], dtype), np.frombuffer(want.data, dtype)
    )
    assert base64.b64decode(packed["data"][0]["embedding"]) == want.data
    if encoding == "int8":
        assert numbers["data"][0]["scale"] == pytest.approx(want.scale)


async def test_token_id_inputs_on_both_faces(make_server: ServerMaker) -> None:
    server, engine = await make_server(vector_cache_mb=0)  # each face must reach the engine
    ids = [101, 7592, 2088, 102]
    grpc_reply = await _grpc_embed(server, pb.EmbedRequest(tokens=[pb.TokenIds(ids=ids)]))
    async with _http(server) as http:
        one = (await http.post("/v1/embeddings", json={"input": ids})).json()
        many = (await http.post("/v1/embeddings", json={"input": [ids, ids[:3]]})).json()
    assert engine.batches[-2] == [ids] and engine.batches[-1] == [ids, ids[:3]]
    want = np.frombuffer(grpc_reply.embeddings[0].data, "<f4")
    np.testing.assert_array_equal(np.array(one["data"][0]["embedding"], "f4"), want)
    np.testing.assert_array_equal(np.array(many["data"][0]["embedding"], "f4"), want)
    assert one["usage"]["prompt_tokens"] == 4 and many["usage"]["prompt_tokens"] == 7


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"input": "x", "dimensions": "64"}', "dimensions", "expected int"),
        (b'{"input": 5}', "input", "must be a string"),
        (b'{"input": ["a", 7]}', "input[1]", "must be a str"),
        (b'{"input": [[1, 2], [3, "x"]]}', "input[1]", "integer token ids"),
        (b'{"input": ""}', "input[0]", "empty"),
        (b'{"input": []}', "input", "at least one"),
        (b'{"model": "fake"}', "input", "required"),
        (b'{"input": "x", "dimensions": 0}', "dimensions", "range of 32 to 384"),
        (b'{"input": "x", "dimensions": 999}', "dimensions", "range of 32 to 384"),
        (b'{"input": "x", "encoding_format": "hex"}', "encoding_format", "float or base64"),
        (b'{"input": "x", "encoding": "int4"}', "encoding", "int8"),
        (b'{"input": "x", "truncate": "middle"}', "truncate", "refuse, end, start"),
        (b'{"input": "x", "input_type": "passage"}', "input_type", "query or document"),
        (b'{"input": [[101, 40000, 102]]}', "input[0]", "vocabulary of 30522"),
        (b'{"input": [[]]}', "input[0]", "no token ids"),
        (b'{"input": [101, 102], "instruction": "x"}', "instruction", "token-id inputs"),
        (b'{"input": "x", "instruction": "find"}', "instruction", "no instruction format"),
    ],
)
async def test_bad_requests_are_400_in_openai_shape(
    make_server: ServerMaker, body: bytes, param: str | None, words: str
) -> None:
    server, _ = await make_server()
    async with _http(server) as http:
        reply = await http.post("/v1/embeddings", content=body)
        error = _error(reply, 400)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param
        assert words in error["message"], error["message"]
        await _still_serving(http)


# Over the fake model's window of 256 tokens, with different words at either end.
LONG_TEXT = "first " + "word " * 400 + "last"


async def test_limits_name_the_index_and_the_limit(make_server: ServerMaker) -> None:
    server, _ = await make_server(max_inputs_per_request=8)
    async with _http(server) as http:
        error = _error(await http.post("/v1/embeddings", json={"input": ["t"] * 9}), 400)
        assert error["param"] == "input" and "9 texts exceed the limit of 8" in error["message"]
        assert error["code"] == "too_many_inputs"
        body = {"input": ["ok", LONG_TEXT], "truncate": "refuse"}
        error = _error(await http.post("/v1/embeddings", json=body), 400)
        assert error["param"] == "input[1]" and "limit of 256" in error["message"]
        assert error["code"] == "input_too_long"
        await _still_serving(http)


async def test_inputs_over_the_window_are_cut_by_default_and_flagged(
    make_server: ServerMaker,
) -> None:
    """Open WebUI never sends `truncate`: its long chunks are cut, and the answer says so."""
    server, engine = await make_server(vector_cache_mb=0)
    async with _http(server) as http:
        reply = await http.post("/v1/embeddings", json={"input": ["short", LONG_TEXT]})
        assert reply.status_code == 200, reply.text
        assert sorted(len(ids) for ids in engine.batches[-1]) == [3, 256]
        start = await http.post("/v1/embeddings", json={"input": LONG_TEXT, "truncate": "start"})
        whole = await http.post("/v1/embeddings", json={"input": ["short", "also short"]})
        tokenized = await http.post("/tokenize", json={"input": LONG_TEXT})
    assert reply.headers["x-truncated-inputs"] == "1"
    short, cut = reply.json()["data"]
    assert "truncated" not in short and cut["truncated"] is True
    assert start.json()["data"][0]["truncated"] is True
    assert start.json()["data"][0]["embedding"] != cut["embedding"]  # the other end was kept
    assert whole.headers["x-truncated-inputs"] == "0"
    assert not any("truncated" in item for item in whole.json()["data"])
    assert tokenized.json()["data"][0]["truncated"] is True
    assert len(tokenized.json()["data"][0]["tokens"]) == 256


async def test_the_server_default_for_truncation_is_configurable(make_server: ServerMaker) -> None:
    server, _ = await make_server(http_truncate="refuse")
    async with _http(server) as http:
        error = _error(await http.post("/v1/embeddings", json={"input": LONG_TEXT}), 400)
        assert error["param"] == "input[0]" and "limit of 256" in error["message"]
        whole = (await http.post("/tokenize", json={"input": LONG_TEXT})).json()["data"][0]
        assert len(whole["tokens"]) == 404 and not whole["truncated"]  # refused: counted whole
        cut = await http.post("/v1/embeddings", json={"input": LONG_TEXT, "truncate": "end"})
        assert cut.json()["data"][0]["truncated"] is True
        # Rerank's documents are cut all the same: a refusal would fail the whole search.
        ranked = await http.post("/v1/rerank", json={"query": "q", "documents": [LONG_TEXT]})
        assert ranked.status_code == 200 and ranked.headers["x-truncated-inputs"] == "1"


async def test_every_served_name_is_accepted_and_listed(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    async with _http(server) as http:
        models = (await http.get("/v1/models")).json()
        for name in (MODEL, ALIAS):
            reply = await http.post("/v1/embeddings", json={"input": "x", "model": name})
            assert reply.status_code == 200 and reply.json()["model"] == MODEL
    assert [card["id"] for card in models["data"]] == [MODEL, ALIAS]
    assert all(card["max_model_len"] == 256 for card in models["data"])


async def test_unknown_model_is_404_model_not_found(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    async with _http(server) as http:
        error = _error(await http.post("/v1/embeddings", json={"input": "x", "model": "gpt"}), 404)
        assert (error["param"], error["code"]) == ("model", "model_not_found")
        assert repr(MODEL) in error["message"] and repr(ALIAS) in error["message"]
        for route in ("/v1/rerank", "/tokenize"):
            body = {"model": "gpt", "query": "q", "documents": ["d"], "input": "x"}
            assert _error(await http.post(route, json=body), 404)["code"] == "model_not_found"
        await _still_serving(http)


async def test_body_over_the_limit_is_413(make_server: ServerMaker) -> None:
    server, _ = await make_server(max_request_bytes=4096)
    async with _http(server) as http:
        big = {"input": ["x" * 1000] * 8}
        assert "4096 bytes" in _error(await http.post("/v1/embeddings", json=big), 413)["message"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            yield b'{"input": ["'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"]}'

        assert _error(await http.post("/v1/embeddings", content=chunks()), 413)
        await _still_serving(http)


async def test_queue_full_is_429_with_retry_after(make_server: ServerMaker) -> None:
    server, _ = await make_server(
        FakeEngine(delay_s=0.05),
        vector_cache_mb=0,  # the same texts every call: the cache would answer them
        max_batch_tokens=256,
        max_queue_tokens=256,
        max_request_tokens=256,
        max_queue_items=40,
        max_batch_items=8,
    )
    async with _http(server, timeout=30) as http:
        body = {"input": [f"flood text number {i}" for i in range(4)]}
        replies = await asyncio.gather(
            *(http.post("/v1/embeddings", json=body) for _ in range(150))
        )
        statuses = {r.status_code for r in replies}
        assert statuses == {200, 429}
        refused = next(r for r in replies if r.status_code == 429)
        error = _error(refused, 429)
        assert error["type"] == "rate_limit_error" and "queue full" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert int(refused.headers["retry-after-ms"]) >= 1
        await _still_serving(http)
    assert server._components is not None and server._components.batchers[0].queued_items == 0


async def test_loading_and_draining_are_503() -> None:
    engine = FakeEngine(delay_s=0.5)
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_factory(config: ServiceConfig, path: Path, name: str) -> FakeEngine:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
        return engine

    config = ServiceConfig(port=0, http_port=free_port(), grace_s=5.0)
    server = EmbeddingServer(config, slow_factory)
    starting = asyncio.create_task(server.start())
    for _ in range(100):  # until the HTTP port listens
        if server.http_port:
            break
        await asyncio.sleep(0.05)
    async with _http(server, timeout=10) as http:
        loading = await http.post("/v1/embeddings", json={"input": "x"})
        assert "loading" in _error(loading, 503)["message"]
        assert loading.headers["retry-after"] == "1"
        assert (await http.get("/health")).status_code == 503
        release.set()
        await starting
        assert (await http.get("/health")).status_code == 200
        # Drain: the call in flight finishes, /health and new calls get 503 at once.
        in_flight = asyncio.create_task(http.post("/v1/embeddings", json={"input": "slow"}))
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.1)
        assert (await http.get("/health")).status_code == 503
        draining = await http.post("/v1/embeddings", json={"input": "new"})
        assert "draining" in _error(draining, 503)["message"]
        assert (await in_flight).status_code == 200
        await stopping


async def test_engine_death_is_503_and_health_says_so(make_server: ServerMaker) -> None:
    server, engine = await make_server(FakeEngine(delay_s=0.3))
    async with _http(server, timeout=10) as http:
        call = asyncio.create_task(http.post("/v1/embeddings", json={"input": "x"}))
        await asyncio.sleep(0.1)
        engine.dead = True
        assert "engine" in _error(await call, 503)["message"]
        await server.fail(await asyncio.wait_for(server.watch_engine(interval_s=0.05), 5))
        assert (await http.get("/health")).status_code == 503
        assert (
            "engine failed"
            in _error(await http.post("/v1/embeddings", json={"input": "y"}), 503)["message"]
        )


async def test_api_keys(make_server: ServerMaker) -> None:
    server, _ = await make_server(api_keys="alpha-key,beta-key")
    async with _http(server) as http:
        for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer nope"}):
            reply = await http.post("/v1/embeddings", json={"input": "x"}, headers=headers)
            error = _error(reply, 401)
            assert error["code"] == "invalid_api_key" and "alpha" not in reply.text
            assert reply.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/v1/models")).status_code == 401
        ok = await http.post(
            "/v1/embeddings", json={"input": "x"}, headers={"authorization": "Bearer beta-key"}
        )
        assert ok.status_code == 200
        ok = await http.post(
            "/v1/embeddings", json={"input": "x"}, headers={"x-api-key": "alpha-key"}
        )
        assert ok.status_code == 200
        assert (await http.get("/health")).status_code == 200  # probes carry no key


async def test_a_client_that_disconnects_releases_its_work(make_server: ServerMaker) -> None:
    engine = FakeEngine()
    engine.gate = gate = asyncio.Event()  # holds every batch until set
    gate.set()  # the warm-up call
    server, _ = await make_server(engine, max_inflight_batches=1)
    gate.clear()
    batcher = server._components.batchers[0] if server._components else None
    assert batcher is not None
    async with _http(server, timeout=0.5) as http:
        with pytest.raises(httpx.TimeoutException):  # in the engine: its batch is aborted
            await http.post("/v1/embeddings", json={"input": "first"})
        for _ in range(50):
            if engine.cancelled:
                break
            await asyncio.sleep(0.02)
        assert engine.cancelled == 1 and batcher.inflight_batches == 0
        blocker = asyncio.create_task(http.post("/v1/embeddings", json={"input": "blocks"}))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.TimeoutException):  # queued behind it: dropped from the queue
            await http.post("/v1/embeddings", json={"input": ["queued"] * 5})
        for _ in range(50):
            if batcher.queued_items == 0:
                break
            await asyncio.sleep(0.02)
        assert batcher.queued_items == 0
        blocker.cancel()
    gate.set()


async def test_a_client_gone_mid_body_is_recorded_499_not_500(
    make_server: ServerMaker, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = await make_server()

    def statuses() -> list[str]:
        return [r.getMessage().split()[2] for r in caplog.records if r.name == "service.http"]

    with caplog.at_level(logging.DEBUG, logger="service.http"):
        _, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{")
        await writer.drain()
        writer.close()
        async with asyncio.timeout(30):
            while not statuses():  # noqa: ASYNC110 - the server writes the line
                await asyncio.sleep(0.02)
    assert statuses() == ["499"]


async def _grpc_cosines(server: EmbeddingServer, query: str, docs: list[str]) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        sim = await pb_grpc.EmbeddingServiceStub(channel).Similarity(
            pb.SimilarityRequest(queries=[query], documents=docs), timeout=10
        )
    return list(sim.results[0].scores)


DOCS = ["alpha doc", "beta doc", "gamma doc", "delta doc"]


async def test_rerank_scores_are_the_grpc_cosines_mapped_to_0_1(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    cosines = await _grpc_cosines(server, "the query", DOCS)
    body = {"model": MODEL, "query": "the query", "documents": DOCS, "top_n": 3}
    async with _http(server) as http:
        ranked = await http.post("/v1/rerank", json=body)
        raw = (await http.post("/v1/rerank", json={**body, "raw_scores": True})).json()
        with_docs = await http.post(
            "/rerank",
            json={
                "query": "the query",
                "documents": [{"text": d} for d in DOCS],
                "return_documents": True,
            },
        )
        error = _error(await http.post("/v1/rerank", json={**body, "top_n": 0}), 400)
    order = sorted(range(4), key=lambda i: -cosines[i])
    assert ranked.headers["x-truncated-inputs"] == "0"
    answer = ranked.json()
    assert [r["index"] for r in answer["results"]] == order[:3]
    for r in answer["results"]:
        assert r["relevance_score"] == pytest.approx((1 + cosines[r["index"]]) / 2, abs=1e-6)
        assert 0 <= r["relevance_score"] <= 1
        assert set(r) == {"index", "relevance_score"}
    assert (answer["score_kind"], answer["score_formula"]) == ("cosine", "(1 + cosine) / 2")
    assert answer["model"] == MODEL and answer["usage"]["total_tokens"] > 0
    assert [r["relevance_score"] for r in raw["results"]] == pytest.approx(
        [cosines[i] for i in order[:3]], abs=1e-6
    )
    assert raw["score_formula"] == "cosine"
    results = with_docs.json()["results"]
    assert [r["document"]["text"] for r in results] == [DOCS[i] for i in order]
    assert error["param"] == "top_n"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        # Cohere v1 (the cohere SDK's Client, Open WebUI's external reranker).
        ("/v1/rerank", {"documents": DOCS, "top_n": 4, "return_documents": True}),
        # Cohere v2 (ClientV2, LiteLLM's cohere/ provider).
        ("/v2/rerank", {"documents": DOCS, "max_tokens_per_doc": 100, "return_documents": True}),
        # Jina: documents as {"text": ...}.
        ("/v1/rerank", {"documents": [{"text": d} for d in DOCS], "return_documents": True}),
    ],
)
async def test_rerank_answers_cohere_and_jina_shapes(
    make_server: ServerMaker, route: str, body: dict[str, Any]
) -> None:
    server, _ = await make_server()
    cosines = await _grpc_cosines(server, "the query", DOCS)
    async with _http(server) as http:
        reply = await http.post(route, json={"model": ALIAS, "query": "the query", **body})
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["index"] for r in results] == sorted(range(4), key=lambda i: -cosines[i])
    assert [r["document"] for r in results] == [{"text": DOCS[r["index"]]} for r in results]


async def test_rerank_answers_tei_shape_with_a_bare_array(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    cosines = await _grpc_cosines(server, "the query", DOCS)
    order = sorted(range(4), key=lambda i: -cosines[i])
    async with _http(server) as http:
        plain = await http.post("/rerank", json={"query": "the query", "texts": DOCS})
        full = await http.post(
            "/rerank",
            json={"query": "the query", "texts": DOCS, "return_text": True, "raw_scores": True},
        )
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-truncated-inputs"] == "0"
    assert [set(r) for r in plain.json()] == [{"index", "score"}] * 4
    assert [r["index"] for r in plain.json()] == order
    assert [r["score"] for r in plain.json()] == pytest.approx(
        [(1 + cosines[i]) / 2 for i in order], abs=1e-6
    )
    assert full.json() == [
        {"index": i, "score": pytest.approx(cosines[i], abs=1e-6), "text": DOCS[i]} for i in order
    ]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"query": "q"}, "documents", "required (or texts"),
        ({"query": "q", "documents": ["d"], "texts": ["d"]}, "texts", "not both"),
        (
            {"query": "q", "texts": ["d"], "return_documents": True},
            "return_documents",
            "return_text",
        ),
        (
            {"query": "q", "documents": ["d"], "return_text": True},
            "return_text",
            "return_documents",
        ),
        ({"query": "q", "documents": []}, "documents", "at least one"),
        ({"query": "q", "texts": ["ok", ""]}, "texts[1]", "empty"),
        ({"query": "", "documents": ["d"]}, "query", "empty"),
        ({"query": "q", "documents": [{"txt": "d"}]}, "documents[0]", "text"),
        (
            {"query": "q", "documents": ["d"], "max_tokens_per_doc": 0},
            "max_tokens_per_doc",
            "at least 1",
        ),
        (
            {"query": "q", "documents": ["d"], "truncate": "middle"},
            "truncate",
            "does not apply to rerank (end or refuse)",
        ),
        (
            {"query": "q", "documents": ["d"], "truncate": "start"},
            "truncate",
            "does not apply to rerank (end or refuse)",
        ),
        ({"query": "q", "documents": ["d"], "truncate": 3}, "truncate", "expected"),
    ],
)
async def test_rerank_refusals_say_what_and_why(
    make_server: ServerMaker, body: dict[str, Any], param: str, words: str
) -> None:
    server, _ = await make_server()
    async with _http(server) as http:
        error = _error(await http.post("/rerank", json=body), 400)
    assert error["param"] == param and words in error["message"], error


async def test_rerank_cuts_long_documents_never_the_query(make_server: ServerMaker) -> None:
    """Open WebUI posts whole chunks with top_n = their count and crashes on an error."""
    server, engine = await make_server(vector_cache_mb=0)
    docs = ["a short document", LONG_TEXT, LONG_TEXT + " more"]
    body = {"model": MODEL, "query": "which one", "documents": docs, "top_n": len(docs)}
    async with _http(server) as http:
        before = len(engine.batches)
        reply = await http.post("/v1/rerank", json=body)
        assert reply.status_code == 200, reply.text
        seen = [len(ids) for batch in engine.batches[before:] for ids in batch]
        before = len(engine.batches)
        capped = await http.post("/v2/rerank", json={**body, "max_tokens_per_doc": 10})
        capped_seen = [len(ids) for batch in engine.batches[before:] for ids in batch]
        refused = await http.post("/v1/rerank", json={**body, "truncate": "refuse"})
        tei_refused = await http.post(
            "/rerank", json={"query": "which one", "texts": docs, "truncate": False}
        )
        long_query = await http.post("/v1/rerank", json={**body, "query": LONG_TEXT})
    results = reply.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert all(0 <= r["relevance_score"] <= 1 for r in results)
    assert {r["index"] for r in results if r.get("truncated")} == {1, 2}
    assert reply.headers["x-truncated-inputs"] == "2"
    assert sorted(seen) == [4, 5, 256, 256]  # query, short document, two cut to the window
    assert capped.headers["x-truncated-inputs"] == "2"
    assert sorted(capped_seen) == [4, 5, 10, 10]
    error = _error(refused, 400)
    assert error["param"] == "documents[1]" and "limit of 256" in error["message"]
    assert _error(tei_refused, 400)["param"] == "texts[1]"
    error = _error(long_query, 400)
    assert error["param"] == "query" and error["code"] == "input_too_long"
    assert "404 tokens" in error["message"] and "limit of 256" in error["message"]
    assert "never cut" in error["message"]


async def test_unknown_routes_and_methods_answer_openai_errors(
    make_server: ServerMaker, caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = await make_server()
    with caplog.at_level(logging.WARNING, logger="service.http"):
        async with _http(server) as http:
            missing = await http.post("/v1/chat/completions", json={})
            wrong = await http.get("/v1/embeddings")
            wrong_get = await http.delete("/v1/models")
    error = _error(missing, 404)
    assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_route")
    assert "POST /v1/chat/completions" in error["message"]
    assert "POST /v1/embeddings" in error["message"] and "GET /v1/models" in error["message"]
    error = _error(wrong, 405)
    assert error["code"] == "method_not_allowed" and "takes POST" in error["message"]
    assert wrong.headers["allow"] == "POST"
    assert "GET" in _error(wrong_get, 405)["message"]
    lines = [r.getMessage() for r in caplog.records if r.name == "service.http"]
    assert any(line.startswith("POST /v1/chat/completions 404") for line in lines), lines


async def test_models_openapi_and_docs_work_offline(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    async with _http(server) as http:
        spec = (await http.get("/openapi.json")).json()
        docs = await http.get("/docs")
        assert docs.status_code == 200
        page = docs.text
        sources = re.findall(r'(?:src|href)="([^"]+)"', page)
        assets = [await http.get(source) for source in sources]
    assert "/openapi.json" in page and "validatorUrl: null" in page
    assert not re.search(r"https?://", page), "the page must load nothing from another host"
    assert sorted(sources) == ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"]
    for source, asset in zip(sources, assets, strict=True):
        assert asset.status_code == 200 and len(asset.content) > 10_000, source
    assert "SwaggerUIBundle" in assets[sources.index("/docs/swagger-ui-bundle.js")].text
    assert {"/v1/embeddings", "/v1/rerank", "/v2/rerank", "/rerank", "/v1/models"} <= set(
        spec["paths"]
    )
    embeddings = spec["components"]["schemas"]["EmbeddingsRequest"]["properties"]
    assert {"input", "model", "encoding_format", "dimensions", "instruction"} <= set(embeddings)
    assert "default here: end" in embeddings["truncate"]["description"]
    result = spec["components"]["schemas"]["RerankResult"]["properties"]
    assert "(1 + cosine) / 2" in result["relevance_score"]["description"]
    assert "truncated" in spec["components"]["schemas"]["EmbeddingData"]["properties"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70_000) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_FIELDS = (
    "input",
    "model",
    "encoding_format",
    "dimensions",
    "truncate",
    "encoding",
    "normalize",
    "instruction",
    "prompt_name",
    "input_type",
    "user",
)


@pytest.fixture(scope="module")
async def shared_server() -> AsyncIterator[EmbeddingServer]:
    config = ServiceConfig(port=0, http_port=free_port(), grace_s=0.0, served_model_name=MODEL)
    server = EmbeddingServer(config, factory(FakeEngine()))  # type: ignore[arg-type]
    await server.start()
    yield server
    await server.stop(grace_s=0)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(_FIELDS), _json_values, max_size=5))
async def test_no_request_body_is_a_server_error(
    shared_server: EmbeddingServer, body: dict[str, Any]
) -> None:
    async with _http(shared_server) as http:
        reply = await http.post("/v1/embeddings", json=body)
    assert reply.status_code in (200, 400, 404), reply.text
    if reply.status_code != 200:
        _error(reply, reply.status_code)
