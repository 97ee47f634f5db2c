"""Cross-encoder rerank through the real server on both faces, against transformers.

The session's servers run each embedding model with a tiny random-weight reranker beside it
(BERT with MiniLM, Qwen3-Reranker with the tiny Qwen3): the service builds every pair
itself, the real vLLM engine scores it, and tests/reference_rerank.py builds its own inputs
from the texts and runs transformers. Scores are probabilities (sigmoid of the logit;
Qwen3-Reranker: P(yes)); the raw logit comes along.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client import EmbeddingClient
from tests.models.tiny_qwen3 import long_document
from tests.reference_rerank import (
    QWEN3_SUFFIX_VLLM_TEMPLATE,
    Scores,
    cross_encoder_scores,
    qwen3_reranker_scores,
)
from tests.servers import ServerProcess
from tests.texts import TEXTS

TOLERANCE = 1e-4  # on the probability
QUERY = "How do I read a file line by line?"
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "Open the file with open(path) and iterate over it: each iteration yields one line.",
    *TEXTS[:8],
]
QWEN3_TASK = "Given a question about Python, find the passage that answers it"


@dataclass(frozen=True)
class Rig:
    """One server with its rerank model, and the reference that scores like it."""

    server: ServerProcess
    model_dir: Path
    reference: Callable[..., Scores]
    too_long: str  # a document over the rerank model's window

    @property
    def name(self) -> str:
        return self.model_dir.name


@pytest.fixture(scope="module", params=["bert", "qwen3"])
def rig(request: pytest.FixtureRequest) -> Rig:
    if request.param == "bert":
        model_dir: Path = request.getfixturevalue("bert_reranker_dir")
        server: ServerProcess = request.getfixturevalue("minilm_server")
        return Rig(server, model_dir, cross_encoder_scores, long_document(model_dir, 400))
    model_dir = request.getfixturevalue("qwen_reranker_dir")
    server = request.getfixturevalue("qwen_server")
    return Rig(server, model_dir, qwen3_reranker_scores, long_document(model_dir, 600))


def _http_rerank(rig: Rig, body: dict[str, Any], route: str = "/v1/rerank") -> httpx.Response:
    url = rig.server.base_url.removesuffix("/v1") + route
    return httpx.post(url, json=body, timeout=300)


def _grpc_rerank(rig: Rig, request: pb.RerankRequest) -> pb.RerankResponse:
    with grpc.insecure_channel(rig.server.address) as channel:
        reply: pb.RerankResponse = pb_grpc.EmbeddingServiceStub(channel).Rerank(request)
        return reply


def _in_document_order(results: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in sorted(results, key=lambda r: int(r["index"]))]


def test_scores_equal_the_reference_on_both_faces_for_a_document_over_the_window(
    rig: Rig,
) -> None:
    documents = [*DOCUMENTS, rig.too_long]
    reference = rig.reference(rig.model_dir, QUERY, documents)
    assert np.ptp(reference.logits) > 1.0, "scores spread, so matching them means something"
    # HTTP, Cohere's shape with no model named: the rerank model answers, best first.
    reply = _http_rerank(rig, {"query": QUERY, "documents": documents})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["model"], body["score_kind"]) == (rig.name, "cross-encoder")
    assert body["score_formula"] == "sigmoid(logit)"
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(
        _in_document_order(body["results"], "relevance_score"),
        reference.probabilities,
        atol=TOLERANCE,
    )
    truncated = {r["index"] for r in body["results"] if r.get("truncated")}
    assert truncated == {len(documents) - 1} and reply.headers["x-truncated-inputs"] == "1"
    # gRPC: every document in document order, with the logit.
    answer = _grpc_rerank(rig, pb.RerankRequest(query=QUERY, documents=documents))
    assert answer.score_kind == pb.SCORE_KIND_CROSS_ENCODER and answer.model == rig.name
    assert [r.index for r in answer.results] == list(range(len(documents)))
    np.testing.assert_allclose(
        [r.relevance_score for r in answer.results], reference.probabilities, atol=TOLERANCE
    )
    np.testing.assert_allclose([r.raw_score for r in answer.results], reference.logits, atol=1e-3)
    assert [r.truncated for r in answer.results] == [False] * len(DOCUMENTS) + [True]
    assert answer.usage.prompt_tokens == sum(len(ids) for ids in reference.input_ids)


def test_top_k_raw_scores_return_documents_and_tei_shape(rig: Rig) -> None:
    reference = rig.reference(rig.model_dir, QUERY, DOCUMENTS)
    best = np.argsort(-reference.probabilities, kind="stable")[:3].tolist()
    top = _grpc_rerank(
        rig, pb.RerankRequest(query=QUERY, documents=DOCUMENTS, top_k=3, return_documents=True)
    )
    assert [r.index for r in top.results] == best
    assert [r.document for r in top.results] == [DOCUMENTS[i] for i in best]
    tei = _http_rerank(
        rig,
        {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True, "return_text": True},
        "/rerank",
    )
    assert tei.status_code == 200, tei.text
    np.testing.assert_allclose(_in_document_order(tei.json(), "score"), reference.logits, atol=1e-3)
    assert all(r["text"] == DOCUMENTS[r["index"]] for r in tei.json())


def test_open_webui_and_the_cohere_sdk_get_the_cross_encoders_scores(rig: Rig) -> None:
    import cohere

    reference = rig.reference(rig.model_dir, QUERY, [*DOCUMENTS, rig.too_long])
    # Open WebUI's external reranker, verbatim: it reads index and relevance_score.
    documents = [*DOCUMENTS, rig.too_long]
    body = {"model": rig.name, "query": QUERY, "documents": documents, "top_n": len(documents)}
    reply = _http_rerank(rig, body)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(
        _in_document_order(reply.json()["results"], "relevance_score"),
        reference.probabilities,
        atol=TOLERANCE,
    )
    root = rig.server.base_url.removesuffix("/v1")
    with cohere.ClientV2(base_url=root, api_key="unused") as client:
        ranked = client.rerank(model=rig.name, query=QUERY, documents=documents, top_n=4)
    order = np.argsort(-reference.probabilities, kind="stable")[:4].tolist()
    assert [r.index for r in ranked.results] == order
    np.testing.assert_allclose(
        [r.relevance_score for r in ranked.results],
        reference.probabilities[order],
        atol=TOLERANCE,
    )


def test_llamaindex_jina_reranker_gets_the_cross_encoders_scores(rig: Rig) -> None:
    """LlamaIndex's JinaRerank node postprocessor, unchanged, pointed at the service."""
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    documents = [*DOCUMENTS, rig.too_long]
    reference = rig.reference(rig.model_dir, QUERY, documents)
    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i))) for i, d in enumerate(documents)]
    reranker = JinaRerank(base_url=rig.server.base_url, api_key="unused", model=rig.name, top_n=4)
    ranked = reranker.postprocess_nodes(nodes, query_str=QUERY)
    order = np.argsort(-reference.probabilities, kind="stable")[:4].tolist()
    assert [int(n.node.node_id) for n in ranked] == order
    np.testing.assert_allclose(
        [n.score for n in ranked], reference.probabilities[order], atol=TOLERANCE
    )


def test_the_cap_on_document_tokens_and_a_query_too_long(rig: Rig, bert_reranker_dir: Path) -> None:
    if rig.model_dir != bert_reranker_dir:
        pytest.skip("the reference's cap is sentence-transformers' (BERT)")
    capped = _grpc_rerank(
        rig, pb.RerankRequest(query=QUERY, documents=DOCUMENTS[:4], max_tokens_per_doc=12)
    )
    reference = cross_encoder_scores(rig.model_dir, QUERY, DOCUMENTS[:4], max_tokens_per_doc=12)
    np.testing.assert_allclose(
        [r.relevance_score for r in capped.results], reference.probabilities, atol=TOLERANCE
    )
    reply = _http_rerank(rig, {"query": rig.too_long, "documents": ["d"]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "query"


@pytest.mark.parametrize("task", ["", QWEN3_TASK])
def test_qwen3_reranker_takes_its_instruction_on_both_faces(
    task: str, qwen_server: ServerProcess, qwen_reranker_dir: Path
) -> None:
    rig = Rig(qwen_server, qwen_reranker_dir, qwen3_reranker_scores, "")
    reference = qwen3_reranker_scores(qwen_reranker_dir, QUERY, DOCUMENTS, instruction=task or None)
    answer = _grpc_rerank(rig, pb.RerankRequest(query=QUERY, documents=DOCUMENTS, instruction=task))
    got = np.array([r.relevance_score for r in answer.results])
    np.testing.assert_allclose(got, reference.probabilities, atol=TOLERANCE)
    body = {"query": QUERY, "documents": DOCUMENTS, **({"instruction": task} if task else {})}
    reply = _http_rerank(rig, body, "/v2/rerank")
    np.testing.assert_allclose(
        _in_document_order(reply.json()["results"], "relevance_score"),
        reference.probabilities,
        atol=TOLERANCE,
    )
    # Sharp enough to catch a one-token slip at the prompt's end (vLLM's shipped template).
    slipped = qwen3_reranker_scores(
        qwen_reranker_dir,
        QUERY,
        DOCUMENTS,
        instruction=task or None,
        suffix=QWEN3_SUFFIX_VLLM_TEMPLATE,
    )
    assert np.max(np.abs(slipped.probabilities - got)) > 1e-2


def test_both_models_are_listed_with_their_kinds(rig: Rig, minilm: EmbeddingClient) -> None:
    with grpc.insecure_channel(rig.server.address) as channel:
        info = pb_grpc.EmbeddingServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    assert [(m.names[0], m.kind) for m in info.models] == [
        (info.model, "embed"),
        (rig.name, "score"),
    ]
    listed = httpx.get(f"{rig.server.base_url}/models", timeout=30).json()["data"]
    assert {(m["id"], m["kind"]) for m in listed} >= {(info.model, "embed"), (rig.name, "score")}


def test_embedding_and_rerank_traffic_share_the_server(
    minilm_server: ServerProcess, bert_reranker_dir: Path
) -> None:
    """A bulk embedding stream and rerank calls at once: each is answered in full, with the
    scores it would get alone."""
    rig = Rig(minilm_server, bert_reranker_dir, cross_encoder_scores, "")
    alone = _grpc_rerank(rig, pb.RerankRequest(query=QUERY, documents=DOCUMENTS))
    corpus = [(str(i), f"{TEXTS[i % len(TEXTS)]} ({i})") for i in range(400)]

    def stream() -> list[str]:
        with EmbeddingClient(minilm_server.address) as client:
            return [r.id for r in client.embed_stream(iter(corpus)) if r.vector is not None]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bulk = pool.submit(stream)
        reranks = [
            pool.submit(_grpc_rerank, rig, pb.RerankRequest(query=QUERY, documents=DOCUMENTS))
            for _ in range(12)
        ]
        answers = [f.result() for f in reranks]
        embedded = bulk.result()
    assert sorted(embedded, key=int) == [i for i, _ in corpus]
    for answer in answers:
        np.testing.assert_allclose(
            [r.relevance_score for r in answer.results],
            [r.relevance_score for r in alone.results],
            atol=1e-6,
        )


# RerankStream: many queries in one stream, each item ranked as Rerank ranks it.
STREAM_QUERIES = [QUERY, *TEXTS[:5]]


def _grpc_rerank_stream(
    rig: Rig, items: Sequence[pb.RerankStreamRequest]
) -> dict[str, pb.RerankStreamResponse]:
    with grpc.insecure_channel(rig.server.address) as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        responses = list(stub.RerankStream(iter(items), timeout=300))
    by_id = {r.id: r for r in responses}
    assert len(by_id) == len(responses) == len(items), "every item answered once"
    return by_id


def _stream_items(rig: Rig) -> list[pb.RerankStreamRequest]:
    """Each query over the documents (with one over the window), every third asking for
    the top 3 with their texts."""
    documents = [*DOCUMENTS, rig.too_long]
    return [
        pb.RerankStreamRequest(
            id=f"query {i}",
            request=pb.RerankRequest(
                query=query,
                documents=documents,
                top_k=3 if i % 3 == 2 else 0,
                return_documents=i % 3 == 2,
            ),
        )
        for i, query in enumerate(STREAM_QUERIES)
    ]


def test_rerank_stream_answers_many_queries_as_rerank_and_the_reference_do(rig: Rig) -> None:
    items = _stream_items(rig)
    streamed = _grpc_rerank_stream(rig, items)
    for item in items:
        answer = streamed[item.id]
        assert answer.HasField("response"), answer.error
        got, request = answer.response, item.request
        unary = _grpc_rerank(rig, request)
        assert (got.model, got.score_kind) == (rig.name, pb.SCORE_KIND_CROSS_ENCODER)
        assert [r.index for r in got.results] == [r.index for r in unary.results]
        assert [r.truncated for r in got.results] == [r.truncated for r in unary.results]
        assert [r.document for r in got.results] == [r.document for r in unary.results]
        np.testing.assert_allclose(
            [r.relevance_score for r in got.results],
            [r.relevance_score for r in unary.results],
            atol=1e-6,
        )
        assert got.usage == unary.usage
        reference = rig.reference(rig.model_dir, request.query, request.documents)
        if request.top_k:
            best = np.argsort(-reference.probabilities, kind="stable")[:3].tolist()
            assert [r.index for r in got.results] == best
            assert [r.document for r in got.results] == [request.documents[i] for i in best]
        np.testing.assert_allclose(
            [r.relevance_score for r in got.results],
            reference.probabilities[[r.index for r in got.results]],
            atol=TOLERANCE,
        )
        assert any(r.truncated for r in got.results) or request.top_k


def test_rerank_stream_bad_items_fail_alone_naming_field_and_limit(rig: Rig) -> None:
    good = _stream_items(rig)[:2]
    bad = {
        "empty query": pb.RerankRequest(query="", documents=DOCUMENTS),
        # More documents than the stream's room (--stream-max-inflight, 1024 by default).
        "too many documents": pb.RerankRequest(query=QUERY, documents=["d"] * 1025),
        "query over the window": pb.RerankRequest(query=rig.too_long, documents=DOCUMENTS),
    }
    items = [
        good[0],
        *(pb.RerankStreamRequest(id=i, request=r) for i, r in bad.items()),
        good[1],
    ]
    streamed = _grpc_rerank_stream(rig, items)
    for item in good:
        assert streamed[item.id].HasField("response"), streamed[item.id].error
        assert len(streamed[item.id].response.results) == len(item.request.documents)
    errors = {i: streamed[i].error for i in bad}
    assert {e.code for e in errors.values()} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    assert errors["empty query"].message == "query: text is empty"
    assert errors["too many documents"].message.startswith(
        "documents: 1025 documents exceed the limit of 1024 per item of a stream"
    )
    window = errors["query over the window"].message
    assert window.startswith("query: ") and "limit of" in window, window


def test_the_clients_rerank_stream_round_trip(rig: Rig) -> None:
    items = [(f"q{i}", query, DOCUMENTS) for i, query in enumerate(STREAM_QUERIES)]
    with EmbeddingClient(rig.server.address) as client:
        alone = {i: client.rerank(query, documents, top_k=4) for i, query, documents in items}
        streamed = list(client.rerank_stream([*items, ("empty", "", DOCUMENTS)], top_k=4))
    by_id = {r.id: r for r in streamed}
    assert sorted(by_id) == sorted([*alone, "empty"])
    for i, expected in alone.items():
        ranking = by_id[i].ranking
        assert by_id[i].ok and ranking is not None
        assert (ranking.model, ranking.score_kind) == (rig.name, "cross-encoder")
        assert [r.index for r in ranking.results] == [r.index for r in expected.results]
        np.testing.assert_allclose(ranking.scores, expected.scores, atol=1e-6)
    failed = by_id["empty"]
    assert not failed.ok and failed.error is not None
    assert failed.error.message == "query: text is empty"
