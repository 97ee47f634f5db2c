"""Problems as HTTP statuses with OpenAI's error body: {"error": {message, type, param, code}}."""

from __future__ import annotations

import math

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


def error_response(problem: Problem) -> Response:
    status, kind, code = _STATUS[problem.kind]
    if problem.kind is Kind.INVALID_ARGUMENT and problem.reason:
        code = problem.reason.lower()
    body = {
        "error": {
            "message": problem.message,
            "type": kind,
            "param": problem.field or None,
            "code": code,
        }
    }
    headers = {}
    if problem.retry_after_s is not None:
        # Retry-After takes whole seconds; the openai SDK also reads retry-after-ms.
        headers["retry-after"] = str(max(1, math.ceil(problem.retry_after_s)))
        headers["retry-after-ms"] = str(max(1, round(problem.retry_after_s * 1000)))
    if problem.kind is Kind.UNAUTHENTICATED:
        headers["www-authenticate"] = "Bearer"
    return Response(orjson.dumps(body), status, headers, media_type="application/json")
