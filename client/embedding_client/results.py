"""Plain result types the clients return, built from response messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from google.rpc import status_pb2

from embedding.v1 import embedding_pb2 as pb
from embedding_client.codec import decode, decode_all, decode_view, decode_views

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class ChunkResult:
    """One chunk of a chunked input: `text[char_start:char_end]` and its own vector.

    `views` holds the chunk's vector in each requested view, in the views' order. Compared
    by identity (it holds arrays).
    """

    char_start: int
    char_end: int
    vector: Vector
    token_count: int
    views: list[Vector]

    @classmethod
    def from_proto(cls, chunk: pb.Chunk) -> ChunkResult:
        e = chunk.embedding
        return cls(
            char_start=chunk.char_start,
            char_end=chunk.char_end,
            vector=decode(e),
            token_count=e.token_count,
            views=[decode_view(v) for v in e.views],
        )


def _chunks(embedding: pb.Embedding) -> list[ChunkResult]:
    return [ChunkResult.from_proto(c) for c in embedding.chunks]


@dataclass(frozen=True)
class EmbedResult:
    """Vectors of one Embed call, in input order, decoded to float32.

    `views[j]` is the (n, dimensions) matrix of the j-th requested view; `chunks[i]` lists
    input i's chunks (empty without chunking); `cached` counts the inputs (or chunks) the
    server answered from its vector cache.
    """

    vectors: Vector
    token_counts: list[int]
    truncated: list[bool]
    model: str
    prompt_tokens: int
    response: pb.EmbedResponse
    views: list[Vector] = field(default_factory=list)
    chunks: list[list[ChunkResult]] = field(default_factory=list)
    cached: int = 0

    @classmethod
    def from_proto(cls, resp: pb.EmbedResponse) -> EmbedResult:
        embeddings = list(resp.embeddings)
        return cls(
            vectors=decode_all(embeddings),
            token_counts=[e.token_count for e in embeddings],
            truncated=[e.truncated for e in embeddings],
            model=resp.model,
            prompt_tokens=resp.usage.prompt_tokens,
            response=resp,
            views=decode_views(embeddings),
            chunks=[_chunks(e) for e in embeddings],
            cached=resp.timing.cached,
        )

    @classmethod
    def concat(cls, parts: Sequence[EmbedResult]) -> EmbedResult:
        """One result of several calls on consecutive slices of the inputs, as from one call.

        `response` merges theirs: every embedding, summed usage and cache hits; its timing
        sums tokenize_us (work done) and takes the longest queue_us, inference_us and
        total_us of one call (the calls may have run at once).
        """
        if len(parts) == 1:
            return parts[0]
        if not parts:
            raise ValueError("nothing to concatenate")
        merged = pb.EmbedResponse(model=parts[0].model)
        for part in parts:
            r = part.response
            merged.embeddings.extend(r.embeddings)
            merged.usage.prompt_tokens += r.usage.prompt_tokens
            merged.usage.total_tokens += r.usage.total_tokens
            t = merged.timing
            t.tokenize_us += r.timing.tokenize_us
            t.queue_us = max(t.queue_us, r.timing.queue_us)
            t.inference_us = max(t.inference_us, r.timing.inference_us)
            t.total_us = max(t.total_us, r.timing.total_us)
            t.cached += r.timing.cached
        n_views = len(parts[0].views)
        return cls(
            vectors=np.concatenate([p.vectors for p in parts]),
            token_counts=[c for p in parts for c in p.token_counts],
            truncated=[t for p in parts for t in p.truncated],
            model=merged.model,
            prompt_tokens=sum(p.prompt_tokens for p in parts),
            response=merged,
            views=[np.concatenate([p.views[j] for p in parts]) for j in range(n_views)],
            chunks=[c for p in parts for c in p.chunks],
            cached=sum(p.cached for p in parts),
        )


@dataclass(frozen=True)
class StreamResult:
    """One EmbedStream result: a vector, or the item's own error.

    An error with an empty id refused a whole message (undecodable, or a malformed `items`).
    `views` and `chunks` are the item's, as in EmbedResult (empty when not asked or failed).
    """

    id: str
    vector: Vector | None
    error: status_pb2.Status | None
    response: pb.EmbedStreamResponse | pb.StreamItemResult
    views: list[Vector] = field(default_factory=list)
    chunks: list[ChunkResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_proto(cls, resp: pb.EmbedStreamResponse | pb.StreamItemResult) -> StreamResult:
        if resp.HasField("embedding"):
            e = resp.embedding
            return cls(
                id=resp.id,
                vector=decode(e),
                error=None,
                response=resp,
                views=[decode_view(v) for v in e.views],
                chunks=_chunks(e),
            )
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


@dataclass(frozen=True)
class Ranked:
    """One document's rerank score: `relevance` in [0, 1], `raw` the logit or the cosine."""

    index: int
    relevance: float
    raw: float
    truncated: bool
    document: str = ""  # with return_documents


@dataclass(frozen=True)
class RerankResult:
    """A Rerank call, or the sub-calls of a split one, as one answer.

    `results` is every document in document order, or the top_k best, best first.
    `score_kind` is "cross-encoder" (a probability) or "cosine" ((1 + cosine) / 2).
    """

    results: list[Ranked]
    model: str
    score_kind: str
    prompt_tokens: int

    @property
    def scores(self) -> npt.NDArray[np.float32]:
        """The relevance scores, in the order of `results`."""
        return np.array([r.relevance for r in self.results], dtype=np.float32)

    @classmethod
    def from_proto(cls, resp: pb.RerankResponse) -> RerankResult:
        """One call's answer, its results in the order the server gave them."""
        return cls.merge([(0, resp)], 0)

    @classmethod
    def merge(cls, parts: Sequence[tuple[int, pb.RerankResponse]], top_k: int) -> RerankResult:
        """Sub-calls' answers (each with its first document's index), every document in
        document order; the top k are picked here, since each pair's score stands alone."""
        ranked = [
            Ranked(start + r.index, r.relevance_score, r.raw_score, r.truncated, r.document)
            for start, resp in parts
            for r in resp.results
        ]
        if top_k:
            ranked = sorted(ranked, key=lambda r: -r.relevance)[:top_k]
        first = parts[0][1]
        kind = pb.ScoreKind.Name(first.score_kind).removeprefix("SCORE_KIND_")
        return cls(
            ranked,
            first.model,
            kind.lower().replace("_", "-"),
            sum(resp.usage.prompt_tokens for _, resp in parts),
        )


@dataclass(frozen=True)
class RerankStreamResult:
    """One RerankStream result: the item's ranking, as `rerank` returns it, or its own error.

    An error with an empty id refused a message that could not be read.
    """

    id: str
    ranking: RerankResult | None
    error: status_pb2.Status | None
    response: pb.RerankStreamResponse

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_proto(cls, resp: pb.RerankStreamResponse) -> RerankStreamResult:
        if resp.HasField("response"):
            return cls(resp.id, RerankResult.from_proto(resp.response), None, resp)
        return cls(resp.id, None, resp.error, resp)


@dataclass(frozen=True)
class TokenizedResult:
    """What Embed would send the engine for one input.

    `offsets[i]` is the (char_start, char_end) span in the input, in code points, of token
    `ids[text_start + i]`; special tokens and the instruction prefix have none.
    """

    ids: list[int]
    offsets: list[tuple[int, int]]
    text_start: int
    truncated: bool

    @classmethod
    def from_proto(cls, item: pb.TokenizedInput) -> TokenizedResult:
        return cls(
            ids=list(item.ids),
            offsets=[(s.char_start, s.char_end) for s in item.offsets],
            text_start=item.text_start,
            truncated=item.truncated,
        )

    @classmethod
    def all_from_proto(cls, resp: pb.TokenizeResponse) -> list[TokenizedResult]:
        return [cls.from_proto(r) for r in resp.results]
