"""One embedding job from text to shaped vectors: tokenize -> batcher -> engine -> post-process.

The faces validate and speak their protocols; this module holds the request path below
them, so Embed, Similarity and each EmbedStream item, over gRPC or HTTP, share one
implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from service import postprocess
from service.batching import Batcher, BatcherClosedError, ItemResult, Priority, QueueFullError
from service.errors import InvalidInputError
from service.tokenization import TextTokenizer, TokenizedInput, Truncation


@dataclass(frozen=True)
class EmbedSpec:
    """Validated options of one call."""

    prefix: str
    dimensions: int
    normalize: bool
    truncation: Truncation
    encoding: postprocess.Encoding


@dataclass(frozen=True)
class Timing:
    tokenize_s: float
    queue_s: float
    inference_s: float


@dataclass(frozen=True)
class TokenInputs:
    """Pre-tokenized inputs: each the model's input as given, special tokens included."""

    ids: Sequence[Sequence[int]]

    def __len__(self) -> int:
        return len(self.ids)


Inputs = Sequence[str] | TokenInputs


@dataclass(frozen=True)
class EmbedOutcome:
    vectors: postprocess.FloatMatrix  # sliced and (if asked) normalized, one row per text
    inputs: list[TokenizedInput]
    timing: Timing

    @property
    def prompt_tokens(self) -> int:
        return sum(len(t.ids) for t in self.inputs)


@dataclass(frozen=True)
class SimilarityOutcome:
    scores: postprocess.FloatMatrix  # (queries, documents) cosines
    prompt_tokens: int
    timing: Timing  # of the queries' embedding


class DeadlineTooShortError(Exception):
    """The caller's deadline ends before the queue could plausibly serve it."""


class StageObserver(Protocol):
    """Telemetry of one call's stages (service.telemetry implements it); must be cheap."""

    def stage(self, name: str) -> AbstractContextManager[object]:
        """Wraps a stage run inline: "tokenize" or "postprocess"."""
        ...

    def tokenized(self, inputs: Sequence[TokenizedInput]) -> None: ...

    def caller(self) -> object | None:
        """Opaque; handed to the batcher with each item (batch spans link to it)."""
        ...

    def batched(self, submitted_ns: int, results: Sequence[ItemResult]) -> None:
        """The queue and engine stages, from the times the batcher measured."""
        ...


class _NoStages:
    def stage(self, name: str) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def tokenized(self, inputs: Sequence[TokenizedInput]) -> None:
        pass

    def caller(self) -> object | None:
        return None

    def batched(self, submitted_ns: int, results: Sequence[ItemResult]) -> None:
        pass


class Embedder:
    def __init__(
        self,
        tokenizer: TextTokenizer,
        batcher: Batcher,
        max_request_tokens: int,
        stages: StageObserver | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._batcher = batcher
        self._max_request_tokens = max_request_tokens
        self._stages: StageObserver = stages or _NoStages()

    async def embed(
        self, texts: Inputs, spec: EmbedSpec, field: str, deadline: float | None
    ) -> EmbedOutcome:
        """Interactive path: all inputs are admitted together or the call is refused."""
        self._check_deadline(deadline)
        stages = self._stages
        started = time.perf_counter()
        with stages.stage("tokenize"):
            if isinstance(texts, TokenInputs):
                inputs = self._tokenizer.from_ids(texts.ids, spec.truncation, field)
            else:
                tokenizer = self._tokenizer
                inputs = await tokenizer.tokenize(texts, spec.prefix, spec.truncation, field)
        tokenized = time.perf_counter()
        stages.tokenized(inputs)
        total = sum(len(t.ids) for t in inputs)
        if total > self._max_request_tokens:
            raise InvalidInputError(
                field,
                f"{total} tokens in one request exceed the limit of {self._max_request_tokens}",
            )
        submitted_ns = time.time_ns()
        futures = self._batcher.submit(
            [t.ids for t in inputs], Priority.INTERACTIVE, deadline, stages.caller()
        )
        results = await _gather(futures)
        stages.batched(submitted_ns, results)
        with stages.stage("postprocess"):
            return _outcome(inputs, results, spec, tokenized - started)

    async def similarity(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        spec: EmbedSpec,
        deadline: float | None,
        fields: tuple[str, str] = ("queries", "documents"),
    ) -> SimilarityOutcome:
        """Cosine scores: the queries laid out as `spec` says, the documents as they are."""
        doc_spec = EmbedSpec("", spec.dimensions, True, spec.truncation, spec.encoding)
        q, d = await asyncio.gather(
            self.embed(queries, spec, fields[0], deadline),
            self.embed(documents, doc_spec, fields[1], deadline),
        )
        return SimilarityOutcome(
            postprocess.cosine(q.vectors, d.vectors), q.prompt_tokens + d.prompt_tokens, q.timing
        )

    async def embed_bulk(
        self, texts: Sequence[str], spec: EmbedSpec, field: str, deadline: float | None
    ) -> list[EmbedOutcome | Exception]:
        """Stream path: independent texts, each answered with its own outcome or error.

        Items wait for room in the bulk share of the queue instead of failing. Taking the
        stream's items a group at a time lets tokenization and post-processing run once
        per group rather than once per item.
        """
        started = time.perf_counter()
        tokenized = await self._tokenizer.tokenize_each(
            texts, spec.prefix, spec.truncation, field, indexed=False
        )
        tokenize_s = time.perf_counter() - started
        # No stage spans per stream item (a bulk stream has millions); metrics and the batch
        # span's link to the stream's span still see them.
        self._stages.tokenized([t for t in tokenized if isinstance(t, TokenizedInput)])
        caller = self._stages.caller()
        outcomes: list[EmbedOutcome | Exception | None] = [
            t if isinstance(t, InvalidInputError) else None for t in tokenized
        ]
        futures: dict[int, asyncio.Future[ItemResult]] = {}
        try:
            for i, item in enumerate(tokenized):
                if isinstance(item, InvalidInputError):
                    continue
                try:
                    futures[i] = await self._batcher.submit_when_ready(
                        item.ids, Priority.BULK, deadline, caller
                    )
                except (QueueFullError, BatcherClosedError, ValueError) as exc:
                    outcomes[i] = exc
            done = await asyncio.gather(*futures.values(), return_exceptions=True)
        finally:
            for f in futures.values():  # only still-pending ones: the caller went away
                f.cancel()
        good: list[tuple[int, ItemResult]] = []
        for i, result in zip(futures, done, strict=True):
            if isinstance(result, ItemResult):
                good.append((i, result))
            elif isinstance(result, Exception):
                outcomes[i] = result
            else:
                raise result  # cancelled
        if good:
            raw = np.array([r.vector for _, r in good])
            vectors = postprocess.shape(raw, spec.dimensions, spec.normalize)
            for row, (i, r) in enumerate(good):
                outcomes[i] = EmbedOutcome(
                    vectors=vectors[row : row + 1],
                    inputs=[cast(TokenizedInput, tokenized[i])],
                    timing=Timing(tokenize_s, r.queue_s, r.inference_s),
                )
        return cast(list[EmbedOutcome | Exception], outcomes)  # every index was set above

    def _check_deadline(self, deadline: float | None) -> None:
        # Refusing now is kinder than queueing work that will be thrown away: the caller can
        # retry elsewhere while its deadline still means something.
        if deadline is None:
            return
        remaining = deadline - time.monotonic()
        expected = self._batcher.estimated_wait_s(Priority.INTERACTIVE)
        if remaining < expected:
            raise DeadlineTooShortError(
                f"deadline of {max(remaining, 0) * 1000:.0f}ms is shorter than the expected "
                f"wait of {expected * 1000:.0f}ms"
            )


async def _gather(futures: list[asyncio.Future[ItemResult]]) -> list[ItemResult]:
    try:
        return await asyncio.gather(*futures)
    finally:
        # On failure or cancellation, siblings still queued are dropped from the batcher.
        for f in futures:
            f.cancel()


def _outcome(
    inputs: list[TokenizedInput], results: list[ItemResult], spec: EmbedSpec, tokenize_s: float
) -> EmbedOutcome:
    raw = np.array([r.vector for r in results])  # np.stack costs 5x more on one row
    return EmbedOutcome(
        vectors=postprocess.shape(raw, spec.dimensions, spec.normalize),
        inputs=inputs,
        timing=Timing(
            tokenize_s=tokenize_s,
            queue_s=max(r.queue_s for r in results),
            inference_s=max(r.inference_s for r in results),
        ),
    )
