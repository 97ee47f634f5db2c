"""The vector cache in front of the real Batcher, with the fake engine: exact hits, no
collisions, one engine request for identical callers in flight, cancellation, errors, the
byte bound, metrics, and what the server reports."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc.aio
import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service import postprocess
from service.batching import Batcher, BatcherLimits, ItemResult, Priority
from service.config import ServiceConfig
from service.errors import DeadlineExpiredError, EngineUnavailableError
from service.model_card import resolve_model_path
from service.pipeline import Embedder, EmbedSpec, EngineQueue
from service.server import EmbeddingServer
from service.telemetry import Telemetry
from service.telemetry.histograms import PrometheusReader
from service.tokenization import TextTokenizer, Truncation
from service.vector_cache import ENTRY_OVERHEAD_BYTES, CachingBatcher, VectorCache, cache_key
from tests.fakes import DIM, FakeEngine, factory, fake_vector
from tests.servers import free_port

# RPC deadlines of the server tests: only a hang reaches them, however loaded the machine.
PATIENCE_S = 120.0


def _limits(**changes: Any) -> BatcherLimits:
    defaults: dict[str, Any] = {
        "max_batch_tokens": 1024,
        "max_batch_items": 64,
        "max_wait_s": 0.0,
        "max_queue_tokens": 8192,
        "max_queue_items": 512,
    }
    return BatcherLimits(**{**defaults, **changes})


def _spec(
    prefix: str = "",
    dims: int = DIM,
    normalize: bool = False,
    truncation: Truncation = Truncation.END,
) -> EmbedSpec:
    return EmbedSpec(prefix, dims, normalize, truncation, postprocess.Encoding.FLOAT32)


class Rig:
    def __init__(
        self, engine: FakeEngine, batcher: Batcher, cached: CachingBatcher, cache: VectorCache
    ) -> None:
        self.engine = engine
        self.batcher = batcher
        self.cached = cached
        self.cache = cache

    @property
    def engine_items(self) -> int:
        return sum(len(b) for b in self.engine.batches)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    engine = FakeEngine()
    batcher = Batcher(engine, _limits())
    cache = VectorCache(1 << 20)
    await batcher.start()
    yield Rig(engine, batcher, CachingBatcher(batcher, cache), cache)
    await batcher.close()


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def _until(check: Callable[[], bool]) -> None:
    """Turns the loop until `check` holds: counted in turns, not seconds, so no machine is
    too slow for it."""
    for _ in range(10_000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_a_hit_returns_exactly_the_vector_a_miss_returns(rig: Rig) -> None:
    (miss,) = await asyncio.gather(*rig.cached.submit([[7, 8, 9]], Priority.INTERACTIVE))
    (hit,) = await asyncio.gather(*rig.cached.submit([[7, 8, 9]], Priority.INTERACTIVE))
    bulk = await (await rig.cached.submit_when_ready([7, 8, 9], Priority.BULK))
    assert not miss.cached and hit.cached and bulk.cached
    assert hit.vector.tobytes() == miss.vector.tobytes() == bulk.vector.tobytes()
    assert (hit.queue_s, hit.inference_s, hit.batch) == (0.0, 0.0, None)
    assert rig.engine_items == 1
    assert (rig.cache.hits, rig.cache.misses, rig.cache.entries) == (2, 1, 1)
    with pytest.raises(ValueError, match="read-only"):
        hit.vector[0] = 1.0  # one entry is shared by every hit: nobody may change it


async def test_a_mixed_request_sends_only_its_misses_in_order(rig: Rig) -> None:
    await asyncio.gather(*rig.cached.submit([[1], [3]], Priority.INTERACTIVE))
    ids = [[1], [2], [3], [4, 5], [2]]
    results = await asyncio.gather(*rig.cached.submit(ids, Priority.INTERACTIVE))
    assert [r.cached for r in results] == [True, False, True, False, False]
    for got, want in zip(results, ids, strict=True):
        np.testing.assert_array_equal(got.vector, fake_vector(want))
    assert rig.engine.batches[-1] == [[2], [4, 5]]  # [2] twice in one request: sent once


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**32 - 1), max_size=12), min_size=2, max_size=12))
def test_keys_of_different_ids_never_collide(sequences: list[list[int]]) -> None:
    keys = {tuple(s): cache_key(s) for s in sequences}
    assert len(set(keys.values())) == len(keys)


async def test_different_ids_get_their_own_vectors(rig: Rig) -> None:
    # Same tokens in another order, one more token, ids that share bytes when packed wider.
    ids = [[1, 2, 3], [3, 2, 1], [1, 2, 3, 0], [1, 2], [256], [1, 0], [65536], [0, 1]]
    for _ in range(2):  # misses, then hits
        results = await asyncio.gather(*rig.cached.submit(ids, Priority.INTERACTIVE))
        for got, want in zip(results, ids, strict=True):
            np.testing.assert_array_equal(got.vector, fake_vector(want))
    assert rig.engine_items == len(ids)


async def test_different_instructions_and_truncations_never_share_an_entry(rig: Rig) -> None:
    """Through the pipeline with a real tokenizer: the key is what the engine sees."""
    path = resolve_model_path(ServiceConfig().model)
    tokenizer = TextTokenizer(path / "tokenizer.json", 8, 1)
    embedder = Embedder(tokenizer, EngineQueue(rig.cached, 1 << 16))

    text = "the capital of france is a city on the seine river"
    instructed = _spec("Instruct: find the answer\nQuery:")
    specs = [_spec(), instructed, _spec(truncation=Truncation.START)]
    first = [await embedder.embed([text], s, "inputs", None) for s in specs]
    again = [await embedder.embed([text], s, "inputs", None) for s in specs]
    ids = [o.inputs[0].ids for o in first]
    assert len({tuple(i) for i in ids}) == 3
    for one, two, want in zip(first, again, ids, strict=True):
        assert (one.timing.cached, two.timing.cached) == (0, 1)
        np.testing.assert_array_equal(one.vectors[0], fake_vector(want))
        np.testing.assert_array_equal(two.vectors[0], one.vectors[0])
    assert rig.engine_items == 3
    tokenizer.close()


async def test_one_entry_serves_every_dimension_and_normalization(rig: Rig) -> None:
    path = resolve_model_path(ServiceConfig().model)
    tokenizer = TextTokenizer(path / "tokenizer.json", 64, 1)
    embedder = Embedder(tokenizer, EngineQueue(rig.cached, 1 << 16))
    raw = await embedder.embed(["hello"], _spec(), "inputs", None)
    small = await embedder.embed(["hello"], _spec(dims=32, normalize=True), "inputs", None)
    assert small.timing.cached == 1 and rig.engine_items == 1
    np.testing.assert_array_equal(small.vectors, postprocess.shape(raw.vectors, 32, True))
    tokenizer.close()


async def test_concurrent_identical_requests_run_the_engine_once(rig: Rig) -> None:
    rig.engine.gate = asyncio.Event()  # the first request stays in flight while all arrive
    calls = [rig.cached.submit([[4, 2]], Priority.INTERACTIVE) for _ in range(5)]
    streamed = [await rig.cached.submit_when_ready([4, 2], Priority.BULK) for _ in range(3)]
    rig.engine.gate.set()
    results = await asyncio.gather(*(f for c in calls for f in c), *streamed)
    assert rig.engine.batches == [[[4, 2]]]
    assert all(r.vector.tobytes() == results[0].vector.tobytes() for r in results)
    assert not any(r.cached for r in results)  # from the engine, through one shared request
    assert (rig.cache.misses, rig.cache.coalesced, rig.cache.hits) == (8, 7, 0)


async def test_a_unary_caller_does_not_wait_on_a_stream_item(rig: Rig) -> None:
    rig.engine.gate = asyncio.Event()  # nothing finishes before all three have arrived
    streamed = await rig.cached.submit_when_ready([6], Priority.BULK)
    (unary,) = rig.cached.submit([[6]], Priority.INTERACTIVE)
    later = await rig.cached.submit_when_ready([6], Priority.BULK)  # shares the unary one
    rig.engine.gate.set()
    await asyncio.gather(streamed, unary, later)
    assert rig.engine_items == 2


async def test_one_waiter_leaving_leaves_the_others_result_intact(rig: Rig) -> None:
    rig.engine.gate = asyncio.Event()  # the batch stays in the engine until released
    (first,) = rig.cached.submit([[5, 5]], Priority.INTERACTIVE)
    (second,) = rig.cached.submit([[5, 5]], Priority.INTERACTIVE)
    await _until(lambda: rig.batcher.inflight_batches == 1)
    first.cancel()
    await _settle()
    rig.engine.gate.set()
    result = await second
    np.testing.assert_array_equal(result.vector, fake_vector([5, 5]))
    assert rig.engine.cancelled == 0
    assert rig.cache.entries == 1


async def test_every_waiter_leaving_aborts_the_engine_request(rig: Rig) -> None:
    rig.engine.gate = asyncio.Event()  # never set: the request only ends by being aborted
    (first,) = rig.cached.submit([[3, 1]], Priority.INTERACTIVE)
    second = await rig.cached.submit_when_ready([3, 1], Priority.BULK)
    await _until(lambda: rig.batcher.inflight_batches == 1)
    first.cancel()
    await _settle()
    assert rig.engine.cancelled == 0
    second.cancel()
    await _settle()
    assert rig.engine.cancelled == 1 and rig.batcher.inflight_batches == 0
    assert rig.cache.entries == 0
    rig.engine.gate = None  # nothing of the aborted request lingers: a new caller is served
    (again,) = await asyncio.gather(*rig.cached.submit([[3, 1]], Priority.INTERACTIVE))
    assert not again.cached


async def test_every_waiter_leaving_a_queued_request_drops_it_from_the_queue() -> None:
    engine = FakeEngine()
    engine.hang = True
    batcher = Batcher(engine, _limits(max_batch_items=1, max_inflight_batches=1))
    cached = CachingBatcher(batcher, VectorCache(1 << 20))
    await batcher.start()
    blocker = await cached.submit_when_ready([1], Priority.BULK)
    await _settle()
    waiters = [await cached.submit_when_ready([2, 2], Priority.BULK) for _ in range(2)]
    assert batcher.queued_items == 1
    for w in waiters:
        w.cancel()
    await _settle()
    assert batcher.queued_items == 0
    blocker.cancel()
    await batcher.close()


async def test_errors_are_not_cached(rig: Rig) -> None:
    rig.engine.dead = True
    failed = rig.cached.submit([[8], [8]], Priority.INTERACTIVE)
    for f in failed:
        with pytest.raises(EngineUnavailableError):
            await f
    assert rig.cache.entries == 0
    rig.engine.dead = False
    (ok,) = await asyncio.gather(*rig.cached.submit([[8]], Priority.INTERACTIVE))
    assert not ok.cached
    np.testing.assert_array_equal(ok.vector, fake_vector([8]))
    assert rig.cache.entries == 1


async def test_a_refused_request_changes_nothing(rig: Rig) -> None:
    await asyncio.gather(*rig.cached.submit([[1]], Priority.INTERACTIVE))
    with pytest.raises(ValueError, match="max_item_tokens"):
        rig.cached.submit([[1], list(range(2000))], Priority.INTERACTIVE)
    assert (rig.cache.hits, rig.cache.misses) == (0, 1)
    assert rig.batcher.queued_items == 0


async def test_a_shared_request_expiring_resubmits_the_callers_still_in_time() -> None:
    """The shared request carries its first caller's deadline; a later caller with a later
    deadline must not see that one's expiry."""
    now = [0.0]
    engine = FakeEngine()
    engine.hang = True
    batcher = Batcher(engine, _limits(max_inflight_batches=1), clock=lambda: now[0])
    cached = CachingBatcher(batcher, VectorCache(1 << 20), clock=lambda: now[0])
    await batcher.start()
    (blocker,) = cached.submit([[9]], Priority.BULK)
    await _settle()
    assert batcher.inflight_batches == 1
    (early,) = cached.submit([[1, 2]], Priority.BULK, deadline=1.0)
    (late,) = cached.submit([[1, 2]], Priority.BULK, deadline=5.0)
    (patient,) = cached.submit([[1, 2]], Priority.BULK)
    engine.hang = False
    now[0] = 2.0
    blocker.cancel()  # frees the engine: the queued request is found expired
    with pytest.raises(DeadlineExpiredError):
        await early
    for f in (late, patient):
        result: ItemResult = await f
        np.testing.assert_array_equal(result.vector, fake_vector([1, 2]))
    assert [b for b in engine.batches if b != [[9]]] == [[[1, 2]]]
    await batcher.close()


async def test_the_batcher_failing_fails_every_waiter(rig: Rig) -> None:
    rig.engine.hang = True
    (first,) = rig.cached.submit([[2, 3]], Priority.INTERACTIVE)
    (second,) = rig.cached.submit([[2, 3]], Priority.INTERACTIVE)
    await _settle()
    rig.batcher.fail_all(EngineUnavailableError("gone"))
    for f in (first, second):
        with pytest.raises(EngineUnavailableError, match="gone"):
            await f
    assert rig.cache.entries == 0


async def test_delegates_what_the_pipeline_reads(rig: Rig) -> None:
    c = rig.cached
    assert c.estimated_wait_s(Priority.INTERACTIVE) == rig.batcher.estimated_wait_s(
        Priority.INTERACTIVE
    )
    assert c.cache is rig.cache


# ----------------------------------------------------------------------- the byte bound


def test_accounted_bytes_are_vector_key_and_overhead() -> None:
    cache = VectorCache(1 << 20)
    cache.put(cache_key([1, 2, 3]), np.ones(100, np.float32))
    assert cache.nbytes == 400 + 12 + ENTRY_OVERHEAD_BYTES
    cache.put(cache_key([1, 2, 3]), np.ones(10, np.float32))  # replaced, not added
    assert cache.nbytes == 40 + 12 + ENTRY_OVERHEAD_BYTES and cache.entries == 1


def test_an_entry_larger_than_the_whole_cache_is_not_stored() -> None:
    cache = VectorCache(1000)
    cache.put(b"k", np.ones(1000, np.float32))
    assert cache.entries == 0 and cache.nbytes == 0


def test_least_recently_used_goes_first_and_evictions_are_counted() -> None:
    entry = 100 * 4 + 4 + ENTRY_OVERHEAD_BYTES
    cache = VectorCache(3 * entry)
    for i in range(3):
        cache.put(cache_key([i]), np.full(100, i, np.float32))
    assert cache.get(cache_key([0])) is not None  # 0 is now the most recently used
    cache.put(cache_key([3]), np.full(100, 3, np.float32))
    assert cache.get(cache_key([1])) is None
    assert all(cache.get(cache_key([i])) is not None for i in (0, 2, 3))
    assert cache.evictions == 1 and cache.entries == 3 and cache.nbytes == 3 * entry


def test_a_stored_vector_is_a_copy_that_frees_its_batch() -> None:
    batch = np.ones((64, 384), np.float32)
    cache = VectorCache(1 << 20)
    cache.put(b"k", batch[5])
    stored = cache.get(b"k")
    assert stored is not None and stored.base is None and stored.nbytes == 384 * 4
    batch[5] = 0.0
    assert stored[0] == 1.0


BOUND = 256 * 1024
# Memory the cache may hold beyond its accounted bytes: dict tables keep their size after
# evictions, so many small entries followed by few big ones leave unaccounted slots behind.
SLACK = 64 * 1024


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 200_000), min_size=1, max_size=64),  # ids
            st.integers(1, 4096),  # vector size
            st.booleans(),  # look up before storing
        ),
        min_size=1,
        max_size=400,
    )
)
def test_memory_stays_under_the_bound(workload: list[tuple[list[int], int, bool]]) -> None:
    cache = VectorCache(BOUND)
    vectors = {n: np.ones(n, np.float32) for _, n, _ in workload}
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for ids, n, look in workload:
            key = cache_key(ids)
            if look:
                cache.get(key)
            cache.put(key, vectors[n])
            assert cache.nbytes <= BOUND
            del key
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown <= BOUND + SLACK, (grown, cache.nbytes, cache.entries)
    assert grown <= cache.nbytes + SLACK  # the accounting does not undercount


# ----------------------------------------------------------------------------- metrics


class _Queue:
    queued_items = 0
    queued_tokens = 0
    inflight_batches = 0

    def oldest_inflight_age_s(self) -> float:
        return 0.0


class _Engine:
    alive = True


def _samples(telemetry: Telemetry, registry: CollectorRegistry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("embedding_cache")
    }


def test_cache_metrics_are_exported_only_while_it_is_on() -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(metric_readers=[PrometheusReader(registry=registry)])
    telemetry.watch(_Queue(), _Engine())
    assert _samples(telemetry, registry) == {}
    cache = VectorCache(1 << 20)
    cache.put(b"k", np.ones(4, np.float32))
    cache.hits, cache.misses, cache.coalesced = 5, 3, 1
    telemetry.watch(_Queue(), _Engine(), cache)
    assert _samples(telemetry, registry) == {
        "embedding_cache_hits_total": 5,
        "embedding_cache_misses_total": 3,
        "embedding_cache_coalesced_total": 1,
        "embedding_cache_evictions_total": 0,
        "embedding_cache_size_bytes": cache.nbytes,
        "embedding_cache_entries": 1,
    }
    assert telemetry.meter_provider is not None
    telemetry.meter_provider.shutdown()


# ------------------------------------------------------------------------ the server


ServerMaker = Callable[..., Awaitable[tuple[EmbeddingServer, FakeEngine]]]


@pytest.fixture
async def server_maker() -> AsyncIterator[ServerMaker]:
    servers: list[EmbeddingServer] = []

    async def make(**settings: Any) -> tuple[EmbeddingServer, FakeEngine]:
        engine = FakeEngine()
        config = ServiceConfig(
            port=0, http_port=free_port(), metrics_port=0, grace_s=1.0, **settings
        )
        server = EmbeddingServer(config, factory(engine))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server, engine

    yield make
    for server in servers:
        await server.stop(grace_s=0)


async def test_the_server_reports_cached_inputs_on_both_faces(server_maker: ServerMaker) -> None:
    server, engine = await server_maker()
    parts = server._components.embedding if server._components else None
    assert parts is not None and parts.cache is not None
    request = pb.EmbedRequest(inputs=["hello there", "general kenobi"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        first = await stub.Embed(request, timeout=PATIENCE_S)
        second = await stub.Embed(
            pb.EmbedRequest(inputs=["general kenobi", "new one"]), timeout=PATIENCE_S
        )
    assert first.timing.cached == 0 and second.timing.cached == 1
    assert second.embeddings[0].data == first.embeddings[1].data
    base = f"http://127.0.0.1:{server.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=PATIENCE_S) as http:
        reply = await http.post("/v1/embeddings", json={"input": ["hello there"]})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-cached-inputs"] == "1"
    texts = [ids for batch in engine.batches for ids in batch]
    assert len(texts) == 4  # warm-up, the first call's two, "new one"


async def test_zero_turns_the_cache_off(server_maker: ServerMaker) -> None:
    server, engine = await server_maker(vector_cache_mb=0)
    parts = server._components.embedding if server._components else None
    assert parts is not None and parts.cache is None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for _ in range(2):
            reply = await stub.Embed(pb.EmbedRequest(inputs=["hello"]), timeout=PATIENCE_S)
            assert reply.timing.cached == 0
    assert len(engine.batches) == 3  # warm-up and both calls


def test_config_option() -> None:
    from service.config import load_config

    assert load_config([], {}).vector_cache_mb == 256
    assert load_config(["--vector-cache-mb", "0"], {}).vector_cache_mb == 0
    assert load_config([], {"EMBED_VECTOR_CACHE_MB": "64"}).vector_cache_mb == 64
    with pytest.raises(SystemExit):
        load_config(["--vector-cache-mb", "-1"], {})


async def test_cancelling_the_callers_tasks_reaches_the_shared_request(rig: Rig) -> None:
    """As a gRPC deadline or a client going away does: the task is cancelled, not the
    future; gather and the task pass the cancellation on to each waiter."""
    rig.engine.gate = asyncio.Event()  # never set: the request only ends by being aborted

    async def unary() -> list[ItemResult]:
        return await asyncio.gather(*rig.cached.submit([[4, 4], [5]], Priority.INTERACTIVE))

    async def streamed() -> ItemResult:
        return await (await rig.cached.submit_when_ready([4, 4], Priority.BULK))

    tasks = [asyncio.create_task(unary()), asyncio.create_task(streamed())]
    await _until(lambda: rig.batcher.inflight_batches == 1)
    tasks[0].cancel()
    await _settle()
    assert rig.engine.cancelled == 0  # [4, 4] still has the stream's caller
    tasks[1].cancel()
    await _settle()
    assert rig.engine.cancelled == 1 and rig.batcher.inflight_batches == 0
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
