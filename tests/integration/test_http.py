"""The HTTP face of the real servers (vLLM on CPU), through the clients users point at it:
the openai SDK, langchain-openai, and the requests Open WebUI's code makes. Every vector is
compared with the gRPC Embed vector of the same input."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings
from tokenizers import Tokenizer

from embedding_client import EmbeddingClient
from tests.servers import ServerProcess
from tests.texts import TEXTS

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TASK = "Given a question, find the passage that answers it"
QUERY_TASK = "Given a web search query, retrieve relevant passages that answer the query"
ATOL = 1e-6
# What a user types into Open WebUI's API key box for a server without keys.
OPEN_WEBUI_KEY = "none"


def _vectors(response: Any) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def _model(server: ServerProcess) -> str:
    return str(httpx.get(f"{server.base_url}/models", timeout=10).json()["data"][0]["id"])


def test_openai_sdk_default_is_base64_and_matches_grpc(
    minilm_server: ServerProcess, minilm: EmbeddingClient
) -> None:
    client = openai.OpenAI(base_url=minilm_server.base_url, api_key="unused")
    sent: list[bytes] = []
    raw = client.embeddings.with_raw_response.create(model=MINILM, input=TEXTS)
    sent.append(raw.http_request.content)
    assert b'"encoding_format":"base64"' in sent[0].replace(b" ", b""), "the SDK's default"
    reply = raw.parse()
    expected = minilm.embed(TEXTS).vectors
    np.testing.assert_allclose(_vectors(reply), expected, atol=ATOL)
    assert [d.index for d in reply.data] == list(range(len(TEXTS)))
    assert reply.model == MINILM
    assert (
        reply.usage.prompt_tokens == reply.usage.total_tokens == minilm.embed(TEXTS).prompt_tokens
    )


def test_openai_sdk_float_dimensions_and_token_ids(
    minilm_server: ServerProcess, minilm: EmbeddingClient, minilm_dir: Path
) -> None:
    client = openai.OpenAI(base_url=minilm_server.base_url, api_key="unused")
    floats = client.embeddings.create(model=MINILM, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(_vectors(floats), minilm.embed(TEXTS[:1]).vectors, atol=ATOL)
    sliced = client.embeddings.create(model=MINILM, input=TEXTS[:3], dimensions=64)
    np.testing.assert_allclose(
        _vectors(sliced), minilm.embed(TEXTS[:3], dimensions=64).vectors, atol=ATOL
    )
    # Token ids of the model's own tokenizer, special tokens included: the same vectors.
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids = [tokenizer.encode(t).ids for t in TEXTS[:3]]
    by_ids = client.embeddings.create(model=MINILM, input=ids)
    np.testing.assert_allclose(_vectors(by_ids), minilm.embed(TEXTS[:3]).vectors, atol=ATOL)
    one = client.embeddings.create(model=MINILM, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(_vectors(one), minilm.embed(TEXTS[:1]).vectors, atol=ATOL)


async def test_async_openai_sdk(minilm_server: ServerProcess, minilm: EmbeddingClient) -> None:
    async with openai.AsyncOpenAI(base_url=minilm_server.base_url, api_key="unused") as client:
        reply = await client.embeddings.create(model=MINILM, input=TEXTS[:4])
        listed = await client.models.list()
    np.testing.assert_allclose(_vectors(reply), minilm.embed(TEXTS[:4]).vectors, atol=ATOL)
    assert listed.data[0].id == MINILM, "the first card is the name the answers report"


def test_openai_sdk_instruction_through_extra_body_on_qwen3(
    qwen_server: ServerProcess, qwen: EmbeddingClient
) -> None:
    client = openai.OpenAI(base_url=qwen_server.base_url, api_key="unused")
    model = _model(qwen_server)
    reply = client.embeddings.create(model=model, input=TEXTS[:3], extra_body={"instruction": TASK})
    expected = qwen.embed(TEXTS[:3], instruction=TASK).vectors
    np.testing.assert_allclose(_vectors(reply), expected, atol=ATOL)
    assert not np.allclose(expected, qwen.embed(TEXTS[:3]).vectors, atol=1e-3)
    query = client.embeddings.create(
        model=model, input=TEXTS[:2], extra_body={"input_type": "query"}
    )
    np.testing.assert_allclose(
        _vectors(query), qwen.embed(TEXTS[:2], prompt_name="query").vectors, atol=ATOL
    )


def test_langchain_openai_embeddings(minilm_server: ServerProcess, minilm: EmbeddingClient) -> None:
    embeddings = OpenAIEmbeddings(
        model=MINILM,
        base_url=minilm_server.base_url,
        api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    )
    documents = np.array(embeddings.embed_documents(TEXTS[:5]), dtype=np.float32)
    query = np.array(embeddings.embed_query(TEXTS[5]), dtype=np.float32)
    np.testing.assert_allclose(documents, minilm.embed(TEXTS[:5]).vectors, atol=ATOL)
    np.testing.assert_allclose(query, minilm.embed(TEXTS[5:6]).vectors[0], atol=ATOL)


def _open_webui_embeddings(
    base_url: str, model: str, texts: list[str], prefix_field: str = "", prefix: str | None = None
) -> list[list[float]]:
    """As Open WebUI's generate_openai_batch_embeddings posts it (engine "OpenAI")."""
    body: dict[str, Any] = {"input": texts, "model": model}
    if prefix_field and isinstance(prefix, str):
        body[prefix_field] = prefix
    reply = httpx.post(
        f"{base_url.rstrip('/')}/embeddings",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {OPEN_WEBUI_KEY}"},
        json=body,
        timeout=30,
    )
    reply.raise_for_status()
    return [item["embedding"] for item in reply.json()["data"]]


def _open_webui_rerank(
    url: str, model: str, query: str, documents: list[str], top_n: int
) -> list[tuple[int, float]]:
    """As Open WebUI's external reranker posts it; it reads index and relevance_score."""
    reply = httpx.post(
        url,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {OPEN_WEBUI_KEY}"},
        json={"model": model, "query": query, "documents": documents, "top_n": top_n},
        timeout=30,
    )
    reply.raise_for_status()
    return [(r["index"], r["relevance_score"]) for r in reply.json()["results"]]


def test_open_webui_documents_queries_and_reranker_on_qwen3(
    qwen_server: ServerProcess, qwen: EmbeddingClient
) -> None:
    model = _model(qwen_server)
    base = qwen_server.base_url
    # Documents: no content prefix set, so no field is sent.
    docs = np.array(_open_webui_embeddings(base, model, TEXTS[:4]), dtype=np.float32)
    np.testing.assert_allclose(docs, qwen.embed(TEXTS[:4]).vectors, atol=ATOL)
    # Queries: RAG_EMBEDDING_PREFIX_FIELD_NAME=instruction, RAG_EMBEDDING_QUERY_PREFIX=<task>.
    queries = _open_webui_embeddings(base, model, TEXTS[4:6], "instruction", QUERY_TASK)
    np.testing.assert_allclose(
        np.array(queries, dtype=np.float32),
        qwen.embed(TEXTS[4:6], instruction=QUERY_TASK).vectors,
        atol=ATOL,
    )
    # An empty content prefix is sent as an empty field and means "as is".
    empty = _open_webui_embeddings(base, model, TEXTS[:1], "instruction", "")
    np.testing.assert_allclose(np.array(empty, dtype=np.float32), docs[:1], atol=ATOL)
    # The reranker: the query gets the model's query prompt, the documents nothing.
    query = "which passage talks about a city"
    ranked = _open_webui_rerank(f"{base}/rerank", model, query, TEXTS[:6], top_n=3)
    scores = qwen.similarity([query], TEXTS[:6], prompt_name="query").scores[0]
    order = np.argsort(-scores, kind="stable")[:3]
    assert [i for i, _ in ranked] == order.tolist()
    np.testing.assert_allclose([s for _, s in ranked], (1 + scores[order]) / 2, atol=1e-5)


# A knowledge-base chunk as Open WebUI cuts them (1,000 characters and more): well over
# MiniLM's window of 256 tokens.
LONG_CHUNK = " ".join(TEXTS) * 3


def test_open_webui_on_minilm(minilm_server: ServerProcess, minilm: EmbeddingClient) -> None:
    got = _open_webui_embeddings(minilm_server.base_url, MINILM, [*TEXTS[:3], LONG_CHUNK])
    np.testing.assert_allclose(
        np.array(got, np.float32),
        minilm.embed([*TEXTS[:3], LONG_CHUNK], truncate="end").vectors,
        atol=ATOL,
    )
    # Its reranker: every document scored in [0, 1], the one far over the window too.
    docs = [*TEXTS, LONG_CHUNK]
    url = f"{minilm_server.base_url}/rerank"
    ranked = _open_webui_rerank(url, MINILM, TEXTS[0], docs, len(docs))
    query = minilm.embed(TEXTS[:1]).vectors[0]
    relevance = (1 + minilm.embed(docs, truncate="end").vectors @ query) / 2
    assert [i for i, _ in ranked] == np.argsort(-relevance, kind="stable").tolist()
    np.testing.assert_allclose([s for _, s in ranked], np.sort(relevance)[::-1], atol=1e-5)
    assert all(0 <= s <= 1 for _, s in ranked)


def test_long_inputs_are_cut_and_flagged_unless_refused(
    minilm_server: ServerProcess, minilm: EmbeddingClient
) -> None:
    reply = httpx.post(
        f"{minilm_server.base_url}/embeddings", json={"input": ["short", LONG_CHUNK]}, timeout=30
    )
    assert reply.status_code == 200 and reply.headers["x-truncated-inputs"] == "1"
    assert [item.get("truncated") for item in reply.json()["data"]] == [None, True]
    client = openai.OpenAI(base_url=minilm_server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(
            model=MINILM, input=["short", LONG_CHUNK], extra_body={"truncate": "refuse"}
        )
    assert caught.value.param == "input[1]" and "limit of 256" in caught.value.message


def _error(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"input": ""}, 400, "input[0]", "empty"),
        ({"input": ["x"] * 2049}, 400, "input", "2049 texts exceed the limit of 2048"),
        ({"input": "x", "dimensions": 16}, 400, "dimensions", "range of 32 to 384"),
        ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format", "float or base64"),
        ({"input": [[101, 31000, 102]]}, 400, "input[0]", "vocabulary"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "model", "does not exist"),
    ],
)
def test_errors_in_openai_shape_and_the_server_goes_on(
    minilm_server: ServerProcess, body: dict[str, Any], status: int, param: str, words: str
) -> None:
    url = f"{minilm_server.base_url}/embeddings"
    error = _error(httpx.post(url, json=body, timeout=30), status)
    assert error["param"] == param and words in error["message"], error
    ok = httpx.post(url, json={"input": "still serving"}, timeout=30)
    assert ok.status_code == 200
    client = openai.OpenAI(base_url=minilm_server.base_url, api_key="unused", max_retries=0)
    expected = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(expected) as caught:
        client.embeddings.create(**{"model": MINILM, **body})
    assert caught.value.param == param  # the SDK reads the same fields


def test_malformed_json_is_400(minilm_server: ServerProcess) -> None:
    reply = httpx.post(f"{minilm_server.base_url}/embeddings", content=b"{nope", timeout=30)
    assert "not valid JSON" in _error(reply, 400)["message"]


def test_base64_is_little_endian_float32(
    minilm_server: ServerProcess, minilm: EmbeddingClient
) -> None:
    reply = httpx.post(
        f"{minilm_server.base_url}/embeddings",
        json={"input": TEXTS[:2], "encoding_format": "base64"},
        timeout=30,
    ).json()
    raw = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in reply["data"]]
    np.testing.assert_array_equal(np.stack(raw), minilm.embed(TEXTS[:2]).vectors)
