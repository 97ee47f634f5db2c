"""Scenario 9, scaleout: `embed-files --streams 1` and `--streams 2` over two service
instances behind one round_robin gRPC target (`ipv4:127.0.0.1:P1,127.0.0.1:P2`).

Both instances run the real vLLM engine on the run's model with the run's service flags,
each with its /metrics on and its model pinned to a core of its own
(VLLM_CPU_OMP_THREADS_BIND), as two pods on two machines would be. Each run is the CLI in
a process of its own (`python -m embedding_client.cli`), from a JSONL file of the corpus's
paragraphs to a fresh Parquet dataset, under a tag of its own, so the instances' vector
caches answer nothing. A warm-up run of 2 streams, under its own tag, pays both instances'
first-call costs first.

Per run: chunks/s and docs/s over the CLI process's whole wall time (start-up included);
how the inputs split over the instances (`embedding_inputs_total` before and after, with
the EmbedStream calls and cache hits each counted); that the dataset holds one row per
input with no id twice; and CPU seconds from /proc: each instance's serving process, its
vLLM engine core and the engine's worker that runs the model (with the cores it is pinned
to), the CLI process (read when it has exited, before it is reaped), and the whole machine,
whose rest (this process, any other job) shows whether something else shared the cores.

    python -m benchmarks.run --only scaleout
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import load
from benchmarks.measure import command, cpu_seconds, machine_busy_seconds
from benchmarks.servers import Server, start_service
from benchmarks.tiny_engine import Snapshot

STREAMS = (1, 2)
INSTANCES = 2
WARMUP_TEXTS = 256
# The engine's processes, apart: vLLM's CPU build pins the worker to its cores at start.
ENGINE_PROCESSES = {"VLLM::EngineCore": "engine_core", "VLLM::Worker": "engine_worker"}
EVEN_WITHIN = 0.10  # of an even share, for the inputs split with one stream per instance
# Prometheus samples summed per instance: (sample name, label that must match, or None).
COUNTERS = {
    "inputs": ("embedding_inputs_total", None),
    "cache_hits": ("embedding_cache_hits_total", None),
    "streams": ("rpc_server_call_duration_seconds_count", ("rpc_method", "EmbedStream")),
}


async def counters(server: Server) -> dict[str, float]:
    """This instance's COUNTERS from its /metrics."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        text = await reply.text()
    out = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, (name, label) in COUNTERS.items():
                if sample.name == name and (
                    label is None or sample.labels.get(label[0]) == label[1]
                ):
                    out[key] += sample.value
    return out


def _embed_files(
    target: str, texts: Sequence[str], streams: int, tag: str, log: Path
) -> dict[str, Any]:
    """embed-files in a process of its own over `texts` under `tag`, into a fresh dataset:
    its wall and CPU seconds, and the check of its output."""
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        source, out = Path(tmp) / "corpus.jsonl", Path(tmp) / "out.parquet"
        with open(source, "w", encoding="utf-8") as f:
            for i, text in enumerate(load.tagged(texts, tag)):
                f.write(json.dumps({"id": str(i), "text": text}) + "\n")
        argv = [sys.executable, "-m", "embedding_client.cli", str(source), "--out", str(out)]
        argv += ["--server", target, "--streams", str(streams), "--quiet"]
        began = time.perf_counter()
        with open(log, "ab") as f:
            process = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        wall, cpu = time.perf_counter() - began, cpu_seconds(process.pid)
        if process.wait() != 0:
            raise RuntimeError(f"embed-files exited with {process.returncode}; see {log}")
        # One row per input (each paragraph is one chunk), no id twice.
        table = pq.read_table(out, columns=["id", "chunk"])
    ids = table.column("id").to_pylist()
    pairs = set(zip(ids, table.column("chunk").to_pylist(), strict=True))
    rows, unique = table.num_rows, len(set(ids))
    return {
        "streams": streams,
        "texts": len(texts),
        "wall_s": round(wall, 2),
        "chunks_per_s": round(rows / wall, 2),
        "docs_per_s": round(len(texts) / wall, 2),
        "rows": rows,
        "unique_ids": unique,
        "rows_ok": rows == len(texts) == unique == len(pairs),
        "cli_cpu_s": round(cpu, 2),
    }


def _cpu(before: Snapshot, after: Snapshot) -> tuple[dict[str, float], dict[str, list[int]]]:
    """One instance's CPU seconds by role (tiny_engine's), its engine split into the engine
    core (scheduler) and its worker (the model), and the cores each engine process may use."""
    seconds: dict[str, float] = {}
    cores: dict[str, list[int]] = {}
    for pid, role in after.roles.items():
        name = command(pid)
        key = ENGINE_PROCESSES.get(name, role)
        seconds[key] = seconds.get(key, 0.0) + after.cpu[pid] - before.cpu.get(pid, 0.0)
        if name in ENGINE_PROCESSES:
            cores[ENGINE_PROCESSES[name]] = sorted(os.sched_getaffinity(pid))
    return {k: round(v, 2) for k, v in seconds.items()}, cores


async def _run_once(
    servers: Sequence[Server], texts: Sequence[str], streams: int, tag: str, log: Path
) -> dict[str, Any]:
    """One CLI run, with each instance's counters and CPU and the machine's around it."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
    before = [(await counters(s), Snapshot.take(s.pid)) for s in servers]
    machine = machine_busy_seconds()
    row = await asyncio.to_thread(_embed_files, target, texts, streams, tag, log)
    machine = machine_busy_seconds() - machine
    rest = machine - row["cli_cpu_s"]
    row["instances"] = []
    for server, (metrics, snapshot) in zip(servers, before, strict=True):
        after = await counters(server)
        delta = {k: int(after[k] - metrics[k]) for k in COUNTERS}
        cpu, cores = _cpu(snapshot, Snapshot.take(server.pid))
        row["instances"].append(delta | {"cpu_s": cpu, "cores": cores})
        rest -= sum(cpu.values())
    row["machine_busy_cores"] = round(machine / row["wall_s"], 2)
    row["rest_of_machine_cpu_s"] = round(rest, 2)  # this process, other jobs
    done = [i["inputs"] for i in row["instances"]]
    row["share"] = [round(n / max(sum(done), 1), 3) for n in done]
    row["even"] = all(abs(s * INSTANCES - 1) <= EVEN_WITHIN for s in row["share"])
    return row


async def run(
    service_args: list[str],
    texts: Sequence[str],
    out: Path,
    *,
    tags: load.Tags,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the instances, warm them up, then one CLI run per entry of STREAMS."""
    servers: list[Server] = []
    rows: list[dict[str, Any]] = []
    cli_log = out / "logs" / "scaleout-cli.log"
    try:
        cores = sorted(os.sched_getaffinity(0))
        for i in range(INSTANCES):
            log_file = out / "logs" / f"scaleout-service{i}.log"
            # Each instance's model on a core of its own, as on two machines (vLLM's CPU
            # build would pin both to the same first cores).
            pin = {"VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])}
            servers.append(
                await start_service(service_args, log_file, f"scaleout{i}", metrics=True, env=pin)
            )
        warm = texts[:WARMUP_TEXTS]
        await _run_once(servers, warm, INSTANCES, load.tag(tags.point()), cli_log)
        for streams in STREAMS:
            rows.append(await _run_once(servers, texts, streams, load.tag(tags.point()), cli_log))
            log(_line(rows[-1]))
    finally:
        for server in servers:
            server.stop()
    return {"meta": {"instances": INSTANCES, "cores": os.cpu_count()}, "rows": rows}


def _line(row: dict[str, Any]) -> str:
    split = " / ".join(str(i["inputs"]) for i in row["instances"])
    cpu = ", ".join(f"instance {n} {i['cpu_s']}" for n, i in enumerate(row["instances"]))
    return (
        f"scaleout --streams {row['streams']}: {row['chunks_per_s']} chunks/s in"
        f" {row['wall_s']} s; split {split}; rows ok {row['rows_ok']}; CPU-s: {cpu},"
        f" CLI {row['cli_cpu_s']}"
    )
