"""How far --api-processes carries the front end on a many-core GPU host, and what the
engine behind it could take.

1. Front ends. The service with `--engine null` (zero vectors at once, no engine process)
   and N = 1, 2, 4, 8 front-end processes; single-text calls on the gRPC Embed and on the
   HTTP /v1/embeddings. The load comes from several generator processes (one Python
   process cannot load eight front ends), each `--concurrency` callers in a closed loop,
   their texts tagged apart so that none is a cache hit. Reported: calls/s, the ratio to
   N = 1, p50/p95 latency, and the serving CPU per 1,000 calls (the front ends' and the
   supervisor's, from /proc).
2. Engine. On a GPU, the forward pass of a Qwen3-Embedding-0.6B-shaped model (random bf16
   weights, transformers' Qwen3Model, SDPA attention) over batches of 128-token documents:
   docs/s against the FLOP roofline (benchmarks/gpu.py's count) at the GPU's bf16 peak.
   This is what the front ends have to keep fed; vLLM itself is not on the device machine.

Usage: python -m benchmarks.front_end_scale --model MODEL_DIR --out OUT [--processes 1,2,4,8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import load
from benchmarks.measure import Point, cpu_seconds, descendants
from benchmarks.servers import Server, start_service

QUERIES = [
    f"how do I {verb} the {thing} in {place} number {n}"
    for n in range(50)
    for verb in ("configure", "reset", "measure", "embed")
    for thing in ("cache", "queue", "model", "index", "router")
    for place in ("production", "staging", "a notebook")
]
TOP_GPU_BATCHES = (64, 256, 1024)
WARMUP_S = 2.0
# Connections per gRPC load generator (each front end serves the connections it accepts).
GRPC_CHANNELS = 4
# H200 dense bf16 peak, as benchmarks/gpu.py takes it.
PEAK_TFLOPS = 989.0


@dataclass(frozen=True)
class LoadSpec:
    """What each generator process sends: single-text calls on one face."""

    face: str  # "grpc" or "http"
    port: int
    model: str  # the name HTTP requests carry
    concurrency: int  # callers per generator
    seconds: float


def _generator(spec: LoadSpec, tag: str, out: Any) -> None:
    async def go() -> Point:
        client: load.Client
        if spec.face == "grpc":
            client = load.GrpcClient(spec.port, GRPC_CHANNELS)
        else:
            client = load.HttpClient(spec.port, spec.model, spec.concurrency + 8)
        try:
            for seconds, window in ((WARMUP_S, f"{tag}w"), (spec.seconds, tag)):
                point = await load.closed_loop(
                    client,
                    QUERIES,
                    batch=1,
                    concurrency=spec.concurrency,
                    seconds=seconds,
                    cycle=True,
                    tag=window,
                )
            return point
        finally:
            await client.close()

    p = asyncio.run(go())
    out.put((p.calls, p.errors, p.seconds, p.latencies))


def _serving_cpu(server: Server) -> float:
    total = 0.0
    for pid in (server.pid, *descendants(server.pid)):
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def measure_face(server: Server, spec: LoadSpec, generators: int, tag: str) -> dict[str, Any]:
    context = mp.get_context("spawn")
    results = context.Queue()
    procs = [
        context.Process(target=_generator, args=(spec, f"{tag}g{i}", results))
        for i in range(generators)
    ]
    for p in procs:
        p.start()
    time.sleep(WARMUP_S)  # the generators' warm-up, not measured
    before = _serving_cpu(server)
    parts = [results.get(timeout=spec.seconds + 300) for _ in procs]
    after = _serving_cpu(server)
    for p in procs:
        p.join()
    calls = sum(c for c, _, _, _ in parts)
    errors = sum(e for _, e, _, _ in parts)
    wall = max(s for _, _, s, _ in parts)
    point = Point(calls=calls, errors=errors, seconds=wall)
    point.latencies = sorted(x for *_, lat in parts for x in lat)
    return {
        "face": spec.face,
        "calls_per_s": round(calls / wall, 1),
        "errors": errors,
        "p50_ms": point.percentile_ms(50),
        "p95_ms": point.percentile_ms(95),
        "serving_cpu_s_per_1000_calls": round((after - before) / max(calls, 1) * 1000, 3),
    }


async def front_ends(
    model: Path, processes: Sequence[int], generators: int, load_shape: LoadSpec, out: Path
) -> list[dict[str, Any]]:
    """`load_shape`: the load's callers and seconds (its face and port are set here)."""
    rows: list[dict[str, Any]] = []
    name = model.name
    for n in processes:
        server = await start_service(
            ["--model", str(model), "--engine", "null", "--api-processes", str(n)],
            out / f"service-n{n}.log",
            name=f"null-n{n}",
        )
        try:
            await asyncio.sleep(3.0)  # every front end up (health answers once one is)
            for face in ("grpc", "http"):
                port = server.port if face == "grpc" else server.http_port
                spec = replace(load_shape, face=face, port=port, model=name)
                row = {"api_processes": n, **measure_face(server, spec, generators, f"n{n}{face}")}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    for row in rows:
        base = next(
            r for r in rows if r["face"] == row["face"] and r["api_processes"] == processes[0]
        )
        row["vs_first"] = round(row["calls_per_s"] / base["calls_per_s"], 2)
    return rows


def engine_forward(tokens: int = 128) -> list[dict[str, Any]]:
    """Qwen3-Embedding-0.6B's shape through transformers on the GPU, random weights."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from benchmarks.gpu import flops_per_token

    if not torch.cuda.is_available():
        return []
    config = Qwen3Config(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=3072, vocab_size=151669, max_position_embeddings=32768,
        tie_word_embeddings=True,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model: Any = Qwen3Model(config)
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    per_doc = flops_per_token(config.to_dict(), tokens) * tokens
    rows = []
    for batch in TOP_GPU_BATCHES:
        ids = torch.randint(0, 150000, (batch, tokens), device="cuda")
        with torch.inference_mode():
            for _ in range(3):
                model(input_ids=ids)
            torch.cuda.synchronize()
            runs, began = 10, time.perf_counter()
            for _ in range(runs):
                model(input_ids=ids)
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / runs
        docs = batch / seconds
        roofline = PEAK_TFLOPS * 1e12 / per_doc
        rows.append(
            {
                "batch": batch,
                "tokens": tokens,
                "docs_per_s": round(docs),
                "roofline_docs_per_s": round(roofline),
                "share_of_roofline": round(docs / roofline, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="a model folder (config.json, tokenizer.json)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--processes", default="1,2,4,8")
    parser.add_argument("--generators", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--concurrency", type=int, default=32, help="callers per generator")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    processes = [int(n) for n in args.processes.split(",")]
    result: dict[str, Any] = {
        "cores": os.cpu_count(),
        "generators": args.generators,
        "concurrency_per_generator": args.concurrency,
        "front_ends": asyncio.run(
            front_ends(
                args.model,
                processes,
                args.generators,
                LoadSpec("", 0, "", args.concurrency, args.seconds),
                args.out,
            )
        ),
    }
    if not args.skip_engine:
        result["engine_forward"] = engine_forward()
    (args.out / "front_end_scale.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
