"""Every HTTP error in OpenAI's shape: {"error": {message, type, param, code}}.

Problems (service.api.problems) map to a status by kind; the errors that are not a request's
problem but the protocol's (an unknown route, a wrong method, a body too slow, a server
full of connections, a malformed request line) take their status directly, so a client
never has to parse anything but this one body.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import orjson
from starlette.responses import Response

from service.api.problems import Kind, Problem

# (status, OpenAI's error type, default code) per kind.
_STATUS: dict[Kind, tuple[int, str, str | None]] = {
    Kind.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    Kind.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    Kind.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    Kind.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    Kind.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    Kind.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
    Kind.UNAVAILABLE: (503, "service_unavailable_error", "service_unavailable"),
    Kind.INTERNAL: (500, "server_error", None),
}

# (OpenAI's error type, code) of the protocol's own errors, by status.
_PROTOCOL: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "invalid_http_request"),
    404: ("invalid_request_error", "unknown_route"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("timeout_error", "request_timeout"),
    500: ("server_error", None),
    503: ("service_unavailable_error", "too_many_connections"),
}


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(problem: Problem) -> Response:
    status, kind, code = _STATUS[problem.kind]
    if problem.kind is Kind.INVALID_ARGUMENT and problem.reason:
        code = problem.reason.lower()
    headers = {}
    if problem.retry_after_s is not None:
        # Retry-After takes whole seconds; the openai SDK also reads retry-after-ms.
        headers["retry-after"] = str(max(1, math.ceil(problem.retry_after_s)))
        headers["retry-after-ms"] = str(max(1, round(problem.retry_after_s * 1000)))
    if problem.kind is Kind.UNAUTHENTICATED:
        headers["www-authenticate"] = "Bearer"
    body = error_body(problem.message, kind, code, problem.field or None)
    return Response(body, status, headers, media_type="application/json")


def protocol_error_body(status: int, message: str) -> bytes:
    """The body of an error the protocol raised."""
    kind, code = _PROTOCOL.get(
        status, ("invalid_request_error" if status < 500 else "server_error", None)
    )
    return error_body(message, kind, code)


def protocol_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        protocol_error_body(status, message), status, headers, media_type="application/json"
    )
