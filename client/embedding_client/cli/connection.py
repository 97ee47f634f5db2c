"""The channel to the service (TLS files, API key) and the model it serves."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client.auth import API_KEY_ENV, auth_metadata
from embedding_client.channel import channel_options

# Codes a stream or a GetModelInfo call may fail with while the server restarts, drains or
# sheds load; every RPC is read-only, so trying again is safe.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

# grpc's own reconnect backoff tops out at 120 s by default; a restarted server should be
# found within a few seconds.
_RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 3000),
]


class FatalError(Exception):
    """The run cannot go on: unreachable server, refused key, unusable output (exit 3)."""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise FatalError("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )


@dataclass(frozen=True)
class Backoff:
    """Exponential waits with jitter, from `initial` doubling up to `cap` seconds."""

    initial: float = 0.25
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.initial * 2.0**attempt)
        return base * random.uniform(0.8, 1.2)


class Connection:
    """One channel for the whole run: grpc re-establishes it when the server comes back."""

    def __init__(self, target: str, tls: TlsFiles | None, api_key: str | None) -> None:
        # --api-key, else $EMBED_API_KEY (the clients' own rule); ValueError for a key that
        # cannot travel as metadata, before anything is opened.
        self.metadata = auth_metadata((), api_key)
        self._key_source = ""
        if self.metadata:
            self._key_source = "--api-key" if api_key else f"${API_KEY_ENV}"
        options = channel_options() + _RECONNECT_OPTIONS
        self.channel = (
            grpc.aio.secure_channel(target, tls.credentials(), options=options)
            if tls is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self.target = target
        self.stub = pb_grpc.EmbeddingServiceStub(self.channel)

    def refused(self) -> FatalError:
        """What to say when the server answers UNAUTHENTICATED: whether a key was sent,
        where it came from (never the key) and how to pass one."""
        how = f"--api-key KEY or set {API_KEY_ENV}=KEY"
        if not self._key_source:
            return FatalError(
                f"{self.target} requires an API key and none was given: pass one with {how}"
            )
        return FatalError(
            f"{self.target} refused the API key from {self._key_source} (wrong or revoked): "
            f"pass the right one with {how}"
        )

    async def model_info(
        self, retry_timeout: float, note: Callable[[str], None]
    ) -> pb.GetModelInfoResponse:
        """GetModelInfo, waiting up to `retry_timeout` s for a server that is down or loading."""
        backoff = Backoff()
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return await self.stub.GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=10.0, metadata=self.metadata
                )
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise self.refused() from err
                waited = time.monotonic() - started
                retryable = code in RETRYABLE or code == grpc.StatusCode.DEADLINE_EXCEEDED
                if not retryable or waited >= retry_timeout:
                    raise FatalError(
                        f"no model info from {self.target} after {waited:.0f} s: "
                        f"{code.name}: {err.details()}"
                    ) from err
                if attempt == 0:
                    note(f"waiting for {self.target} ({code.name}: {err.details()})")
                await asyncio.sleep(min(backoff.delay(attempt), retry_timeout - waited))
                attempt += 1

    async def close(self) -> None:
        await self.channel.close()
