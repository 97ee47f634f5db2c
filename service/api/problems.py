"""One error vocabulary for both faces: what went wrong, in words a caller can act on.

Code below the faces raises plain exceptions (service.errors, the batcher's, the engine's).
`describe` turns any of them into a Problem: a kind, a message that names the field, the
index and the limit, and retry advice where a retry can help. The gRPC face maps the kind to
a status code with rich details, the HTTP face to a status code with OpenAI's error JSON;
neither face decides on its own what an exception means.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

from service.errors import (
    BatcherClosedError,
    DeadlineExpiredError,
    DeadlineTooShortError,
    EngineUnavailableError,
    InvalidInputError,
    NotReadyError,
    QueueFullError,
    UnknownModelError,
)

log = logging.getLogger(__name__)

# A caller told "not serving" should come back once a restart or a drain has had a moment.
UNAVAILABLE_RETRY_S = 1.0


class Kind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"  # the request message itself is over the size limit
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Problem:
    kind: Kind
    message: str
    field: str = ""  # the request field at fault, such as "inputs[3]"
    reason: str = ""  # stable machine-readable name, such as "QUEUE_FULL"
    retry_after_s: float | None = None  # set where retrying later can succeed


def describe(exc: BaseException) -> Problem:
    """The Problem a caller sees for `exc`. Unknown exceptions become INTERNAL and are logged."""
    if isinstance(exc, InvalidInputError):
        return Problem(Kind.INVALID_ARGUMENT, str(exc), exc.field, exc.reason)
    if isinstance(exc, UnknownModelError):
        return Problem(Kind.NOT_FOUND, str(exc), "model", "MODEL_NOT_FOUND")
    if isinstance(exc, QueueFullError):
        return Problem(
            Kind.RESOURCE_EXHAUSTED,
            f"server is at capacity ({exc.reason}); retry after {exc.retry_after_s:.2f}s",
            reason="QUEUE_FULL",
            retry_after_s=max(exc.retry_after_s, 0.0),
        )
    if isinstance(exc, DeadlineTooShortError):
        return Problem(Kind.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, DeadlineExpiredError | asyncio.TimeoutError):
        return Problem(Kind.DEADLINE_EXCEEDED, "deadline passed before the input was embedded")
    if isinstance(exc, NotReadyError | BatcherClosedError):
        return Problem(
            Kind.UNAVAILABLE, f"server is not serving: {exc}", retry_after_s=UNAVAILABLE_RETRY_S
        )
    if isinstance(exc, EngineUnavailableError):
        return Problem(
            Kind.UNAVAILABLE, f"engine unavailable: {exc}", retry_after_s=UNAVAILABLE_RETRY_S
        )
    log.exception("unexpected error", exc_info=exc)
    return Problem(Kind.INTERNAL, "internal error")
