"""The supervisor's pieces without processes: bounds split between front ends, the port
reservation, and the merge of their /metrics."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.config import ServiceConfig
from service.front_ends.metrics import merge
from service.front_ends.supervisor import (
    front_end_count,
    reserve_shared_port,
    share,
    usable_cpus,
)


def test_server_wide_bounds_are_split_and_per_call_limits_stay_whole() -> None:
    config = ServiceConfig(
        max_queue_items=8192,
        max_queue_tokens=262144,
        vector_cache_mb=256,
        max_request_tokens=131072,
    )
    part = share(config, 3, grpc_port=5001, http_port=8001, health_port=0)
    assert (part.port, part.http_port) == (5001, 8001)
    assert part.max_queue_items * 3 >= config.max_queue_items > (part.max_queue_items - 1) * 3
    assert part.max_queue_tokens == -(-262144 // 3)
    assert part.streams_total * 3 >= config.streams_total
    assert part.vector_cache_mb == 86
    assert part.max_request_tokens == config.max_request_tokens
    assert part.stream_max_inflight == config.stream_max_inflight
    # A share never drops below one batch's worth, which the config requires.
    tiny = share(ServiceConfig(max_queue_tokens=4096), 8, 1, 2, 0)
    assert tiny.max_queue_tokens == tiny.max_batch_tokens


def test_the_process_count_is_the_flag_or_one_on_a_cpu_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert front_end_count(ServiceConfig(api_processes=3)) == 3
    monkeypatch.setattr("service.front_ends.supervisor._gpu_host", lambda: False)
    assert front_end_count(ServiceConfig(api_processes=0)) == 1
    monkeypatch.setattr("service.front_ends.supervisor._gpu_host", lambda: True)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(32)))
    monkeypatch.setattr("service.front_ends.supervisor.usable_cpus", lambda: 32.0)
    assert front_end_count(ServiceConfig(api_processes=0)) == 8
    monkeypatch.setattr("service.front_ends.supervisor.usable_cpus", lambda: 6.0)
    assert front_end_count(ServiceConfig(api_processes=0)) == 3


def test_usable_cpus_follow_a_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(32)))
    quota = tmp_path / "cpu.max"
    quota.write_text("600000 100000\n")  # a pod limited to 6 CPUs
    assert usable_cpus(quota) == 6.0
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == 32.0
    assert usable_cpus(tmp_path / "absent") == 32.0


def test_a_port_another_server_listens_on_is_refused_even_if_it_allows_sharing() -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve gRPC on 127.0.0.1:{port}"):
            reserve_shared_port("127.0.0.1", port, "gRPC")
    kept = reserve_shared_port("127.0.0.1", 0, "gRPC")
    try:
        port = kept.getsockname()[1]
        # A front end joins the port with SO_REUSEPORT, as grpc does.
        with socket.socket() as front_end:
            front_end.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            front_end.bind(("127.0.0.1", port))
            front_end.listen()
        # A server that does not share cannot take it meanwhile.
        with socket.socket() as intruder, pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))
    finally:
        kept.close()


def _exposition(engine_up: int, inputs: int, queued: int, waits: list[float]) -> str:
    registry = CollectorRegistry()
    Gauge("embedding_engine_up", "up", registry=registry).set(engine_up)
    Gauge("embedding_queue_items", "queued", registry=registry).set(queued)
    Counter("embedding_inputs", "inputs", ["priority"], registry=registry).labels("bulk").inc(
        inputs
    )
    histogram = Histogram("queue_wait_seconds", "wait", buckets=(0.1, 1.0), registry=registry)
    for wait in waits:
        histogram.observe(wait)
    return generate_latest(registry).decode()


def test_metrics_merge_sums_counters_histograms_and_queues_but_not_engine_up() -> None:
    merged = merge([_exposition(1, 3, 5, [0.05, 0.5]), _exposition(0, 4, 2, [2.0])])
    registry = CollectorRegistry()

    class Merged:
        def collect(self) -> list[object]:
            return list(merged)

    registry.register(Merged())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert values[("embedding_inputs_total", (("priority", "bulk"),))] == 7
    assert values[("embedding_queue_items", ())] == 7
    assert values[("embedding_engine_up", ())] == 0  # one front end has lost its engine
    assert values[("queue_wait_seconds_bucket", (("le", "0.1"),))] == 1
    assert values[("queue_wait_seconds_bucket", (("le", "1.0"),))] == 2
    assert values[("queue_wait_seconds_count", ())] == 3
    assert values[("queue_wait_seconds_sum", ())] == pytest.approx(2.55)


def test_client_connections_must_be_positive() -> None:
    from embedding_client import AsyncEmbeddingClient, EmbeddingClient

    for make in (EmbeddingClient, AsyncEmbeddingClient):
        with pytest.raises(ValueError, match="connections must be at least 1, not 0"):
            make("127.0.0.1:1", connections=0)
