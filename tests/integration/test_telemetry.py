"""The service as operators run it (`python -m service`), scraped and read from outside.

The null engine keeps this fast: what is under test is the process's wiring of flags,
the /metrics endpoint, the JSON log lines and the timing metadata, not the model.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.telemetry import QUEUE_ITEMS_METRIC, QUEUE_TOKENS_METRIC
from tests.servers import ServerProcess, free_port, start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SECRET_TEXT = "SECRET-TEXT-do-not-log"
# RPC deadlines and bounds on polls: only a hang reaches them, however loaded the machine.
PATIENCE_S = 600.0


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def null_server(
    metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("telemetry") / "server.log"
    args = [
        "--engine", "null",
        "--metrics-port", str(metrics_port),
        "--metrics-host", "127.0.0.1",
        "--log-format", "json",
        "--log-level", "debug",
    ]  # fmt: skip
    server = start_server(args, log)
    yield server
    server.stop()


def _scrape(port: int) -> dict[str, Metric]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=PATIENCE_S) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_scrape_a_running_server(null_server: ServerProcess, metrics_port: int) -> None:
    with grpc.insecure_channel(null_server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        texts = [f"text {i}" for i in range(37)]
        reply, call = stub.Embed.with_call(pb.EmbedRequest(inputs=texts), timeout=PATIENCE_S)
    assert len(reply.embeddings) == 37
    trailing = dict(call.trailing_metadata() or ())
    assert float(str(trailing["x-total-time"])) > 0
    assert {"x-queue-time", "x-inference-time", "x-tokenize-time"} <= set(trailing)

    # The server records a call once it has answered it: wait for the record, not race it.
    give_up = time.monotonic() + PATIENCE_S
    while not _ok_embed_counts(families := _scrape(metrics_port)):
        assert time.monotonic() < give_up, "the call was never counted"
        time.sleep(0.05)
    for name in (QUEUE_ITEMS_METRIC, QUEUE_TOKENS_METRIC):
        family = families[name]
        assert family.type == "gauge"
        assert [s.value for s in family.samples] == [0]  # idle again
    inputs = families["embedding_inputs"].samples
    assert sum(s.value for s in inputs if s.name == "embedding_inputs_total") == 37 + 1
    assert [s.value for s in _ok_embed_counts(families)] == [1]
    up = families["embedding_engine_up"].samples
    assert [s.value for s in up] == [1]


def _ok_embed_counts(families: dict[str, Metric]) -> list[Sample]:
    """The call-duration histogram's counts of Embed calls that ended OK."""
    family = families.get("rpc_server_call_duration_seconds")
    return [
        s
        for s in (family.samples if family else [])
        if s.name.endswith("_count")
        and s.labels["rpc_method"] == "Embed"
        and s.labels["rpc_grpc_status_code"] == "0"
    ]


def test_json_log_lines_carry_the_trace_and_never_the_text(null_server: ServerProcess) -> None:
    with grpc.insecure_channel(null_server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        stub.Embed(
            pb.EmbedRequest(inputs=[SECRET_TEXT]),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=PATIENCE_S,
        )
        with pytest.raises(grpc.RpcError):
            stub.Embed(
                pb.EmbedRequest(inputs=[SECRET_TEXT], options=pb.EmbedOptions(dimensions=3)),
                timeout=PATIENCE_S,
            )
    # The server logs a call after answering it: wait for the line rather than race it.
    deadline = time.monotonic() + PATIENCE_S  # a bound on the poll, not a speed assertion
    while True:
        lines = [json.loads(line) for line in _log_lines(null_server.log_path)]
        rpc = [line for line in lines if line.get("logger") == "service.rpc"]
        if any(line["grpc_status"] == "INVALID_ARGUMENT" for line in rpc):
            break
        assert time.monotonic() < deadline, "no WARNING line for the failed call"
        time.sleep(0.05)
    ok = [line for line in rpc if line.get("trace_id") == TRACE_ID]
    assert ok and ok[0]["level"] == "DEBUG" and ok[0]["grpc_status"] == "OK"
    failed = [line for line in rpc if line["grpc_status"] == "INVALID_ARGUMENT"]
    assert len(failed) == 1 and failed[0]["level"] == "WARNING"
    assert "options.dimensions" in failed[0]["message"]
    assert SECRET_TEXT not in null_server.log_path.read_text()


def _log_lines(path: Path) -> list[str]:
    # The log also holds lines written before logging was configured (none expected).
    return [line for line in path.read_text().splitlines() if line.startswith("{")]
