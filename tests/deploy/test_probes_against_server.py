"""The real server, started the way the CPU overlay's Deployment starts it, answers the
kubelet's gRPC probes as the manifest expects: while loading, once warm, and while draining.

The environment and flags come from the rendered manifest (ConfigMap, env, command), with
only what a laptop needs changed: loopback instead of 0.0.0.0, free ports instead of the
container ports, and temporary directories where the pod mounts its emptyDirs.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from embedding_client import EmbeddingClient
from service.telemetry.names import QUEUE_ITEMS_METRIC
from tests.deploy.manifests import (
    Obj,
    container_env,
    mounts,
    one,
    prestop_sleep_s,
    render,
    server_argv,
    server_config,
    server_container,
)
from tests.servers import free_port, health_status, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Flags that say where to listen: replaced for a run on loopback.
ADDRESS_FLAGS = {
    *("--host", "--port", "--http-port", "--health-port", "--metrics-host", "--metrics-port"),
}
# A bulk stream that keeps the drain busy for a few seconds on two CPU cores.
STREAM_ITEMS = 300
STREAM_TEXT = "Kubernetes drains a pod: endpoints go first, then SIGTERM, then SIGKILL. " * 3

pytestmark = pytest.mark.integration


def local_env(container: Obj, pod: Obj, objects: list[Obj], tmp_path: Path) -> dict[str, str]:
    """The container's environment, with paths on the pod's volumes moved under tmp_path."""
    env = container_env(container, objects).values
    for mount_path in sorted(mounts(container, pod), key=len, reverse=True):
        if mount_path == "/dev/shm":
            continue
        local = tmp_path / mount_path.strip("/").replace("/", "_")
        local.mkdir(exist_ok=True)
        for name, value in env.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                env[name] = str(local) + value[len(mount_path) :]
    return env


def local_flags(
    container: Obj, objects: list[Obj], health_port: int, metrics_port: int
) -> list[str]:
    """The manifest's own flags, with loopback addresses and free ports instead."""
    flags: list[str] = []
    skip = False
    for arg in server_argv(container):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ADDRESS_FLAGS:
            skip = "=" not in arg
            continue
        flags.append(arg)
    flags += ["--host", "127.0.0.1", "--health-port", str(health_port)]
    flags += ["--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port)]
    if server_config(container, objects).gpu_memory_utilization > 0.3:
        # A share of this machine's RAM (on CPU) that the tests can afford.
        flags += ["--gpu-memory-utilization", "0.1"]
    return flags


def probe(address: str, service: str) -> int | str:
    try:
        return health_status(address, service, timeout=2.0)
    except grpc.RpcError as exc:
        return str(exc.code())


class LoadingWatch:
    """Polls (liveness, readiness) on the health port while the server starts."""

    def __init__(self, address: str, liveness: str, readiness: str) -> None:
        self.seen: list[tuple[int | str, int | str]] = []
        self._stop = threading.Event()
        self._args = (address, liveness, readiness)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        address, liveness, readiness = self._args
        while not self._stop.is_set():
            self.seen.append((probe(address, liveness), probe(address, readiness)))
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class BulkStream:
    """An EmbedStream in a thread: slow work in flight for the drain to wait for."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.results: list[bool] = []
        self.errors: list[BaseException] = []
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        items = (
            (str(i), f"{i}: {STREAM_TEXT}") for i in range(STREAM_ITEMS)
        )  # distinct: no cache hits
        try:
            with EmbeddingClient(self.address) as client:
                for result in client.embed_stream(items):
                    self.results.append(result.ok)
                    self.started.set()
        except BaseException as exc:
            self.errors.append(exc)
            self.started.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _startup_s(container: Obj) -> float:
    """As long as the kubelet waits before it restarts the pod (a cold torch.compile on two
    busy cores takes minutes)."""
    probe = container["startupProbe"]
    return float(probe["periodSeconds"] * probe["failureThreshold"])


def test_cpu_overlay_server_answers_the_probes_as_the_kubelet_sees_them(
    tmp_path: Path,
) -> None:
    objects = render("overlays/cpu")
    deployment = one(objects, "Deployment", "embedding-service")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    manifest = server_config(container, objects)
    startup = container["startupProbe"]["grpc"]["service"]
    readiness = container["readinessProbe"]["grpc"]["service"]
    liveness = container["livenessProbe"]["grpc"]["service"]

    health_port, metrics_port = free_port(), free_port()
    flags = local_flags(container, objects, health_port, metrics_port)
    health = f"127.0.0.1:{health_port}"

    # What the kubelet sees while the model loads: alive, not ready.
    watch = LoadingWatch(health, liveness, readiness)
    try:
        env = local_env(container, pod, objects, tmp_path)
        server = start_server(flags, tmp_path / "server.log", env=env, wait_s=_startup_s(container))
    finally:
        watch.stop()
    assert (SERVING, NOT_SERVING) in watch.seen, f"never alive-but-loading: {watch.seen}"

    try:
        for service in (startup, readiness, liveness):
            assert probe(health, service) == SERVING, service
        # The HPA's metric is exported (prometheus-adapter reads it by this name).
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(scrape, timeout=5) as response:
            assert QUEUE_ITEMS_METRIC in response.read().decode()

        bulk = BulkStream(server.address)
        assert bulk.started.wait(60), "the stream never got a result"
        assert not bulk.errors, bulk.errors

        # Deletion: after the preStop pause, the kubelet sends SIGTERM.
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        during_drain: list[int | str] = []
        while server.process.poll() is None and time.monotonic() - signalled < 5:
            during_drain.append(probe(health, readiness))
            if during_drain[-1] == NOT_SERVING:
                break
            time.sleep(0.1)
        assert during_drain and during_drain[-1] == NOT_SERVING, during_drain
        assert server.process.poll() is None, "exited before the stream in flight finished"
        assert len(bulk.results) < STREAM_ITEMS, "the stream finished before the drain began"
        assert probe(health, startup) == NOT_SERVING

        code = server.process.wait(timeout=manifest.grace_s + 30)
        exited_after = time.monotonic() - signalled
        bulk.join(timeout=10)
    finally:
        server.stop()

    assert code == 0, server.log_tail()
    # The drain let the stream in flight finish.
    assert not bulk.errors, bulk.errors
    assert len(bulk.results) == STREAM_ITEMS and all(bulk.results)
    # The kubelet sends SIGKILL terminationGracePeriodSeconds after deletion; preStop has
    # used part of it. The process must be gone before then.
    budget = pod["terminationGracePeriodSeconds"] - prestop_sleep_s(container)
    assert exited_after < budget, f"exit {exited_after:.1f}s after SIGTERM, budget {budget}s"
