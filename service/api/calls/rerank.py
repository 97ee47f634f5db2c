"""Rerank: documents ordered by relevance to one query, on whichever model can rank them.

With a rerank model (a cross-encoder) the score is its probability that the document answers
the query. Without one, the embedding model ranks by cosine, mapped to [0, 1] as
(1 + cosine) / 2 so that clients with relevance thresholds (Open WebUI) keep working.

Documents are cut to fit beside the query (Cohere's max_tokens_per_doc) and never refused
for their length, unless a caller asks for that explicitly; the query is never cut, since a
cut query asks a different question.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from service import postprocess
from service.api.calls.metadata import Metadata
from service.api.runtime import EmbeddingModel, Runtime
from service.api.validation import RequestOptions
from service.errors import INPUT_TOO_LONG, InputTooLongError, InvalidInputError
from service.tokenization import Truncation


class ScoreKind(enum.Enum):
    CROSS_ENCODER = "cross-encoder"  # relevance = sigmoid(logit)
    COSINE = "cosine"  # relevance = (1 + cosine) / 2


@dataclass(frozen=True)
class RerankCall:
    query: str
    documents: Sequence[str]
    top_k: int = 0  # 0: every document, in document order
    instruction: str = ""
    prompt_name: str = ""  # the embedding model's named prompt for the query (cosine only)
    max_tokens_per_doc: int = 0  # 0: as many as fit in the window
    refuse_long_documents: bool = False  # only when a caller asked for it explicitly
    model: str | None = None  # None: the rerank model, else the embedding model
    documents_field: str = "documents"  # the caller's name for them, in errors
    deadline: float | None = None
    # None: an interactive call. A stream (RerankStream) for one of its items: bulk work in
    # that stream's fair share, behind interactive calls, waiting for room in the queue.
    flow: object | None = None


@dataclass(frozen=True)
class Ranked:
    index: int  # in RerankCall.documents
    relevance: float  # in [0, 1]
    raw: float  # the logit, or the cosine
    truncated: bool


@dataclass(frozen=True)
class RerankAnswer:
    results: list[Ranked]  # the top k, best first, or every document in document order
    kind: ScoreKind
    meta: Metadata  # truncated: documents cut to fit, of all of them (not only the top k)


async def rerank(rt: Runtime, call: RerankCall) -> RerankAnswer:
    field = call.documents_field
    rt.validator.text(call.query, "query")
    rt.validator.texts(call.documents, field)
    rt.validator.count(1 + len(call.documents), f"query+{field}", "texts")
    for name, value in (("top_k", call.top_k), ("max_tokens_per_doc", call.max_tokens_per_doc)):
        if value < 0:
            raise InvalidInputError(name, f"must be at least 0, not {value}")
    scorer = rt.scorer_for(call.model)
    if scorer is not None:
        outcome = await scorer.reranker.score(
            call.query,
            call.documents,
            instruction=call.instruction,
            max_tokens_per_doc=call.max_tokens_per_doc,
            refuse_long_documents=call.refuse_long_documents,
            field=field,
            deadline=call.deadline,
            flow=call.flow,
        )
        raw = outcome.logits
        relevance = 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))
        meta = Metadata(scorer.name, outcome.prompt_tokens, outcome.timing, sum(outcome.truncated))
        return RerankAnswer(
            _ranked(call, raw, relevance, outcome.truncated), ScoreKind.CROSS_ENCODER, meta
        )
    return await _by_cosine(rt, rt.embedding_for(call.model), call)


async def _by_cosine(rt: Runtime, model: EmbeddingModel, call: RerankCall) -> RerankAnswer:
    v = rt.validator
    # The query is a query: it gets the model's query prompt unless told otherwise.
    prompt = call.prompt_name or ("" if call.instruction else v.query_prompt_name)
    spec = v.options(RequestOptions(instruction=call.instruction, prompt_name=prompt), prefix="")
    documents = replace(
        spec,
        truncation=Truncation.REFUSE if call.refuse_long_documents else Truncation.END,
        max_tokens=call.max_tokens_per_doc,
    )
    try:
        outcome = await model.embedder.similarity(
            [call.query],
            call.documents,
            replace(spec, truncation=Truncation.REFUSE),
            call.deadline,
            fields=("query", call.documents_field),
            documents_spec=documents,
            flow=call.flow,
        )
    except InputTooLongError as exc:
        if exc.field != "query[0]":
            raise
        raise query_too_long(exc.tokens, exc.limit) from None
    cosines = outcome.scores[0]
    relevance = np.clip((cosines.astype(np.float64) + 1) / 2, 0.0, 1.0)
    truncated = outcome.documents_truncated
    meta = Metadata(model.name, outcome.prompt_tokens, outcome.timing, sum(truncated))
    return RerankAnswer(_ranked(call, cosines, relevance, truncated), ScoreKind.COSINE, meta)


def query_too_long(tokens: int, limit: int) -> InvalidInputError:
    return InvalidInputError(
        "query",
        f"has {tokens} tokens, over the model's limit of {limit}; the query is never cut"
        " (only documents are): shorten it",
        INPUT_TOO_LONG,
    )


def _ranked(
    call: RerankCall,
    raw: npt.NDArray[np.float32],
    relevance: npt.NDArray[np.float64],
    truncated: Sequence[bool],
) -> list[Ranked]:
    """The top k, best first (stable on ties), or every document in document order."""
    if call.top_k:
        order, _ = postprocess.top_k(relevance[None, :], call.top_k)
        indices = order[0].tolist()
    else:
        indices = list(range(len(call.documents)))
    return [Ranked(i, float(relevance[i]), float(raw[i]), bool(truncated[i])) for i in indices]
