"""Turn Embedding messages back into float32 numpy vectors, and EmbedOptions into messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt

from embedding.v1 import embedding_pb2 as pb

TruncateName = Literal["refuse", "end", "start"]
EncodingName = Literal["float32", "float16", "int8", "binary"]

_TRUNCATE: dict[str, pb.Truncate.ValueType] = {
    "refuse": pb.TRUNCATE_REFUSE,
    "end": pb.TRUNCATE_END,
    "start": pb.TRUNCATE_START,
}
_ENCODING: dict[str, pb.Encoding.ValueType] = {
    "float32": pb.ENCODING_FLOAT32,
    "float16": pb.ENCODING_FLOAT16,
    "int8": pb.ENCODING_INT8,
    "binary": pb.ENCODING_BINARY,
}


class OptionsKwargs(TypedDict, total=False):
    """Keyword form of Options, for the clients' **options."""

    instruction: str
    prompt_name: str
    dimensions: int
    normalize: bool | None
    truncate: TruncateName
    encoding: EncodingName
    chunk_tokens: int
    chunk_overlap: int
    views: Sequence[tuple[int, EncodingName]]


@dataclass(frozen=True)
class Options:
    """Options for every embedding call; None leaves the server's default.

    `chunk_tokens` > 0 splits each input into chunks of at most that many tokens, consecutive
    chunks sharing about `chunk_overlap` tokens (EmbedOptions.chunking). `views` asks for more
    resolutions of the same vectors, each a (dimensions, encoding) pair; dimensions 0 means
    the call's own (EmbedOptions.views).
    """

    instruction: str = ""
    prompt_name: str = ""
    dimensions: int = 0
    normalize: bool | None = None
    truncate: TruncateName = "refuse"
    encoding: EncodingName = "float32"
    chunk_tokens: int = 0
    chunk_overlap: int = 0
    views: Sequence[tuple[int, EncodingName]] = ()

    def __post_init__(self) -> None:
        # A tuple of tuples whatever sequence was passed, so Options stays hashable.
        views = tuple((int(dims), enc) for dims, enc in self.views)
        for _, enc in views:
            if enc not in _ENCODING:
                raise ValueError(f"unknown view encoding {enc!r} (one of {', '.join(_ENCODING)})")
        object.__setattr__(self, "views", views)
        if self.chunk_overlap and not self.chunk_tokens:
            raise ValueError("chunk_overlap needs chunk_tokens")

    def to_proto(self) -> pb.EmbedOptions:
        msg = pb.EmbedOptions(
            instruction=self.instruction,
            prompt_name=self.prompt_name,
            dimensions=self.dimensions,
            truncate=_TRUNCATE[self.truncate],
            encoding=_ENCODING[self.encoding],
            views=[pb.View(dimensions=d, encoding=_ENCODING[e]) for d, e in self.views],
        )
        if self.normalize is not None:
            msg.normalize = self.normalize
        if self.chunk_tokens > 0:
            msg.chunking.max_tokens = self.chunk_tokens
            msg.chunking.overlap_tokens = self.chunk_overlap
        return msg


def decode_data(
    data: bytes, dimensions: int, encoding: pb.Encoding.ValueType, scale: float
) -> npt.NDArray[np.float32]:
    """The float32 vector of encoded bytes; what both decode and decode_view do."""
    n = dimensions
    if encoding in (pb.ENCODING_FLOAT32, pb.ENCODING_UNSPECIFIED):
        return np.frombuffer(data, dtype="<f4", count=n).astype(np.float32)
    if encoding == pb.ENCODING_FLOAT16:
        return np.frombuffer(data, dtype="<f2", count=n).astype(np.float32)
    if encoding == pb.ENCODING_INT8:
        q = np.frombuffer(data, dtype=np.int8, count=n)
        return q.astype(np.float32) * np.float32(scale)
    if encoding == pb.ENCODING_BINARY:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n)
        return np.where(bits == 1, 1.0, -1.0).astype(np.float32)
    raise ValueError(f"unknown encoding {encoding}")


def decode(embedding: pb.Embedding) -> npt.NDArray[np.float32]:
    """The float32 vector an Embedding carries (its main data), whatever its encoding.

    Binary embeddings decode to +1.0 / -1.0 per dimension.
    """
    return decode_data(embedding.data, embedding.dimensions, embedding.encoding, embedding.scale)


def decode_view(view: pb.ViewData) -> npt.NDArray[np.float32]:
    """The float32 vector of one of Embedding.views, decoded as `decode` does."""
    return decode_data(view.data, view.dimensions, view.encoding, view.scale)


def decode_all(embeddings: Sequence[pb.Embedding]) -> npt.NDArray[np.float32]:
    """Stack decoded vectors into an (n, dimensions) matrix."""
    if not embeddings:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([decode(e) for e in embeddings])


def decode_views(embeddings: Sequence[pb.Embedding]) -> list[npt.NDArray[np.float32]]:
    """One (n, dimensions) matrix per view the embeddings carry, in the views' order."""
    if not embeddings:
        return []
    count = len(embeddings[0].views)
    return [np.stack([decode_view(e.views[j]) for e in embeddings]) for j in range(count)]
