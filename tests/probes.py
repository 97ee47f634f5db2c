"""Waiting on and steering real server processes without depending on how fast the machine
is: polls bounded only against a hang, a frozen engine, the queue gauge as an HPA reads it."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

from embedding_client import EmbeddingClient, StreamResult
from service.telemetry.names import QUEUE_ITEMS_METRIC
from tests.servers import ServerProcess

# Nothing may depend on how fast this machine is. Waits are bounded by PATIENCE_S: only a
# hang reaches it.
PATIENCE_S = 600.0


def until(check: Callable[[], bool], what: str) -> None:
    """Polls `check`; fails after PATIENCE_S (a hang, not slowness)."""
    give_up = time.monotonic() + PATIENCE_S
    while not check():
        assert time.monotonic() < give_up, f"never: {what}"
        time.sleep(0.05)


def settled(value: Callable[[], float]) -> Callable[[], bool]:
    """A check for `until`: true once `value` has not moved for a second. Only used while
    the engine is frozen, when nothing moves it for long."""
    last = [value(), time.monotonic()]

    def check() -> bool:
        now = value()
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] >= 1.0

    return check


def queued_items(metrics_port: int) -> float:
    """The server's queue gauge, as the HPA reads it."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=PATIENCE_S) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == QUEUE_ITEMS_METRIC:
            return float(family.samples[0].value)
    raise AssertionError(f"no {QUEUE_ITEMS_METRIC} in /metrics")


def is_engine_core(process: psutil.Process) -> bool:
    return "EngineCore" in " ".join(process.cmdline()) or "EngineCore" in process.name()


def engine_cores(server: ServerProcess) -> list[psutil.Process]:
    cores = [
        p for p in psutil.Process(server.process.pid).children(recursive=True) if is_engine_core(p)
    ]
    assert cores, "no EngineCore process found"
    return cores


@contextlib.contextmanager
def frozen_engine(server: ServerProcess) -> Iterator[None]:
    """SIGSTOP the vLLM engine cores: the server keeps reading, queueing and refusing, but
    nothing finishes until the block ends, however fast or slow either side runs."""
    cores = engine_cores(server)
    for core in cores:
        core.suspend()
    try:
        yield
    finally:
        for core in cores:
            core.resume()


def code_name(number: int) -> str:
    return next(c.name for c in grpc.StatusCode if c.value[0] == number)


def stream_failure_codes(results: Iterable[StreamResult]) -> set[str]:
    """The status codes a stream ends with: its items' errors and the call's own."""
    codes: set[str] = set()
    try:
        for result in results:
            if not result.ok and result.error is not None:
                codes.add(code_name(result.error.code))
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        codes.add(err.code().name)
    return codes


def unary_behind_a_full_queue(
    server: ServerProcess,
    metrics_port: int,
    call: Callable[[], int],
    received: Callable[[], float],
    batch_items: int,
) -> tuple[float, int]:
    """With a stream running: freezes the engine until the stream has filled its room in
    the queue, makes `call` (a unary call that returns its vector count), lets the engine
    go; returns the bulk results that arrived meanwhile and how many bulk items were queued
    ahead of the call."""
    with ThreadPoolExecutor(1) as pool, frozen_engine(server):
        # Nothing finishes now: the queue stops growing once the stream's room is used up,
        # and the client takes in what finished before the freeze.

        def queued_now() -> float:
            return queued_items(metrics_port)

        until(lambda: queued_now() >= 4 * batch_items, "the stream queues four batches")
        until(settled(queued_now), "the stream's room is used up")
        until(settled(received), "the stream's results are all in")
        queued = int(queued_now())
        before = received()
        answer = pool.submit(call)
        until(lambda: queued_now() > queued or answer.done(), "the call is queued")
    assert answer.result(timeout=PATIENCE_S) == 1
    return received() - before, queued


def unary_calls_during_a_stream(
    server: ServerProcess,
    metrics_port: int,
    items: list[tuple[str, str]],
    call: Callable[[EmbeddingClient], int],
    *,
    batch_items: int,
    rounds: int,
) -> list[tuple[float, int]]:
    """A stream of `items` runs to its end while `rounds` unary calls (`call`, given the
    streaming client) are each made behind a full queue (unary_behind_a_full_queue);
    returns each round's (bulk results during the call, bulk items queued ahead of it)."""
    received = 0
    failed: list[str] = []
    measured: list[tuple[float, int]] = []
    with EmbeddingClient(server.address) as client:

        def consume() -> None:
            nonlocal received
            for result in client.embed_stream(items):
                if not result.ok:
                    failed.append(str(result.error))
                received += 1

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            until(lambda: received >= 50 or not thread.is_alive(), "the stream is running")
            for _ in range(rounds):
                measured.append(
                    unary_behind_a_full_queue(
                        server, metrics_port, lambda: call(client), lambda: received, batch_items
                    )
                )
        finally:
            thread.join(PATIENCE_S)
    assert not thread.is_alive(), "the stream never ended"
    assert received == len(items) and not failed, failed[:3]
    return measured
