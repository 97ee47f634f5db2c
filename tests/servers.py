"""Start the real service as a subprocess on loopback and wait until health says SERVING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_status(address: str, service: str = "", timeout: float = 30.0) -> int:
    """One Health/Check. The deadline only bounds a hang: a server that is not listening
    answers UNAVAILABLE at once, and a busy machine must not turn an answer into an error."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return int(stub.Check(request, timeout=timeout).status)


@dataclass
class ServerProcess:
    address: str  # gRPC host:port
    process: subprocess.Popen[bytes]
    log_path: Path
    http_port: int = 0

    @property
    def base_url(self) -> str:
        """The HTTP face's OpenAI base URL."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        return int(self.process.returncode)


def start_server(
    args: Sequence[str], log_path: Path, env: dict[str, str] | None = None, wait_s: float = 600
) -> ServerProcess:
    """Starts the service and polls health until SERVING. `wait_s` bounds the poll (a server
    that never comes up), not the start-up: an engine start on two busy cores takes minutes."""
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--http-port", str(http_port)]
    cmd += args
    log = log_path.open("wb")
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    server = ServerProcess(f"127.0.0.1:{port}", process, log_path, http_port)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if health_status(server.address) == health_pb2.HealthCheckResponse.SERVING:
                return server
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not SERVING after {wait_s}s:\n{server.log_tail()}")
