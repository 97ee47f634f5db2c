"""The client splits large calls against the real MiniLM server; Tokenize, views, chunks."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from embedding_client import AsyncEmbeddingClient, EmbeddingClient, packed_rows
from tests.servers import ServerProcess
from tests.texts import TEXTS

WORDS = [
    *("vector", "search", "index", "query", "passage", "model", "token", "batch"),
    *("server", "client", "stream", "chunk", "window", "budget", "latency"),
    *("document", "paragraph", "sentence", "word", "engine", "queue"),
]
N = 5000
# Each sub-call's deadline: the client's default (60 s) is a production setting, and a
# 1,024-text sub-call beside three others can take longer on two busy cores.
PATIENCE_S = 600.0


def _corpus(n: int) -> list[str]:
    """Short varied texts: 4 to 15 words each, every one distinct."""
    rng = np.random.default_rng(5000)
    return [
        f"text {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(4, 16)))) for i in range(n)
    ]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus(N)


@pytest.fixture(scope="module")
def reference(minilm: EmbeddingClient, corpus: list[str]) -> npt.NDArray[np.float32]:
    """The corpus embedded 100 texts a call: every call within the server's limits."""
    return np.concatenate([minilm.embed(corpus[i : i + 100]).vectors for i in range(0, N, 100)])


def test_a_5000_text_embed_returns_every_vector_in_order(
    minilm_server: ServerProcess, corpus: list[str], reference: npt.NDArray[np.float32]
) -> None:
    with EmbeddingClient(minilm_server.address, timeout=PATIENCE_S) as client:
        result = client.embed(corpus)
    assert result.vectors.shape == (N, 384) and len(result.response.embeddings) == N
    np.testing.assert_allclose(result.vectors, reference, atol=1e-6)
    assert len(result.token_counts) == N and result.prompt_tokens == sum(result.token_counts)
    assert result.response.usage.prompt_tokens == result.prompt_tokens


async def test_the_async_client_splits_the_same_way(
    minilm_server: ServerProcess, corpus: list[str], reference: npt.NDArray[np.float32]
) -> None:
    async with AsyncEmbeddingClient(minilm_server.address, timeout=PATIENCE_S) as client:
        result = await client.embed(corpus)
    np.testing.assert_allclose(result.vectors, reference, atol=1e-6)
    assert len(result.token_counts) == N


def test_one_sub_call_at_a_time(
    minilm_server: ServerProcess, corpus: list[str], reference: npt.NDArray[np.float32]
) -> None:
    with EmbeddingClient(minilm_server.address, max_concurrency=1, timeout=PATIENCE_S) as client:
        result = client.embed(corpus[:2500])
    np.testing.assert_allclose(result.vectors, reference[:2500], atol=1e-6)


def test_tokenize_counts_what_embed_counts(minilm: EmbeddingClient) -> None:
    try:
        tokens = minilm.tokenize(TEXTS)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip("this server has no Tokenize yet")
        raise
    embedded = minilm.embed(TEXTS)
    assert [len(t.ids) for t in tokens] == embedded.token_counts
    for text, t in zip(TEXTS, tokens, strict=True):
        assert all(0 <= a <= b <= len(text) for a, b in t.offsets)
        assert t.text_start == 1 and not t.truncated  # after [CLS]


def test_views_match_the_main_vectors(minilm: EmbeddingClient) -> None:
    try:
        result = minilm.embed(TEXTS, views=[(64, "binary"), (0, "float32")])
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT):
            pytest.skip(f"this server does not answer views yet: {exc.details()}")
        raise
    if not result.views:
        pytest.skip("this server does not answer views yet")
    bits, full = result.views
    np.testing.assert_allclose(full, result.vectors, atol=1e-6)
    np.testing.assert_array_equal(bits, np.where(result.vectors[:, :64] > 0, 1.0, -1.0))
    packed = packed_rows([e.views[0] for e in result.response.embeddings])
    np.testing.assert_array_equal(packed, np.packbits(result.vectors[:, :64] > 0, axis=1))


def test_chunk_spans_cover_the_input(minilm: EmbeddingClient) -> None:
    text = " ".join(TEXTS * 8)
    try:
        result = minilm.embed([text, "short"], chunk_tokens=64, chunk_overlap=8)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT):
            pytest.skip(f"this server does not chunk yet: {exc.details()}")
        raise
    chunks, short = result.chunks
    if not chunks:
        pytest.skip("this server does not chunk yet")
    assert len(chunks) > 1 and len(short) == 1
    assert chunks[0].char_start == 0 and chunks[-1].char_end <= len(text)
    assert all(a.char_start < b.char_start for a, b in itertools.pairwise(chunks))
    assert all(c.token_count <= 64 and c.vector.shape == (384,) for c in chunks)
    assert result.token_counts[0] == sum(c.token_count for c in chunks)
