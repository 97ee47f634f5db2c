"""Optional API keys on the embedding RPCs; health and reflection stay open for probes.

Keys are compared as SHA-256 digests with hmac.compare_digest, against every configured key
without stopping at the first match, so timing reveals neither a key nor which one matched.
Keys never appear in logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

PROTECTED_PREFIX = "/embedding.v1.EmbeddingService/"


def load_keys(inline: str, file: str) -> list[str]:
    """Keys from a comma-separated setting and/or a file with one key per line (# comments)."""
    keys = [k.strip() for k in inline.split(",")]
    if file:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return [k for k in keys if k]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def presented_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>`."""
    for name, value in metadata or ():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if name == "x-api-key":
            return text
        if name == "authorization" and text[:7].lower() == "bearer ":
            return text[7:]
    return ""


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise ValueError("ApiKeyInterceptor needs at least one key")

    def accepts(self, key: str) -> bool:
        candidate = _digest(key)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched and bool(key)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(PROTECTED_PREFIX):
            return handler
        if self.accepts(presented_key(handler_call_details.invocation_metadata)):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape that answers UNAUTHENTICATED without running the RPC."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid API key: send 'authorization: Bearer <key>' or 'x-api-key'",
        )

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
