"""Turn Embedding messages back into float32 numpy vectors, and EmbedOptions into messages."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Options:
    """Options for every embedding call; None leaves the server's default."""

    instruction: str = ""
    prompt_name: str = ""
    dimensions: int = 0
    normalize: bool | None = None
    truncate: TruncateName = "refuse"
    encoding: EncodingName = "float32"

    def to_proto(self) -> pb.EmbedOptions:
        msg = pb.EmbedOptions(
            instruction=self.instruction,
            prompt_name=self.prompt_name,
            dimensions=self.dimensions,
            truncate=_TRUNCATE[self.truncate],
            encoding=_ENCODING[self.encoding],
        )
        if self.normalize is not None:
            msg.normalize = self.normalize
        return msg


def decode(embedding: pb.Embedding) -> npt.NDArray[np.float32]:
    """The float32 vector an Embedding carries, whatever its encoding.

    Binary embeddings decode to +1.0 / -1.0 per dimension.
    """
    enc = embedding.encoding
    n = embedding.dimensions
    if enc in (pb.ENCODING_FLOAT32, pb.ENCODING_UNSPECIFIED):
        return np.frombuffer(embedding.data, dtype="<f4", count=n).astype(np.float32)
    if enc == pb.ENCODING_FLOAT16:
        return np.frombuffer(embedding.data, dtype="<f2", count=n).astype(np.float32)
    if enc == pb.ENCODING_INT8:
        q = np.frombuffer(embedding.data, dtype=np.int8, count=n)
        return q.astype(np.float32) * np.float32(embedding.scale)
    if enc == pb.ENCODING_BINARY:
        bits = np.unpackbits(np.frombuffer(embedding.data, dtype=np.uint8))[:n]
        return np.where(bits == 1, 1.0, -1.0).astype(np.float32)
    raise ValueError(f"unknown encoding {enc}")


def decode_all(embeddings: list[pb.Embedding]) -> npt.NDArray[np.float32]:
    """Stack decoded vectors into an (n, dimensions) matrix."""
    if not embeddings:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([decode(e) for e in embeddings])
