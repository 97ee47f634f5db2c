"""The parent of several front-end processes: ports, engine cores, lifecycle, /metrics.

- **Ports.** gRPC cannot adopt a socket it did not bind, so every front end binds the gRPC
  (and health) port with SO_REUSEPORT and the kernel spreads connections over them. The
  supervisor first checks with a plain bind that no other server holds the port, then keeps
  a bound, never-listening socket in the group so that the port number (0: any) is fixed for
  all. The HTTP port is one listening socket, bound here and inherited by every front end:
  the first idle process accepts, which spreads HTTP load by how busy each one is.
- **Engines.** One vLLM engine core per model, with one client slot per front end
  (service.engines.vllm_engine.SharedEngineCore), started before any front end.
- **Lifecycle.** One SIGTERM drains every front end, then stops the cores. A front end that
  dies takes the others down with it (exit 1, so the orchestrator restarts the pod) rather
  than leaving the port served by fewer processes than configured. An engine core that dies
  is reported to every front end (ENGINE_LOST_SIGNAL), which fails its callers with
  UNAVAILABLE and exits 1, as a single process does when its engine dies.
- **Metrics.** The configured /metrics port serves the merge of the front ends' own
  (service.front_ends.metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from service.api.http.server import bind_http
from service.config import ServiceConfig
from service.engines.base import EMBED, SCORE
from service.engines.loading import check_vllm_args, quiet_vllm, vllm_settings
from service.errors import EngineConfigError, ModelLoadError
from service.front_ends.metrics import MergedMetrics
from service.front_ends.slot import FrontEndSlot
from service.front_ends.worker import run_front_end
from service.model_card import resolve_model_path
from service.server import ENGINE_LOST_SIGNAL, model_names
from service.telemetry.wiring import MetricsEndpoint

if TYPE_CHECKING:
    from service.engines.vllm_engine import SharedEngineCore

log = logging.getLogger(__name__)

MAX_AUTO_PROCESSES = 8
_POLL_S = 0.2
# After the drain's grace, how long a front end may take to close before it is killed.
_EXIT_MARGIN_S = 10.0


def _gpu_host() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 quota (a pod's
    CPU limit does not change the affinity)."""
    cpus = float(len(os.sched_getaffinity(0)))
    try:
        quota, period = cgroup.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    return cpus if quota == "max" else min(cpus, int(quota) / int(period))


def front_end_count(config: ServiceConfig) -> int:
    """--api-processes, or for 0: one per two usable CPUs up to 8 on a GPU host, where the
    engine leaves the CPUs to the front ends; 1 on a CPU host, where the engine computes on
    them."""
    if config.api_processes:
        return config.api_processes
    if not _gpu_host():
        return 1
    return max(1, min(MAX_AUTO_PROCESSES, int(usable_cpus() // 2)))


def share(
    config: ServiceConfig, count: int, grpc_port: int, http_port: int, health_port: int
) -> ServiceConfig:
    """One front end's configuration: the ports as bound, and each server-wide bound split
    `count` ways, so that together they hold what one process would. The per-call and
    per-stream limits stay whole, except that a call's tokens can never exceed one
    process's queue (the limits each front end reports say so)."""

    def part(total: int) -> int:
        return max(1, math.ceil(total / count))

    return dataclasses.replace(
        config,
        port=grpc_port,
        http_port=http_port,
        health_port=health_port,
        max_queue_items=part(config.max_queue_items),
        max_queue_tokens=max(part(config.max_queue_tokens), config.max_batch_tokens),
        streams_max_inflight=part(config.streams_total),
        vector_cache_mb=part(config.vector_cache_mb) if config.vector_cache_mb else 0,
    )


def reserve_shared_port(host: str, port: int, what: str) -> socket.socket:
    """A bound socket in the port's SO_REUSEPORT group, which fixes the port for the front
    ends; raises OSError if another server already holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR passes a port in TIME_WAIT, but not one with a listener on it, even
        # a listener that allows sharing.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot serve {what} on {host}:{port}: {exc}") from exc
        port = int(probe.getsockname()[1])
    keep = socket.socket(family, socket.SOCK_STREAM)
    keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        keep.bind((host, port))
    except OSError as exc:
        keep.close()
        raise OSError(f"cannot serve {what} on {host}:{port}: {exc}") from exc
    return keep


@dataclasses.dataclass
class _FrontEnd:
    index: int
    process: BaseProcess
    ready: Connection
    metrics_port: int = 0
    is_ready: bool = False


class Supervisor:
    def __init__(self, config: ServiceConfig, count: int) -> None:
        self.config = config
        self.count = count
        self._sockets: list[socket.socket] = []
        self._cores: dict[str, SharedEngineCore] = {}
        self._front_ends: list[_FrontEnd] = []
        self._metrics: MetricsEndpoint | None = None
        self._stop_requested = False
        self._cores_failed: list[BaseException] = []
        self._cores_ready = threading.Event()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            worker_config, http_socket = self._bind()
            self._start_cores()
        except (OSError, ModelLoadError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        self._spawn(worker_config, http_socket)
        self._serve_metrics()
        threading.Thread(target=self._wait_for_cores, name="engine-load", daemon=True).start()
        return self._watch()

    def _bind(self) -> tuple[ServiceConfig, socket.socket | None]:
        c = self.config
        grpc = reserve_shared_port(c.host, c.port, "gRPC")
        self._sockets.append(grpc)
        health_port = 0
        if c.health_port:
            health = reserve_shared_port(c.host, c.health_port, "health")
            self._sockets.append(health)
            health_port = int(health.getsockname()[1])
        http_socket = None
        if c.http_port:
            http_socket = bind_http(c.host, c.http_port)
            http_socket.listen(c.http_max_connections or socket.SOMAXCONN)
            self._sockets.append(http_socket)
        http_port = int(http_socket.getsockname()[1]) if http_socket else 0
        grpc_port = int(grpc.getsockname()[1])
        return share(c, self.count, grpc_port, http_port, health_port), http_socket

    def _start_cores(self) -> None:
        """Each model's engine core, started (it loads the model in its own process)."""
        c = self.config
        if c.engine != "vllm":
            return
        quiet_vllm(c)  # before vllm is imported; the front ends inherit the quiet
        check_vllm_args(c)
        from service.engines.vllm_engine import SharedEngineCore

        models = {
            EMBED: (c.model, c.served_model_name),
            SCORE: (c.rerank_model, c.rerank_served_model_name),
        }
        for kind, (model, given) in models.items():
            if not model:
                continue
            path = resolve_model_path(model)
            name = model_names(model, given)[0]
            try:
                core = SharedEngineCore(vllm_settings(c, path, name, kind), self.count)
            except EngineConfigError as exc:
                raise ModelLoadError(f"{name}: the engine refused its settings: {exc}") from exc
            self._cores[kind] = core
            core.start()

    def _spawn(self, config: ServiceConfig, http_socket: socket.socket | None) -> None:
        context = multiprocessing.get_context("spawn")
        for index in range(self.count):
            theirs, ours = context.Pipe(duplex=False)
            engines = {kind: core.attachments[index] for kind, core in self._cores.items()}
            slot = FrontEndSlot(index, self.count, http_socket, engines, ours, os.getpid())
            process = context.Process(
                target=run_front_end, args=(config, slot), name=f"front-end-{index}"
            )
            process.start()
            ours.close()
            self._front_ends.append(_FrontEnd(index, process, theirs))
        for core in self._cores.values():
            core.release_listeners()

    def _serve_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        registry = CollectorRegistry()
        registry.register(
            MergedMetrics(lambda: [f.metrics_port for f in self._front_ends if f.metrics_port])
        )
        host = self.config.metrics_host or self.config.host
        self._metrics = MetricsEndpoint(host, self.config.metrics_port, registry)
        self._metrics.start()

    def _wait_for_cores(self) -> None:
        try:
            for core in self._cores.values():
                core.wait_ready()
        except BaseException as exc:  # the engine's own error is logged above
            self._cores_failed.append(exc)
        self._cores_ready.set()

    def _watch(self) -> int:
        """Until every front end has exited: relay readiness, signals and deaths."""
        code = 0
        deadline = math.inf
        alive = {f.process.sentinel: f for f in self._front_ends}
        pending = {f.ready: f for f in self._front_ends}
        engine_sentinels: set[int] = set()
        cores_watched = False

        def stop(why: str, sig: signal.Signals = signal.SIGTERM, failed: bool = True) -> None:
            nonlocal code, deadline
            if deadline == math.inf:
                if why:
                    log.error("%s; stopping every front end", why)
                deadline = time.monotonic() + self.config.grace_s + _EXIT_MARGIN_S
            code = code or int(failed)
            self._signal(alive.values(), sig)

        while alive:
            if self._stop_requested and deadline == math.inf:
                log.info("draining %d front ends for up to %.0fs", len(alive), self.config.grace_s)
                stop("", failed=False)
            if self._cores_ready.is_set() and not cores_watched:
                cores_watched = True
                if self._cores_failed:
                    cause = str(self._cores_failed[0]).strip().splitlines() or ["failed"]
                    stop(f"cannot start: an engine core could not load its model: {cause[0]}")
                engine_sentinels = {s for c in self._cores.values() for s in c.sentinels()}
            if time.monotonic() > deadline:
                self._signal(alive.values(), signal.SIGKILL)
            waitables: list[Connection | int] = [*alive, *pending, *engine_sentinels]
            for ready in wait(waitables, timeout=_POLL_S):
                if isinstance(ready, Connection):
                    self._on_ready(pending.pop(ready))
                elif ready in alive:
                    ended = alive.pop(ready)
                    pending.pop(ended.ready, None)
                    exit_code = ended.process.exitcode
                    if deadline == math.inf:
                        stop(f"front end {ended.index} exited with code {exit_code}")
                    elif exit_code:
                        code = code or 1
                elif ready in engine_sentinels:
                    engine_sentinels.discard(ready)
                    if deadline == math.inf:
                        stop("an engine core process died", ENGINE_LOST_SIGNAL)
        return code

    def _on_ready(self, front_end: _FrontEnd) -> None:
        try:
            front_end.metrics_port, line = front_end.ready.recv()
        except EOFError:
            return  # it exited before it was ready; its sentinel says so
        front_end.is_ready = True
        if all(f.is_ready for f in self._front_ends):
            log.info("%s; %d front-end processes", line, self.count)

    @staticmethod
    def _signal(front_ends: Iterable[_FrontEnd], sig: signal.Signals) -> None:
        for f in front_ends:
            if f.process.pid is not None and f.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(f.process.pid, sig)

    def close(self) -> None:
        for f in self._front_ends:
            if f.process.exitcode is None:
                f.process.kill()
            f.process.join()
        for core in self._cores.values():
            core.shutdown()
        if self._metrics is not None:
            self._metrics.stop()
        for sock in self._sockets:
            sock.close()


def supervise(config: ServiceConfig, count: int) -> int:
    """Serve with `count` front-end processes until SIGTERM (0 after the drain), a front
    end's or an engine's death, or a failed start (1)."""
    supervisor = Supervisor(config, count)
    try:
        return supervisor.run()
    finally:
        supervisor.close()
