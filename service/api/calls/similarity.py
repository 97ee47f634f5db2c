"""Similarity: the cosine of every (query, document) pair under the embedding model, as whole
rows or as each query's top k documents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service import postprocess
from service.api.calls.metadata import Metadata
from service.api.runtime import Runtime
from service.api.validation import RequestOptions, field_name
from service.errors import InvalidInputError


@dataclass(frozen=True)
class SimilarityCall:
    queries: Sequence[str]
    documents: Sequence[str]
    options: RequestOptions
    top_k: int = 0  # 0: every score, in document order
    options_field: str = "options"
    deadline: float | None = None


@dataclass(frozen=True)
class Scored:
    index: int  # in SimilarityCall.documents
    score: float


@dataclass(frozen=True)
class SimilarityAnswer:
    # Per query: every document's score in document order (top_k 0), or its k best.
    rows: list[list[float]]
    top: list[list[Scored]]
    meta: Metadata


async def similarity(rt: Runtime, call: SimilarityCall) -> SimilarityAnswer:
    model = rt.embedding_for(None)
    v = rt.validator
    v.texts(call.queries, "queries")
    v.texts(call.documents, "documents")
    v.count(len(call.queries) + len(call.documents), "queries+documents")
    spec = v.options(call.options, prefix=call.options_field)
    for name, unused in (
        ("encoding", spec.encoding is not postprocess.Encoding.FLOAT32),
        ("chunking", spec.chunking is not None),
        ("views", bool(spec.views)),
    ):
        if unused:
            raise InvalidInputError(
                field_name(call.options_field, name), "does not apply to Similarity"
            )
    outcome = await model.embedder.similarity(call.queries, call.documents, spec, call.deadline)
    meta = Metadata(model.name, outcome.prompt_tokens, outcome.timing)
    if call.top_k <= 0:
        return SimilarityAnswer([row.tolist() for row in outcome.scores], [], meta)
    order, best = postprocess.top_k(outcome.scores, call.top_k)
    top = [
        [Scored(i, s) for i, s in zip(idx.tolist(), sc.tolist(), strict=True)]
        for idx, sc in zip(order, best, strict=True)
    ]
    return SimilarityAnswer([], top, meta)
