"""Start and stop the two servers under test, each in a process of its own.

- the service: `python -m service`, with the engine settings of the run's ServiceConfig;
- vLLM's own OpenAI-compatible server: `python -m vllm.entrypoints.openai.api_server`, with
  the same model and the same engine settings, translated flag by flag.

Both spawn vLLM's engine-core process as a child. The pid kept is the serving process's
own, whose CPU time is the cost of the serving path.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import ServiceConfig
from service.model_card import resolve_model_path
from service.server import served_names

START_TIMEOUT_S = 300.0


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int  # the service's gRPC port; vLLM's HTTP port
    log: Path
    http_port: int = 0  # the service's HTTP face
    metrics_port: int = 0  # the service's Prometheus /metrics (0: off)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(
    name: str, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None
) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}),
        )
    return Server(name, process, port, log)


async def _until_ready(server: Server, probe: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode}; see {server.log}"
            )
        try:
            if await probe():
                return
        except (OSError, aiohttp.ClientError, grpc.aio.AioRpcError):
            pass
        await asyncio.sleep(1.0)
    server.stop()
    raise TimeoutError(f"{server.name} not ready after {START_TIMEOUT_S:.0f}s; see {server.log}")


async def start_service(
    service_args: list[str],
    log: Path,
    name: str = "service",
    *,
    metrics: bool = False,
    env: dict[str, str] | None = None,
) -> Server:
    """The service on free loopback ports (gRPC and HTTP, and /metrics when `metrics`),
    ready once its health says SERVING."""
    port, http_port = free_port(), free_port()
    metrics_port = free_port() if metrics else 0
    argv = [
        sys.executable, "-m", "service", *service_args,
        "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port), "--health-port", "0",
    ]  # fmt: skip
    server = _spawn(name, argv, port, log, env)
    server.http_port, server.metrics_port = http_port, metrics_port

    async def probe() -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service="embedding.v1.EmbeddingService"), timeout=2
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    await _until_ready(server, probe)
    return server


def vllm_server_args(config: ServiceConfig) -> list[str]:
    """vLLM's server flags for the engine settings the service derives from `config`."""
    # Here, not at the top: the null-engine benchmarks run where vllm is not installed.
    from service.engines.vllm_engine import _resolve_dtype as resolve_dtype

    return [
        "--model", str(resolve_model_path(config.model)),
        "--served-model-name", served_names(config)[0],
        "--runner", "pooling",
        "--dtype", resolve_dtype(config.dtype),
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--max-num-batched-tokens", str(max(config.max_batch_tokens, config.max_model_len)),
        "--max-num-seqs", str(config.max_batch_items),
        *(["--max-model-len", str(config.max_model_len)] if config.max_model_len else []),
        "--enforce-eager" if config.enforce_eager else "--no-enforce-eager",
        # The service's engine default on one device (service/engines/vllm_engine.py).
        "--distributed-executor-backend", "uni",
        *shlex.split(config.vllm_args),  # the same passthrough, last so it wins
        *([] if config.prefix_caching else ["--no-enable-prefix-caching"]),
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]  # fmt: skip


def vllm_default_args(config: ServiceConfig) -> list[str]:
    """vLLM's server with its own engine defaults: only the model, its name, the pooling
    runner (which a user serving embeddings must ask for), and the service's memory share.
    vLLM's own share, 92% of RAM on CPU, cannot start beside another engine; it sizes the KV
    cache only, which a small embedding model never fills."""
    return [
        "--model", str(resolve_model_path(config.model)),
        "--served-model-name", served_names(config)[0],
        "--runner", "pooling",
        "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]  # fmt: skip


VLLM_API_SERVER = "vllm.entrypoints.openai.api_server"
# `vllm serve`, the one launcher that honours --api-server-count (benchmarks/vllm_serve.py).
VLLM_SERVE = "benchmarks.vllm_serve"


async def start_vllm_server(
    args: list[str],
    log: Path,
    name: str = "vllm",
    env: dict[str, str] | None = None,
    module: str = VLLM_API_SERVER,
) -> Server:
    """vLLM's OpenAI server on a free loopback port, ready once /health answers 200.

    `args`: vllm_server_args(config) for the service's engine settings, or just the model
    for vLLM's own defaults. `module`: VLLM_SERVE to start it as `vllm serve` does."""
    port = free_port()
    argv = [
        sys.executable, "-m", module,
        *args, "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    server = _spawn(name, argv, port, log, env)

    async def probe() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/health") as reply,
        ):
            return reply.status == 200

    await _until_ready(server, probe)
    return server
