"""Work on encoded vectors without decoding them to float: binary bits and int8 dot products.

Binary vectors are packed as ENCODING_BINARY says: one bit per dimension, most significant
bit first, the last byte zero-padded. Int8 vectors are signed bytes with one scale per
vector (value = byte * scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from embedding.v1 import embedding_pb2 as pb

Packed = bytes | npt.NDArray[np.uint8]
PackedRows = npt.NDArray[np.uint8] | Sequence[bytes]
Int8 = bytes | npt.NDArray[np.int8]

# Set bits of every byte value: the popcount for numpy releases without np.bitwise_count.
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
_POPCOUNT = _POPCOUNT.astype(np.uint8)
_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")

# hamming_matrix XORs this many bytes at most at once, whatever n and m are.
_BLOCK_BYTES = 1 << 24


def _bytes_1d(data: Packed) -> npt.NDArray[np.uint8]:
    if isinstance(data, bytes | bytearray | memoryview):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def _rows(data: PackedRows) -> npt.NDArray[np.uint8]:
    """An (n, bytes) uint8 matrix from a matrix or from equal-length byte strings."""
    if isinstance(data, np.ndarray):
        matrix = np.asarray(data, dtype=np.uint8)
    else:
        widths = {len(row) for row in data}
        if len(widths) > 1:
            raise ValueError(f"packed rows differ in length: {sorted(widths)}")
        width = widths.pop() if widths else 0
        matrix = np.frombuffer(b"".join(data), dtype=np.uint8).reshape(len(data), width)
    if matrix.ndim != 2:
        raise ValueError(f"expected an (n, bytes) matrix, got shape {matrix.shape}")
    return matrix


def _popcount(x: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.uint8]:
    if _HAS_BITWISE_COUNT:
        return np.bitwise_count(x)  # type: ignore[no-any-return]
    return _POPCOUNT[x]  # type: ignore[no-any-return]


def unpack_binary(data: Packed, dimensions: int) -> npt.NDArray[np.uint8]:
    """The 0/1 bits of a packed binary vector: `dimensions` of them, dimension 0 first.

    A 2-D (n, bytes) array unpacks row by row into (n, dimensions).
    """
    if isinstance(data, np.ndarray) and data.ndim == 2:
        packed = np.asarray(data, dtype=np.uint8)
    else:
        packed = _bytes_1d(data)
    if dimensions > packed.shape[-1] * 8:
        raise ValueError(f"{packed.shape[-1]} bytes hold fewer than {dimensions} bits")
    return np.unpackbits(packed, axis=-1, count=dimensions)


def hamming(a: Packed, b: Packed) -> int:
    """Bits that differ between two packed binary vectors of the same size."""
    x, y = _bytes_1d(a), _bytes_1d(b)
    if x.shape != y.shape:
        raise ValueError(f"packed vectors differ in length: {x.size} and {y.size} bytes")
    return int(_popcount(np.bitwise_xor(x, y)).sum(dtype=np.int64))


def hamming_matrix(queries: PackedRows, documents: PackedRows) -> npt.NDArray[np.int32]:
    """Hamming distances of every query to every document: an (n, m) int32 matrix.

    Both are (rows, bytes) packed binary matrices, or sequences of equal-length bytes.
    """
    q, d = _rows(queries), _rows(documents)
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} bytes per row, documents {d.shape[1]}")
    width = q.shape[1]
    # Whole 64-bit words are popcounted 8 bytes at a time where numpy can.
    if _HAS_BITWISE_COUNT and width % 8 == 0 and width:
        qw: npt.NDArray[np.unsignedinteger] = np.ascontiguousarray(q).view(np.uint64)
        dw: npt.NDArray[np.unsignedinteger] = np.ascontiguousarray(d).view(np.uint64)
    else:
        qw, dw = q, d
    out = np.empty((q.shape[0], d.shape[0]), dtype=np.int32)
    # Blocks of queries keep the (block, m, words) XOR within _BLOCK_BYTES.
    step = max(1, _BLOCK_BYTES // max(1, d.shape[0] * width))
    for start in range(0, q.shape[0], step):
        xor = np.bitwise_xor(qw[start : start + step, None, :], dw[None, :, :])
        out[start : start + step] = _popcount(xor).sum(axis=-1, dtype=np.int32)
    return out


def _int8_1d(data: Int8) -> npt.NDArray[np.int8]:
    if isinstance(data, bytes | bytearray | memoryview):
        return np.frombuffer(data, dtype=np.int8)
    return np.asarray(data, dtype=np.int8).reshape(-1)


def int8_dot(a: Int8, a_scale: float, b: Int8, b_scale: float) -> float:
    """The dot product of two int8 vectors, close to that of the float vectors they encode.

    Sums in int32: exact for up to 133,000 dimensions (127 * 127 * d < 2**31).
    """
    x, y = _int8_1d(a), _int8_1d(b)
    if x.shape != y.shape:
        raise ValueError(f"vectors differ in length: {x.size} and {y.size}")
    total = int(np.dot(x.astype(np.int32), y.astype(np.int32)))
    return float(total * np.float64(a_scale) * np.float64(b_scale))


def int8_dot_matrix(
    a: npt.NDArray[np.int8],
    a_scales: npt.ArrayLike,
    b: npt.NDArray[np.int8],
    b_scales: npt.ArrayLike,
) -> npt.NDArray[np.float32]:
    """Dot products of every row of `a` (n, d) with every row of `b` (m, d): (n, m) float32.

    `a_scales` (n,) and `b_scales` (m,) are the rows' scales (Embedding.scale).
    """
    x, y = np.asarray(a, dtype=np.int8), np.asarray(b, dtype=np.int8)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) matrices, got {x.shape} and {y.shape}")
    sa = np.asarray(a_scales, dtype=np.float32).reshape(-1)
    sb = np.asarray(b_scales, dtype=np.float32).reshape(-1)
    if sa.shape != (x.shape[0],) or sb.shape != (y.shape[0],):
        raise ValueError("expected one scale per row")
    dots = x.astype(np.int32) @ y.astype(np.int32).T
    return dots.astype(np.float32) * sa[:, None] * sb[None, :]


def packed_rows(items: Sequence[pb.Embedding] | Sequence[pb.ViewData]) -> npt.NDArray[np.uint8]:
    """The raw bytes of binary embeddings (or views) as an (n, bytes) matrix for hamming_matrix."""
    for item in items:
        if item.encoding != pb.ENCODING_BINARY:
            raise ValueError(f"expected binary vectors, got encoding {item.encoding}")
    return _rows([item.data for item in items])


def int8_rows(
    items: Sequence[pb.Embedding] | Sequence[pb.ViewData],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """The bytes and scales of int8 embeddings (or views), for int8_dot_matrix."""
    for item in items:
        if item.encoding != pb.ENCODING_INT8:
            raise ValueError(f"expected int8 vectors, got encoding {item.encoding}")
    matrix = _rows([item.data for item in items]).view(np.int8)
    scales = np.array([item.scale for item in items], dtype=np.float32)
    return matrix, scales
