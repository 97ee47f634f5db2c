"""One rerank job: (query, document) pairs -> the rerank model's batcher -> one logit each.

A cross-encoder reads each pair together, so a rerank of N documents is N engine items.
They go through the rerank model's own batcher as interactive items (a RerankStream
item's as bulk items, in its stream's fair share): the same queue bounds, priorities and
deadlines as embeddings, and a caller that leaves drops its queued pairs. Scores are never
cached: a pair is rarely asked twice, and the vector cache keys single inputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.errors import INPUT_TOO_LONG, InvalidInputError
from service.pair_tokenization import PairTokenizer
from service.pipeline import (
    EngineQueue,
    Timing,
    timing_of,
)


@dataclass(frozen=True)
class ScoreOutcome:
    logits: npt.NDArray[np.float32]  # one per document, in document order
    truncated: list[bool]  # per document: cut to fit beside the query
    prompt_tokens: int
    timing: Timing


class Reranker:
    def __init__(self, pairs: PairTokenizer, queue: EngineQueue) -> None:
        self._pairs = pairs
        self._queue = queue

    @property
    def default_instruction(self) -> str:
        return self._pairs.default_instruction

    async def score(
        self,
        query: str,
        documents: Sequence[str],
        *,
        instruction: str,
        max_tokens_per_doc: int,
        refuse_long_documents: bool,
        field: str,
        deadline: float | None,
        flow: object | None = None,
    ) -> ScoreOutcome:
        """`flow`: None for an interactive call; a stream for one of its items (bulk)."""
        self._queue.check_deadline(deadline, flow)
        stages = self._queue.stages
        started = time.perf_counter()
        with stages.stage("tokenize"):
            inputs = await self._pairs.pairs(
                query, documents, instruction=instruction, max_tokens_per_doc=max_tokens_per_doc
            )
        tokenize_s = time.perf_counter() - started
        if refuse_long_documents:
            cut = next((i for i, pair in enumerate(inputs) if pair.truncated), None)
            if cut is not None:
                limit = max_tokens_per_doc or self._pairs.max_tokens
                raise InvalidInputError(
                    f"{field}[{cut}]",
                    f"does not fit beside the query in the limit of {limit} tokens; leave"
                    " truncate unset (or end) to have it cut",
                    INPUT_TOO_LONG,
                )
        results = await self._queue.run(inputs, field, deadline, flow)
        total = sum(len(t.ids) for t in inputs)
        logits = np.array([r.vector[0] for r in results], dtype=np.float32)
        return ScoreOutcome(
            logits, [t.truncated for t in inputs], total, timing_of(tokenize_s, results)
        )
