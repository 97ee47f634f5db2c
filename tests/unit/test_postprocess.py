"""Post-processing against plain numpy arithmetic."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embedding.v1 import embedding_pb2 as pb
from embedding_client import decode
from service import postprocess
from service.postprocess import Encoding

matrices = arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(1, 70)),
    elements=st.floats(-50, 50, width=32),
)
WIRE = {
    Encoding.FLOAT32: pb.ENCODING_FLOAT32,
    Encoding.FLOAT16: pb.ENCODING_FLOAT16,
    Encoding.INT8: pb.ENCODING_INT8,
    Encoding.BINARY: pb.ENCODING_BINARY,
}


def _roundtrip(vectors: np.ndarray, encoding: Encoding) -> np.ndarray:
    encoded = postprocess.encode(vectors, encoding)
    assert len(encoded) == len(vectors)
    return np.stack(
        [
            decode(
                pb.Embedding(
                    data=e.data, dimensions=vectors.shape[1], encoding=WIRE[encoding], scale=e.scale
                )
            )
            for e in encoded
        ]
    )


@given(matrices)
def test_float32_is_exact(vectors: np.ndarray) -> None:
    np.testing.assert_array_equal(_roundtrip(vectors, Encoding.FLOAT32), vectors)


@given(matrices)
def test_float16_within_half_precision(vectors: np.ndarray) -> None:
    got = _roundtrip(vectors, Encoding.FLOAT16)
    np.testing.assert_allclose(got, vectors, rtol=1e-3, atol=1e-3)


@given(matrices)
def test_int8_within_half_a_step(vectors: np.ndarray) -> None:
    got = _roundtrip(vectors, Encoding.INT8)
    step = np.abs(vectors).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - vectors) <= step / 2 + 1e-5)


@given(matrices)
def test_binary_keeps_the_sign(vectors: np.ndarray) -> None:
    got = _roundtrip(vectors, Encoding.BINARY)
    np.testing.assert_array_equal(got, np.where(vectors > 0, 1.0, -1.0))
    assert len(postprocess.encode(vectors, Encoding.BINARY)[0].data) == -(-vectors.shape[1] // 8)


def test_binary_bit_order_is_msb_first() -> None:
    vec = np.array([[1, -1, -1, -1, -1, -1, -1, 1, 1]], dtype=np.float32)
    assert postprocess.encode(vec, Encoding.BINARY)[0].data == bytes([0b10000001, 0b10000000])


def test_shape_slices_before_normalizing() -> None:
    vec = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(postprocess.shape(vec, 2, normalize=True), [[0.6, 0.8]])
    np.testing.assert_allclose(postprocess.shape(vec, 2, normalize=False), [[3.0, 4.0]])


def test_zero_vector_stays_zero() -> None:
    zero = np.zeros((1, 4), dtype=np.float32)
    assert not np.isnan(postprocess.shape(zero, 4, normalize=True)).any()


def test_top_k_sorts_best_first_and_is_stable_on_ties() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9]], dtype=np.float32)
    order, best = postprocess.top_k(scores, 3)
    assert order.tolist() == [[1, 3, 2]]
    np.testing.assert_allclose(best, [[0.9, 0.9, 0.5]])
    assert postprocess.top_k(scores, 10)[0].shape == (1, 4)


def test_cosine_matches_definition() -> None:
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    expected = (q @ d.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(d, axis=1))
    np.testing.assert_allclose(postprocess.cosine(q, d), expected, rtol=1e-5, atol=1e-6)
