"""One grpc.aio server interceptor for traces, the RPC duration metric, call logs and timing.

Written here rather than taken from opentelemetry-instrumentation-grpc, whose aio interceptor
records `abort_with_status` and cancellations as OK. The status recorded here is the one the
caller gets: the code an abort set on the context, CANCELLED when the caller went away, and
DEADLINE_EXCEEDED when its deadline passed.

Cost with tracing off: two clock reads and one histogram record with a prebuilt attribute
key. Handler wrappers are built once per method, not per call; without other interceptors
the server registers them directly (`wrap`) and skips intercepting altogether.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import (
    Span,
    SpanKind,
    StatusCode,
    Tracer,
    format_span_id,
    format_trace_id,
    set_span_in_context,
)
from opentelemetry.util.types import Attributes

from service.telemetry import names
from service.telemetry.histograms import AttributeKey
from service.telemetry.metrics import Instruments

log = logging.getLogger("service.rpc")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Server-side codes that mean the server failed (OpenTelemetry's gRPC conventions); the
# others (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED, ...) are the caller's business and
# leave the span status unset.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

# Strings: grpc's classes are generic only in the type stubs.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def status_code_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def _cancel_code(context: Context) -> grpc.StatusCode:
    """A handler is cancelled both when the caller cancels and when its deadline passes."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _incoming_trace_id(context: Context) -> str:
    """The caller's trace id from its W3C traceparent, for logs when tracing is off."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str) and len(value) >= 35:
            return value[3:35]
    return ""


class _Method:
    """Everything about one RPC method that does not change between calls."""

    def __init__(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.name = f"{service}/{method}"
        self.span_attrs: Attributes = {
            names.RPC_SYSTEM: "grpc",
            names.RPC_SERVICE: service,
            names.RPC_METHOD: method,
        }
        self.metric_attrs: dict[grpc.StatusCode, AttributeKey] = {
            code: (
                (names.RPC_SYSTEM, "grpc"),
                (names.RPC_SERVICE, service),
                (names.RPC_METHOD, method),
                (names.RPC_STATUS_CODE, status_code_number(code)),
            )
            for code in grpc.StatusCode
        }


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Put it first in the server's interceptor list, so calls refused by later
    interceptors (API keys) are measured too."""

    def __init__(
        self,
        instruments: Instruments,
        tracer: Tracer | None,
        excluded_prefixes: tuple[str, ...] = (HEALTH_PREFIX,),
    ) -> None:
        self._m = instruments
        self._tracer = tracer
        self._excluded = excluded_prefixes
        # method -> (the handler seen, its wrapper): the generic handler returns the same
        # object for every call, so the wrapper is built once.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method or method.startswith(self._excluded):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, _Method(method))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: Handler, full_method: str) -> Handler:
        """The handler with telemetry around it, for registering directly: cheaper than
        intercepting, which grpc.aio pays on every call."""
        return self._wrap(handler, _Method(full_method))

    def _wrap(self, handler: Handler, method: _Method) -> Handler:
        codecs: Mapping[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method), **codecs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method), **codecs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method), **codecs
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, method), **codecs
            )
        return handler

    # ----------------------------------------------------------------- per-call wrappers
    # The common path (tracing off, status OK, DEBUG off) runs inline: two clock reads and
    # one deferred histogram record. Every extra Python call on it shows in the null-engine
    # benchmark.

    def _unary(
        self, behavior: Callable[..., Any], method: _Method
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        record = self._m.rpc_duration.record
        attrs = method.metric_attrs
        ok_attrs = attrs[grpc.StatusCode.OK]  # StatusCode's hash is a Python call: skip it
        tracer = self._tracer
        ok = grpc.StatusCode.OK

        async def call(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            span, token = self._start_span(method, context) if tracer else (None, None)
            code = grpc.StatusCode.UNKNOWN
            error: BaseException | None = None
            try:
                response = await behavior(request, context)
                code = context.code() or ok
                return response
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            except Exception as exc:
                error = exc
                raise
            finally:
                elapsed = time.perf_counter() - started
                record(elapsed, ok_attrs if code is ok else attrs[code])
                if span is not None:
                    _end_span(span, token, code, context, error)
                if code is not ok or log.isEnabledFor(logging.DEBUG):
                    _log_call(method, code, elapsed, span, context)

        return call

    def _streaming(
        self, behavior: Callable[..., Any], method: _Method
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        record = self._m.rpc_duration.record
        tracer = self._tracer

        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            span, token = self._start_span(method, context) if tracer else (None, None)
            code = grpc.StatusCode.UNKNOWN
            error: BaseException | None = None
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                else:  # a handler that writes with context.write()
                    await result
                code = context.code() or grpc.StatusCode.OK
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = _cancel_code(context)
                raise
            except Exception as exc:
                error = exc
                raise
            finally:
                elapsed = time.perf_counter() - started
                record(elapsed, method.metric_attrs[code])
                if span is not None:
                    _end_span(span, token, code, context, error)
                if code is not grpc.StatusCode.OK or log.isEnabledFor(logging.DEBUG):
                    _log_call(method, code, elapsed, span, context)

        return call

    def _start_span(self, method: _Method, context: Context) -> tuple[Span, object]:
        assert self._tracer is not None
        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        parent = propagate.extract(carrier)
        span = self._tracer.start_span(
            method.name, context=parent, kind=SpanKind.SERVER, attributes=method.span_attrs
        )
        # Current for the handler, so pipeline spans become its children and each queued
        # item carries it for the batch span's links.
        token = otel_context.attach(set_span_in_context(span, parent))
        return span, token


def _end_span(
    span: Span,
    token: object,
    code: grpc.StatusCode,
    context: Context,
    error: BaseException | None,
) -> None:
    span.set_attribute(names.RPC_STATUS_CODE, status_code_number(code))
    if code in _SERVER_ERRORS:
        span.set_status(StatusCode.ERROR, f"{code.name}: {context.details() or ''}")
    if error is not None:
        span.record_exception(error)
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


def _log_call(
    method: _Method,
    code: grpc.StatusCode,
    elapsed: float,
    span: Span | None,
    context: Context,
) -> None:
    """DEBUG for every call, WARNING for a failed one (a caller leaving is not a failure).

    Metadata is never logged (it carries API keys), nor request contents; details are the
    status message, which names fields and limits, not input text.
    """
    failed = code is not grpc.StatusCode.OK and code is not grpc.StatusCode.CANCELLED
    level = logging.WARNING if failed else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    if span is not None:
        ctx = span.get_span_context()
        trace_id, span_id = format_trace_id(ctx.trace_id), format_span_id(ctx.span_id)
    else:
        trace_id, span_id = _incoming_trace_id(context), ""
    details = (context.details() or "") if code is not grpc.StatusCode.OK else ""
    ms = elapsed * 1000
    log.log(
        level,
        "%s %s %.1fms%s",
        method.name,
        code.name,
        ms,
        f": {details}" if details else "",
        extra={
            "rpc_method": method.name,
            "grpc_status": code.name,
            "duration_ms": round(ms, 3),
            "trace_id": trace_id,
            "span_id": span_id,
        },
    )
