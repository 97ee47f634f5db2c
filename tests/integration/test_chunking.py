"""Long documents on the real servers: chunks with spans, several views from one pass, and
Tokenize. Chunk vectors are compared with transformers run on each chunk's own ids."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding_client import EmbeddingClient, decode
from tests.reference import last_token_reference, minilm_reference, tokenize_for_reference
from tests.servers import ServerProcess

# RPC and HTTP deadlines: only a hang reaches them, however loaded the machine.
PATIENCE_S = 600.0

TOPICS = ["the harbour", "the committee", "the river delta", "the old library", "the budget"]
SENTENCE = "In year {n}, {topic} was discussed at length, and the notes were filed for review."


def _document(sentences: int) -> str:
    """Paragraphs of four sentences, with numbers so no two sentences are the same."""
    lines = [SENTENCE.format(n=n, topic=TOPICS[n % len(TOPICS)]) for n in range(sentences)]
    return "\n\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4))


def _embed(client: EmbeddingClient, inputs: list[str], **options: object) -> pb.EmbedResponse:
    request = pb.EmbedRequest(inputs=inputs, options=pb.EmbedOptions(**options))  # type: ignore[arg-type]
    response: pb.EmbedResponse = client._stub.Embed(request, timeout=300)
    return response


def _chunking(max_tokens: int, overlap: int = 0) -> pb.Chunking:
    return pb.Chunking(max_tokens=max_tokens, overlap_tokens=overlap)


def _check_spans(text: str, chunks: list[pb.Chunk], max_tokens: int, overlap: bool) -> None:
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text.rstrip())
    for a, b in itertools.pairwise(chunks):
        assert a.char_start < b.char_start and a.char_end < b.char_end
        gap = text[a.char_end : b.char_start]
        assert b.char_start < a.char_end if overlap else not gap.strip()
    assert all(0 < c.embedding.token_count <= max_tokens for c in chunks)


def test_minilm_chunks_match_the_reference_and_the_mean(
    minilm: EmbeddingClient, minilm_dir: Path
) -> None:
    text = _document(48)
    response = _embed(minilm, [text], chunking=_chunking(128, 16))
    [embedding] = response.embeddings
    chunks = list(embedding.chunks)
    assert len(chunks) >= 5
    _check_spans(text, chunks, 128, overlap=True)
    pieces = [text[c.char_start : c.char_end] for c in chunks]
    got = np.stack([decode(c.embedding) for c in chunks])
    np.testing.assert_allclose(got, minilm_reference(minilm_dir, pieces), atol=1e-4)
    # Each chunk's ids are the reference tokenizer's ids of its own text.
    counts = [c.embedding.token_count for c in chunks]
    assert counts == [len(ids) for ids in tokenize_for_reference(minilm_dir, pieces)]
    # The input's own vector: the token-weighted mean of the normalized chunk vectors.
    mean = np.asarray(counts, np.float32) @ got / sum(counts)
    np.testing.assert_allclose(decode(embedding), mean / np.linalg.norm(mean), atol=1e-6)
    assert embedding.token_count == sum(counts) == response.usage.prompt_tokens


def test_qwen_chunks_carry_the_instruction(qwen: EmbeddingClient, qwen_dir: Path) -> None:
    text = _document(24)
    task = "Find the passage about the harbour"
    template = qwen.model_info().instruction_template
    response = _embed(qwen, [text], chunking=_chunking(64, 8), instruction=task)
    chunks = list(response.embeddings[0].chunks)
    assert len(chunks) >= 4
    _check_spans(text, chunks, 64, overlap=True)
    prefix = template.replace("{instruction}", task)
    ids = tokenize_for_reference(
        qwen_dir, [prefix + text[c.char_start : c.char_end] for c in chunks]
    )
    assert [c.embedding.token_count for c in chunks] == [len(i) for i in ids]
    got = np.stack([decode(c.embedding) for c in chunks])
    np.testing.assert_allclose(got, last_token_reference(qwen_dir, ids), atol=1e-4)


def test_a_short_input_is_one_chunk_and_its_own_vector(minilm: EmbeddingClient) -> None:
    text = "A short document."
    chunked = _embed(minilm, [text], chunking=_chunking(128, 16)).embeddings[0]
    plain = _embed(minilm, [text]).embeddings[0]
    assert [(c.char_start, c.char_end) for c in chunked.chunks] == [(0, len(text))]
    np.testing.assert_allclose(decode(chunked), decode(plain), atol=1e-6)
    np.testing.assert_allclose(decode(chunked.chunks[0].embedding), decode(plain), atol=1e-6)


def test_views_equal_separate_calls(minilm: EmbeddingClient) -> None:
    texts = [_document(2), "capital of France", _document(6)]
    asked = [(128, pb.ENCODING_BINARY), (0, pb.ENCODING_FLOAT32), (64, pb.ENCODING_INT8)]
    views = [pb.View(dimensions=d, encoding=e) for d, e in asked]
    response = _embed(minilm, texts, views=views, dimensions=256)
    for k, (dims, encoding) in enumerate(asked):
        alone = _embed(minilm, texts, dimensions=dims or 256, encoding=encoding).embeddings
        for got, want in zip(response.embeddings, alone, strict=True):
            view = got.views[k]
            assert (view.dimensions, view.encoding) == (dims or 256, encoding)
            as_embedding = pb.Embedding(
                data=view.data, dimensions=view.dimensions, encoding=view.encoding, scale=view.scale
            )
            # Another engine batch may round differently in the last bits.
            tolerance = 2 * want.scale if encoding == pb.ENCODING_INT8 else 1e-5
            if encoding == pb.ENCODING_BINARY:
                flips = np.count_nonzero(decode(as_embedding) != decode(want))
                assert flips <= 1
            else:
                np.testing.assert_allclose(decode(as_embedding), decode(want), atol=tolerance)
    assert all(len(e.views) == 3 and e.dimensions == 256 for e in response.embeddings)


def test_chunks_carry_views_too(minilm: EmbeddingClient) -> None:
    text = _document(20)
    views = [pb.View(dimensions=64, encoding=pb.ENCODING_FLOAT16)]
    response = _embed(minilm, [text], chunking=_chunking(96), views=views)
    for chunk in response.embeddings[0].chunks:
        [view] = chunk.embedding.views
        full = decode(chunk.embedding)[:64]
        half = np.frombuffer(view.data, "<f2").astype(np.float32)
        np.testing.assert_allclose(half, full / np.linalg.norm(full), atol=1e-3)


def test_stream_items_are_chunked_like_embed(minilm: EmbeddingClient) -> None:
    texts = [_document(12), "a short one", _document(30)]
    options = pb.EmbedOptions(chunking=_chunking(100, 10))

    def requests() -> Iterator[pb.EmbedStreamRequest]:
        items = [pb.StreamItem(id=str(i), input=t) for i, t in enumerate(texts)]
        yield pb.EmbedStreamRequest(items=items, options=options)

    results = {
        r.id: r.embedding for resp in minilm._stub.EmbedStream(requests()) for r in resp.results
    }
    unary = _embed(minilm, texts, chunking=_chunking(100, 10)).embeddings
    for i, want in enumerate(unary):
        got = results[str(i)]
        assert [(c.char_start, c.char_end) for c in got.chunks] == [
            (c.char_start, c.char_end) for c in want.chunks
        ]
        np.testing.assert_allclose(decode(got), decode(want), atol=1e-5)


def test_tokenize_gives_the_ids_embed_sends(minilm: EmbeddingClient, minilm_dir: Path) -> None:
    texts = ["Ünïcode façade 😀 and more", _document(1)]
    response = minilm._stub.Tokenize(pb.TokenizeRequest(inputs=texts), timeout=PATIENCE_S)
    assert [list(r.ids) for r in response.results] == tokenize_for_reference(minilm_dir, texts)
    for text, r in zip(texts, response.results, strict=True):
        assert r.text_start == 1 and len(r.offsets) == len(r.ids) - 2  # [CLS] ... [SEP]
        pieces = [text[o.char_start : o.char_end] for o in r.offsets]
        assert all(p.strip() for p in pieces) and pieces[0] == text[: len(pieces[0])]
    # The ids as token inputs give the very vectors the texts give: they are what the engine saw.
    by_ids = minilm._stub.Embed(
        pb.EmbedRequest(tokens=[pb.TokenIds(ids=r.ids) for r in response.results]),
        timeout=PATIENCE_S,
    )
    by_text = _embed(minilm, texts)
    for a, b in zip(by_ids.embeddings, by_text.embeddings, strict=True):
        np.testing.assert_allclose(decode(a), decode(b), atol=1e-6)


def test_tokenize_applies_the_instruction_and_truncation(
    qwen: EmbeddingClient, qwen_over_window: str
) -> None:
    text = qwen_over_window  # about 40,000 tokens: past the tiny Qwen3's 32,768-token window
    task = "Find it"
    options = pb.EmbedOptions(instruction=task, truncate=pb.TRUNCATE_START)
    [r] = qwen._stub.Tokenize(pb.TokenizeRequest(inputs=[text], options=options)).results
    assert r.truncated and len(r.ids) == qwen.model_info().max_input_tokens == 32768
    assert r.offsets[-1].char_end == len(text)  # the end of the text was kept
    embedded = _embed(qwen, [text], instruction=task, truncate=pb.TRUNCATE_START).embeddings[0]
    by_ids = qwen._stub.Embed(pb.EmbedRequest(tokens=[pb.TokenIds(ids=r.ids)])).embeddings[0]
    np.testing.assert_allclose(decode(by_ids), decode(embedded), atol=1e-6)


def test_a_50000_token_document_embeds_with_bounded_memory(
    minilm_server: ServerProcess, minilm: EmbeddingClient
) -> None:
    text = _document(2800)  # about 230,000 characters
    process = psutil.Process(minilm_server.process.pid)
    before = process.memory_info().rss
    response = _embed(minilm, [text], chunking=_chunking(256, 32))
    grown_mib = (process.memory_info().rss - before) / 2**20
    [embedding] = response.embeddings
    assert embedding.token_count > 50_000 and len(embedding.chunks) > 200
    _check_spans(text, list(embedding.chunks), 256, overlap=True)
    assert grown_mib < 300, f"the server grew by {grown_mib:.0f} MiB"


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"chunking": _chunking(300)}, "options.chunking.max_tokens", "window of 256"),
        ({"chunking": _chunking(100, 60)}, "options.chunking.overlap_tokens", "over half"),
        ({"chunking": _chunking(0, 10)}, "options.chunking.overlap_tokens", "needs max_tokens"),
        ({"views": [pb.View(dimensions=8)]}, "options.views[0].dimensions", "32 to 384"),
        ({"views": [pb.View()] * 9}, "options.views", "limit of 8"),
    ],
)
def test_bad_chunking_and_views_name_the_field(
    minilm: EmbeddingClient, options: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _embed(minilm, ["ok"], **options)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.details() or ""
    assert message.startswith(field + ":") and words in message, message


def test_http_chunking_views_and_tokenize_match_grpc(
    minilm_server: ServerProcess, minilm: EmbeddingClient
) -> None:
    text = _document(16)
    body = {
        "input": [text],
        "chunking": {"max_tokens": 96, "overlap_tokens": 8},
        "views": [{"dimensions": 64, "encoding": "int8"}],
    }
    got = httpx.post(f"{minilm_server.base_url}/embeddings", json=body, timeout=PATIENCE_S).json()
    want = _embed(
        minilm,
        [text],
        chunking=_chunking(96, 8),
        views=[pb.View(dimensions=64, encoding=pb.ENCODING_INT8)],
    ).embeddings[0]
    [item] = got["data"]
    np.testing.assert_allclose(item["embedding"], decode(want), atol=1e-5)
    assert [(c["char_start"], c["char_end"]) for c in item["chunks"]] == [
        (c.char_start, c.char_end) for c in want.chunks
    ]
    for chunk, expected in zip(item["chunks"], want.chunks, strict=True):
        np.testing.assert_allclose(chunk["embedding"], decode(expected.embedding), atol=1e-5)
        assert chunk["token_count"] == expected.embedding.token_count
    view = item["views"][0]
    assert (view["dimensions"], view["encoding"]) == (64, "int8") and "scale" in view
    tokens = httpx.post(
        f"{minilm_server.base_url.removesuffix('/v1')}/tokenize",
        json={"input": text},
        timeout=PATIENCE_S,
    ).json()
    # HTTP cuts an input over the window by default (--http-truncate end); gRPC, told so.
    options = pb.EmbedOptions(truncate=pb.TRUNCATE_END)
    [r] = minilm._stub.Tokenize(pb.TokenizeRequest(inputs=[text], options=options)).results
    assert tokens["data"][0]["truncated"] and r.truncated
    assert tokens["data"][0]["tokens"] == list(r.ids)
    assert tokens["data"][0]["offsets"] == [[o.char_start, o.char_end] for o in r.offsets]
