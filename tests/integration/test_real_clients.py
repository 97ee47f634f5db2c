"""Client libraries users point at the HTTP face, each running its own code unchanged against
the real service on loopback: Chroma's OpenAIEmbeddingFunction, LlamaIndex's OpenAIEmbedding,
LiteLLM's cohere/ rerank and the cohere SDK's ClientV2. Every vector and score they get back
is checked against the service's own gRPC answer for the same text.

The libraries are imported inside the tests: together they take seconds to import, which
every pytest run would otherwise pay while collecting.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import httpx2
import numpy as np
import openai
import pytest

from embedding_client import EmbeddingClient
from tests.servers import ServerProcess
from tests.texts import TEXTS

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# What LlamaIndex's OpenAIEmbedding sends when given no model. The service answers to it
# because the minilm_server fixture lists it in --served-model-name.
ADA = "text-embedding-ada-002"
ATOL = 1e-5

# LiteLLM downloads its model price list (and more) from GitHub when imported or called,
# unless told to use its bundled copies; nothing here may leave loopback.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")


# Paragraphs as a knowledge base chunks them (about 1,000 characters and more of Markdown and
# code): each is well over MiniLM's 256-token window. The topic comes first, so what truncation
# at the end keeps still says what the paragraph is about.
def _kubernetes_doc() -> str:
    env = "\n".join(
        f'        - name: OPERATOR_SETTING_{i}\n          value: "{i * 37 % 101}"'
        for i in range(24)
    )
    return (
        "# Deploying the operator on Kubernetes\n\n"
        "Apply the manifests with `kubectl apply -k deploy/`, then wait until the Deployment "
        "reports every replica ready. The operator watches custom resources in its namespace.\n\n"
        "```yaml\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: operator\n"
        "spec:\n  replicas: 2\n  template:\n    spec:\n      containers:\n      - name: operator\n"
        f"        image: registry.local/operator:1.4.2\n        env:\n{env}\n```\n"
    )


def _retry_doc() -> str:
    handlers = "\n\n".join(
        f"def fetch_{i}(session: Session, url: str) -> Response:\n"
        f"    # attempt {i}: back off {2**i}s after a 429 or a 503, then try again\n"
        f"    return with_retries(lambda: session.get(url, timeout={i + 1}), attempts={i + 3})"
        for i in range(10)
    )
    return (
        "## Retrying failed HTTP requests in Python\n\n"
        "Wrap each call in a retry loop with exponential backoff and jitter; retry only on "
        "429, 502, 503 and connection errors, and give up after a few attempts.\n\n"
        f"```python\nimport random\nimport time\n\n{handlers}\n```\n"
    )


def _bread_doc() -> str:
    steps = "\n".join(
        f"{i}. Fold the dough {i} times, rest it {10 + 5 * i} minutes at 24 °C, and check that "
        "the surface turns smooth and elastic."
        for i in range(1, 15)
    )
    return (
        "# Sourdough bread, step by step\n\n"
        "Feed the starter the evening before; mix flour, water and salt in the morning.\n\n"
        f"{steps}\n\n| flour | water | salt |\n|---|---|---|\n| 500 g | 350 g | 10 g |\n"
    )


def _changelog_doc() -> str:
    """About 20,000 characters: far over the window, as a whole file sent as one document."""
    entries = "\n".join(
        f"- 0.{i}.0: the storage engine compacts segments {i} times faster; fixed a crash "
        f"when a snapshot of more than {i * 1024} rows was restored."
        for i in range(200)
    )
    return f"# Changelog of the storage engine\n\n{entries}\n"


LONG_DOCS = [_kubernetes_doc(), _retry_doc(), _bread_doc()]
HUGE_DOC = _changelog_doc()
RETRY_QUERY = "How do I retry a failed HTTP request with exponential backoff in Python?"
RERANK_DOCS = [TEXTS[1], *LONG_DOCS, HUGE_DOC, TEXTS[0]]


def _root(server: ServerProcess) -> str:
    """The service root, without /v1: the Cohere-shaped clients add their own route."""
    return server.base_url.removesuffix("/v1")


def _expected_relevance(
    client: EmbeddingClient, query: str, documents: Sequence[str]
) -> np.ndarray:
    """(1 + cosine) / 2 from gRPC vectors: the query with the model's query prompt (if it
    has one), the documents cut at the end of the window."""
    prompt = "query" if "query" in client.model_info().prompts else ""
    query_vector = client.embed([query], prompt_name=prompt).vectors[0].astype(np.float64)
    doc_vectors = client.embed(list(documents), truncate="end").vectors.astype(np.float64)
    relevance: np.ndarray = (1.0 + doc_vectors @ query_vector) / 2.0
    # The ranking checks below need an unambiguous order.
    assert np.diff(np.sort(relevance)).min() > 1e-4
    return relevance


def _check_ranking(results: Sequence[tuple[int, float]], expected: np.ndarray, top_n: int) -> None:
    """The top_n best documents, best first, each scored as gRPC's vectors say."""
    indices = [index for index, _ in results]
    scores = np.array([score for _, score in results], dtype=np.float64)
    assert len(results) == top_n
    assert indices == np.argsort(-expected, kind="stable")[:top_n].tolist()
    np.testing.assert_allclose(scores, expected[indices], atol=ATOL)
    assert ((scores >= 0.0) & (scores <= 1.0)).all()


def test_long_paragraphs_overflow_the_window(minilm: EmbeddingClient) -> None:
    # Otherwise the tests below would not exercise truncation at all.
    result = minilm.embed([*LONG_DOCS, HUGE_DOC], truncate="end")
    assert all(result.truncated)
    assert all(len(doc) >= 1000 for doc in LONG_DOCS)
    assert len(HUGE_DOC) > 15_000


# ------------------------------------------------------------------------------ Chroma


def test_chroma_openai_embedding_function_on_long_paragraphs(
    minilm_server: ServerProcess, minilm: EmbeddingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chromadb
    from chromadb.config import Settings
    from chromadb.utils.embedding_functions import OpenAIEmbeddingFunction

    # Chroma takes the key from an environment variable (OPENAI_API_KEY first, when set); it
    # cannot send extra fields, so the service must truncate without being asked.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("CHROMA_OPENAI_API_KEY", "unused")
    function = OpenAIEmbeddingFunction(model_name=MINILM, api_base=minilm_server.base_url)
    expected = minilm.embed(LONG_DOCS, truncate="end").vectors
    np.testing.assert_allclose(np.array(function(LONG_DOCS)), expected, atol=ATOL)

    # The journey: a collection that embeds through the service on add and on query.
    client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False))
    name = f"docs-{uuid.uuid4().hex}"
    # Chroma's own annotations reject its text-only functions here (EmbeddingFunction is
    # invariant in its input type), though the call is as Chroma documents it.
    untyped: Any = function
    collection = client.create_collection(
        name, embedding_function=untyped, configuration={"hnsw": {"space": "cosine"}}
    )
    try:
        ids = [f"doc{i}" for i in range(len(LONG_DOCS))]
        collection.add(ids=ids, documents=LONG_DOCS)
        stored = collection.get(ids=ids, include=["embeddings"])
        order = [ids.index(i) for i in stored["ids"]]
        np.testing.assert_allclose(np.asarray(stored["embeddings"]), expected[order], atol=ATOL)
        found = collection.query(query_texts=[RETRY_QUERY], n_results=1)
        assert found["ids"] == [["doc1"]], "the retry paragraph answers the retry question"
    finally:
        client.delete_collection(name)


# -------------------------------------------------------------------------- LlamaIndex


def test_llamaindex_openai_embedding_without_a_model(
    minilm_server: ServerProcess, minilm: EmbeddingClient
) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    sent: list[dict[str, Any]] = []

    def record(request: httpx2.Request) -> None:
        sent.append(json.loads(request.content))

    texts = [*TEXTS[:4], LONG_DOCS[0]]
    with httpx2.Client(event_hooks={"request": [record]}) as http:
        embedding = OpenAIEmbedding(
            api_base=minilm_server.base_url, api_key="unused", http_client=http
        )
        documents = np.array(embedding.get_text_embedding_batch(texts), dtype=np.float32)
        query = np.array(embedding.get_query_embedding(RETRY_QUERY), dtype=np.float32)
    assert embedding.model_name == ADA
    assert [body["model"] for body in sent] == [ADA, ADA]
    # LlamaIndex turns newlines into spaces before sending (as OpenAI's old cookbook did).
    expected = minilm.embed([t.replace("\n", " ") for t in texts], truncate="end").vectors
    np.testing.assert_allclose(documents, expected, atol=ATOL)
    np.testing.assert_allclose(query, minilm.embed([RETRY_QUERY]).vectors[0], atol=ATOL)


def test_unknown_model_is_404_naming_the_served_models(minilm_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=minilm_server.base_url, api_key="unused", max_retries=0)
    served = [model.id for model in client.models.list().data]
    assert served[0] == MINILM, "the first name is the one reported"
    assert ADA in served
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input=["hello"])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    for name in served:
        assert repr(name) in caught.value.message
    # The Cohere-shaped route refuses the same way, with OpenAI's error body.
    reply = httpx.post(
        f"{_root(minilm_server)}/v2/rerank",
        json={"model": "rerank-v3.5", "query": "q", "documents": ["d"]},
        timeout=30,
    )
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


# ----------------------------------------------------------------------------- rerank


@pytest.mark.parametrize("route", ["v2", "v1"])
def test_litellm_cohere_rerank(
    minilm_server: ServerProcess, minilm: EmbeddingClient, route: str
) -> None:
    import litellm
    from litellm.types.rerank import RerankResponse

    # LiteLLM posts to {api_base}/v2/rerank, and to v1 when api_base names that route.
    root = _root(minilm_server)
    api_base = root if route == "v2" else f"{root}/v1/rerank"
    expected = _expected_relevance(minilm, RETRY_QUERY, RERANK_DOCS)
    for top_n in (2, len(RERANK_DOCS)):
        response = litellm.rerank(
            model=f"cohere/{MINILM}",
            query=RETRY_QUERY,
            documents=list(RERANK_DOCS),
            top_n=top_n,
            api_base=api_base,
            api_key="unused",
        )
        assert isinstance(response, RerankResponse)
        results = response.results or []
        _check_ranking([(r["index"], r["relevance_score"]) for r in results], expected, top_n)
        # LiteLLM asks for the documents back by default.
        assert [r["document"]["text"] for r in results] == [
            RERANK_DOCS[r["index"]] for r in results
        ]


def test_cohere_sdk_v2_rerank(minilm_server: ServerProcess, minilm: EmbeddingClient) -> None:
    import cohere

    expected = _expected_relevance(minilm, RETRY_QUERY, RERANK_DOCS)
    with cohere.ClientV2(base_url=_root(minilm_server), api_key="unused") as client:
        best = client.rerank(model=MINILM, query=RETRY_QUERY, documents=RERANK_DOCS, top_n=3)
        _check_ranking([(r.index, r.relevance_score) for r in best.results], expected, 3)
        assert best.results[0].index == RERANK_DOCS.index(LONG_DOCS[1]), "the retry paragraph"
        # Without top_n every document comes back scored, the one far over the window too.
        every = client.rerank(model=MINILM, query=RETRY_QUERY, documents=RERANK_DOCS)
        ranked = [(r.index, r.relevance_score) for r in every.results]
        _check_ranking(ranked, expected, len(RERANK_DOCS))
        assert RERANK_DOCS.index(HUGE_DOC) in [index for index, _ in ranked]
        with pytest.raises(cohere.NotFoundError):
            client.rerank(model="rerank-v3.5", query=RETRY_QUERY, documents=RERANK_DOCS)
