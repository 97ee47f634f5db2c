"""Scenario 8, tinyengine: the front ends in front of an engine that is nearly free.

A Qwen3-shaped model so small that its forward pass costs next to nothing (width 32, two
layers, one attention head of dim 64, the smallest head vLLM's CPU attention takes, an MLP
of 64, seeded random weights, a byte-level BPE tokenizer trained on the benchmark corpus)
is built into a temporary folder, as benchmarks/gpu.py builds its models, and served
through the real vLLM engine core. What limits single-text calls is then the front end, the
engine client and the engine core's scheduling, as it would be in front of a fast GPU.

Each case below gets single-text calls from 64 concurrent callers for `seconds`, after a
warm-up of the same shape; one server runs at a time:

- `service`: the service with its defaults (`--model` only), on its gRPC Embed and its HTTP
  /v1/embeddings;
- `service_null`: the same with `--engine null` (zero vectors at once, no engine process);
- `vllm_api1`, `vllm_api2`: vLLM's own OpenAI server with its defaults and
  `--api-server-count` 1 and 2, started as `vllm serve` (benchmarks/vllm_serve.py; vLLM's
  `python -m vllm.entrypoints.openai.api_server` ignores the flag).

- `service_n2`, `service_null_n2`: the two service cases with `--api-processes 2`: two
  front-end processes sharing the ports and one engine core.

Every case sends the same texts (the corpus's queries under this scenario's tag, a lap
number keeping them unique when a point wraps around), so no call is answered from the
service's vector cache and every server counts the same tokens.

CPU. Before and after each point the scenario reads /proc for the launched process and
every process below it, and sorts them by role:
- `api`: the processes that serve HTTP or gRPC: the service's process, or with two its
  `embedding-service::front-end-<i>` children; vLLM's launched process with one API server,
  or with two its `VLLM::APIServer_<i>` children (the launched process then only watches
  them, and starts the engine core: `launcher`);
- `engine`: `VLLM::EngineCore` and the processes below it (vLLM's default executor on CPU
  runs the model in a `VLLM::Worker` child; the service's runs it inside the engine core);
- `other`: multiprocessing's resource tracker.
The serving CPU per 1,000 calls is the `api` role's. The load generator (this process)
and the whole machine (/proc/stat, which also counts anything else running) are read
alongside, and per-thread CPU by thread name for the api, engine and load-generator roles.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import load
from benchmarks.corpus import Corpus
from benchmarks.gpu import BPE_VOCAB, Shape, qwen3_config, write_model
from benchmarks.measure import (
    Point,
    command,
    cpu_seconds,
    descendants,
    machine_busy_seconds,
    thread_seconds,
)
from benchmarks.servers import (
    VLLM_SERVE,
    Server,
    start_service,
    start_vllm_server,
    vllm_default_args,
)
from service.config import load_config
from service.front_ends.worker import PROCESS_TITLE
from service.server import served_names
from tests.models.qwen3_files import eos_id, train_tokenizer

# Width 32 needs no head of width 32: Qwen3 sets head_dim apart from the width.
SHAPE = Shape(
    hidden=32, layers=2, heads=1, kv_heads=1, head_dim=64, intermediate=64, vocab=0,
    max_positions=8192,  # the window the sentence-transformers files say (gpu.write_model)
)  # fmt: skip
CONCURRENCY = 64
# gRPC callers over this many connections (HTTP's callers open up to CONCURRENCY + 8): a
# server with several front ends serves each connection in one of them.
GRPC_CHANNELS = 8
# The titles of the processes that serve calls under a launcher: vLLM's API servers with
# --api-server-count, the service's front ends with --api-processes.
API_PROCESSES = ("VLLM::APIServer", PROCESS_TITLE)
WARMUP_S = 6.0  # per face, before the first window: the first seconds after start run slower
WINDOWS = 2  # measured windows per face, taken in turn with the other face's
TOP_THREADS = 6  # per role, in the report


@dataclass(frozen=True)
class Case:
    name: str
    server: str  # "service" or "vllm"
    args: tuple[str, ...]  # after the model
    faces: tuple[str, ...]  # "grpc", "http"
    api_processes: int  # front-end processes serving the calls


def cases() -> list[Case]:
    return [
        Case("service", "service", (), ("grpc", "http"), 1),
        Case("service_null", "service", ("--engine", "null"), ("grpc", "http"), 1),
        Case("service_n2", "service", ("--api-processes", "2"), ("grpc", "http"), 2),
        Case(
            "service_null_n2",
            "service",
            ("--engine", "null", "--api-processes", "2"),
            ("grpc", "http"),
            2,
        ),
        Case("vllm_api1", "vllm", ("--api-server-count", "1"), ("http",), 1),
        Case("vllm_api2", "vllm", ("--api-server-count", "2"), ("http",), 2),
    ]


def build_model(folder: Path, corpus: Corpus) -> Path:
    """The tiny model folder, written into `folder`; a few seconds."""
    tokenizer = train_tokenizer(corpus.kinds[corpus.long], BPE_VOCAB)
    vocab = -(-tokenizer.get_vocab_size() // 64) * 64
    config = qwen3_config(SHAPE, vocab, eos_id(tokenizer), "float32")
    target = folder / "tiny-qwen3-w32"
    write_model(target, config, tokenizer)
    return target


# -------------------------------------------------------------------------------- CPU


def _role(pid: int, root: int, cmd: str, engine_pids: set[int], has_api_children: bool) -> str:
    if cmd.startswith(API_PROCESSES):
        return "api"
    if cmd.startswith("VLLM::EngineCore") or pid in engine_pids:
        return "engine"
    if pid == root:
        return "launcher" if has_api_children else "api"
    return "other"


@dataclass
class Snapshot:
    """CPU seconds of a server's process tree, of this process, and of the machine."""

    roles: dict[int, str]  # pid -> role
    cpu: dict[int, float]  # pid -> CPU seconds
    threads: dict[int, dict[str, float]]  # pid -> thread name -> CPU seconds
    own: float
    own_threads: dict[str, float]
    machine: float
    at: float

    @classmethod
    def take(cls, root: int) -> Snapshot:
        pids = [root, *descendants(root)]
        commands = {pid: command(pid) for pid in pids}
        engine_pids: set[int] = set()
        for pid in pids:
            if commands[pid].startswith("VLLM::EngineCore"):
                engine_pids |= {pid, *descendants(pid)}
        api_children = any(c.startswith(API_PROCESSES) for c in commands.values())
        roles = {
            pid: _role(pid, root, commands[pid], engine_pids, api_children)
            for pid in pids
            if commands[pid]
        }
        cpu: dict[int, float] = {}
        for pid in roles:
            try:
                cpu[pid] = cpu_seconds(pid)
            except OSError:
                continue
        return cls(
            roles={pid: roles[pid] for pid in cpu},
            cpu=cpu,
            threads={pid: thread_seconds(pid) for pid in cpu},
            own=cpu_seconds(os.getpid()),
            own_threads=thread_seconds(os.getpid()),
            machine=machine_busy_seconds(),
            at=time.monotonic(),
        )


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def _add(into: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v


@dataclass
class Usage:
    """CPU seconds by role and by thread name over one or more windows."""

    seconds: dict[str, float] = field(default_factory=dict)
    threads: dict[str, dict[str, float]] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    machine: float = 0.0  # busy CPU seconds of the whole machine
    wall: float = 0.0

    def add(self, before: Snapshot, after: Snapshot) -> None:
        seconds: dict[str, float] = {}
        processes: dict[str, int] = {}
        for pid, role in after.roles.items():
            seconds[role] = seconds.get(role, 0.0) + after.cpu[pid] - before.cpu.get(pid, 0.0)
            processes[role] = processes.get(role, 0) + 1
            _add(
                self.threads.setdefault(role, {}),
                _delta(after.threads[pid], before.threads.get(pid, {})),
            )
        seconds["load_generator"] = after.own - before.own
        _add(
            self.threads.setdefault("load_generator", {}),
            _delta(after.own_threads, before.own_threads),
        )
        _add(self.seconds, seconds)
        self.processes = processes
        self.machine += after.machine - before.machine
        self.wall += after.at - before.at

    def to_json(self, calls: int) -> dict[str, Any]:
        seconds = dict(self.seconds)
        seconds["rest_of_machine"] = self.machine - sum(seconds.values())
        return {
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "per_1000_calls": {k: round(v / max(calls, 1) * 1000, 3) for k, v in seconds.items()},
            "processes": self.processes,
            "wall_s": round(self.wall, 3),
            "machine_busy_cores": round(self.machine / self.wall, 2) if self.wall else None,
            "threads": {role: _top(named) for role, named in self.threads.items()},
        }


def _top(seconds: dict[str, float]) -> dict[str, float]:
    ranked = sorted(seconds.items(), key=lambda kv: -kv[1])[:TOP_THREADS]
    return {name: round(s, 3) for name, s in ranked}


# ------------------------------------------------------------------------------- running


@dataclass
class _Face:
    name: str
    client: load.Client
    lane: int
    point_tag: str = ""  # the tag of its measured texts; each window adds its number
    point: Point = field(default_factory=Point)
    usage: Usage = field(default_factory=Usage)
    lap: int = 0  # windows done; a window tags its texts with its number


async def _window(server: Server, face: _Face, queries: Sequence[str], seconds: float) -> None:
    """One window of single-text calls on one face, added to its point and its CPU."""
    before = Snapshot.take(server.pid)
    p = await load.closed_loop(
        face.client,
        queries,
        batch=1,
        concurrency=CONCURRENCY,
        seconds=seconds,
        cycle=True,
        tag=f"{face.point_tag}w{face.lap}",  # a window's texts are its own
    )
    face.usage.add(before, Snapshot.take(server.pid))
    face.lap += 1
    total = face.point
    total.texts += p.texts
    total.tokens += p.tokens
    total.calls += p.calls
    total.errors += p.errors
    total.cached += p.cached
    total.seconds += p.seconds
    total.latencies += p.latencies


def _row(face: _Face) -> dict[str, Any]:
    cpu = face.usage.to_json(face.point.calls)
    face.point.cpu_s = cpu["seconds"].get("api", 0.0)
    row = face.point.to_json()
    row["calls_per_s"] = row.pop("docs_per_s")
    row["cpu"] = cpu
    return row


async def _start(case: Case, model: Path, out: Path) -> tuple[Server, str]:
    args = ["--model", str(model)]
    name = served_names(load_config(args))[0]
    log = out / "logs" / f"tinyengine-{case.name}.log"
    if case.server == "service":
        return await start_service([*args, *case.args], log, name=case.name), name
    vllm_args = [*vllm_default_args(load_config(args)), *case.args]
    server = await start_vllm_server(vllm_args, log, name=case.name, module=VLLM_SERVE)
    return server, name


def _faces(case: Case, server: Server, name: str) -> list[_Face]:
    faces: list[_Face] = []
    for lane, face in enumerate(case.faces):
        if face == "grpc":
            faces.append(_Face(face, load.GrpcClient(server.port, GRPC_CHANNELS), lane))
        else:
            port = server.http_port if case.server == "service" else server.port
            faces.append(_Face(face, load.HttpClient(port, name, CONCURRENCY + 8), lane))
    return faces


async def run(
    corpus: Corpus,
    out: Path,
    *,
    seconds: float,
    tags: load.Tags,
    warmup_s: float = WARMUP_S,
    windows: int = WINDOWS,
    only: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the model, then each case in turn: start, warm up, measure, stop.

    A case's faces are measured in `windows` windows each, taken in turn (gRPC, HTTP, gRPC,
    HTTP), so a drift of the machine's speed (a first minute after start that runs slower,
    another job on the machine) hits both faces alike.
    """
    queries = corpus.kinds[corpus.short]
    # One point number for the scenario's measured calls, one for its warm-ups: every case
    # gets the same texts; the lanes keep the service's two faces (one cache) apart.
    point, warmup = tags.point(), tags.point()
    rows: list[dict[str, Any]] = []
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as folder:
        began = time.monotonic()
        model = build_model(Path(folder), corpus)
        log(f"tinyengine: model built in {time.monotonic() - began:.0f} s")
        for case in cases():
            if only and case.name not in only:
                continue
            base = {"case": case.name, "server": case.server, "api_processes": case.api_processes}
            try:
                began = time.monotonic()
                server, name = await _start(case, model, out)
            except (OSError, RuntimeError, TimeoutError) as exc:
                log(f"tinyengine {case.name}: did not start: {exc}")
                rows += [base | {"face": f, "error": str(exc)} for f in case.faces]
                continue
            started_s = round(time.monotonic() - began, 1)
            faces = _faces(case, server, name)
            try:
                for face in faces:
                    face.point_tag = load.tag(point, face.lane)
                    await load.closed_loop(
                        face.client,
                        queries,
                        batch=1,
                        concurrency=CONCURRENCY,
                        seconds=warmup_s,
                        cycle=True,
                        tag=load.tag(warmup, face.lane),
                    )
                load_average = os.getloadavg()[0]
                for _ in range(windows):
                    for face in faces:
                        await _window(server, face, queries, seconds / windows)
                for face in faces:
                    row = {"face": face.name, "start_s": started_s, "load_average": load_average}
                    rows.append(base | row | _row(face))
                    log(_line(rows[-1]))
            except Exception as exc:  # a case that fails must not lose the others
                log(f"tinyengine {case.name}: {exc!r}")
                rows.append(base | {"face": "?", "error": repr(exc)})
            finally:
                for face in faces:
                    await face.client.close()
                server.stop()
    return {
        "meta": {
            "model": {
                "hidden": SHAPE.hidden,
                "layers": SHAPE.layers,
                "heads": SHAPE.heads,
                "head_dim": SHAPE.head_dim,
                "intermediate": SHAPE.intermediate,
            },
            "concurrency": CONCURRENCY,
            "seconds": seconds,
            "warmup_s": warmup_s,
            "windows": windows,
            "load_average_at_start": load_at_start,  # 1, 5 and 15 minutes
            "load_average_at_end": os.getloadavg(),
            "cores": os.cpu_count(),
        },
        "rows": rows,
    }


def _line(row: dict[str, Any]) -> str:
    cpu = row["cpu"]["per_1000_calls"]
    err = f", {row['errors']} errors" if row["errors"] else ""
    return (
        f"tinyengine {row['case']} {row['face']}: {row['calls_per_s']} calls/s, p50"
        f" {row['p50_ms']} p95 {row['p95_ms']} ms{err}; CPU-s per 1,000 calls: serving"
        f" {cpu.get('api', 0)}, engine {cpu.get('engine', 0)}, load generator"
        f" {cpu.get('load_generator', 0)}, rest of machine {cpu.get('rest_of_machine', 0)}"
    )
