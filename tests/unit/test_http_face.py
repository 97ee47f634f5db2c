"""The HTTP face on the real server (uvicorn beside grpc.aio) with a fake engine: its
translations, every error status in OpenAI's shape, and the faults that need injecting."""

from __future__ import annotations

import asyncio
import base64
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
from service.engines.base import EngineInfo
from service.server import EmbeddingServer
from tests.fakes import DIM, FakeEngine, factory
from tests.servers import free_port

MODEL = "fake"  # the fake engine's model name
ServerMaker = Callable[..., Awaitable[tuple[EmbeddingServer, FakeEngine]]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerMaker]:
    servers: list[EmbeddingServer] = []

    async def make(
        engine: FakeEngine | None = None, **settings: Any
    ) -> tuple[EmbeddingServer, FakeEngine]:
        engine = engine or FakeEngine()
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


async def test_limits_name_the_index_and_the_limit(make_server: ServerMaker) -> None:
    server, _ = await make_server(max_inputs_per_request=8)
    async with _http(server) as http:
        error = _error(await http.post("/v1/embeddings", json={"input": ["t"] * 9}), 400)
        assert error["param"] == "input" and "9 texts exceed the limit of 8" in error["message"]
        assert error["code"] == "too_many_inputs"
        long_text = "word " * 400  # the fake model's window is 256 tokens
        error = _error(await http.post("/v1/embeddings", json={"input": ["ok", long_text]}), 400)
        assert error["param"] == "input[1]" and "limit of 256" in error["message"]
        truncated = await http.post("/v1/embeddings", json={"input": long_text, "truncate": "end"})
        assert truncated.status_code == 200
        assert truncated.json()["usage"]["prompt_tokens"] == 256
        await _still_serving(http)


async def test_unknown_model_is_404_model_not_found(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    async with _http(server) as http:
        error = _error(await http.post("/v1/embeddings", json={"input": "x", "model": "gpt"}), 404)
        assert (error["param"], error["code"]) == ("model", "model_not_found")
        assert MODEL in error["message"]
        rerank = {"model": "gpt", "query": "q", "documents": ["d"]}
        assert _error(await http.post("/v1/rerank", json=rerank), 404)["code"] == "model_not_found"
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
    assert server._components is not None and server._components.batcher.queued_items == 0


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


class _GatedEngine(FakeEngine):
    """Holds every batch until `gate` opens; counts the batches cancelled meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def embed(self, batch: Any, priority: int = 0) -> Any:
        self.batches.append([list(ids) for ids in batch])
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return np.stack([np.ones(DIM, np.float32) for _ in batch])

    @property
    def info(self) -> EngineInfo:
        return EngineInfo("fake", DIM, 256, "float32", "MEAN")


async def test_a_client_that_disconnects_releases_its_work(make_server: ServerMaker) -> None:
    engine = _GatedEngine()
    engine.gate.set()  # the warm-up call
    server, _ = await make_server(engine, max_inflight_batches=1)
    engine.gate.clear()
    batcher = server._components.batcher if server._components else None
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
    engine.gate.set()


async def test_rerank_sorts_documents_by_the_grpc_cosines(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    docs = ["alpha doc", "beta doc", "gamma doc", "delta doc"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        sim = await pb_grpc.EmbeddingServiceStub(channel).Similarity(
            pb.SimilarityRequest(queries=["the query"], documents=docs), timeout=10
        )
    scores = list(sim.results[0].scores)
    body = {"model": MODEL, "query": "the query", "documents": docs, "top_n": 3}
    async with _http(server) as http:
        ranked = (await http.post("/v1/rerank", json=body)).json()
        with_docs = (
            await http.post(
                "/rerank",
                json={
                    "query": "the query",
                    "documents": [{"text": d} for d in docs],
                    "return_documents": True,
                },
            )
        ).json()
        error = _error(await http.post("/v1/rerank", json={**body, "top_n": 0}), 400)
    order = sorted(range(4), key=lambda i: -scores[i])
    assert [r["index"] for r in ranked["results"]] == order[:3]
    for r in ranked["results"]:
        assert r["relevance_score"] == pytest.approx(scores[r["index"]], abs=1e-6)
        assert "document" not in r
    assert [r["document"]["text"] for r in with_docs["results"]] == [docs[i] for i in order]
    assert ranked["model"] == MODEL and ranked["usage"]["total_tokens"] > 0
    assert error["param"] == "top_n"


async def test_models_openapi_and_docs(make_server: ServerMaker) -> None:
    server, _ = await make_server()
    async with _http(server) as http:
        models = (await http.get("/v1/models")).json()
        spec = (await http.get("/openapi.json")).json()
        docs = await http.get("/docs")
    assert models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == (MODEL, "model", 256)
    assert {"/v1/embeddings", "/v1/rerank", "/v1/models", "/health"} <= set(spec["paths"])
    embeddings = spec["components"]["schemas"]["EmbeddingsRequest"]["properties"]
    assert {"input", "model", "encoding_format", "dimensions", "instruction"} <= set(embeddings)
    assert docs.status_code == 200 and "/openapi.json" in docs.text


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
    config = ServiceConfig(port=0, http_port=free_port(), grace_s=0.0)
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
