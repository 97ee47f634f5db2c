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
import urllib.error
import urllib.request
from collections.abc import Iterator
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
    render,
    server_argv,
    server_config,
    server_container,
)
from tests.servers import ServerProcess, free_port, health_status, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Flags that say where to listen: replaced for a run on loopback.
ADDRESS_FLAGS = {
    *("--host", "--port", "--http-port", "--health-port", "--metrics-host", "--metrics-port"),
}
# A bulk stream in flight through the drain: a whole number of 64-item messages, so every
# item has left before the client holds its side of the stream open.
STREAM_ITEMS = 320
STREAM_TEXT = "Kubernetes drains a pod: endpoints go first, then SIGTERM, then SIGKILL. " * 3
# The drain runs with a grace far longer than the test could take, so nothing here depends
# on how fast this machine is; the manifest's own grace is checked against its budget, as
# arithmetic, in test_manifests.py.
DRAIN_GRACE_S = 3600
# How long the test waits for something that must happen before calling it hung. Shorter
# than DRAIN_GRACE_S: a server that exits within it did not sit out its grace.
PATIENCE_S = 600.0

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
        # A generous deadline: the answer, not its speed, is what is checked.
        return health_status(address, service, timeout=30.0)
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


class HeldStream:
    """An EmbedStream in a thread that the test holds in flight until release(): every item
    is sent, then the request side stays open and the reader stops after the first result.
    The drain therefore begins with the call open and STREAM_ITEMS - 1 results undelivered,
    however fast the machine is."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.results: list[tuple[str, bool]] = []
        self.errors: list[BaseException] = []
        self.first = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _items(self) -> Iterator[tuple[str, str]]:
        for i in range(STREAM_ITEMS):
            yield str(i), f"{i}: {STREAM_TEXT}"  # distinct: no cache hits
        self._release.wait()  # the call stays open: the client has not finished sending

    def _run(self) -> None:
        try:
            with EmbeddingClient(self.address) as client:
                for result in client.embed_stream(self._items()):
                    self.results.append((result.id, result.ok))
                    self.first.set()
                    self._release.wait()  # read nothing more until released
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.first.set()

    def release(self) -> None:
        self._release.set()

    def join(self) -> bool:
        """Whether the stream ended (within PATIENCE_S)."""
        self._thread.join(PATIENCE_S)
        return not self._thread.is_alive()


def _wait_for_status(address: str, service: str, want: int) -> list[int | str]:
    """Probes until `want` is seen (or PATIENCE_S passes); returns what was seen."""
    seen: list[int | str] = []
    give_up = time.monotonic() + PATIENCE_S  # a bound on the loop, not a speed assertion
    while time.monotonic() < give_up:
        seen.append(probe(address, service))
        if seen[-1] == want:
            break
        time.sleep(0.1)
    return seen


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
    startup = container["startupProbe"]["grpc"]["service"]
    readiness = container["readinessProbe"]["grpc"]["service"]
    liveness = container["livenessProbe"]["grpc"]["service"]

    health_port, metrics_port = free_port(), free_port()
    flags = local_flags(container, objects, health_port, metrics_port)
    flags += ["--grace-s", str(DRAIN_GRACE_S)]  # see DRAIN_GRACE_S
    health = f"127.0.0.1:{health_port}"

    # What the kubelet sees while the model loads: alive, not ready.
    watch = LoadingWatch(health, liveness, readiness)
    try:
        env = local_env(container, pod, objects, tmp_path)
        server = start_server(flags, tmp_path / "server.log", env=env, wait_s=_startup_s(container))
    finally:
        watch.stop()
    assert (SERVING, NOT_SERVING) in watch.seen, f"never alive-but-loading: {watch.seen}"

    stream: HeldStream | None = None
    try:
        for service in (startup, readiness, liveness):
            assert probe(health, service) == SERVING, service
        # The HPA's metric is exported (prometheus-adapter reads it by this name).
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(scrape, timeout=PATIENCE_S) as response:
            assert QUEUE_ITEMS_METRIC in response.read().decode()

        stream = HeldStream(server.address)
        assert stream.first.wait(PATIENCE_S), "the stream never got a result"
        assert not stream.errors, stream.errors
        code = _drain(server, stream, health, readiness=readiness, startup=startup)
    finally:
        if stream is not None:
            stream.release()
        server.stop()

    assert code == 0, server.log_tail()
    # The drain let the call in flight finish: every item answered once, none failed.
    assert not stream.errors, stream.errors
    assert sorted(int(i) for i, _ in stream.results) == list(range(STREAM_ITEMS))
    assert all(ok for _, ok in stream.results)


def _drain(
    server: ServerProcess, stream: HeldStream, health: str, *, readiness: str, startup: str
) -> int:
    """SIGTERM with `stream` held in flight: the probes say NOT_SERVING while the call is
    still open, new calls are refused on both faces, and once the stream is released the
    process exits by itself. Returns its exit status."""
    # Deletion: after the preStop pause, the kubelet sends SIGTERM.
    server.process.send_signal(signal.SIGTERM)
    during_drain = _wait_for_status(health, readiness, NOT_SERVING)
    assert during_drain[-1] == NOT_SERVING, during_drain
    assert probe(health, startup) == NOT_SERVING
    with EmbeddingClient(server.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.embed(["a new call"])
    assert isinstance(refused.value, grpc.Call)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert _http_status(server.base_url + "/embeddings") == 503
    # Still draining: the held call keeps it going, whatever the time it took to get here.
    assert server.process.poll() is None, "exited with a call in flight"
    assert len(stream.results) == 1 and not stream.errors  # held, as designed

    stream.release()
    assert stream.join(), "the stream did not end after it was released"
    # Well within DRAIN_GRACE_S: the drain ended with the call, not with the grace.
    return server.process.wait(timeout=PATIENCE_S)


def _http_status(url: str) -> int:
    """The status of a POST of one input to the OpenAI face."""
    request = urllib.request.Request(
        url, data=b'{"input": "a new call"}', headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=PATIENCE_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
