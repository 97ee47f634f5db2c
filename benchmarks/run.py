"""`make bench`: every scenario, side by side, in one run, on one model and one corpus.

1. engine ceiling (benchmarks/ceiling.py, a process of its own);
2. the service, and 3. vLLM's own OpenAI server, under the same loads:
   single-text unary calls at each concurrency, 32-text calls, bulk (the service: one
   EmbedStream over the corpus; vLLM: concurrent 64-text requests), and the mix (unary
   query latency idle, then while a bulk load saturates the engine), sporadic single calls
   during a bulk load, and a small bulk job started behind a large one;
4. the serving path's CPU seconds per 1,000 texts, measured on every point above;
5. the null-engine front end (benchmarks/null_engine.py), with tracing off and on;
   (6 is the GPU run, benchmarks/gpu.py, not part of this one)
7. rerank (benchmarks/rerank.py): the service's cross-encoder against vLLM's own /rerank,
   pairs/s and serving CPU per 1,000 pairs at 1, 16 and 64 concurrent 20-document calls;
8. tinyengine (benchmarks/tiny_engine.py): a nearly free engine (a Qwen3 of width 32),
   single-text calls/s at 64 concurrent on the service (vLLM engine and null engine, both
   faces) and on vLLM's server with --api-server-count 1 and 2, with CPU by process role;
9. scaleout (benchmarks/scale_out.py): embed-files with --streams 1 and 2 over two service
   instances behind one round_robin target: chunks/s, the split, CPU of each process.

No point sends a text an earlier point sent (each carries its point's tag, see
benchmarks/load.py), so the service runs with its vector cache on, as deployed, and the
cache answers nothing but the Zipf point's repeats, which it measures (each face under
its own tag, as the two faces share one cache).

Writes result.json, report.md and PNG plots into --out. Engine settings come from the
service's own flags after `--`, for example:

    python -m benchmarks.run --out benchmarks/results/cpu -- --max-batch-tokens 4096
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import uvloop

from benchmarks import load, report, rerank, scale_out, tiny_engine
from benchmarks.corpus import Corpus, build
from benchmarks.measure import Point, cpu_seconds
from benchmarks.servers import (
    Server,
    start_service,
    start_vllm_server,
    vllm_default_args,
    vllm_server_args,
)
from service.config import ServiceConfig, load_config
from service.server import served_names

FAIR_SMALL_JOB = 150  # texts of the small bulk job started behind the whole corpus
LOADS = ("unary", "batch32", "float", "bulk", "mixed", "sporadic", "fair", "zipf")
ZIPF_S = 1.1
ZIPF_CALLS = 6000
# The suffix of the targets of a service with --api-processes 2 (their CPU is not read: the
# launched process is the supervisor, not the front ends).
TWO_FRONT_ENDS = "_n2"


@dataclass(frozen=True)
class Plan:
    seconds: float  # per measured point
    concurrencies: tuple[int, ...]
    mix_callers: int  # unary callers measuring latency in the mix
    http_bulk_workers: int  # vLLM's bulk load: concurrent 64-text requests
    stream_limit: int  # texts per stream run (0: the whole corpus)
    loads: frozenset[str]  # which of LOADS to run against the servers
    scenarios: frozenset[str]  # which scenarios (--only)
    # Unmeasured waits, shortened only by the unit tests.
    warmup_s: float = 3.0  # first calls per target: connections up, first-call costs paid
    ramp_s: float = 3.0  # a background bulk load runs this long before a point opens
    sporadic_gaps_s: tuple[float, ...] = (0.05, 1.0)
    fair_delay_s: float = 2.0  # the small job starts this long after the large one

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        return cls(
            seconds=args.seconds,
            concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
            mix_callers=args.mix_callers,
            http_bulk_workers=args.http_bulk_workers,
            stream_limit=args.stream_limit,
            loads=frozenset(args.loads.split(",")),
            scenarios=frozenset(args.only.split(",")),
        )


# ------------------------------------------------------------------------------ helpers


async def _timed(server: Server, job: Awaitable[Point]) -> Point:
    """Run `job` and charge it the serving process's CPU time meanwhile."""
    before = cpu_seconds(server.pid)
    point = await job
    point.cpu_s = cpu_seconds(server.pid) - before
    return point


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def _summary(name: str, p: Point) -> str:
    lat = f" p50 {p.percentile_ms(50):.1f} p99 {p.percentile_ms(99):.1f} ms" if p.latencies else ""
    err = f" ({p.errors} errors)" if p.errors else ""
    cached = f" ({p.cached} from the vector cache)" if p.cached else ""
    return f"{name}: {p.docs_per_s:.1f} docs/s{lat}{err}{cached}"


# ---------------------------------------------------------------------------- scenarios


def run_ceiling(kind: str, plan: Plan, service_args: list[str], out: Path) -> dict[str, Any]:
    target = out / f"ceiling-{kind}.json"
    argv = [sys.executable, "-m", "benchmarks.ceiling", "--corpus", str(out / "corpus.json")]
    argv += ["--kind", kind]
    argv += ["--seconds", str(plan.seconds), "--json", str(target), *service_args]
    with open(out / "logs" / f"ceiling-{kind}.log", "wb") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True)
    result: dict[str, Any] = json.loads(target.read_text("utf-8"))
    target.unlink()
    _log(f"ceiling {kind}: {result['docs_per_s']} docs/s")
    return result


@dataclass
class Target:
    """One face of one server under the shared load plan."""

    name: str  # "service" (gRPC), "service_http", "vllm"
    server: Server  # the process whose CPU is charged
    client: load.Client
    # A background load that saturates the engine, for the mix, its texts under a tag.
    bulk: Callable[[str], AsyncIterator[None]]
    # The bulk throughput job over given texts (a stream, or batched HTTP requests).
    stream: Callable[[Sequence[str]], Awaitable[Point]]
    float_client: load.Client | None = None  # HTTP: the same calls with float vectors


def lanes(targets: Sequence[Target]) -> dict[str, int]:
    """Each target's lane: its place among the targets served by the same process.

    The service's two faces share one process and one vector cache, so they get different
    tags at the same point (lanes 0 and 1); vLLM's server has a process of its own and gets
    lane 0, the very texts the service's gRPC face gets. Tags of one point differ only in
    that digit, so every target of a point sends the same number of tokens.
    """
    seen: dict[int, int] = {}
    out: dict[str, int] = {}
    for t in targets:
        out[t.name] = seen.get(id(t.server), 0)
        seen[id(t.server)] = out[t.name] + 1
    return out


def _rotated(targets: Sequence[Target], n: int) -> list[Target]:
    """Point n runs the targets in a rotated order, so drift is spread over all of them."""
    k = n % len(targets)
    return [*targets[k:], *targets[:k]]


async def _warm_up(
    targets: Sequence[Target], texts: Sequence[str], plan: Plan, number: int, lane: dict[str, int]
) -> None:
    """Connections up, first-call costs paid; under a point number of its own."""
    for t in targets:
        await load.closed_loop(
            t.client,
            texts,
            batch=1,
            concurrency=16,
            seconds=plan.warmup_s,
            cycle=True,
            tag=load.tag(number, lane[t.name]),
        )
        if t.float_client is not None:
            await load.closed_loop(
                t.float_client,
                texts,
                batch=1,
                concurrency=4,
                seconds=plan.warmup_s / 3,
                cycle=True,
                tag=load.tag(number, lane[t.name], "f"),
            )


# A point's job on one target, given the tag of that target's texts at that point; None:
# the point does not apply to it.
Job = Callable[[Target, str], Awaitable[Point] | None]


async def compare(
    targets: Sequence[Target], corpus: Corpus, plan: Plan, tags: load.Tags
) -> dict[str, Any]:
    """Every point of the plan on every target in turn, one target at a time.

    The servers stay up side by side (an idle vLLM engine costs about 2% of a core) and each
    point is measured on each target back to back, in an order that rotates from point to
    point, so a drift of the machine's speed hits all of them alike instead of whichever
    ran last.

    Every point takes a fresh number from `tags`, and every text it sends (its background
    bulk load's too) carries it, so no point sends a text that an earlier one sent and the
    service's vector cache answers nothing but the Zipf point's repeats within one face.
    """
    results: dict[str, Any] = {t.name: {} for t in targets}
    short = corpus.kinds[corpus.short]
    lane = lanes(targets)
    await _warm_up(targets, short, plan, tags.point(), lane)
    turn = 0

    async def point(keys: tuple[str, ...], job: Job) -> None:
        nonlocal turn
        number = tags.point()
        for t in _rotated(targets, turn):
            measured = job(t, load.tag(number, lane[t.name]))
            if measured is None:
                continue
            p = await _timed(t.server, measured)
            _log(_summary(f"{t.name} {' '.join(keys)}", p))
            node = results[t.name]
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = p.to_json()
        turn += 1

    def calls(texts: Sequence[str], batch: int, concurrency: int, floats: bool = False) -> Job:
        def job(t: Target, tag: str) -> Awaitable[Point] | None:
            client = t.float_client if floats else t.client
            if client is None:
                return None
            return load.closed_loop(
                client,
                texts,
                batch=batch,
                concurrency=concurrency,
                seconds=plan.seconds,
                tag=tag,
            )

        return job

    def bulk(texts: Sequence[str]) -> Job:
        def job(t: Target, tag: str) -> Awaitable[Point]:
            return t.stream(load.tagged(texts, tag))

        return job

    def mix(background: bool) -> Job:
        def job(t: Target, tag: str) -> Awaitable[Point]:
            return load.mixed(
                t.client,
                short,
                t.bulk(tag + "b") if background else None,
                concurrency=plan.mix_callers,
                seconds=plan.seconds,
                ramp_s=plan.ramp_s,
                tag=tag,
            )

        return job

    def spaced(gap_s: float) -> Job:
        def job(t: Target, tag: str) -> Awaitable[Point]:
            calls = max(5, min(40, int(plan.seconds / (gap_s + 0.05))))
            return load.sporadic(
                t.client,
                short,
                t.bulk(tag + "b"),
                gap_s=gap_s,
                calls=calls,
                ramp_s=plan.ramp_s,
                tag=tag,
            )

        return job

    def behind(large: Sequence[str], small: Sequence[str]) -> Job:
        def job(t: Target, tag: str) -> Awaitable[Point]:
            return load.behind(
                t.stream,
                load.tagged(large, tag + "b"),
                load.tagged(small, tag),
                delay_s=plan.fair_delay_s,
            )

        return job

    for kind, texts in corpus.kinds.items():
        for c in plan.concurrencies if "unary" in plan.loads else ():
            await point(("unary", kind, str(c)), calls(texts, 1, c))
        if "batch32" in plan.loads:
            await point(("batch32", kind), calls(texts, 32, 4))
        if "float" in plan.loads:  # the HTTP faces with JSON numbers instead of base64
            for batch, c in ((1, 64), (32, 4)):
                await point(("float", kind, f"{batch}x{c}"), calls(texts, batch, c, floats=True))
        if "bulk" in plan.loads:
            await point(("bulk", kind), bulk(texts[: plan.stream_limit or len(texts)]))
    for state in ("idle", "loaded") if "mixed" in plan.loads else ():
        await point(("mixed", state), mix(state == "loaded"))
    if "sporadic" in plan.loads:
        for gap in plan.sporadic_gaps_s:
            await point(("sporadic", f"{gap:g}s"), spaced(gap))
    if "zipf" in plan.loads:
        # Repeats within the point are its traffic; its tag still keeps one face's cache
        # entries from answering the next face's calls (both faces share one cache).
        await point(("zipf", "64"), calls(zipf_queries(short), 1, 64))
    if "fair" in plan.loads:
        long = corpus.kinds[corpus.long]
        small = long[:FAIR_SMALL_JOB]
        await point(("fair", "alone"), bulk(small))
        await point(("fair", "behind_large"), behind(long, small))
    return results


def zipf_queries(queries: Sequence[str], n: int = ZIPF_CALLS, seed: int = 7) -> list[str]:
    """`n` queries drawn with Zipf weights (rank r has weight r^-s), as search traffic
    repeats its popular queries; the same draw on every run and target."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, len(queries) + 1, dtype=np.float64) ** -ZIPF_S
    picks = rng.choice(len(queries), size=n, p=weights / weights.sum())
    return [queries[i] for i in picks]


def _service_targets(server: Server, corpus: Corpus, plan: Plan, model: str) -> list[Target]:
    """The service's two faces; both take the same gRPC stream as their background bulk."""
    grpc_client = load.GrpcClient(server.port)
    connections = max(plan.concurrencies) + plan.mix_callers

    async def whole_stream(texts: Sequence[str]) -> Point:
        return await load.stream(grpc_client.stub, texts)

    def bulk(tag: str) -> AsyncIterator[None]:
        return load.grpc_bulk(server.port, corpus.kinds[corpus.long], tag)

    http = load.HttpClient(server.http_port, model, connections)
    return [
        Target("service", server, grpc_client, bulk, whole_stream),
        Target(
            "service_http",
            server,
            http,
            bulk,
            _batched_http(http, plan),
            float_client=load.HttpClient(server.http_port, model, connections, "float"),
        ),
    ]


def _batched_http(client: load.Client, plan: Plan) -> Callable[[Sequence[str]], Awaitable[Point]]:
    async def batched(texts: Sequence[str]) -> Point:
        # No stream in the OpenAI API: its bulk form is concurrent batched requests.
        return await load.closed_loop(
            client, texts, batch=64, concurrency=plan.http_bulk_workers, seconds=1e9
        )

    return batched


def _vllm_target(server: Server, corpus: Corpus, plan: Plan, model: str) -> Target:
    connections = max(plan.concurrencies) + plan.http_bulk_workers + plan.mix_callers
    client = load.HttpClient(server.port, model, connections)
    return Target(
        "vllm",
        server,
        client,
        lambda tag: load.http_bulk(
            server.port,
            model,
            corpus.kinds[corpus.long],
            batch=64,
            workers=plan.http_bulk_workers,
            tag=tag,
        ),
        _batched_http(client, plan),
        float_client=load.HttpClient(server.port, model, connections, "float"),
    )


async def run_servers(
    service_args: list[str],
    config: ServiceConfig,
    corpus: Corpus,
    plan: Plan,
    out: Path,
    *,
    tags: load.Tags,
) -> dict[str, Any]:
    """The service (both faces) and vLLM's server with the same engine settings."""
    model = served_names(config)[0]
    servers: list[Server] = []
    targets: list[Target] = []
    try:
        if "service" in plan.scenarios:
            service = await start_service(service_args, out / "logs" / "service.log")
            servers.append(service)
            targets += _service_targets(service, corpus, plan, model)
        if "vllm" in plan.scenarios:
            vllm = await start_vllm_server(vllm_server_args(config), out / "logs" / "vllm.log")
            servers.append(vllm)
            targets.append(_vllm_target(vllm, corpus, plan, model))
        # Zipf traffic is about the vector cache: the defaults scenario measures it.
        return await compare(targets, corpus, replace(plan, loads=plan.loads - {"zipf"}), tags)
    finally:
        await _close(targets, servers)


async def _close(targets: Sequence[Target], servers: Sequence[Server]) -> None:
    """The load generators' channels, then the servers."""
    for t in targets:
        await t.client.close()
        if t.float_client is not None:
            await t.float_client.close()
    for server in servers:
        server.stop()


async def run_defaults(
    config: ServiceConfig, corpus: Corpus, plan: Plan, out: Path, tags: load.Tags
) -> dict[str, Any]:
    """Each server with its own defaults, as a user trying both would run them.

    The service runs with every default, the vector cache included: the single-text points
    send texts under tags of their own, which the cache has never seen, and the Zipf point,
    where repeats are the traffic, repeats them within each face's tag. vLLM's server gets
    the model and nothing else.
    """
    model = served_names(config)[0]
    logs = out / "logs"
    vllm = await start_vllm_server(vllm_default_args(config), logs / "vllm-defaults.log")
    servers = [vllm]
    targets = [_vllm_target(vllm, corpus, plan, model)]
    try:
        service = await start_service(["--model", config.model], logs / "service-defaults.log")
        servers.append(service)
        targets = [*_service_targets(service, corpus, plan, model), *targets]
        loads = plan.loads & {"unary", "zipf"}
        results = await compare(targets, corpus, replace(plan, loads=loads), tags)
        if "zipf" in loads:
            # The vector cache is per front-end process: what Zipf traffic gets from it with
            # two of them (a repeat hits only in the process that saw the text).
            args = ["--model", config.model, "--api-processes", "2"]
            two = await start_service(args, logs / "service-defaults-n2.log")
            servers.append(two)
            pair = [
                replace(t, name=f"{t.name}{TWO_FRONT_ENDS}")
                for t in _service_targets(two, corpus, plan, model)
            ]
            targets += pair
            results |= await compare(pair, corpus, replace(plan, loads=frozenset({"zipf"})), tags)
        return results
    finally:
        await _close(targets, servers)


def run_null_engine(plan: Plan, out: Path) -> dict[str, Any]:
    target = out / "null-engine.json"
    argv = [sys.executable, "-m", "benchmarks.null_engine", "--json", str(target)]
    argv += ["--seconds", str(plan.seconds)]
    with open(out / "logs" / "null-engine.log", "wb") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True)
    result: dict[str, Any] = json.loads(target.read_text("utf-8"))
    target.unlink()
    return result


def run_tiny_engine(corpus: Corpus, plan: Plan, out: Path, tags: load.Tags) -> dict[str, Any]:
    # uvloop: at a thousand calls a second the load generator shares the two cores too.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(tiny_engine.run(corpus, out, seconds=plan.seconds, tags=tags, log=_log))


# --------------------------------------------------------------------------------- main


def _meta(
    config: ServiceConfig, corpus: Corpus, plan: Plan, service_args: list[str]
) -> dict[str, Any]:

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
        "model": served_names(config)[0],
        "service_args": service_args,
        "engine": {
            "max_num_batched_tokens": max(config.max_batch_tokens, config.max_model_len),
            "max_num_seqs": config.max_batch_items,
            "dtype": config.dtype,
            "enforce_eager": config.enforce_eager,
            "prefix_caching": config.prefix_caching,
        },
        "corpus": {
            kind: {"texts": len(texts), "chars": sum(map(len, texts))}
            for kind, texts in corpus.kinds.items()
        },
        "plan": plan.__dict__ | {"loads": sorted(plan.loads), "scenarios": sorted(plan.scenarios)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--corpus", type=Path, help="a corpus JSON file (default: built here)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured time per point")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument(
        "--rerank-concurrency",
        default=",".join(map(str, rerank.CONCURRENCIES)),
        help="concurrent 20-document rerank calls per point",
    )
    parser.add_argument("--mix-callers", type=int, default=2)
    parser.add_argument("--http-bulk-workers", type=int, default=4)
    parser.add_argument(
        "--loads", default=",".join(LOADS), help="comma-separated: " + ",".join(LOADS)
    )
    parser.add_argument("--stream-limit", type=int, default=0, help="0: the whole corpus")
    parser.add_argument(
        "--only",
        default="ceiling,service,vllm,defaults,rerank,null,tinyengine,scaleout",
        help="comma-separated scenarios",
    )
    args, service_args = parser.parse_known_args(argv)
    # Prefix caching off, as vLLM's server gets it (servers.vllm_server_args): the engines
    # are compared on the same work. The vector cache stays on: no text repeats (the tags).
    service_args = [*("--prefix-caching", "false"), *(a for a in service_args if a != "--")]
    config = load_config(service_args)
    plan = Plan.from_args(args)
    rerank_concurrency = tuple(int(c) for c in args.rerank_concurrency.split(","))
    only = set(args.only.split(","))
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)

    corpus = Corpus.load(args.corpus) if args.corpus else build()
    corpus.save(out / "corpus.json")
    results: dict[str, Any] = {"meta": _meta(config, corpus, plan, service_args)}
    tags = load.Tags()  # one numbering for the whole run: no two points share a text
    scenarios: dict[str, Callable[[], Any]] = {
        "ceiling": lambda: {k: run_ceiling(k, plan, service_args, out) for k in corpus.kinds},
        "servers": lambda: asyncio.run(
            run_servers(service_args, config, corpus, plan, out, tags=tags)
        ),
        "defaults": lambda: asyncio.run(run_defaults(config, corpus, plan, out, tags)),
        "rerank": lambda: asyncio.run(
            rerank.run(
                service_args,
                corpus,
                out,
                seconds=plan.seconds,
                concurrencies=rerank_concurrency,
                log=_log,
            )
        ),
        "null": lambda: run_null_engine(plan, out),
        "tinyengine": lambda: run_tiny_engine(corpus, plan, out, tags),
        "scaleout": lambda: asyncio.run(
            scale_out.run(
                service_args,
                corpus.kinds[corpus.long][: plan.stream_limit or None],
                out,
                tags=tags,
                log=_log,
            )
        ),
    }
    began = time.monotonic()
    failed = []
    if only & {"service", "vllm"}:
        only.add("servers")
    for name, scenario in scenarios.items():
        if name not in only:
            continue
        _log(f"scenario {name}")
        try:
            outcome = scenario()
            if name == "servers":
                results.update(outcome)  # one entry per target
            elif name == "defaults":
                results["defaults"] = outcome
            else:
                results["null_engine" if name == "null" else name] = outcome
        except Exception as exc:  # one failed scenario must not lose the others' results
            _log(f"scenario {name} failed: {exc!r}; logs in {out / 'logs'}")
            results.setdefault("failed", {})[name] = repr(exc)
            failed.append(name)
        results["meta"]["wall_s"] = round(time.monotonic() - began, 1)
        (out / "result.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    report.write(results, out)
    _log(f"wrote {out}/result.json, report.md and plots")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
