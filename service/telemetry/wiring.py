"""The Telemetry object the server wires in: providers, instruments, hooks, interceptor.

`Telemetry.from_config` builds what production runs:
- metrics: a Prometheus endpoint at /metrics on `metrics_port` (its own HTTP server) and,
  when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._METRICS_ENDPOINT) is set, OTLP push as well;
- traces: only when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set, through a
  batch span processor; sampling follows OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG.
  Without an endpoint no tracer exists at all, so nothing is created per call.
Tests build `Telemetry(...)` with their own tracer provider and readers (in-memory):
OpenTelemetry's global providers can be set only once per process, so none is set here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.resources import PROCESS_PID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry, start_http_server

from service import version
from service.config import ServiceConfig
from service.telemetry import names
from service.telemetry.batches import BatchTelemetry
from service.telemetry.histograms import (
    HistogramReader,
    PeriodicExportingReader,
    PrometheusReader,
)
from service.telemetry.http import App, HttpTelemetry
from service.telemetry.interceptor import TelemetryInterceptor
from service.telemetry.metrics import CacheSource, EngineSource, Instruments, QueueSource
from service.telemetry.stages import PipelineTelemetry

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "embedding-service"


class MetricsEndpoint:
    """prometheus_client's HTTP server (a daemon thread) serving one registry at /metrics."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        except OSError as exc:
            # Metrics are not worth refusing traffic over; a scraper sees the target down.
            log.error(
                "cannot serve /metrics on %s:%d (%s); going on without", self.host, self.port, exc
            )
            self.port = 0
            return
        self.port = int(self._server.server_port)  # the real one when 0 was asked for
        log.debug("serving Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None


class Telemetry:
    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        metric_readers: Sequence[HistogramReader] = (),
        resource: Resource | None = None,
        metrics_endpoint: MetricsEndpoint | None = None,
        enabled: bool = True,
        owns_providers: bool = False,
    ) -> None:
        """`metric_readers` get the SDK's instruments and the service's histograms; with
        none, metrics are recorded and dropped."""
        service_version = version()
        self.tracer_provider = tracer_provider
        self.meter_provider: SdkMeterProvider | None = (
            SdkMeterProvider(resource=resource, metric_readers=metric_readers)
            if metric_readers
            else None
        )
        self.metrics_endpoint = metrics_endpoint
        self._owns_providers = owns_providers
        tracer = (
            tracer_provider.get_tracer(names.INSTRUMENTATION_SCOPE, service_version)
            if tracer_provider is not None and enabled
            else None
        )
        meter = (self.meter_provider or NoOpMeterProvider()).get_meter(
            names.INSTRUMENTATION_SCOPE, service_version
        )
        self.instruments = Instruments(
            meter, InstrumentationScope(names.INSTRUMENTATION_SCOPE, service_version)
        )
        for reader in metric_readers:
            reader.attach(self.instruments.histograms)
        self.batch_observer = BatchTelemetry(self.instruments, tracer) if enabled else None
        self.stages = PipelineTelemetry(self.instruments, tracer) if enabled else None
        self.interceptors = [TelemetryInterceptor(self.instruments, tracer)] if enabled else []
        self._enabled = enabled
        self._tracer = tracer

    def http_app(self, app: App, routes: frozenset[str]) -> App:
        """The HTTP face's ASGI app, with a span, a duration record and log lines per request
        (`routes`: the paths recorded by name; any other is recorded as "other")."""
        if not self._enabled:
            return app
        return HttpTelemetry(app, self.instruments, self._tracer, routes)

    @classmethod
    def disabled(cls) -> Telemetry:
        """No interceptor, no hooks, no exporters: the baseline for overhead measurements."""
        return cls(enabled=False)

    @classmethod
    def from_config(
        cls,
        config: ServiceConfig,
        environ: Mapping[str, str] | None = None,
        span_processor: SpanProcessor | None = None,
        front_end: int | None = None,
    ) -> Telemetry:
        """Exporters from the config and the standard OTEL_* variables.

        `span_processor` turns tracing on without OTLP (the overhead benchmark uses it).
        `front_end`: this process's index among several front ends; its spans name it, and
        its /metrics is served on a private loopback port for the supervisor to merge.
        """
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(metrics_endpoint=None)
        resource = _resource(front_end)
        processors: list[SpanProcessor] = []
        if _otlp_wanted(env, "TRACES"):
            processors.append(BatchSpanProcessor(_otlp_span_exporter(env)))
        if span_processor is not None:
            processors.append(span_processor)
        tracer_provider = None
        if processors:
            # The sampler comes from OTEL_TRACES_SAMPLER (default parentbased_always_on).
            tracer_provider = SdkTracerProvider(resource=resource)
            for processor in processors:
                tracer_provider.add_span_processor(processor)
        readers: list[HistogramReader] = []
        endpoint = None
        if config.metrics_port:
            # A registry of our own: the global one would collect twice if two servers ran
            # in one process, and would also expose prometheus_client's process metrics.
            registry = CollectorRegistry()
            readers.append(PrometheusReader(registry=registry))
            if front_end is None:
                host, port = config.metrics_host or config.host, config.metrics_port
            else:
                host, port = "127.0.0.1", 0
            endpoint = MetricsEndpoint(host, port, registry)
        if _otlp_wanted(env, "METRICS"):
            readers.append(PeriodicExportingReader(_otlp_metric_exporter(env)))
        return cls(
            tracer_provider=tracer_provider,
            metric_readers=readers,
            resource=resource,
            metrics_endpoint=endpoint,
            owns_providers=True,
        )

    @property
    def metrics_port(self) -> int:
        """The port /metrics is served on (0: not served)."""
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else 0

    def watch(
        self,
        queue: QueueSource | None,
        engine: EngineSource | None,
        cache: CacheSource | None = None,
    ) -> None:
        self.instruments.watch(queue, engine, cache)

    def start(self) -> None:
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()

    def shutdown(self) -> None:
        """Stop serving /metrics; flush and stop exporters this object created."""
        self.instruments.watch(None, None)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        if self._owns_providers:
            if isinstance(self.tracer_provider, SdkTracerProvider):
                self.tracer_provider.shutdown()
            if isinstance(self.meter_provider, SdkMeterProvider):
                self.meter_provider.shutdown()


def _resource(front_end: int | None = None) -> Resource:
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; a name set there wins.
    attributes: dict[str, str | int] = {SERVICE_VERSION: version()}
    if front_end is not None:
        attributes.update({PROCESS_PID: os.getpid(), names.FRONT_END: front_end})
    resource = Resource.create(attributes)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _otlp_wanted(env: Mapping[str, str], signal: str) -> bool:
    """OTLP for a signal: an endpoint is set, and OTEL_<SIGNAL>_EXPORTER does not say none."""
    if env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


def _protocol(env: Mapping[str, str], signal: str) -> str:
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
    return (specific or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()


# The exporters read their endpoint, headers, TLS and timeout settings from OTEL_* variables
# themselves; only the protocol picks the class. Imported lazily: most runs export nothing.
def _otlp_span_exporter(env: Mapping[str, str]) -> SpanExporter:
    if _protocol(env, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def _otlp_metric_exporter(env: Mapping[str, str]) -> MetricExporter:
    if _protocol(env, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter()
