"""Observability: OpenTelemetry traces and metrics, a Prometheus endpoint, structured logs.

The rest of the service knows telemetry only through two small hooks it declares itself
(service.batching.BatchObserver, service.pipeline.StageObserver) and through one gRPC
interceptor that the server installs; everything OpenTelemetry lives in this package.
"""

from service.telemetry.names import QUEUE_ITEMS_METRIC, QUEUE_TOKENS_METRIC
from service.telemetry.wiring import MetricsEndpoint, Telemetry

__all__ = ["QUEUE_ITEMS_METRIC", "QUEUE_TOKENS_METRIC", "MetricsEndpoint", "Telemetry"]
