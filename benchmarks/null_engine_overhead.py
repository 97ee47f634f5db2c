"""What telemetry costs the front end: the null-engine scenario, with tracing off and on.

Each mode gets its own server: the real EmbeddingServer (grpc.aio server, servicer, bundled
MiniLM tokenizer) with the null engine, which answers zeros at once, so everything measured
is front end. The modes:

- none: no telemetry at all (no interceptor, no hooks): the baseline;
- off:  the production default without a collector: metrics recorded and served on
        /metrics, tracing off (no exporter, so no tracer);
- on:   as off, plus tracing at full sampling (always_on) through a batch span processor
        into an exporter that drops the spans (the cost up to, not including, the network).

The servers run side by side, each in a process of its own pinned to the same core, and
this process (pinned to another core) sends unary single-text Embed calls at a fixed
concurrency to one server at a time, switching every `--window` seconds: none, off, on,
none, ... A small shared machine drifts in speed by more than the effect measured; short
interleaved windows put every mode under the same drift. Per mode it prints calls/s and the
server process's CPU time per call (user + system, all its threads), and the overhead of
each against `none`.

    .venv/bin/python benchmarks/null_engine_overhead.py --seconds 10 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event

import grpc
import grpc.aio
import uvloop
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.config import ServiceConfig
from service.server import EmbeddingServer
from service.telemetry import Telemetry

MODES = ("none", "off", "on")
TEXT = "hello world, how fast is the front end?"


class DropExporter(SpanExporter):
    """Accepts every span and keeps none."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _pin(cpu: int) -> None:
    """Servers on one core, load on another: they stop stealing each other's time slices."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[cpu]})


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- servers


def _telemetry(mode: str, config: ServiceConfig) -> Telemetry:
    if mode == "none":
        return Telemetry.disabled()
    if mode == "off":
        return Telemetry.from_config(config, environ={})
    return Telemetry.from_config(
        config, environ={}, span_processor=BatchSpanProcessor(DropExporter())
    )


async def _serve(mode: str, ports: mp.Queue[tuple[str, int]], stop: Event) -> None:
    # metrics_port 0 would turn the endpoint off; a free port keeps it served, as deployed.
    config = ServiceConfig(
        port=0, engine="null", metrics_port=_free_port(), metrics_host="127.0.0.1"
    )
    server = EmbeddingServer(config, telemetry=_telemetry(mode, config))
    await server.start()
    ports.put((mode, server.port))
    await asyncio.to_thread(stop.wait)
    await server.stop(grace_s=1)


def _server_process(mode: str, ports: mp.Queue[tuple[str, int]], stop: Event) -> None:
    _pin(0)
    # Full sampling for "on", whatever the environment says; the others have no tracer.
    os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(mode, ports, stop))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- load


@dataclass
class Tally:
    mode: str
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    server_cpu_s: float = 0.0

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_call(self) -> float:
        return self.server_cpu_s / max(self.calls, 1) * 1e6


async def _window(
    stub: pb_grpc.EmbeddingServiceAsyncStub, concurrency: int, seconds: float
) -> tuple[int, int, float]:
    """`concurrency` callers for `seconds`; calls finished in the window count."""
    loop = asyncio.get_running_loop()
    request = pb.EmbedRequest(inputs=[TEXT])
    calls = errors = 0
    began = loop.time()
    end = began + seconds

    async def caller() -> None:
        nonlocal calls, errors
        while loop.time() < end:
            try:
                await stub.Embed(request, timeout=30)
                calls += 1
            except grpc.aio.AioRpcError:
                errors += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return calls, errors, loop.time() - began


async def _load(servers: dict[str, tuple[int, int]], args: argparse.Namespace) -> dict[str, Tally]:
    """Round-robin windows over the servers (mode -> (port, pid))."""
    tallies = {mode: Tally(mode) for mode in servers}
    channels = {
        mode: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for mode, (port, _) in servers.items()
    }
    try:
        stubs = {mode: pb_grpc.EmbeddingServiceStub(ch) for mode, ch in channels.items()}
        for mode in servers:  # connect, load the tokenizer caches, settle the batcher
            await _window(stubs[mode], args.concurrency, args.warmup)
        windows = max(1, round(args.seconds / args.window))
        for _ in range(windows):
            for mode, (_, pid) in servers.items():
                cpu0 = _cpu_s(pid)
                calls, errors, elapsed = await _window(stubs[mode], args.concurrency, args.window)
                t = tallies[mode]
                t.server_cpu_s += _cpu_s(pid) - cpu0
                t.calls += calls
                t.errors += errors
                t.seconds += elapsed
    finally:
        for ch in channels.values():
            await ch.close()
    return tallies


def _report(tallies: dict[str, Tally], args: argparse.Namespace) -> list[dict[str, object]]:
    base = tallies.get("none")
    print(
        f"null engine, {args.concurrency} concurrent unary single-text Embed calls,"
        f" {args.seconds:.0f}s per mode in {args.window:g}s windows taken in turn"
    )
    print(f"{'mode':6} {'calls/s':>9} {'cpu us/call':>12} {'throughput cost':>16} {'cpu cost':>9}")
    rows: list[dict[str, object]] = []
    for t in tallies.values():
        row: dict[str, object] = {
            **asdict(t),
            "calls_per_s": round(t.calls_per_s, 1),
            "cpu_us_per_call": round(t.cpu_us_per_call, 1),
        }
        line = f"{t.mode:6} {t.calls_per_s:9.0f} {t.cpu_us_per_call:12.1f}"
        if base is not None and t is not base:
            thr = (1 - t.calls_per_s / base.calls_per_s) * 100
            cpu = (t.cpu_us_per_call / base.cpu_us_per_call - 1) * 100
            row |= {"throughput_overhead_pct": round(thr, 1), "cpu_overhead_pct": round(cpu, 1)}
            line += f" {thr:15.1f}% {cpu:8.1f}%"
        print(line + (f"  ({t.errors} errors)" if t.errors else ""))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per mode")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per turn")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured time per mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: none,off,on")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}")

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ports: mp.Queue[tuple[str, int]] = ctx.Queue()
    processes = {
        mode: ctx.Process(target=_server_process, args=(mode, ports, stop), daemon=True)
        for mode in modes
    }
    for process in processes.values():
        process.start()
    try:
        started = dict(ports.get(timeout=120) for _ in modes)
        servers = {m: (started[m], processes[m].pid or 0) for m in modes}
        _pin(1)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            tallies = runner.run(_load(servers, args))
    finally:
        stop.set()
        for process in processes.values():
            process.join(timeout=30)
    rows = _report(tallies, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"concurrency": args.concurrency, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
