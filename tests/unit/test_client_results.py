"""EmbedResult, StreamResult and TokenizedResult from handcrafted responses: chunks, views."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.rpc import status_pb2

from embedding.v1 import embedding_pb2 as pb
from embedding_client import ChunkResult, EmbedResult, StreamResult, TokenizedResult


def _f32(values: list[float]) -> pb.Embedding:
    v = np.array(values, dtype="<f4")
    return pb.Embedding(data=v.tobytes(), dimensions=v.size, encoding=pb.ENCODING_FLOAT32)


def _views(values: list[float]) -> list[pb.ViewData]:
    """Two views: the first two dimensions in float16, and all of them in binary."""
    v = np.array(values, dtype=np.float32)
    half = pb.ViewData(
        data=v[:2].astype("<f2").tobytes(), dimensions=2, encoding=pb.ENCODING_FLOAT16
    )
    bits = pb.ViewData(
        data=np.packbits(v > 0).tobytes(), dimensions=v.size, encoding=pb.ENCODING_BINARY
    )
    return [half, bits]


def _embedding(values: list[float], tokens: int, chunks: Sequence[pb.Chunk] = ()) -> pb.Embedding:
    e = _f32(values)
    e.token_count = tokens
    e.views.extend(_views(values))
    e.chunks.extend(chunks)
    return e


def _chunk(start: int, end: int, values: list[float], tokens: int) -> pb.Chunk:
    return pb.Chunk(char_start=start, char_end=end, embedding=_embedding(values, tokens))


def _response() -> pb.EmbedResponse:
    chunked = _embedding(
        [0.6, 0.8, 0.0, 0.0],
        10,
        [_chunk(0, 12, [1.0, 0.0, 0.0, 0.0], 6), _chunk(8, 20, [0.0, 1.0, 0.0, 0.0], 4)],
    )
    plain = _embedding([0.0, 0.0, -1.0, 0.0], 3)
    return pb.EmbedResponse(
        embeddings=[chunked, plain],
        model="m",
        usage=pb.Usage(prompt_tokens=13, total_tokens=13),
        timing=pb.Timing(tokenize_us=5, queue_us=7, inference_us=11, total_us=30, cached=1),
    )


def test_embed_result_exposes_views_chunks_and_cache_hits() -> None:
    result = EmbedResult.from_proto(_response())
    assert result.vectors.shape == (2, 4) and result.token_counts == [10, 3]
    half, bits = result.views
    np.testing.assert_allclose(half, [[0.6, 0.8], [0.0, 0.0]], atol=1e-3)
    np.testing.assert_array_equal(bits, [[1, 1, -1, -1], [-1, -1, -1, -1]])
    assert result.cached == 1 and result.prompt_tokens == 13
    first, second = result.chunks
    assert second == []
    assert [(c.char_start, c.char_end, c.token_count) for c in first] == [(0, 12, 6), (8, 20, 4)]
    np.testing.assert_array_equal(first[1].vector, [0.0, 1.0, 0.0, 0.0])
    assert len(first[0].views) == 2
    np.testing.assert_array_equal(first[0].views[1], [1, -1, -1, -1])


def test_results_without_chunks_or_views_have_empty_lists() -> None:
    resp = pb.EmbedResponse(embeddings=[_f32([1.0, 0.0])], model="m")
    result = EmbedResult.from_proto(resp)
    assert result.views == [] and result.chunks == [[]] and result.cached == 0


def test_concat_is_as_one_call() -> None:
    one = EmbedResult.from_proto(_response())
    parts = [EmbedResult.from_proto(_response()), EmbedResult.from_proto(_response())]
    merged = EmbedResult.concat(parts)
    np.testing.assert_array_equal(merged.vectors, np.concatenate([one.vectors, one.vectors]))
    assert merged.token_counts == one.token_counts * 2
    assert merged.prompt_tokens == 26 and merged.cached == 2
    assert [v.shape for v in merged.views] == [(4, 2), (4, 4)]
    spans = [[(c.char_start, c.char_end) for c in chunks] for chunks in merged.chunks]
    assert spans == [[(0, 12), (8, 20)], []] * 2
    r = merged.response
    assert len(r.embeddings) == 4 and r.model == "m"
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (26, 26)
    assert (r.timing.tokenize_us, r.timing.queue_us, r.timing.total_us) == (10, 7, 30)
    assert EmbedResult.from_proto(r).token_counts == merged.token_counts
    assert EmbedResult.concat([one]) is one


def test_stream_result_carries_its_item_views_and_chunks() -> None:
    e = _response().embeddings[0]
    (solo,) = StreamResult.all_from_proto(pb.EmbedStreamResponse(id="a", embedding=e))
    multi = StreamResult.all_from_proto(
        pb.EmbedStreamResponse(results=[pb.StreamItemResult(id="b", embedding=e)])
    )
    for result in (solo, multi[0]):
        assert result.ok and len(result.views) == 2 and len(result.chunks) == 2
        assert isinstance(result.chunks[0], ChunkResult) and result.chunks[1].char_start == 8
    failed = StreamResult.from_proto(pb.StreamItemResult(id="c", error=status_pb2.Status(code=3)))
    assert not failed.ok and failed.views == [] and failed.chunks == []


def test_tokenized_result_from_proto() -> None:
    resp = pb.TokenizeResponse(
        results=[
            pb.TokenizedInput(
                ids=[101, 7592, 2088, 102],
                offsets=[
                    pb.TokenSpan(char_start=0, char_end=5),
                    pb.TokenSpan(char_start=6, char_end=11),
                ],
                text_start=1,
                truncated=False,
            )
        ],
        model="m",
    )
    (result,) = TokenizedResult.all_from_proto(resp)
    assert result == TokenizedResult([101, 7592, 2088, 102], [(0, 5), (6, 11)], 1, False)
