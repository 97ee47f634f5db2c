"""ASGI middleware for the HTTP face: a SERVER span, a duration record and log lines.

It follows OpenTelemetry's HTTP server conventions: span name "{method} {route}", the
attributes http.request.method, http.route, http.response.status_code, url.path, url.scheme
and network.protocol.version, a W3C traceparent from the request as parent, and status ERROR
only for 5xx (a 4xx is the caller's mistake). The span is current while the route runs, so
the pipeline's stage spans are its children and engine batches link to it, as on gRPC.

Cost with tracing off: two clock reads, one dict lookup for the attribute key and one
histogram record. /health is neither traced nor measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
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

from service.telemetry import names
from service.telemetry.histograms import AttributeKey
from service.telemetry.metrics import Instruments

log = logging.getLogger("service.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

UNTRACED_PATHS = frozenset({"/health"})
# What an unknown path is recorded under, so scanners cannot mint a series per path; its
# log line still names the path, cut to this many characters.
OTHER_ROUTE = "other"
_MAX_LOGGED_PATH = 200
# A body this long is an error JSON of ours; longer ones are not read for the log line.
_MAX_LOGGED_BODY = 4096


class HttpTelemetry:
    def __init__(
        self, app: App, instruments: Instruments, tracer: Tracer | None, routes: frozenset[str]
    ) -> None:
        self._app = app
        self._record = instruments.http_duration.record
        self._tracer = tracer
        self._routes = routes
        self._keys: dict[tuple[str, str, int, str], AttributeKey] = {}

    def _key(self, method: str, route: str, status: int, scheme: str) -> AttributeKey:
        found = self._keys.get((method, route, status, scheme))
        if found is None:
            found = (
                (names.HTTP_METHOD, method),
                (names.HTTP_ROUTE, route),
                (names.HTTP_STATUS_CODE, status),
                (names.URL_SCHEME, scheme),
            )
            if status >= 500:
                found = (*found, (names.ERROR_TYPE, str(status)))
            self._keys[(method, route, status, scheme)] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in UNTRACED_PATHS:
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        route = path if path in self._routes else OTHER_ROUTE
        span, token = self._start_span(scope, method, route) if self._tracer else (None, None)
        status = 500
        error_body = b""

        async def sending(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif status >= 400 and len(error_body) < _MAX_LOGGED_BODY:
                error_body += message.get("body", b"")
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - started
            self._record(elapsed, self._key(method, route, status, scope.get("scheme", "http")))
            if span is not None:
                span.set_attribute(names.HTTP_STATUS_CODE, status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR, str(status))
                span.end()
                otel_context.detach(token)  # type: ignore[arg-type]
            if status >= 400 or log.isEnabledFor(logging.DEBUG):
                _log_request(scope, (method, route, status), elapsed, span, error_body)

    def _start_span(self, scope: Scope, method: str, route: str) -> tuple[Span, object]:
        assert self._tracer is not None
        parent = propagate.extract(_headers(scope))
        attributes = {
            names.HTTP_METHOD: method,
            names.HTTP_ROUTE: route,
            names.URL_PATH: scope.get("path", ""),
            names.URL_SCHEME: scope.get("scheme", "http"),
            names.NETWORK_PROTOCOL_VERSION: scope.get("http_version", "1.1"),
        }
        span = self._tracer.start_span(
            f"{method} {route}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        token = otel_context.attach(set_span_in_context(span, parent))
        return span, token


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _log_request(
    scope: Scope,
    request: tuple[str, str, int],
    elapsed: float,
    span: Span | None,
    error_body: bytes,
) -> None:
    """DEBUG for every request, WARNING for a refused or failed one. Headers (API keys) and
    bodies are never logged; an error's message names fields and limits, not input text.
    The line names the path asked for (an unknown one too: metrics record it as "other")."""
    method, route, status = request
    path = _printable(scope.get("path", ""))
    level = logging.WARNING if 400 <= status < 499 or status >= 500 else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    if span is not None:
        ctx = span.get_span_context()
        trace_id, span_id = format_trace_id(ctx.trace_id), format_span_id(ctx.span_id)
    else:
        traceparent = _headers(scope).get("traceparent", "")
        trace_id, span_id = (traceparent[3:35] if len(traceparent) >= 35 else ""), ""
    message = ""
    if error_body:
        try:
            message = str(orjson.loads(error_body)["error"]["message"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = ""
    ms = elapsed * 1000
    log.log(
        level,
        "%s %s %d %.1fms%s",
        method,
        path,
        status,
        ms,
        f": {message}" if message else "",
        extra={
            "http_method": method,
            "http_route": route,
            "url_path": path,
            "http_status": status,
            "duration_ms": round(ms, 3),
            "trace_id": trace_id,
            "span_id": span_id,
        },
    )


def _printable(path: str) -> str:
    """A client's path made safe for a log line: bounded, control characters escaped."""
    cut = path[:_MAX_LOGGED_PATH]
    shown = cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")
    return shown + ("..." if len(path) > _MAX_LOGGED_PATH else "")
