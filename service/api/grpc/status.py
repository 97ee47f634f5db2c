"""Problems as google.rpc.Status with rich details (BadRequest, RetryInfo, ErrorInfo).

The same Status answers a unary call (through abort_with_status) and a failed stream item
(inside EmbedStreamResponse.error), so both paths speak with one voice.
"""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service.api.problems import Kind, Problem, describe

ERROR_DOMAIN = "embedding.v1"

_CODES = {
    Kind.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    Kind.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    Kind.NOT_FOUND: code_pb2.NOT_FOUND,
    # What grpc itself answers for a message over the receive limit.
    Kind.TOO_LARGE: code_pb2.RESOURCE_EXHAUSTED,
    Kind.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    Kind.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    Kind.UNAVAILABLE: code_pb2.UNAVAILABLE,
    Kind.INTERNAL: code_pb2.INTERNAL,
}


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(exc: BaseException) -> status_pb2.Status:
    """The status a caller sees for `exc`."""
    return problem_status(describe(exc))


def problem_status(problem: Problem) -> status_pb2.Status:
    details: list[Message] = []
    if problem.kind is Kind.INVALID_ARGUMENT:
        description = problem.message.removeprefix(f"{problem.field}: ")
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=problem.field, description=description
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if problem.retry_after_s is not None:
        seconds = problem.retry_after_s
        delay = duration_pb2.Duration(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if problem.reason:
        details.append(error_details_pb2.ErrorInfo(reason=problem.reason, domain=ERROR_DOMAIN))
    return status_pb2.Status(
        code=_CODES[problem.kind], message=problem.message, details=[_pack(d) for d in details]
    )
