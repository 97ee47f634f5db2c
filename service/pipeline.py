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
from dataclasses import dataclass, replace
from typing import Protocol, cast

import numpy as np

from service import postprocess
from service.batching import ItemResult, ItemSubmitter, Priority
from service.chunking import ChunkSpec, Span
from service.errors import (
    TOO_MANY_TOKENS,
    BatcherClosedError,
    DeadlineTooShortError,
    InvalidInputError,
    QueueFullError,
)
from service.tokenization import (
    ChunkedInput,
    TextTokenizer,
    TokenizedInput,
    TokenSpans,
    Truncation,
    all_or_raise,
)


@dataclass(frozen=True)
class View:
    """One more resolution of each vector: Matryoshka dimensions and an encoding."""

    dimensions: int
    encoding: postprocess.Encoding


@dataclass(frozen=True)
class EmbedSpec:
    """Validated options of one call."""

    prefix: str
    dimensions: int
    normalize: bool
    truncation: Truncation
    encoding: postprocess.Encoding
    chunking: ChunkSpec | None = None
    views: tuple[View, ...] = ()
    # Tokens an input may keep, special tokens included, when smaller than the model's
    # window (Cohere's max_tokens_per_doc); 0: the window. Past it, `truncation` applies.
    max_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    tokenize_s: float
    queue_s: float
    inference_s: float
    cached: int = 0  # inputs (or chunks) answered from the vector cache


@dataclass(frozen=True)
class TokenInputs:
    """Pre-tokenized inputs: each the model's input as given, special tokens included."""

    ids: Sequence[Sequence[int]]

    def __len__(self) -> int:
        return len(self.ids)


Inputs = Sequence[str] | TokenInputs


@dataclass(frozen=True)
class EmbedOutcome:
    """Vectors of some inputs, one row each. For a chunked input, `raw` is the token-
    weighted mean of its chunks' normalized vectors, and `chunks` holds the chunks."""

    raw: postprocess.FloatMatrix  # full size, as the engine gave them
    vectors: postprocess.FloatMatrix  # sliced and (if asked) normalized
    inputs: list[TokenizedInput]  # a chunked input's: all its chunks' ids together
    timing: Timing
    chunks: list[Chunks] | None = None  # per input, when the call was chunked

    @property
    def prompt_tokens(self) -> int:
        return sum(len(t.ids) for t in self.inputs)

    def row(self, i: int, timing: Timing) -> EmbedOutcome:
        return EmbedOutcome(
            raw=self.raw[i : i + 1],
            vectors=self.vectors[i : i + 1],
            inputs=self.inputs[i : i + 1],
            timing=timing,
            chunks=None if self.chunks is None else self.chunks[i : i + 1],
        )

    @classmethod
    def join(cls, parts: Sequence[EmbedOutcome]) -> EmbedOutcome:
        """Several outcomes with the same options as one (the first one's timing)."""
        chunks = [c for p in parts for c in p.chunks or ()] if parts[0].chunks else None
        return cls(
            raw=np.concatenate([p.raw for p in parts]),
            vectors=np.concatenate([p.vectors for p in parts]),
            inputs=[t for p in parts for t in p.inputs],
            timing=parts[0].timing,
            chunks=chunks,
        )


@dataclass(frozen=True)
class Chunks:
    """The chunks of one input: their spans in its text and their own vectors."""

    spans: list[Span]
    outcome: EmbedOutcome


@dataclass(frozen=True)
class SimilarityOutcome:
    scores: postprocess.FloatMatrix  # (queries, documents) cosines
    prompt_tokens: int
    timing: Timing  # of the queries' embedding
    documents_truncated: list[bool]  # per document: cut to fit


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


class NoStages:
    def stage(self, name: str) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def tokenized(self, inputs: Sequence[TokenizedInput]) -> None:
        pass

    def caller(self) -> object | None:
        return None

    def batched(self, submitted_ns: int, results: Sequence[ItemResult]) -> None:
        pass


_NO_STAGES = NoStages()


@dataclass(frozen=True)
class EngineQueue:
    """One model's way to its engine: the batcher (or the vector cache in front of it), the
    per-request token limit, and the telemetry of each call's stages."""

    batcher: ItemSubmitter
    max_request_tokens: int
    telemetry: StageObserver | None = None  # None: no telemetry

    @property
    def stages(self) -> StageObserver:
        return self.telemetry or _NO_STAGES

    def check_deadline(self, deadline: float | None, flow: object | None = None) -> None:
        """Refuse an interactive call the queue cannot serve in time; a stream's item
        (`flow` set) waits for room instead, as bulk work does."""
        if flow is None:
            check_deadline(self.batcher, deadline)

    async def run(
        self,
        units: list[TokenizedInput],
        field: str,
        deadline: float | None,
        flow: object | None = None,
    ) -> list[ItemResult]:
        """One call's engine items: interactive, or, with `flow` (a stream), bulk work in
        that stream's fair share."""
        if flow is None:
            return await self.run_interactive(units, field, deadline)
        return await self.run_bulk(units, deadline, flow)

    async def run_interactive(
        self, units: list[TokenizedInput], field: str, deadline: float | None
    ) -> list[ItemResult]:
        """One interactive call's engine items, all admitted together within the
        per-request token limit (TOO_MANY_TOKENS tells a client to split), or none."""
        self.stages.tokenized(units)
        total = sum(len(t.ids) for t in units)
        if total > self.max_request_tokens:
            raise InvalidInputError(
                field,
                f"{total} tokens in one request exceed the limit of {self.max_request_tokens}",
                TOO_MANY_TOKENS,
            )
        submitted_ns = time.time_ns()
        ids = [t.ids for t in units]
        futures = self.batcher.submit(ids, Priority.INTERACTIVE, deadline, self.stages.caller())
        results = await gather_items(futures)
        self.stages.batched(submitted_ns, results)
        return results

    async def run_bulk(
        self, units: list[TokenizedInput], deadline: float | None, flow: object
    ) -> list[ItemResult]:
        """One stream item's engine items as bulk work, like embed_bulk's: each waits for
        room in the bulk share of the queue instead of being refused (so no per-request
        token limit: the stream's budget bounds what it holds), and `flow` (the stream) is
        the fair share of the engine they belong to. Interactive calls go ahead of them.
        No queue and engine spans per stream item (a stream has many); metrics see them."""
        self.stages.tokenized(units)
        caller = self.stages.caller()
        futures: list[asyncio.Future[ItemResult]] = []
        try:
            for unit in units:
                futures.append(
                    await self.batcher.submit_when_ready(
                        unit.ids, Priority.BULK, deadline, caller, flow
                    )
                )
        except BaseException:
            for f in futures:  # admitted siblings go too: the item fails whole
                f.cancel()
            raise
        return await gather_items(futures)


class Embedder:
    def __init__(self, tokenizer: TextTokenizer, queue: EngineQueue) -> None:
        self._tokenizer = tokenizer
        self._queue = queue
        self._batcher = queue.batcher
        self._stages = queue.stages

    async def embed(
        self,
        texts: Inputs,
        spec: EmbedSpec,
        field: str,
        deadline: float | None,
        flow: object | None = None,
    ) -> EmbedOutcome:
        """Interactive path: all inputs are admitted together or the call is refused. With
        `flow` (a stream's item that is a whole call, such as a RerankStream item) they are
        bulk work instead, admitted as the queue has room (EngineQueue.run_bulk)."""
        self._queue.check_deadline(deadline, flow)
        stages = self._stages
        started = time.perf_counter()
        with stages.stage("tokenize"):
            prepared: list[Prepared] = all_or_raise(await self._prepare(texts, spec, field))
        tokenized = time.perf_counter()
        units = [t for p in prepared for t in _units(p)]
        results = await self._queue.run(units, field, deadline, flow)
        with stages.stage("postprocess"):
            return _assemble(prepared, results, spec, tokenized - started)

    async def similarity(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        spec: EmbedSpec,
        deadline: float | None,
        fields: tuple[str, str] = ("queries", "documents"),
        *,
        documents_spec: EmbedSpec | None = None,
        flow: object | None = None,
    ) -> SimilarityOutcome:
        """Cosine scores: the queries laid out as `spec` says, the documents as they are
        (or as `documents_spec` says: rerank cuts long documents, never the query).
        `flow`: as in embed."""
        doc_spec = replace(documents_spec or spec, prefix="", normalize=True)
        sides = (
            asyncio.ensure_future(self.embed(queries, spec, fields[0], deadline, flow)),
            asyncio.ensure_future(self.embed(documents, doc_spec, fields[1], deadline, flow)),
        )
        try:
            q, d = await asyncio.gather(*sides)
        except BaseException:
            for side in sides:  # a refused side takes the other's queued work with it
                side.cancel()
            raise
        return SimilarityOutcome(
            postprocess.cosine(q.vectors, d.vectors),
            q.prompt_tokens + d.prompt_tokens,
            q.timing,
            [t.truncated for t in d.inputs],
        )

    async def embed_bulk(
        self,
        texts: Sequence[str],
        spec: EmbedSpec,
        field: str,
        deadline: float | None,
        flow: object | None = None,
    ) -> list[EmbedOutcome | Exception]:
        """Stream path: independent texts, each answered with its own outcome or error.

        Items wait for room in the bulk share of the queue instead of failing. Taking the
        stream's items a group at a time lets tokenization and post-processing run once
        per group rather than once per item. `flow` (the stream) is the fair share of the
        engine the items belong to. A chunked text's chunks go to the batcher one by one,
        each counting against the budgets on its own.
        """
        started = time.perf_counter()
        prepared = await self._prepare(texts, spec, field, indexed=False)
        tokenize_s = time.perf_counter() - started
        # No stage spans per stream item (a bulk stream has millions); metrics and the batch
        # span's link to the stream's span still see them.
        self._stages.tokenized(
            [t for p in prepared if not isinstance(p, InvalidInputError) for t in _units(p)]
        )
        caller = self._stages.caller()
        failed: dict[int, Exception] = {
            i: p for i, p in enumerate(prepared) if isinstance(p, InvalidInputError)
        }
        futures: list[tuple[int, asyncio.Future[ItemResult]]] = []
        try:
            for i, item in enumerate(prepared):
                if isinstance(item, InvalidInputError):
                    continue
                for unit in _units(item):
                    try:
                        future = await self._batcher.submit_when_ready(
                            unit.ids, Priority.BULK, deadline, caller, flow
                        )
                    except (QueueFullError, BatcherClosedError, ValueError) as exc:
                        failed[i] = exc
                        break
                    futures.append((i, future))
            done = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
        finally:
            for _, f in futures:  # only still-pending ones: the caller went away
                f.cancel()
        results: dict[int, list[ItemResult]] = {}
        for (i, _), result in zip(futures, done, strict=True):
            if isinstance(result, ItemResult):
                results.setdefault(i, []).append(result)
            elif isinstance(result, Exception):
                failed.setdefault(i, result)
            else:
                raise result  # cancelled
        good = [i for i in range(len(prepared)) if i not in failed]
        rows: dict[int, EmbedOutcome] = {}
        if good:
            joined = _assemble(
                [cast(Prepared, prepared[i]) for i in good],
                [r for i in good for r in results[i]],
                spec,
                tokenize_s,
            )
            rows = {i: joined.row(k, timing_of(tokenize_s, results[i])) for k, i in enumerate(good)}
        return [failed[i] if i in failed else rows[i] for i in range(len(prepared))]

    async def _prepare(
        self, texts: Inputs, spec: EmbedSpec, field: str, indexed: bool = True
    ) -> list[Prepared | InvalidInputError]:
        """Each input as the engine will see it: token ids, or chunks of them."""
        tokenizer = self._tokenizer
        if isinstance(texts, TokenInputs):
            return list(tokenizer.from_ids(texts.ids, spec.truncation, field))
        if spec.chunking is not None:
            return list(await tokenizer.chunk_each(texts, spec.prefix, spec.chunking))
        return list(
            await tokenizer.tokenize_each(
                texts, spec.prefix, spec.truncation, field, indexed, limit=spec.max_tokens
            )
        )

    async def tokenize(self, texts: Sequence[str], spec: EmbedSpec, field: str) -> list[TokenSpans]:
        """The ids `embed` would send the engine for each text, with their spans."""
        return await self._tokenizer.spans(texts, spec.prefix, spec.truncation, field)


class _Waits(Protocol):
    def estimated_wait_s(self, priority: Priority) -> float: ...


def check_deadline(batcher: _Waits, deadline: float | None) -> None:
    """Refuse an interactive call whose deadline ends before the queue could serve it.

    Refusing now is kinder than queueing work that will be thrown away: the caller can
    retry elsewhere while its deadline still means something.
    """
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    expected = batcher.estimated_wait_s(Priority.INTERACTIVE)
    if remaining < expected:
        raise DeadlineTooShortError(
            f"deadline of {max(remaining, 0) * 1000:.0f}ms is shorter than the expected "
            f"wait of {expected * 1000:.0f}ms"
        )


async def gather_items(futures: list[asyncio.Future[ItemResult]]) -> list[ItemResult]:
    """The items' results; on failure or cancellation, siblings still queued are dropped."""
    try:
        return await asyncio.gather(*futures)
    finally:
        # On failure or cancellation, siblings still queued are dropped from the batcher.
        for f in futures:
            f.cancel()


def view_vectors(
    outcome: EmbedOutcome, spec: EmbedSpec
) -> list[tuple[View, postprocess.FloatMatrix]]:
    """Each asked view's vectors, shaped from the same raw vectors as the main ones."""
    return [(v, postprocess.shape(outcome.raw, v.dimensions, spec.normalize)) for v in spec.views]


Prepared = TokenizedInput | ChunkedInput


def _units(item: Prepared) -> list[TokenizedInput]:
    """What goes to the engine for one input: itself, or its chunks."""
    return item.chunks if isinstance(item, ChunkedInput) else [item]


def timing_of(tokenize_s: float, results: Sequence[ItemResult]) -> Timing:
    return Timing(
        tokenize_s=tokenize_s,
        queue_s=max(r.queue_s for r in results),
        inference_s=max(r.inference_s for r in results),
        cached=sum(r.cached for r in results),
    )


def _assemble(
    prepared: Sequence[Prepared], results: Sequence[ItemResult], spec: EmbedSpec, tokenize_s: float
) -> EmbedOutcome:
    """The inputs' outcome from the engine's results, one per unit in order."""
    timing = timing_of(tokenize_s, results)
    raw = np.array([r.vector for r in results])  # np.stack costs 5x more on one row
    vectors = postprocess.shape(raw, spec.dimensions, spec.normalize)
    if spec.chunking is None:
        return EmbedOutcome(raw, vectors, cast(list[TokenizedInput], list(prepared)), timing)
    # An input's vector: the token-weighted mean of its chunks' normalized full vectors.
    unit = postprocess.shape(raw, raw.shape[1], normalize=True)
    means, inputs, chunks = [], [], []
    start = 0
    for item in cast(Sequence[ChunkedInput], prepared):
        end = start + len(item.chunks)
        weights = np.array([len(c.ids) for c in item.chunks], dtype=np.float32)
        means.append(weights @ unit[start:end] / weights.sum())
        ids = [i for c in item.chunks for i in c.ids]
        inputs.append(TokenizedInput(ids, any(c.truncated for c in item.chunks)))
        part = EmbedOutcome(raw[start:end], vectors[start:end], item.chunks, timing)
        chunks.append(Chunks(item.spans, part))
        start = end
    mean = np.array(means, dtype=np.float32)
    return EmbedOutcome(
        mean, postprocess.shape(mean, spec.dimensions, spec.normalize), inputs, timing, chunks
    )
