"""The benchmark suite's own parts: corpus, load generators, report. No timing is asserted."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from benchmarks import load, report
from benchmarks.corpus import MAX_PARAGRAPH_WORDS, MIN_PARAGRAPH_WORDS, QUERY_WORDS, build
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
