"""Scenario 5, the front end alone: the null engine, with telemetry none, off and on.

Each mode gets its own server: the real EmbeddingServer (grpc.aio server, servicer, bundled
MiniLM tokenizer, batcher, post-processing) with the null engine, which answers at once, so
everything measured is front end. The modes:

- none: no telemetry at all (no interceptor, no hooks): the baseline;
- off:  the production default without a collector: metrics recorded and served on
        /metrics, tracing off (no exporter, so no tracer);
- on:   as off, plus tracing at full sampling (always_on) through a batch span processor
        into an exporter that drops the spans (the cost up to, not including, the network).

The loads: single-text unary calls (64 concurrent), 64-text unary calls (8 concurrent), and
two EmbedStreams, of single-item messages and of 64-item messages, all with the corpus's
query-length texts.

The servers run side by side, each in a process of its own pinned to one core, and this
process (pinned to the other core) drives one server at a time, switching every `--window`
seconds: none, off, on, none, ... A small shared machine drifts in speed by more than the
effect measured; short interleaved windows put every mode under the same drift.

The load generator is Python too and can be the slower side, so the front end's capacity is
reported as texts per CPU-second of the server process (what one server core moves),
next to the texts/s reached.

    python -m benchmarks.null_engine --seconds 10 --loads unary1,stream
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event

import grpc
import grpc.aio
import uvloop
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from benchmarks.corpus import build
from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.config import ServiceConfig
from service.server import EmbeddingServer
from service.telemetry import Telemetry

MODES = ("none", "off", "on")


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
    # No vector cache: the loads cycle through the corpus, and hits would skip the path measured.
    config = ServiceConfig(
        port=0,
        engine="null",
        metrics_port=_free_port(),
        metrics_host="127.0.0.1",
        vector_cache_mb=0,
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

LOADS = {
    # name: (texts per call or stream message, concurrent calls or streams)
    "unary1": (1, 64),
    "unary64": (64, 8),
    "stream": (1, 2),
    "stream64": (64, 2),
}


@dataclass
class Tally:
    mode: str
    load: str
    texts: int = 0
    calls: int = 0
    errors: int = 0
    seconds: float = 0.0
    server_cpu_s: float = 0.0

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_text(self) -> float:
        return self.server_cpu_s / max(self.texts, 1) * 1e6

    @property
    def texts_per_cpu_s(self) -> float:
        """Capacity of one server core: texts per CPU-second of the server process."""
        return self.texts / self.server_cpu_s if self.server_cpu_s else 0.0


async def _unary(
    stub: pb_grpc.EmbeddingServiceAsyncStub,
    texts: list[str],
    size: int,
    concurrency: int,
    end: float,
) -> tuple[int, int, int]:
    loop = asyncio.get_running_loop()
    done = calls = errors = 0

    async def caller(offset: int) -> None:
        nonlocal done, calls, errors
        i = offset
        while loop.time() < end:
            request = pb.EmbedRequest(inputs=[texts[(i + k) % len(texts)] for k in range(size)])
            i += size * concurrency
            try:
                await stub.Embed(request, timeout=30)
                done, calls = done + size, calls + 1
            except grpc.aio.AioRpcError:
                errors += 1

    await asyncio.gather(*(caller(n * size) for n in range(concurrency)))
    return done, calls, errors


async def _stream(
    stub: pb_grpc.EmbeddingServiceAsyncStub, texts: list[str], size: int, streams: int, end: float
) -> tuple[int, int, int]:
    """`size` 1: single-item messages; more: multi-item messages of `size` items."""
    loop = asyncio.get_running_loop()
    done = errors = 0

    def message(n: int) -> pb.EmbedStreamRequest:
        if size == 1:
            return pb.EmbedStreamRequest(id=str(n), input=texts[n % len(texts)])
        items = [pb.StreamItem(id=str(k), input=texts[k % len(texts)]) for k in range(n, n + size)]
        return pb.EmbedStreamRequest(items=items)

    async def messages(offset: int) -> AsyncIterator[pb.EmbedStreamRequest]:
        n = offset
        while loop.time() < end:
            yield message(n)
            n += size

    async def one(offset: int) -> None:
        nonlocal done, errors
        async for response in stub.EmbedStream(messages(offset), timeout=60):
            for result in response.results or (response,):
                if result.HasField("error"):
                    errors += 1
                else:
                    done += 1

    await asyncio.gather(*(one(n * 100_000) for n in range(streams)))
    return done, streams, errors


async def _window(
    stub: pb_grpc.EmbeddingServiceAsyncStub, load: str, texts: list[str], seconds: float
) -> tuple[int, int, int, float]:
    """One load for `seconds`: (texts, calls, errors, elapsed)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    size, concurrency = LOADS[load]
    if load.startswith("stream"):
        counts = await _stream(stub, texts, size, concurrency, began + seconds)
    else:
        counts = await _unary(stub, texts, size, concurrency, began + seconds)
    return (*counts, loop.time() - began)


async def _load(
    servers: dict[str, tuple[int, int]], loads: list[str], args: argparse.Namespace
) -> list[Tally]:
    """Per load, round-robin windows over the servers (mode -> (port, pid))."""
    texts = build(paragraphs=0).kinds["queries"]
    tallies: list[Tally] = []
    channels = {
        mode: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for mode, (port, _) in servers.items()
    }
    try:
        stubs = {mode: pb_grpc.EmbeddingServiceStub(ch) for mode, ch in channels.items()}
        for load in loads:
            by_mode = {mode: Tally(mode, load) for mode in servers}
            for mode in servers:  # connect, warm the tokenizer, settle the batcher
                await _window(stubs[mode], load, texts, args.warmup)
            windows = max(1, round(args.seconds / args.window))
            for _ in range(windows):
                for mode, (_, pid) in servers.items():
                    cpu0 = _cpu_s(pid)
                    done, calls, errors, elapsed = await _window(
                        stubs[mode], load, texts, args.window
                    )
                    t = by_mode[mode]
                    t.server_cpu_s += _cpu_s(pid) - cpu0
                    t.texts += done
                    t.calls += calls
                    t.errors += errors
                    t.seconds += elapsed
            tallies.extend(by_mode.values())
    finally:
        for ch in channels.values():
            await ch.close()
    return tallies


def _report(tallies: list[Tally], args: argparse.Namespace) -> list[dict[str, object]]:
    print(
        f"null engine, {args.seconds:.0f}s per load and mode in {args.window:g}s windows taken"
        " in turn; capacity = texts per CPU-second of the server process"
    )
    print(
        f"{'load':8} {'mode':5} {'texts/s':>9} {'us/text':>8} {'capacity':>9}"
        f" {'throughput cost':>16} {'cpu cost':>9}"
    )
    rows: list[dict[str, object]] = []
    base = {t.load: t for t in tallies if t.mode == "none"}
    for t in tallies:
        row: dict[str, object] = {
            **asdict(t),
            "texts_per_s": round(t.texts_per_s, 1),
            "cpu_us_per_text": round(t.cpu_us_per_text, 2),
            "texts_per_cpu_s": round(t.texts_per_cpu_s, 1),
        }
        line = (
            f"{t.load:8} {t.mode:5} {t.texts_per_s:9.0f} {t.cpu_us_per_text:8.1f}"
            f" {t.texts_per_cpu_s:9.0f}"
        )
        b = base.get(t.load)
        if b is not None and t is not b and b.texts_per_s and b.cpu_us_per_text:
            thr = (1 - t.texts_per_s / b.texts_per_s) * 100
            cpu = (t.cpu_us_per_text / b.cpu_us_per_text - 1) * 100
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
    parser.add_argument(
        "--loads", default=",".join(LOADS), help="comma-separated: " + ",".join(LOADS)
    )
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: none,off,on")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    loads = [x for x in args.loads.split(",") if x]
    if unknown := (set(modes) - set(MODES)) | (set(loads) - set(LOADS)):
        parser.error(f"unknown modes or loads {sorted(unknown)}")

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
            tallies = runner.run(_load(servers, loads, args))
    finally:
        stop.set()
        for process in processes.values():
            process.join(timeout=30)
    rows = _report(tallies, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"loads": LOADS, "seconds": args.seconds, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
