"""The service's metric instruments, created once per meter, with buckets in seconds.

The SDK's default histogram buckets are scaled for milliseconds (0, 5, 10, ... 10000), which
would put every embedding call in the first bucket; each histogram here passes its own.
Histograms are aggregated by service.telemetry.histograms (cheaper per record than the SDK);
counters are plain integers and gauges read the batcher and the engine, both at collection
time, so the request path pays nothing for them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from service.telemetry import names
from service.telemetry.histograms import HistogramSet

# Seconds. Unary calls take ~1 ms on a GPU for a short text and seconds for a big batch on a
# CPU; stream calls last as long as the bulk job.
CALL_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
# Seconds an item waits in the queue: about nothing when idle, batches' worth when busy.
QUEUE_WAIT_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# Seconds one batch spends in the engine.
ENGINE_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
)  # fmt: skip
# Counts, not seconds: powers of two up to past the default limits (256 items, 8192 tokens).
BATCH_ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (
    16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072,
)  # fmt: skip


class QueueSource(Protocol):
    """What the gauges read of the batcher (service.batching.Batcher satisfies it)."""

    @property
    def queued_items(self) -> int: ...

    @property
    def queued_tokens(self) -> int: ...

    @property
    def inflight_batches(self) -> int: ...

    def oldest_inflight_age_s(self) -> float: ...


class EngineSource(Protocol):
    @property
    def alive(self) -> bool: ...


class CacheSource(Protocol):
    """What the cache metrics read (service.vector_cache.VectorCache satisfies it)."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def coalesced(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def entries(self) -> int: ...


class Instruments:
    """Every instrument of the service; the gauges read whatever `watch` last attached."""

    def __init__(self, meter: Meter, scope: InstrumentationScope | None = None) -> None:
        self._queue: QueueSource | None = None
        self._engine: EngineSource | None = None
        self._cache: CacheSource | None = None
        # What the readers add to each collection (HistogramReader.attach).
        self.histograms = HistogramSet(scope or InstrumentationScope(names.INSTRUMENTATION_SCOPE))
        histogram = self.histograms.create

        self.rpc_duration = histogram(
            names.RPC_DURATION,
            "Duration of gRPC calls handled, by method and status code",
            CALL_BUCKETS_S,
        )
        self.http_duration = histogram(
            names.HTTP_DURATION,
            "Duration of HTTP requests handled, by method, route and status code",
            CALL_BUCKETS_S,
        )
        self.batch_items = histogram(
            names.BATCH_ITEMS, "Inputs per batch sent to the engine", BATCH_ITEM_BUCKETS
        )
        self.batch_tokens = histogram(
            names.BATCH_TOKENS, "Tokens per batch sent to the engine", BATCH_TOKEN_BUCKETS
        )
        self.queue_wait = histogram(
            names.QUEUE_WAIT,
            "Longest time an input of the batch waited from enqueue to dispatch, per batch "
            "and priority",
            QUEUE_WAIT_BUCKETS_S,
        )
        self.engine_duration = histogram(
            names.ENGINE_DURATION,
            "Time the engine took per batch; error.type is set on failed batches",
            ENGINE_BUCKETS_S,
        )
        # Counters are plain integers read at collection time: the SDK's Counter.add costs
        # ~6 us per call with attributes, and these move on every batch.
        self._inputs: dict[str, int] = {}  # by priority
        self._tokens: dict[str, int] = {}
        self._truncations = 0
        self._rejections: dict[tuple[str, str], int] = {}  # (reason, priority)
        meter.create_observable_counter(
            names.INPUTS[0],
            [self._observe_inputs],
            names.INPUTS[1],
            "Inputs embedded by the engine, by priority (interactive, bulk)",
        )
        meter.create_observable_counter(
            names.TOKENS[0],
            [self._observe_tokens],
            names.TOKENS[1],
            "Tokens embedded by the engine, by priority",
        )
        meter.create_observable_counter(
            names.TRUNCATIONS[0],
            [self._observe_truncations],
            names.TRUNCATIONS[1],
            "Inputs truncated to the model's limit (options.truncate)",
        )
        meter.create_observable_counter(
            names.REJECTIONS[0],
            [self._observe_rejections],
            names.REJECTIONS[1],
            "Inputs refused or dropped before the engine, by error.type: queue_full, "
            "too_large (no room even in an empty queue), deadline_expired (while queued)",
        )
        meter.create_observable_gauge(
            names.QUEUE_ITEMS[0],
            [self._observe_queue_items],
            names.QUEUE_ITEMS[1],
            "Inputs waiting in the queue (not yet in the engine); an autoscaling signal",
        )
        meter.create_observable_gauge(
            names.QUEUE_TOKENS[0],
            [self._observe_queue_tokens],
            names.QUEUE_TOKENS[1],
            "Tokens waiting in the queue (not yet in the engine); an autoscaling signal",
        )
        meter.create_observable_gauge(
            names.BATCHES_INFLIGHT[0],
            [self._observe_inflight],
            names.BATCHES_INFLIGHT[1],
            "Batches in the engine now",
        )
        meter.create_observable_gauge(
            names.ENGINE_UP[0],
            [self._observe_engine_up],
            names.ENGINE_UP[1],
            "1 while the engine is loaded and alive, else 0",
        )
        meter.create_observable_gauge(
            names.ENGINE_OLDEST_BATCH[0],
            [self._observe_oldest_batch],
            names.ENGINE_OLDEST_BATCH[1],
            "Age of the oldest batch in the engine; grows without bound when it hangs",
        )
        # The vector cache keeps plain counters of its own; no series while it is off.
        for (name, unit), attribute, text in (
            (names.CACHE_HITS, "hits", "Inputs whose vector came from the vector cache"),
            (names.CACHE_MISSES, "misses", "Inputs not found in the vector cache"),
            (
                names.CACHE_COALESCED,
                "coalesced",
                "Cache misses that shared an identical engine request already in flight",
            ),
            (names.CACHE_EVICTIONS, "evictions", "Vector cache entries evicted to stay in bounds"),
        ):
            observe = functools.partial(self._observe_cache, attribute)
            meter.create_observable_counter(name, [observe], unit, text)
        for (name, unit), attribute, text in (
            (names.CACHE_SIZE, "nbytes", "Bytes the vector cache holds: vectors, keys, overhead"),
            (names.CACHE_ENTRIES, "entries", "Vectors the vector cache holds"),
        ):
            observe = functools.partial(self._observe_cache, attribute)
            meter.create_observable_gauge(name, [observe], unit, text)

    def count_processed(self, priority: str, n_items: int, n_tokens: int) -> None:
        self._inputs[priority] = self._inputs.get(priority, 0) + n_items
        self._tokens[priority] = self._tokens.get(priority, 0) + n_tokens

    def count_truncated(self, n_inputs: int) -> None:
        self._truncations += n_inputs

    def count_rejected(self, reason: str, priority: str, n_inputs: int) -> None:
        key = (reason, priority)
        self._rejections[key] = self._rejections.get(key, 0) + n_inputs

    def watch(
        self,
        queue: QueueSource | None,
        engine: EngineSource | None,
        cache: CacheSource | None = None,
    ) -> None:
        """Point the gauges at the live batcher, engine and cache (None: report idle/down;
        no cache series at all)."""
        self._queue = queue
        self._engine = engine
        self._cache = cache

    # Gauges report 0 rather than nothing while the engine loads: an autoscaler reading a
    # missing series would stall instead of seeing an idle replica.
    def _observe_queue_items(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._queue.queued_items if self._queue else 0)]

    def _observe_queue_tokens(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._queue.queued_tokens if self._queue else 0)]

    def _observe_inflight(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._queue.inflight_batches if self._queue else 0)]

    def _observe_oldest_batch(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._queue.oldest_inflight_age_s() if self._queue else 0.0)]

    def _observe_engine_up(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(1 if self._engine is not None and self._engine.alive else 0)]

    # Collection runs on the exporter's thread: list() copies each dict in one step under
    # the GIL, so a key added meanwhile on the event loop cannot break the iteration.
    def _observe_inputs(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {names.PRIORITY: p}) for p, n in list(self._inputs.items())]

    def _observe_tokens(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {names.PRIORITY: p}) for p, n in list(self._tokens.items())]

    def _observe_truncations(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._truncations)]

    def _observe_rejections(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {names.ERROR_TYPE: reason, names.PRIORITY: priority})
            for (reason, priority), n in list(self._rejections.items())
        ]

    def _observe_cache(self, attribute: str, _options: CallbackOptions) -> Iterable[Observation]:
        cache = self._cache
        return [] if cache is None else [Observation(getattr(cache, attribute))]
