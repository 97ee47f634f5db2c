"""Map the service's exceptions to google.rpc.Status with rich details.

The same Status answers a unary call (through abort_with_status) and a failed stream item
(inside EmbedStreamResponse.error), so both paths speak with one voice.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service.batching import BatcherClosedError, DeadlineExpiredError, QueueFullError
from service.engines.base import EngineUnavailableError
from service.errors import InvalidInputError, NotReadyError
from service.pipeline import DeadlineTooShortError

log = logging.getLogger(__name__)

ERROR_DOMAIN = "embedding.v1"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _status(code: int, message: str, *details: object) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message, details=[_pack(d) for d in details])


def to_status(exc: BaseException) -> status_pb2.Status:
    """The status a caller sees for `exc`. Unknown exceptions become INTERNAL and are logged."""
    if isinstance(exc, InvalidInputError):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.description
        )
        return _status(
            code_pb2.INVALID_ARGUMENT,
            str(exc),
            error_details_pb2.BadRequest(field_violations=[violation]),
        )
    if isinstance(exc, QueueFullError):
        seconds = max(exc.retry_after_s, 0.0)
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))
        return _status(
            code_pb2.RESOURCE_EXHAUSTED,
            f"server is at capacity ({exc.reason}); retry after {exc.retry_after_s:.2f}s",
            error_details_pb2.RetryInfo(retry_delay=delay),
            error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain=ERROR_DOMAIN),
        )
    if isinstance(exc, DeadlineTooShortError):
        return _status(code_pb2.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, DeadlineExpiredError | asyncio.TimeoutError):
        return _status(code_pb2.DEADLINE_EXCEEDED, "deadline passed before the input was embedded")
    if isinstance(exc, NotReadyError | BatcherClosedError):
        return _status(code_pb2.UNAVAILABLE, f"server is not serving: {exc}")
    if isinstance(exc, EngineUnavailableError):
        return _status(code_pb2.UNAVAILABLE, f"engine unavailable: {exc}")
    log.exception("unexpected error", exc_info=exc)
    return _status(code_pb2.INTERNAL, "internal error")
