"""Binary and int8 helpers against numpy float references."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from embedding.v1 import embedding_pb2 as pb
from embedding_client import (
    hamming,
    hamming_matrix,
    int8_dot,
    int8_dot_matrix,
    int8_rows,
    packed_rows,
    unpack_binary,
)
from embedding_client import vectors as vectors_module

RNG = np.random.default_rng(13)


def _unit_rows(n: int, d: int) -> npt.NDArray[np.float32]:
    x = RNG.standard_normal((n, d))
    norms: npt.NDArray[np.float64] = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / norms).astype(np.float32)


def _int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The server's int8 encoding: symmetric, one scale per row."""
    scales = np.abs(x).max(axis=1) / 127
    return np.round(x / scales[:, None]).astype(np.int8), scales.astype(np.float32)


def test_unpack_binary_is_msb_first_and_drops_the_padding() -> None:
    # Dimensions 0 and 9 set: bit 7 of byte 0 and bit 6 of byte 1.
    bits = unpack_binary(bytes([0b1000_0000, 0b0100_0000]), 10)
    assert bits.dtype == np.uint8 and bits.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    x = RNG.standard_normal((3, 21))
    packed = np.packbits(x > 0, axis=1)
    np.testing.assert_array_equal(unpack_binary(packed, 21), (x > 0).astype(np.uint8))
    with pytest.raises(ValueError, match="fewer than"):
        unpack_binary(b"\x00", 9)


def test_hamming_counts_differing_signs() -> None:
    a, b = RNG.standard_normal(100), RNG.standard_normal(100)
    expected = int(np.sum((a > 0) != (b > 0)))
    assert hamming(np.packbits(a > 0).tobytes(), np.packbits(b > 0)) == expected
    with pytest.raises(ValueError, match="differ in length"):
        hamming(b"\x00", b"\x00\x00")


def _naive_hamming(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    out = np.zeros((len(q), len(d)), dtype=np.int64)
    for i, row in enumerate(q):
        for j, col in enumerate(d):
            out[i, j] = sum(bin(x ^ y).count("1") for x, y in zip(row, col, strict=True))
    return out


@pytest.mark.parametrize("dims", [64, 100, 384])
@pytest.mark.parametrize("table", [False, True])
def test_hamming_matrix_equals_a_naive_count(
    dims: int, table: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if table:  # the popcount table older numpy releases use
        monkeypatch.setattr(vectors_module, "_HAS_BITWISE_COUNT", False)
    q = np.packbits(RNG.standard_normal((7, dims)) > 0, axis=1)
    d = np.packbits(RNG.standard_normal((11, dims)) > 0, axis=1)
    got = hamming_matrix(q, d)
    assert got.shape == (7, 11) and got.dtype == np.int32
    np.testing.assert_array_equal(got, _naive_hamming(q, d))
    rows = [row.tobytes() for row in d]
    np.testing.assert_array_equal(hamming_matrix(q, rows), got)


def test_hamming_matrix_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors_module, "_BLOCK_BYTES", 64)
    q = np.packbits(RNG.standard_normal((9, 64)) > 0, axis=1)
    d = np.packbits(RNG.standard_normal((5, 64)) > 0, axis=1)
    np.testing.assert_array_equal(hamming_matrix(q, d), _naive_hamming(q, d))


def test_int8_dot_is_close_to_the_float_dot() -> None:
    x = _unit_rows(2, 384)
    q, scales = _int8(x)
    got = int8_dot(q[0].tobytes(), float(scales[0]), q[1], float(scales[1]))
    # Each value is off by at most half a step: |error| <= sum(|a| s_b + |b| s_a) / 2.
    bound = 0.5 * (np.abs(x[0]).sum() * scales[1] + np.abs(x[1]).sum() * scales[0])
    assert abs(got - float(x[0] @ x[1])) <= bound
    assert abs(got - float(x[0] @ x[1])) < 5e-3


def test_int8_dot_matrix_matches_the_float_matrix_and_the_pairwise_form() -> None:
    a, b = _unit_rows(6, 256), _unit_rows(9, 256)
    qa, sa = _int8(a)
    qb, sb = _int8(b)
    got = int8_dot_matrix(qa, sa, qb, sb)
    assert got.shape == (6, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, a @ b.T, atol=5e-3)
    assert got[2, 3] == pytest.approx(int8_dot(qa[2], sa[2], qb[3], sb[3]), rel=1e-6)
    with pytest.raises(ValueError, match="one scale per row"):
        int8_dot_matrix(qa, sa[:2], qb, sb)


def test_rows_from_embeddings() -> None:
    x = _unit_rows(3, 16)
    binary = [
        pb.Embedding(data=np.packbits(r > 0).tobytes(), dimensions=16, encoding=pb.ENCODING_BINARY)
        for r in x
    ]
    np.testing.assert_array_equal(packed_rows(binary), np.packbits(x > 0, axis=1))
    q, scales = _int8(x)
    views = [
        pb.ViewData(data=r.tobytes(), dimensions=16, encoding=pb.ENCODING_INT8, scale=s)
        for r, s in zip(q, scales, strict=True)
    ]
    got_q, got_scales = int8_rows(views)
    np.testing.assert_array_equal(got_q, q)
    np.testing.assert_allclose(got_scales, scales)
    with pytest.raises(ValueError, match="expected int8"):
        int8_rows(binary)
