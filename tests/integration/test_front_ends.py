"""Several front-end processes sharing one engine core per model (--api-processes 2), on
real server processes with vLLM on CPU: the vectors and scores of one process, priority
across processes, one merged /metrics, one drain for all, and what a death takes down.

Each server here is this module's own (two engine cores beside the session's servers).
"""

from __future__ import annotations

import signal
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client import EmbeddingClient
from tests.integration.conftest import ENGINE_ARGS, RERANK_ARGS
from tests.probes import (
    PATIENCE_S,
    is_engine_core,
    stream_failure_codes,
    unary_calls_during_a_stream,
    until,
)
from tests.reference import minilm_reference
from tests.reference_rerank import cross_encoder_scores
from tests.servers import ServerProcess, free_port, health_status, start_server
from tests.texts import TEXTS

BATCH_ITEMS = 32
TWO = ["--api-processes", "2"]
SMALL_QUEUE = [
    *("--max-queue-items", "2048", "--max-queue-tokens", "131072"),
    *("--grace-s", "3600", "--engine-timeout-s", "3600"),
    *("--max-batch-items", str(BATCH_ITEMS)),
    *("--vector-cache-mb", "0"),
]
METRICS_PORT = free_port()
HEALTH_PORT = free_port()


def _start(args: list[str], log: Path) -> ServerProcess:
    """A supervisor with two front ends, returned once both are serving (health answers as
    soon as one is; the supervisor's ready line waits for all)."""
    server = start_server([*TWO, *args], log)
    until(lambda: "2 front-end processes" in log.read_text(errors="replace"), "both ready")
    return server


@pytest.fixture(scope="module")
def two_front_ends(
    bert_reranker_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    args = [*ENGINE_ARGS, *SMALL_QUEUE, "--rerank-model", str(bert_reranker_dir), *RERANK_ARGS]
    args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(METRICS_PORT)]
    args += ["--health-port", str(HEALTH_PORT)]
    server = _start(args, tmp_path_factory.mktemp("front-ends") / "s.log")
    yield server
    server.stop()


def _front_ends(server: ServerProcess) -> list[psutil.Process]:
    """The supervisor's children that are front ends (not engine cores, nor the resource
    tracker of multiprocessing)."""
    return [
        p
        for p in psutil.Process(server.process.pid).children()
        if not is_engine_core(p) and "resource_tracker" not in " ".join(p.cmdline())
    ]


def _private_metrics(process: psutil.Process) -> dict[str, float]:
    """One front end's own /metrics (its private loopback port), as name -> summed value."""
    ports = {
        c.laddr.port
        for c in process.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.ip == "127.0.0.1"
    }
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                return _totals(r.read().decode())
        except (OSError, ValueError):
            continue  # the gRPC or HTTP port, not /metrics
    raise AssertionError(f"no /metrics port among {ports}")


def _inputs_per_front_end(server: ServerProcess) -> list[float]:
    """How many inputs each front end has embedded so far (its warm-up call included)."""
    return [_private_metrics(p).get("embedding_inputs_total", 0.0) for p in _front_ends(server)]


def _totals(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _merged_metrics() -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30) as r:
        return _totals(r.read().decode())


def test_two_front_ends_give_the_vectors_and_scores_of_one_process(
    two_front_ends: ServerProcess, minilm_dir: Path, bert_reranker_dir: Path
) -> None:
    texts = [f"{TEXTS[i % len(TEXTS)]} front end {i}" for i in range(24)]
    reference = minilm_reference(minilm_dir, texts)
    before = _inputs_per_front_end(two_front_ends)
    # Many connections, so that both processes take some (the kernel spreads gRPC
    # connections by address; HTTP goes to whichever process accepts first).
    with ThreadPoolExecutor(8) as pool:

        def over_grpc(i: int) -> list[float]:
            with EmbeddingClient(two_front_ends.address) as client:
                return list(client.embed([texts[i]]).vectors[0])

        def over_http(i: int) -> list[float]:
            reply = httpx.post(
                f"{two_front_ends.base_url}/embeddings",
                json={"input": texts[i], "model": "all-MiniLM-L6-v2"},
                timeout=PATIENCE_S,
            )
            assert reply.status_code == 200, reply.text
            vector: list[float] = reply.json()["data"][0]["embedding"]
            return vector

        grpc_vectors = list(pool.map(over_grpc, range(len(texts))))
        http_vectors = list(pool.map(over_http, range(len(texts))))
    np.testing.assert_allclose(grpc_vectors, reference, atol=1e-5)
    np.testing.assert_allclose(http_vectors, reference, atol=1e-5)
    # Every front end reaches the rerank model's core too.
    query, documents = "How do I read a file line by line?", TEXTS[:6]
    expected = cross_encoder_scores(bert_reranker_dir, query, documents).probabilities
    for _ in range(8):
        with grpc.insecure_channel(two_front_ends.address) as channel:
            reply = pb_grpc.EmbeddingServiceStub(channel).Rerank(
                pb.RerankRequest(query=query, documents=documents), timeout=PATIENCE_S
            )
        np.testing.assert_allclose([r.relevance_score for r in reply.results], expected, atol=1e-4)
    after = _inputs_per_front_end(two_front_ends)
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert len(served) == 2 and all(n > 0 for n in served), served


def test_metrics_are_one_merged_picture(two_front_ends: ServerProcess) -> None:
    with EmbeddingClient(two_front_ends.address) as client:
        client.embed(["counted once"])
    parts = [_private_metrics(p) for p in _front_ends(two_front_ends)]
    merged = _merged_metrics()
    for name in ("embedding_inputs_total", "rpc_server_call_duration_seconds_count"):
        assert merged[name] == sum(p.get(name, 0.0) for p in parts), name
    assert merged["embedding_engine_up"] == 1.0  # the minimum, not a sum over processes


def test_an_interactive_call_overtakes_bulk_work_of_every_front_end(
    two_front_ends: ServerProcess,
) -> None:
    """As the one-process test in test_reliability.py: while a stream fills the bulk queue
    and the engine is frozen, a unary call waits for the batches already in the engine, not
    for the bulk items queued ahead of it. Here each call opens a fresh connection, landing
    on either process: the engine core's priority scheduling sees the work of both."""
    items = [(f"bulk-{i}", f"{TEXTS[i % len(TEXTS)]} bulk {i}") for i in range(2000)]

    def call(_: EmbeddingClient) -> int:
        with EmbeddingClient(two_front_ends.address) as fresh:
            return len(fresh.embed(["an interactive query"]).vectors)

    rounds = unary_calls_during_a_stream(
        two_front_ends, METRICS_PORT, items, call, batch_items=BATCH_ITEMS, rounds=4
    )
    for during, queued in rounds:
        assert during < queued, rounds


def test_sigterm_drains_every_front_end(two_front_ends: ServerProcess) -> None:
    """Last in this module: it ends the server. Streams on several connections are held in
    flight; one SIGTERM to the supervisor drains both processes, every id is answered
    exactly once, and nothing of the server is left."""
    front_ends = _front_ends(two_front_ends)
    cores = [
        p for p in psutil.Process(two_front_ends.process.pid).children() if p not in front_ends
    ]
    release = threading.Event()
    streams = 4
    items = [
        [(f"s{s}-{i}", f"{TEXTS[i % len(TEXTS)]} drain {s} {i}") for i in range(128)]
        for s in range(streams)
    ]
    results: list[list[str]] = [[] for _ in range(streams)]
    started = threading.Barrier(streams + 1)

    def run(s: int) -> None:
        def held() -> Iterator[tuple[str, str]]:
            yield from items[s]
            release.wait()

        with EmbeddingClient(two_front_ends.address) as client:
            stream = client.embed_stream(held())
            first = next(stream)
            results[s].append(first.id)
            started.wait()
            results[s].extend(r.id for r in stream if r.ok)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(streams)]
    for t in threads:
        t.start()
    try:
        started.wait(PATIENCE_S)
        two_front_ends.process.send_signal(signal.SIGTERM)
        health = f"127.0.0.1:{HEALTH_PORT}"
        until(lambda: _not_serving(health), "NOT_SERVING on SIGTERM")
        assert two_front_ends.process.poll() is None, "exited with calls in flight"
    finally:
        release.set()
        for t in threads:
            t.join(PATIENCE_S)
    assert two_front_ends.process.wait(PATIENCE_S) == 0
    for s in range(streams):
        assert sorted(results[s]) == sorted(i for i, _ in items[s]), s
    assert not any(_alive(p) for p in [*front_ends, *cores])


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _not_serving(address: str) -> bool:
    try:
        return bool(health_status(address) == 2)  # NOT_SERVING
    except grpc.RpcError:
        return True  # that process has closed its port already


def test_a_client_with_several_connections_reaches_every_front_end(tmp_path: Path) -> None:
    """Each front end serves the gRPC connections the kernel hands it: one client reaches
    both processes over several connections (connections=4), whichever the hashing."""
    server = _start(["--engine", "null"], tmp_path / "s.log")
    try:
        before = _inputs_per_front_end(server)
        # 16 connections, hashed onto 2 processes: all on one has odds of 2 in 65,536.
        with EmbeddingClient(server.address, connections=16) as client:
            for i in range(48):
                assert len(client.embed([f"call {i}"]).vectors) == 1
        served = [b - a for a, b in zip(before, _inputs_per_front_end(server), strict=True)]
        assert sum(served) == 48 and all(n > 0 for n in served), served
    finally:
        server.stop()


def test_a_dead_front_end_takes_the_others_down(tmp_path: Path) -> None:
    """The null engine (no engine core): a SIGKILLed front end stops the supervisor and the
    other front end with exit 1, so the orchestrator restarts the pod, and no port is left
    half served."""
    server = _start(["--engine", "null"], tmp_path / "s.log")
    try:
        front_ends = _front_ends(server)
        assert len(front_ends) == 2
        front_ends[0].kill()
        assert server.process.wait(PATIENCE_S) == 1
        assert "front end 0 exited" in server.log_path.read_text()
        assert not _alive(front_ends[1])
        with pytest.raises(grpc.RpcError):
            health_status(server.address, timeout=5)
    finally:
        server.stop()


def test_front_ends_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no time to stop anything: each front end notices that
    its parent is gone and exits, rather than serving on unsupervised."""
    server = _start(["--engine", "null"], tmp_path / "s.log")
    try:
        front_ends = _front_ends(server)
        server.process.kill()
        server.process.wait(PATIENCE_S)
        until(lambda: not any(_alive(p) for p in front_ends), "the front ends exit")
    finally:
        for p in front_ends:
            if _alive(p):
                p.kill()


def test_engine_core_death_answers_unavailable_in_every_front_end(tmp_path: Path) -> None:
    server = _start([*ENGINE_ARGS, "--max-batch-items", str(BATCH_ITEMS)], tmp_path / "s.log")
    try:
        process = psutil.Process(server.process.pid)
        cores = [p for p in process.children() if is_engine_core(p)]
        assert cores
        with EmbeddingClient(server.address) as client:
            stream = client.embed_stream(
                [(f"k-{i}", f"{TEXTS[i % len(TEXTS)]} {i}") for i in range(4000)]
            )
            assert next(stream).ok
            for core in cores:
                core.kill()
            codes = stream_failure_codes(stream)
        assert "UNAVAILABLE" in codes and codes <= {"UNAVAILABLE"}, codes
        assert server.process.wait(PATIENCE_S) == 1
        assert "an engine core process died" in server.log_path.read_text()
    finally:
        server.stop()
