"""Telemetry of the batcher: batch metrics and one span per engine batch.

This is the BatchObserver the batcher calls (service.batching stays free of OpenTelemetry).
A batch serves many calls, so its span cannot be the child of all of them: it starts a
trace of its own and *links* to the server span of every call it served; each call's
engine span links back to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from opentelemetry import context as otel_context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, StatusCode, Tracer

from service.batching import Priority, QueuedItem
from service.telemetry import names
from service.telemetry.histograms import AttributeKey
from service.telemetry.metrics import Instruments

# A batch span has no parent: the batching task runs outside every call's context.
_NO_PARENT = otel_context.Context()
# The SDK keeps 128 links by default; past that a batch links to the first calls only.
MAX_LINKS = 128


_PRIORITY_NAMES = {p: p.name.lower() for p in Priority}


class BatchTelemetry:
    """Records queue wait, batch size and engine time; starts and ends the batch span."""

    def __init__(self, instruments: Instruments, tracer: Tracer | None) -> None:
        self._m = instruments
        self._tracer = tracer
        # Attribute keys built once, not per record.
        self._by_priority: dict[Priority, AttributeKey] = {
            p: ((names.PRIORITY, name),) for p, name in _PRIORITY_NAMES.items()
        }

    def dispatched(self, items: Sequence[QueuedItem], now: float) -> object | None:
        # Queue wait: one value per batch and priority, the longest (its oldest input): what
        # SLOs are about, at one record per batch instead of one per input.
        tokens = 0
        oldest: dict[Priority, float] = {}
        for item in items:
            tokens += item.n_tokens
            if item.enqueued_at <= oldest.get(item.priority, now):
                oldest[item.priority] = item.enqueued_at
        for priority, enqueued_at in oldest.items():
            self._m.queue_wait.record(now - enqueued_at, self._by_priority[priority])
        self._m.batch_items.record(len(items))
        self._m.batch_tokens.record(tokens)
        if self._tracer is None:
            return None
        span = self._tracer.start_span(
            names.SPAN_BATCH,
            context=_NO_PARENT,
            kind=SpanKind.INTERNAL,
            links=_links(items),
            attributes={names.BATCH_SIZE: len(items), names.BATCH_SIZE_TOKENS: tokens},
        )
        return span if span.is_recording() else None

    def finished(
        self,
        handle: object | None,
        items: Sequence[QueuedItem],
        engine_s: float,
        error: BaseException | None,
    ) -> None:
        if error is None:
            self._m.engine_duration.record(engine_s)
            self._count_processed(items)
        else:
            cancelled = isinstance(error, asyncio.CancelledError)
            kind = "cancelled" if cancelled else type(error).__name__
            self._m.engine_duration.record(engine_s, ((names.ERROR_TYPE, kind),))
        if handle is not None and isinstance(handle, Span):
            if error is not None and not isinstance(error, asyncio.CancelledError):
                handle.set_status(StatusCode.ERROR, type(error).__name__)
                handle.set_attribute(names.ERROR_TYPE, type(error).__name__)
            handle.end()

    def rejected(self, reason: str, priority: Priority, n_items: int) -> None:
        self._m.count_rejected(reason, _PRIORITY_NAMES[priority], n_items)

    def _count_processed(self, items: Sequence[QueuedItem]) -> None:
        if not items:
            return
        first = items[0].priority
        tokens = 0
        for item in items:
            if item.priority is not first:
                break
            tokens += item.n_tokens
        else:  # the usual case: one priority
            self._m.count_processed(_PRIORITY_NAMES[first], len(items), tokens)
            return
        for item in items:
            self._m.count_processed(_PRIORITY_NAMES[item.priority], 1, item.n_tokens)


def _links(items: Sequence[QueuedItem]) -> list[Link]:
    """One link per distinct calling span (a 37-input call is linked once, not 37 times)."""
    links: list[Link] = []
    seen: set[int] = set()
    for item in items:
        ctx = item.context
        if isinstance(ctx, SpanContext) and ctx.span_id not in seen:
            seen.add(ctx.span_id)
            links.append(Link(ctx))
            if len(links) >= MAX_LINKS:
                break
    return links
