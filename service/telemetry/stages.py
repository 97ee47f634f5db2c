"""Telemetry of one call's stages inside the pipeline (a service.pipeline.StageObserver).

Tokenize and post-process are timed live, as child spans of the server span. Queue wait and
engine time happen on the batching task, which serves many calls at once; the batcher
reports them per item (ItemResult.queue_s, .inference_s), and the two spans are written
afterwards with those exact bounds. The engine span links to the batch span(s) that carried
the call's inputs.

With tracing off every method returns after one check, so the request path pays ~nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from types import TracebackType

from opentelemetry.trace import Link, Span, StatusCode, Tracer, get_current_span

from service.batching import ItemResult
from service.telemetry import names
from service.telemetry.metrics import Instruments
from service.tokenization import TokenizedInput

_NULL: AbstractContextManager[None] = contextlib.nullcontext()
_STAGE_SPANS = {"tokenize": names.SPAN_TOKENIZE, "postprocess": names.SPAN_POSTPROCESS}


class PipelineTelemetry:
    def __init__(self, instruments: Instruments, tracer: Tracer | None) -> None:
        self._instruments = instruments
        self._tracer = tracer

    def stage(self, name: str) -> AbstractContextManager[object]:
        """A child span of the call for a stage run inline ("tokenize", "postprocess")."""
        tracer = self._tracer
        if tracer is None or not get_current_span().is_recording():
            return _NULL
        # Not made current: nothing runs under these stages that could parent to them, and
        # attaching a context costs more than the span itself.
        return _Ended(tracer.start_span(_STAGE_SPANS.get(name, name)))

    def tokenized(self, inputs: Sequence[TokenizedInput]) -> None:
        truncated = sum(1 for t in inputs if t.truncated)
        if truncated:
            self._instruments.count_truncated(truncated)
        if self._tracer is None:
            return
        span = get_current_span()
        if span.is_recording():
            span.set_attribute(names.INPUT_COUNT, len(inputs))
            span.set_attribute(names.TOKEN_COUNT, sum(len(t.ids) for t in inputs))
            span.set_attribute(names.TRUNCATED_COUNT, truncated)

    def caller(self) -> object | None:
        """The calling span's context, carried by each queued item so batches can link it."""
        if self._tracer is None:
            return None
        span = get_current_span()
        return span.get_span_context() if span.is_recording() else None

    def batched(self, submitted_ns: int, results: Sequence[ItemResult]) -> None:
        """Write the call's queue and engine spans from the times the batcher measured."""
        tracer = self._tracer
        if tracer is None or not results or not get_current_span().is_recording():
            return
        # Items of one call are enqueued together, so offsets from submit place them all.
        first_dispatch = min(r.queue_s for r in results)
        last_dispatch = max(r.queue_s for r in results)
        done = max(r.queue_s + r.inference_s for r in results)
        queue = tracer.start_span(names.SPAN_QUEUE, start_time=submitted_ns)
        queue.end(end_time=submitted_ns + _ns(last_dispatch))
        batches: dict[int, Link] = {}
        for r in results:
            if isinstance(r.batch, Span):
                ctx = r.batch.get_span_context()
                batches.setdefault(ctx.span_id, Link(ctx))
        engine = tracer.start_span(
            names.SPAN_ENGINE,
            start_time=submitted_ns + _ns(first_dispatch),
            links=list(batches.values()),
            attributes={"embedding.batches": len(batches)},
        )
        engine.end(end_time=submitted_ns + _ns(done))


class _Ended:
    """Ends the span on exit; an exception marks it failed."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def __enter__(self) -> Span:
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._span.record_exception(exc)
            self._span.set_status(StatusCode.ERROR, type(exc).__name__)
        self._span.end()


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)
