"""Post-processing in numpy: Matryoshka slice, L2 normalization, wire encodings.

Done in the service rather than in the engine so one engine batch can serve requests
that ask for different dimensions, normalization and encodings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

FloatMatrix = npt.NDArray[np.float32]
F = TypeVar("F", bound=np.floating[Any])


class Encoding(enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    BINARY = "binary"


# Each encoding's element type on the wire: little-endian floats, signed bytes, or packed
# bits read as unsigned bytes.
DTYPES: dict[Encoding, np.dtype[Any]] = {
    Encoding.FLOAT32: np.dtype("<f4"),
    Encoding.FLOAT16: np.dtype("<f2"),
    Encoding.INT8: np.dtype("i1"),
    Encoding.BINARY: np.dtype("u1"),
}


@dataclass(frozen=True)
class EncodedVector:
    data: bytes
    # Dequantization factor for INT8 (value = int8 * scale); 0 for other encodings.
    scale: float


def shape(vectors: FloatMatrix, dimensions: int, normalize: bool) -> FloatMatrix:
    """Keep the first `dimensions` columns, then L2-normalize rows if asked.

    Slicing before normalizing is what makes Matryoshka truncation correct: the kept prefix
    is rescaled to unit length on its own.
    """
    out = np.array(vectors[:, :dimensions], dtype=np.float32)  # a copy: inputs stay intact
    if normalize:
        # einsum rather than np.linalg.norm: half the cost on the one-row batches of
        # single-text calls, where numpy's per-call overhead is most of the work.
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
        norms[norms == 0] = 1.0  # an all-zero row stays zero instead of becoming NaN
        out /= norms
    return out


def encode(vectors: FloatMatrix, encoding: Encoding) -> list[EncodedVector]:
    """Little-endian bytes per row."""
    if encoding in (Encoding.FLOAT32, Encoding.FLOAT16):
        return _rows(vectors.astype(DTYPES[encoding], copy=False))
    if encoding is Encoding.INT8:
        return _int8(vectors)
    # One bit per dimension, 1 for values > 0, most significant bit first.
    return _rows(np.packbits(vectors > 0, axis=1))


def _rows(matrix: npt.NDArray[np.generic]) -> list[EncodedVector]:
    raw = matrix.tobytes()
    step = len(raw) // len(matrix) if len(matrix) else 0
    return [EncodedVector(raw[i : i + step], 0.0) for i in range(0, len(raw), step or 1)]


def _int8(vectors: FloatMatrix) -> list[EncodedVector]:
    # Symmetric per-vector scale: the largest magnitude maps to 127.
    peak = np.abs(vectors).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)
    return [
        EncodedVector(row.tobytes(), float(s)) for row, s in zip(q, scale.tolist(), strict=True)
    ]


def cosine(queries: FloatMatrix, documents: FloatMatrix) -> FloatMatrix:
    """Cosine similarity matrix, shape (len(queries), len(documents))."""
    q = shape(queries, queries.shape[1], normalize=True)
    d = shape(documents, documents.shape[1], normalize=True)
    return (q @ d.T).astype(np.float32)


def top_k(scores: npt.NDArray[F], k: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[F]]:
    """Indices and scores of the k best columns per row, best first (stable on ties): the
    one ranking of Similarity's top_k and rerank's top_n."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
