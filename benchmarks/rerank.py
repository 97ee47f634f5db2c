"""Scenario 7, rerank: the service's cross-encoder against vLLM's own `/rerank`.

A tiny random-weight BERT cross-encoder (tests/models/tiny_bert_reranker.py, the layout of
ms-marco-MiniLM, a window of 128 tokens) is built into a temporary folder. Then:

- the service runs with `--rerank-model` set to it, beside its embedding model, and is
  called on its HTTP face (`/v1/rerank`, Cohere's shape) and its gRPC face (`Rerank`);
- vLLM's own OpenAI server serves the same folder with `--runner pooling` and the engine
  settings the service gives its rerank engine, translated flag by flag (`vllm_args`), and
  is called on `/v1/rerank` with the same body. Two engine settings cannot be the same:
  the service's engine skips tokenizer start-up (it sends token ids) and schedules by
  priority, which orders the same as vLLM's first-come default when every call is
  interactive, as here.

Every request is one query and 20 documents, `top_n` 20, `return_documents` false (vLLM
ignores that field and sends the texts back anyway). Queries and documents come from the
benchmark corpus, kept only when the longest query and the longest document fit the window
together, so neither server cuts or refuses anything; every request of the scenario is a
different (query, documents) combination. Each point is a closed loop of 1, 16 or 64
callers for `seconds`, and is charged the serving process's CPU time (not vLLM's
engine-core child, in both cases); the servers stay up side by side and each point is
measured on each in turn, in an order that rotates from point to point.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc.aio
from tokenizers import Tokenizer

from benchmarks.corpus import Corpus
from benchmarks.measure import Point, cpu_seconds
from benchmarks.servers import Server, start_service, start_vllm_server
from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from service.config import ServiceConfig, load_config
from service.engines.vllm_engine import _resolve_dtype
from service.server import model_names
from service.telemetry import names as headers

DOCUMENTS_PER_REQUEST = 20
CONCURRENCIES = (1, 16, 64)
MAX_QUERY_TOKENS = 32  # about three queries in four of the corpus
PAIR_SPECIAL_TOKENS = 3  # [CLS] query [SEP] document [SEP]
WARMUP_S = 3.0
CALL_TIMEOUT_S = 300.0
TIMING = ("tokenize", "queue", "inference", "total")  # the service's own timing, per call


# ---------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Requests:
    """Queries and documents that fit the window together, whichever are paired."""

    queries: list[str]
    documents: list[str]
    query_tokens: int  # the longest query
    document_tokens: int  # the longest document

    @classmethod
    def fitting(cls, corpus: Corpus, tokenizer: Path, window: int) -> Requests:
        """The corpus's queries of at most MAX_QUERY_TOKENS, and its paragraphs that fit
        beside the longest of them (counted by the reranker's own tokenizer)."""
        tok = Tokenizer.from_file(str(tokenizer))

        def lengths(texts: Sequence[str]) -> list[int]:
            return [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]

        short = corpus.kinds[corpus.short]
        queries = [q for q, n in zip(short, lengths(short), strict=True) if n <= MAX_QUERY_TOKENS]
        room = window - PAIR_SPECIAL_TOKENS - max(lengths(queries))
        paragraphs = corpus.kinds[corpus.long]
        documents = [d for d, n in zip(paragraphs, lengths(paragraphs), strict=True) if n <= room]
        if len(queries) < 100 or len(documents) < 10 * DOCUMENTS_PER_REQUEST:
            raise RuntimeError(f"too few texts fit a window of {window} tokens")
        return cls(queries, documents, max(lengths(queries)), max(lengths(documents)))

    def stream(self, start: int) -> Iterator[tuple[str, list[str]]]:
        """Request n, n+1, ... from `start`: query n (mod the queries) with the next 20
        documents, shifted by one more document each time the queries wrap around, so no
        two requests of one run pair the same query with the same documents."""
        q, d = len(self.queries), len(self.documents)
        for n in itertools.count(start):
            first = n * DOCUMENTS_PER_REQUEST + n // q
            docs = [self.documents[(first + j) % d] for j in range(DOCUMENTS_PER_REQUEST)]
            yield self.queries[n % q], docs


def build_model(folder: Path) -> Path:
    """The tiny BERT cross-encoder the tests use, written into `folder`."""
    from tests.models.tiny_bert_reranker import build_tiny_bert_reranker

    return build_tiny_bert_reranker(folder / "tiny-bert-reranker")


# -------------------------------------------------------------------------------- clients


@dataclass
class Answer:
    tokens: int
    timing_ms: dict[str, float] = field(default_factory=dict)  # the service's own, if sent


class RerankClient(Protocol):
    async def rerank(self, query: str, documents: Sequence[str]) -> Answer: ...

    async def close(self) -> None: ...


def _check(results: int, documents: int, indices: set[int], scores: Sequence[float]) -> None:
    if results != documents or indices != set(range(documents)):
        raise RuntimeError(f"{results} results for {documents} documents")
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores):
        raise RuntimeError("a relevance score outside [0, 1]")


class HttpRerank:
    """Cohere's /v1/rerank, the same body to the service and to vLLM."""

    def __init__(self, port: int, model: str, connections: int) -> None:
        self._url = f"http://127.0.0.1:{port}/v1/rerank"
        self._model = model
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
        )

    async def rerank(self, query: str, documents: Sequence[str]) -> Answer:
        body = {
            "model": self._model,
            "query": query,
            "documents": list(documents),
            "top_n": len(documents),
            "return_documents": False,
        }
        async with self._session.post(self._url, json=body) as reply:
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {(await reply.text())[:200]}")
            out = await reply.json()
            timing = {
                name: float(reply.headers[header])
                for name, header in zip(
                    TIMING,
                    (
                        headers.TOKENIZE_TIME_HEADER,
                        headers.QUEUE_TIME_HEADER,
                        headers.INFERENCE_TIME_HEADER,
                        headers.TOTAL_TIME_HEADER,
                    ),
                    strict=True,
                )
                if header in reply.headers
            }
        results = out["results"]
        _check(
            len(results),
            len(documents),
            {int(r["index"]) for r in results},
            [float(r["relevance_score"]) for r in results],
        )
        return Answer(int(out["usage"]["prompt_tokens"]), timing)

    async def close(self) -> None:
        await self._session.close()


class GrpcRerank:
    """The service's Rerank RPC, top_k 20 and no texts back, as the HTTP body asks."""

    def __init__(self, port: int, model: str) -> None:
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._stub = pb_grpc.EmbeddingServiceStub(self._channel)
        self._model = model

    async def rerank(self, query: str, documents: Sequence[str]) -> Answer:
        request = pb.RerankRequest(
            query=query, documents=documents, top_k=len(documents), model=self._model
        )
        reply = await self._stub.Rerank(request, timeout=CALL_TIMEOUT_S)
        _check(
            len(reply.results),
            len(documents),
            {r.index for r in reply.results},
            [r.relevance_score for r in reply.results],
        )
        t = reply.timing
        timing = dict(
            zip(TIMING, (t.tokenize_us, t.queue_us, t.inference_us, t.total_us), strict=True)
        )
        return Answer(int(reply.usage.prompt_tokens), {k: v / 1000 for k, v in timing.items()})

    async def close(self) -> None:
        await self._channel.close()


# ----------------------------------------------------------------------------------- load


@dataclass
class RerankPoint:
    """A Point whose texts are (query, document) pairs, with the service's mean timing."""

    point: Point
    timing_ms: dict[str, float]
    first_error: str = ""

    def to_json(self) -> dict[str, Any]:
        out = self.point.to_json()
        out["pairs_per_s"] = out.pop("docs_per_s")
        out["pairs"] = out.pop("texts")
        if "cpu_s_per_1000_texts" in out:
            out["cpu_s_per_1000_pairs"] = out.pop("cpu_s_per_1000_texts")
        if self.timing_ms:
            out["server_timing_mean_ms"] = {k: round(v, 3) for k, v in self.timing_ms.items()}
        if self.first_error:
            out["first_error"] = self.first_error
        return out


async def closed_loop(
    client: RerankClient,
    requests: Iterator[tuple[str, list[str]]],
    *,
    concurrency: int,
    seconds: float,
    limit: int,
) -> RerankPoint:
    """`concurrency` callers, each sending the next request as soon as its last returns,
    for `seconds` or `limit` requests, whichever ends first. Throughput is over the time
    until the last call returned."""
    work = itertools.islice(requests, limit)
    point = Point()
    sums: dict[str, float] = {}
    errors: list[str] = []
    began = time.perf_counter()
    end = began + seconds

    async def caller() -> None:
        for query, documents in work:
            if time.perf_counter() >= end:
                return
            t0 = time.perf_counter()
            try:
                answer = await client.rerank(query, documents)
            except (grpc.aio.AioRpcError, aiohttp.ClientError, RuntimeError, TimeoutError) as e:
                point.errors += 1
                errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            point.latencies.append(time.perf_counter() - t0)
            point.calls += 1
            point.texts += len(documents)
            point.tokens += answer.tokens
            for k, v in answer.timing_ms.items():
                sums[k] = sums.get(k, 0.0) + v

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    point.seconds = time.perf_counter() - began
    means = {k: v / point.calls for k, v in sums.items()} if point.calls else {}
    return RerankPoint(point, means, errors[0] if errors else "")


# -------------------------------------------------------------------------------- servers


def service_args(base: Sequence[str], model: Path) -> list[str]:
    """The run's service flags with the cross-encoder beside the embedding model."""
    return [*base, "--rerank-model", str(model)]


def vllm_args(config: ServiceConfig) -> list[str]:
    """vLLM's server flags for the engine the service builds for `config.rerank_model`
    (server.load_vllm_scorer and engines/vllm_engine.py service_engine_args): the same
    dtype, memory share, step budgets, window, compile mode and executor, chunked prefill
    and (here) prefix caching off. --vllm-args reaches only the embedding engine in the
    service, so it is not passed here either."""
    model = Path(config.rerank_model)
    return [
        "--model", str(model),
        "--served-model-name", model_names(config.rerank_model, config.rerank_served_model_name)[0],
        "--runner", "pooling",
        "--dtype", _resolve_dtype(config.dtype),
        "--gpu-memory-utilization", str(config.rerank_gpu_memory_utilization),
        "--max-num-batched-tokens",
        str(max(config.rerank_max_batch_tokens, config.rerank_max_model_len)),
        "--max-num-seqs", str(config.rerank_max_batch_items),
        *(["--max-model-len", str(config.rerank_max_model_len)]
          if config.rerank_max_model_len else []),
        "--enforce-eager" if config.enforce_eager else "--no-enforce-eager",
        "--distributed-executor-backend", "uni",
        "--no-enable-chunked-prefill",
        *([] if config.prefix_caching else ["--no-enable-prefix-caching"]),
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]  # fmt: skip


@dataclass
class _Target:
    name: str  # "service" (gRPC), "service_http", "vllm"
    server: Server
    client: RerankClient


def _window(model: Path) -> int:
    config = json.loads((model / "config.json").read_text("utf-8"))
    return int(config["max_position_embeddings"])


async def _compare(
    targets: Sequence[_Target],
    requests: Requests,
    seconds: float,
    concurrencies: Sequence[int],
    log: Callable[[str], None],
) -> dict[str, Any]:
    source = requests.stream(0)  # one source for the whole scenario: no request repeats
    for t in targets:  # connections up, first-call costs paid, compiled shapes warm
        await closed_loop(
            t.client, source, concurrency=16, seconds=WARMUP_S, limit=len(requests.queries)
        )
    results: dict[str, Any] = {t.name: {} for t in targets}
    for turn, c in enumerate(concurrencies):
        k = turn % len(targets)
        for t in [*targets[k:], *targets[:k]]:
            before = cpu_seconds(t.server.pid)
            measured = await closed_loop(
                t.client, source, concurrency=c, seconds=seconds, limit=len(requests.queries)
            )
            p = measured.point
            p.cpu_s = cpu_seconds(t.server.pid) - before
            row = measured.to_json()
            err = f" ({p.errors} errors: {measured.first_error})" if p.errors else ""
            log(
                f"rerank {t.name} {c}: {row['pairs_per_s']} pairs/s, p50 {row['p50_ms']}"
                f" p95 {row['p95_ms']} ms, {row['cpu_s_per_1000_pairs']} CPU-s/1,000 pairs{err}"
            )
            results[t.name][str(c)] = row
    return results


async def run(
    base_args: Sequence[str],
    corpus: Corpus,
    out: Path,
    *,
    seconds: float,
    concurrencies: Sequence[int],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The scenario: build the model, start both servers, measure every point."""
    with tempfile.TemporaryDirectory(prefix="bench-rerank-") as folder:
        model = build_model(Path(folder))
        args = service_args(base_args, model)
        config = load_config(args)
        name = model_names(config.rerank_model, config.rerank_served_model_name)[0]
        window = _window(model)
        requests = Requests.fitting(corpus, model / "tokenizer.json", window)
        flags = vllm_args(config)
        servers: list[Server] = []
        targets: list[_Target] = []
        try:
            service = await start_service(args, out / "logs" / "rerank-service.log")
            servers.append(service)
            connections = max(concurrencies) + 16
            targets.append(_Target("service", service, GrpcRerank(service.port, name)))
            targets.append(
                _Target("service_http", service, HttpRerank(service.http_port, name, connections))
            )
            vllm = await start_vllm_server(flags, out / "logs" / "rerank-vllm.log")
            servers.append(vllm)
            targets.append(_Target("vllm", vllm, HttpRerank(vllm.port, name, connections)))
            results = await _compare(targets, requests, seconds, concurrencies, log)
        finally:
            for t in targets:
                await t.client.close()
            for server in servers:
                server.stop()
    results["meta"] = {
        "model": "tiny random-weight BERT cross-encoder (tests/models/tiny_bert_reranker.py)",
        "window": window,
        "documents_per_request": DOCUMENTS_PER_REQUEST,
        "queries": len(requests.queries),
        "documents": len(requests.documents),
        "longest_query_tokens": requests.query_tokens,
        "longest_document_tokens": requests.document_tokens,
        "service_args": [a if a != str(model) else "<tiny-bert-reranker>" for a in args],
        "vllm_args": [a if a != str(model) else "<tiny-bert-reranker>" for a in flags],
        "seconds": seconds,
    }
    return results
