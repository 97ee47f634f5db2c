"""What telemetry costs the front end: the null-engine scenario, with tracing off and on.

The server runs in this process (uvloop, the real grpc.aio server and servicer, the bundled
MiniLM tokenizer, the null engine that answers zeros at once), so everything measured is
front end. A separate load process sends unary single-text Embed calls at a fixed
concurrency on loopback. Each mode gets a fresh server:

- none: no telemetry at all (no interceptor, no hooks): the baseline;
- off:  the production default without a collector: metrics recorded and served on
        /metrics, tracing off (no exporter, so no tracer);
- on:   as off, plus tracing at full sampling (always_on) through a batch span processor
        into an exporter that drops the spans (the cost up to, not including, the network).

Printed per mode: calls/s seen by the load process, the server process's CPU time per call
(the steadier number on a small machine, where client and server share the cores), and the
overhead of each against `none`.

    .venv/bin/python benchmarks/null_engine_overhead.py --seconds 10 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
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


class DropExporter(SpanExporter):
    """Accepts every span and keeps none."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@dataclass
class Result:
    mode: str
    calls: int
    errors: int
    seconds: float
    server_cpu_s: float

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def cpu_us_per_call(self) -> float:
        return self.server_cpu_s / max(self.calls, 1) * 1e6


@dataclass
class Summary:
    """One mode over its rounds: medians, since a shared machine adds noise both ways."""

    mode: str
    rounds: int
    calls_per_s: float
    cpu_us_per_call: float
    errors: int

    @classmethod
    def of(cls, mode: str, results: list[Result]) -> Summary:
        return cls(
            mode,
            len(results),
            statistics.median(r.calls_per_s for r in results),
            statistics.median(r.cpu_us_per_call for r in results),
            sum(r.errors for r in results),
        )


# ------------------------------------------------------------------------ load process


async def _load(
    address: str, concurrency: int, *, warmup_s: float, seconds: float, start: Event, stop: Event
) -> tuple[int, int, float]:
    request = pb.EmbedRequest(inputs=["hello world, how fast is the front end?"])
    counting = False
    calls = errors = 0
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        end = loop.time() + warmup_s + seconds

        async def worker() -> None:
            nonlocal calls, errors
            while loop.time() < end:
                try:
                    await stub.Embed(request, timeout=30)
                    calls += counting
                except grpc.aio.AioRpcError:
                    errors += counting

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        counting, calls, errors = True, 0, 0
        start.set()
        began = loop.time()
        await asyncio.sleep(seconds)
        counting = False
        elapsed = loop.time() - began
        stop.set()
        await asyncio.gather(*workers)
    return calls, errors, elapsed


def _load_process(
    address: str,
    concurrency: int,
    *,
    warmup_s: float,
    seconds: float,
    start: Event,
    stop: Event,
    out: mp.Queue[tuple[int, int, float]],
) -> None:
    _pin(1)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        load = _load(
            address, concurrency, warmup_s=warmup_s, seconds=seconds, start=start, stop=stop
        )
        out.put(runner.run(load))


def _pin(cpu: int) -> None:
    """Server on one core, load on another: they stop stealing each other's time slices."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[cpu]})


# ---------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _telemetry(mode: str, config: ServiceConfig) -> Telemetry:
    if mode == "none":
        return Telemetry.disabled()
    if mode == "off":
        return Telemetry.from_config(config, environ={})
    return Telemetry.from_config(
        config, environ={}, span_processor=BatchSpanProcessor(DropExporter())
    )


async def _run_mode(mode: str, args: argparse.Namespace) -> Result:
    # The metrics endpoint really serves, as in production, on a free port.
    metrics_port = free_port()
    config = ServiceConfig(
        port=0, engine="null", metrics_port=metrics_port, metrics_host="127.0.0.1"
    )
    telemetry = _telemetry(mode, config)
    server = EmbeddingServer(config, telemetry=telemetry)
    await server.start()
    ctx = mp.get_context("spawn")
    start, stop = ctx.Event(), ctx.Event()
    out: mp.Queue[tuple[int, int, float]] = ctx.Queue()
    load = ctx.Process(
        target=_load_process,
        args=(f"127.0.0.1:{server.port}", args.concurrency),
        kwargs={
            "warmup_s": args.warmup,
            "seconds": args.seconds,
            "start": start,
            "stop": stop,
            "out": out,
        },
    )
    load.start()
    try:
        await asyncio.to_thread(start.wait)
        cpu0 = time.process_time()
        await asyncio.to_thread(stop.wait)
        cpu1 = time.process_time()
        calls, errors, elapsed = await asyncio.to_thread(out.get)
    finally:
        await asyncio.to_thread(load.join)
        await server.stop(grace_s=1)
    return Result(mode, calls, errors, elapsed, cpu1 - cpu0)


def _report(summaries: list[Summary]) -> list[dict[str, object]]:
    base = next((r for r in summaries if r.mode == "none"), None)
    rows: list[dict[str, object]] = []
    print(f"{'mode':6} {'calls/s':>9} {'cpu us/call':>12} {'throughput cost':>16} {'cpu cost':>9}")
    for r in summaries:
        row: dict[str, object] = {
            **asdict(r),
            "calls_per_s": round(r.calls_per_s, 1),
            "cpu_us_per_call": round(r.cpu_us_per_call, 1),
        }
        line = f"{r.mode:6} {r.calls_per_s:9.0f} {r.cpu_us_per_call:12.1f}"
        if base is not None and r is not base:
            thr = (1 - r.calls_per_s / base.calls_per_s) * 100
            cpu = (r.cpu_us_per_call / base.cpu_us_per_call - 1) * 100
            row |= {"throughput_overhead_pct": round(thr, 1), "cpu_overhead_pct": round(cpu, 1)}
            line += f" {thr:15.1f}% {cpu:8.1f}%"
        print(line + (f"  ({r.errors} errors)" if r.errors else ""))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per mode")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured time per mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: none,off,on")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the modes, interleaved")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}")
    # Full sampling for "on", whatever the environment says; "none"/"off" have no tracer.
    os.environ["OTEL_TRACES_SAMPLER"] = "always_on"
    # Children inherit affinity at fork/spawn, so the load process re-pins itself.
    _pin(0)
    results: dict[str, list[Result]] = {m: [] for m in modes}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for _ in range(args.rounds):
            for mode in modes:
                results[mode].append(runner.run(_run_mode(mode, args)))
    summaries = [Summary.of(mode, rs) for mode, rs in results.items()]
    print(
        f"null engine, {args.concurrency} concurrent unary calls, {args.seconds:.0f}s per mode"
        f" and round, median of {args.rounds} round(s)"
    )
    for mode, rs in results.items():
        print(f"  {mode}: " + ", ".join(f"{r.calls_per_s:.0f}/s" for r in rs))
    rows = _report(summaries)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"concurrency": args.concurrency, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
