"""Plain result types the clients return, built from response messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from google.rpc import status_pb2

from embedding.v1 import embedding_pb2 as pb
from embedding_client.codec import decode, decode_all


@dataclass(frozen=True)
class EmbedResult:
    """Vectors of one Embed call, in input order, decoded to float32."""

    vectors: npt.NDArray[np.float32]
    token_counts: list[int]
    truncated: list[bool]
    model: str
    prompt_tokens: int
    response: pb.EmbedResponse

    @classmethod
    def from_proto(cls, resp: pb.EmbedResponse) -> EmbedResult:
        return cls(
            vectors=decode_all(list(resp.embeddings)),
            token_counts=[e.token_count for e in resp.embeddings],
            truncated=[e.truncated for e in resp.embeddings],
            model=resp.model,
            prompt_tokens=resp.usage.prompt_tokens,
            response=resp,
        )


@dataclass(frozen=True)
class StreamResult:
    """One EmbedStream result: a vector, or the item's own error.

    An error with an empty id refused a whole message (undecodable, or a malformed `items`).
    """

    id: str
    vector: npt.NDArray[np.float32] | None
    error: status_pb2.Status | None
    response: pb.EmbedStreamResponse | pb.StreamItemResult

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_proto(cls, resp: pb.EmbedStreamResponse | pb.StreamItemResult) -> StreamResult:
        if resp.HasField("embedding"):
            return cls(id=resp.id, vector=decode(resp.embedding), error=None, response=resp)
        return cls(id=resp.id, vector=None, error=resp.error, response=resp)

    @classmethod
    def all_from_proto(cls, resp: pb.EmbedStreamResponse) -> list[StreamResult]:
        """The results one response carries: its own, or those of a multi-item message."""
        if resp.results:
            return [cls.from_proto(r) for r in resp.results]
        return [cls.from_proto(resp)]


@dataclass(frozen=True)
class SimilarityResult:
    """Scores of a Similarity call.

    Without top_k, `scores[q, d]` is the cosine of query q and document d.
    With top_k, `top_k[q]` lists (document index, score), best first, and `scores` is empty.
    """

    scores: npt.NDArray[np.float32]
    top_k: list[list[tuple[int, float]]]
    response: pb.SimilarityResponse

    @classmethod
    def from_proto(cls, resp: pb.SimilarityResponse) -> SimilarityResult:
        rows = [list(r.scores) for r in resp.results]
        scores = np.array(rows, dtype=np.float32) if rows and rows[0] else np.zeros((0, 0))
        top = [[(s.index, s.score) for s in r.top_k] for r in resp.results]
        return cls(scores=scores.astype(np.float32), top_k=top, response=resp)
