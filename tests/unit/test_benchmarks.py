"""The benchmark suite's own parts: corpus, load generators, report. No timing is asserted."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import grpc.aio
import numpy as np
import pytest
from aiohttp import web

from benchmarks import load, report, run
from benchmarks.corpus import MAX_PARAGRAPH_WORDS, MIN_PARAGRAPH_WORDS, QUERY_WORDS, Corpus, build
from benchmarks.servers import Server
from embedding.v1 import embedding_pb2 as pb
from service.config import ServiceConfig
from service.server import EmbeddingServer


def test_corpus_is_real_varied_prose_without_repeats() -> None:
    corpus = build()
    paragraphs, queries = corpus.kinds["paragraphs"], corpus.kinds["queries"]
    assert len(paragraphs) >= 2000 and len(queries) >= 2000
    assert all(MIN_PARAGRAPH_WORDS <= len(p.split()) <= MAX_PARAGRAPH_WORDS for p in paragraphs)
    assert all(QUERY_WORDS[0] <= len(q.split()) <= QUERY_WORDS[1] for q in queries)
    sentences = [s.lower() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p)]
    assert len(sentences) == len(set(sentences))
    assert len(set(queries)) == len(queries)
    assert not any(re.search(r"https?://|```", p) for p in paragraphs)
    lengths = sorted(len(p) for p in paragraphs)
    assert lengths[len(lengths) // 10] * 3 < lengths[-len(lengths) // 10]  # varied lengths
    assert build() == corpus  # the same on every run


def test_corpus_round_trips_through_json(tmp_path: Path) -> None:
    corpus = build(paragraphs=10, queries=5)
    corpus.save(tmp_path / "corpus.json")
    assert type(corpus).load(tmp_path / "corpus.json") == corpus


@pytest.fixture
async def null_server() -> AsyncIterator[EmbeddingServer]:
    server = EmbeddingServer(ServiceConfig(port=0, http_port=0, engine="null", metrics_port=0))
    await server.start()
    yield server
    await server.stop(grace_s=1)


async def test_load_generators_count_what_the_server_did(null_server: EmbeddingServer) -> None:
    texts = build(paragraphs=0, queries=200).kinds["queries"]
    client = load.GrpcClient(null_server.port)
    try:
        # Ends when the texts run out; `seconds` only bounds a hang (the null engine answers
        # these 29 calls in well under a second, but a loaded machine must not cut them).
        point = await load.closed_loop(client, texts, batch=7, concurrency=4, seconds=600)
        streamed = await load.stream(client.stub, texts[:50])
    finally:
        await client.close()
    # Bounded by the texts: every text once, in calls of at most 7.
    assert point.texts == 200 and point.calls == 29 and point.errors == 0
    assert len(point.latencies) == 29 and point.tokens > 200
    assert streamed.texts == 50 and len(streamed.latencies) == 50 and streamed.errors == 0
    assert point.to_json()["p99_ms"] >= point.to_json()["p50_ms"] > 0


def test_report_renders_tables_and_plots(tmp_path: Path) -> None:
    def point(docs: float, p99: float) -> dict[str, float]:
        return {"docs_per_s": docs, "tokens_per_s": docs * 20, "p50_ms": p99 / 2,
                "p95_ms": p99 * 0.9, "p99_ms": p99, "cpu_s_per_1000_texts": 1.5}  # fmt: skip

    def server(scale: float, http: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "unary": {"queries": {"1": point(40 * scale, 30), "64": point(100 * scale, 900)}},
            "batch32": {"queries": point(110 * scale, 2000)},
            "bulk": {"queries": point(120 * scale, 5000)},
            "mixed": {"idle": point(50, 30), "loaded": point(5, 90 / scale)},
            "sporadic": {"0.05s": {"p50_ms": 20.0, "max_ms": 150 / scale}},
            "fair": {"alone": {"seconds": 1.5}, "behind_large": {"seconds": 3 / scale}},
        }
        if http:
            out["float"] = {"queries": {"1x64": point(80 * scale, 5), "32x4": point(90 * scale, 5)}}
        return out

    results = {
        "meta": {"model": "m", "plan": {"seconds": 1}},
        "ceiling": {"queries": {"docs_per_s": 125.0}},
        "service": server(1.0),
        "service_http": server(0.75, http=True),
        "vllm": server(0.5, http=True),
        "defaults": {
            "service": {"unary": {"queries": {"16": point(90, 9)}}, "zipf": {"64": point(300, 5)}},
            "vllm": {"unary": {"queries": {"16": point(100, 9)}}, "zipf": {"64": point(100, 5)}},
        },
    }
    report.write(results, tmp_path)
    md = (tmp_path / "report.md").read_text("utf-8")
    assert "| unary, 64 concurrent | queries | 125.0 | 100.0 | 450.0 / 900.0 | 75.0 |" in md
    assert "| 0.80 | 2.00 | 1.50 |" in md  # gRPC / ceiling, gRPC / vLLM, HTTP / vLLM
    assert "| 1-text, 64 concurrent | queries | 60.0 | 75.0 | 40.0 | 50.0 | 1.50 |" in md
    assert "| unary, 16 concurrent | queries | 90.0 | 100.0 | 0.90 |" in md
    assert "| Zipf s=1.1, 64 concurrent | queries | 300.0 | 100.0 | 3.00 |" in md
    assert "| service gRPC | 20.0 / 150.0 | - / - | 1.50 | 3.00 |" in md
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert (tmp_path / "mixed_latency.png").stat().st_size > 1000
    json.dumps(results)


# ------------------------------------------------------------------ no text sent twice

VECTOR = np.zeros(4, np.float32)
TAGGED = re.compile(r"^p\d+\.\d+[a-z]*\d*\.\d+ ")  # load.mark: "{tag}.{lap} {text}"


class Recorder:
    """Stands in for a server: answers Embed, EmbedStream and /v1/embeddings at once with
    zero vectors and keeps every text it was sent, in order."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.grpc: grpc.aio.Server | None = None
        self.http: web.AppRunner | None = None

    def _embedding(self) -> pb.Embedding:
        return pb.Embedding(data=VECTOR.tobytes(), dimensions=len(VECTOR), token_count=1)

    async def _embed(self, request: pb.EmbedRequest, _: object) -> pb.EmbedResponse:
        self.texts += request.inputs
        return pb.EmbedResponse(
            embeddings=[self._embedding() for _ in request.inputs],
            usage=pb.Usage(prompt_tokens=len(request.inputs)),
        )

    async def _stream(
        self, requests: AsyncIterator[pb.EmbedStreamRequest], _: object
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        async for request in requests:
            self.texts += [item.input for item in request.items]
            results = [
                pb.StreamItemResult(id=item.id, embedding=self._embedding())
                for item in request.items
            ]
            yield pb.EmbedStreamResponse(results=results)

    async def _http(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.texts += body["input"]
        vector: Any = (
            base64.b64encode(VECTOR.tobytes()).decode()
            if body["encoding_format"] == "base64"
            else VECTOR.tolist()
        )
        data = [{"index": i, "embedding": vector} for i in range(len(body["input"]))]
        return web.json_response({"data": data, "usage": {"prompt_tokens": len(data)}})

    async def start(self, with_grpc: bool) -> tuple[int, int]:
        """(gRPC port or 0, HTTP port)"""
        grpc_port = 0
        if with_grpc:
            self.grpc = grpc.aio.server()
            handler = grpc.method_handlers_generic_handler(
                "embedding.v1.EmbeddingService",
                {
                    "Embed": grpc.unary_unary_rpc_method_handler(
                        self._embed,
                        request_deserializer=pb.EmbedRequest.FromString,
                        response_serializer=pb.EmbedResponse.SerializeToString,
                    ),
                    "EmbedStream": grpc.stream_stream_rpc_method_handler(
                        self._stream,
                        request_deserializer=pb.EmbedStreamRequest.FromString,
                        response_serializer=pb.EmbedStreamResponse.SerializeToString,
                    ),
                },
            )
            self.grpc.add_generic_rpc_handlers((handler,))
            grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
            await self.grpc.start()
        app = web.Application()
        app.router.add_post("/v1/embeddings", self._http)
        self.http = web.AppRunner(app)
        await self.http.setup()
        site = web.TCPSite(self.http, "127.0.0.1", 0)
        await site.start()
        http_port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        return grpc_port, http_port

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(None)
        if self.http is not None:
            await self.http.cleanup()


def _server(name: str, port: int, http_port: int, log: Path) -> Server:
    """A Server whose CPU is read from this process (the recorders run in it)."""
    process = cast(subprocess.Popen[bytes], SimpleNamespace(pid=os.getpid()))
    return Server(name, process, port, log, http_port)


async def test_no_two_points_of_a_run_share_a_text(tmp_path: Path) -> None:
    """Every load of `make bench`'s servers scenario, wired as run.py wires it (both faces
    of the service on one cache, vLLM's server apart, the background bulk loads of the mix
    and of the sporadic calls, fair's two jobs): no server is sent any text twice but in
    the Zipf point, whose repeats are what it measures, each face under its own tag."""
    queries = [f"query number {i} about things" for i in range(120)]
    paragraphs = [f"paragraph number {i} about other things." for i in range(150)]
    corpus = Corpus({"queries": queries, "paragraphs": paragraphs})
    plan = run.Plan(
        seconds=0.05,
        concurrencies=(1, 4),
        mix_callers=2,
        http_bulk_workers=2,
        stream_limit=0,
        loads=frozenset(run.LOADS),
        scenarios=frozenset(),
        warmup_s=0.05,
        ramp_s=0.05,
        sporadic_gaps_s=(0.001,),
        fair_delay_s=0.05,
    )
    service, vllm = Recorder(), Recorder()
    targets: list[run.Target] = []
    try:
        port, http_port = await service.start(with_grpc=True)
        _, vllm_port = await vllm.start(with_grpc=False)
        targets = [
            *run._service_targets(_server("service", port, http_port, tmp_path), corpus, plan, "m"),
            run._vllm_target(_server("vllm", vllm_port, 0, tmp_path), corpus, plan, "m"),
        ]
        results = await run.compare(targets, corpus, plan, load.Tags())
    finally:
        for t in targets:
            await t.client.close()
            if t.float_client is not None:
                await t.float_client.close()
        await service.stop()
        await vllm.stop()

    zipf = set(run.zipf_queries(queries))
    for recorder in (service, vllm):
        sent = Counter(recorder.texts)
        assert all(TAGGED.match(t) for t in sent)  # every point tags its texts
        repeated = [t for t, n in sent.items() if n > 1]
        # Only the Zipf point repeats, within its own tag: one point, one lane.
        assert repeated and {t.split(" ", 1)[1] for t in repeated} <= zipf
        assert len({t.split(" ", 1)[0] for t in repeated}) <= 2  # gRPC and HTTP lanes
        # Every text is one of the corpus's, under its tag.
        assert {t.split(" ", 1)[1] for t in sent} <= {*queries, *paragraphs}
    # Every load ran, on every target it applies to.
    for name in ("service", "service_http", "vllm"):
        assert set(results[name]) == {
            "unary", "batch32", "bulk", "mixed", "sporadic", "zipf", "fair",
            *(["float"] if name != "service" else []),
        }  # fmt: skip

    # The service's two faces share one cache, so they send under two lanes; vLLM's server
    # gets lane 0, the gRPC face's very texts, so both count the same tokens.
    def lanes(texts: list[str]) -> set[str]:
        return {m.group(1) for t in texts if (m := re.match(r"p\d+\.(\d)", t))}

    assert lanes(service.texts) == {"0", "1"} and lanes(vllm.texts) == {"0"}


def test_marks_keep_a_cycling_load_unique() -> None:
    texts = ["a", "b", "c"]
    slices = load._slices(texts, 2, cycle=True, tag="p9.1")
    sent = [t for _ in range(6) for t in next(slices)]
    assert sent[:3] == ["p9.1.0 a", "p9.1.0 b", "p9.1.0 c"]
    assert sent[3].startswith("p9.1.1 ")  # the second pass: lap 1
    assert len(set(sent)) == len(sent)
    assert load.tagged(texts, "") == texts  # no tag: the texts go as they are
