"""Client options to EmbedOptions (chunking, views) and decoding of every encoding."""

from __future__ import annotations

import numpy as np
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding_client import Options, decode, decode_view
from embedding_client.codec import decode_data


def test_chunking_and_views_reach_the_message() -> None:
    msg = Options(
        chunk_tokens=128, chunk_overlap=16, views=[(64, "binary"), (0, "int8")]
    ).to_proto()
    assert msg.HasField("chunking")
    assert (msg.chunking.max_tokens, msg.chunking.overlap_tokens) == (128, 16)
    assert [(v.dimensions, v.encoding) for v in msg.views] == [
        (64, pb.ENCODING_BINARY),
        (0, pb.ENCODING_INT8),
    ]


def test_chunking_is_absent_unless_asked() -> None:
    msg = Options().to_proto()
    assert not msg.HasField("chunking") and not msg.views


def test_options_stay_hashable_with_views_given_as_lists() -> None:
    a = Options(views=[(128, "binary")])
    b = Options(views=((128, "binary"),))
    assert a.views == ((128, "binary"),) and a == b and hash(a) == hash(b)


def test_bad_view_encoding_and_overlap_without_chunks_are_refused() -> None:
    with pytest.raises(ValueError, match="view encoding"):
        Options(views=[(64, "bits")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="chunk_tokens"):
        Options(chunk_overlap=8)


VECTOR = np.array([0.5, -0.25, 0.0, 1.0, -1.0, 0.125, 0.75, -0.5, 0.3], dtype=np.float32)


def _encoded(encoding: pb.Encoding.ValueType) -> tuple[bytes, float]:
    if encoding == pb.ENCODING_FLOAT32:
        return VECTOR.astype("<f4").tobytes(), 0.0
    if encoding == pb.ENCODING_FLOAT16:
        return VECTOR.astype("<f2").tobytes(), 0.0
    if encoding == pb.ENCODING_INT8:
        scale = float(np.abs(VECTOR).max() / 127)
        return np.round(VECTOR / scale).astype(np.int8).tobytes(), scale
    return np.packbits(VECTOR > 0).tobytes(), 0.0


EXPECTED = {
    pb.ENCODING_FLOAT32: (VECTOR, 0.0),
    pb.ENCODING_FLOAT16: (VECTOR, 1e-3),
    pb.ENCODING_INT8: (VECTOR, 1.0 / 127),
    pb.ENCODING_BINARY: (np.where(VECTOR > 0, 1.0, -1.0).astype(np.float32), 0.0),
}


@pytest.mark.parametrize("encoding", list(EXPECTED))
def test_views_decode_like_the_main_data(encoding: pb.Encoding.ValueType) -> None:
    data, scale = _encoded(encoding)
    n = VECTOR.size
    view = pb.ViewData(data=data, dimensions=n, encoding=encoding, scale=scale)
    main = pb.Embedding(data=data, dimensions=n, encoding=encoding, scale=scale)
    expected, atol = EXPECTED[encoding]
    got = decode_view(view)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, expected, atol=atol)
    np.testing.assert_array_equal(decode(main), got)
    np.testing.assert_array_equal(decode_data(data, n, encoding, scale), got)


def test_unspecified_encoding_is_float32_and_unknown_is_refused() -> None:
    data = VECTOR.tobytes()
    view = pb.ViewData(data=data, dimensions=VECTOR.size)
    np.testing.assert_array_equal(decode_view(view), VECTOR)
    with pytest.raises(ValueError, match="unknown encoding"):
        decode_data(data, VECTOR.size, 99, 0.0)  # type: ignore[arg-type]
