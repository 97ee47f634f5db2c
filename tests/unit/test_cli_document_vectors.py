"""embed-files --document-vectors without a server: one row per document, chunk -1, with
the vector the service computed for the whole input, beside the chunk rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from embedding.v1 import embedding_pb2 as pb
from embedding_client.cli.documents import Document
from embedding_client.cli.schema import DOCUMENT_CHUNK, OutputSchema, RowBuffer
from tests.unit.test_cli_output import _float32, _settings


def _chunked(text: str) -> pb.Embedding:
    """What the service sends for a two-chunk input: the chunks, and their token-weighted
    mean as the input's own vector (weights 2 and 6)."""
    first, second = _float32([1.0] + [0.0] * 7, tokens=2), _float32([0.0, 1.0] + [0.0] * 6, 6)
    mean = np.array([2.0, 6.0] + [0.0] * 6) / np.hypot(2.0, 6.0)
    whole = _float32(list(mean), tokens=8)
    whole.chunks.add(char_start=0, char_end=6).embedding.CopyFrom(first)
    whole.chunks.add(char_start=4, char_end=len(text)).embedding.CopyFrom(second)
    return whole


def test_each_document_gets_a_row_of_its_own_after_its_chunks() -> None:
    text = "rivers carry sediment"
    buffer = RowBuffer(
        OutputSchema.build(_settings(document_vectors=True), {"lang": pa.string()}, True)
    )
    embedding = _chunked(text)
    assert buffer.add(Document("d", text, "in.jsonl", 1, {"lang": "en"}), embedding) == (2, 8)
    assert (buffer.rows, buffer.documents) == (3, 1)
    rows = buffer.table().to_pylist()
    assert [r["chunk"] for r in rows] == [0, 1, DOCUMENT_CHUNK]
    document = rows[-1]
    assert (document["char_start"], document["char_end"], document["text"]) == (0, len(text), text)
    assert document["token_count"] == 8  # the chunks' sum
    assert document["lang"] == "en" and document["source"] == "in.jsonl"
    np.testing.assert_array_equal(document["vector"], np.frombuffer(embedding.data, "<f4"))
    assert [r["text"] for r in rows[:2]] == [text[0:6], text[4:]]


def test_an_unchunked_document_row_repeats_its_only_vector() -> None:
    settings = _settings(document_vectors=True, chunk_tokens=0, views=((4, "binary"),))
    buffer = RowBuffer(OutputSchema.build(settings, {}, with_text=False))
    embedding = _float32([0.5] * 8, tokens=3)
    embedding.views.add(data=b"\x0f", dimensions=4, encoding=pb.ENCODING_BINARY)
    buffer.add(Document("d", "short", "s", None), embedding)
    chunk, document = buffer.table().to_pylist()
    assert (chunk["chunk"], document["chunk"]) == (0, DOCUMENT_CHUNK)
    for column in ("char_start", "char_end", "token_count", "vector", "vector_4_binary"):
        assert chunk[column] == document[column], column


def test_the_flag_is_part_of_the_settings_a_dataset_keeps() -> None:
    # Absent unless asked: datasets written before the flag existed still resume.
    assert "document_vectors" not in _settings().to_json()
    assert _settings(document_vectors=True).to_json()["document_vectors"] is True
