"""Dynamic batcher: a bounded two-priority queue in front of the engine, drained by one task.

The shape follows TEI's router: callers only *enqueue* (cheap, synchronous, all-or-nothing
admission), and a single batching task - the actor - is the only code that takes items off
the queues, so batch formation needs no locks. The actor forms a batch under a token budget
and an item cap, holds a non-full batch for at most ``max_wait_s``, and keeps at most
``max_inflight_batches`` batches in the engine, so one batch runs while the next is formed.

This module knows nothing about vLLM or gRPC: it talks to the ``Engine`` protocol only and
reports problems as plain exceptions that the servicer maps to status codes.

Clock note: ``clock`` timestamps items and is what deadlines and ``max_wait_s`` are measured
against; it must tick in seconds, because the actor sleeps on event-loop timers for the
remaining wait. A test clock that never advances simply means "not yet waited long enough".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from service.engines.base import Engine, EngineUnavailableError

logger = logging.getLogger(__name__)

# retry_after_s is a hint, never zero: a client that retries at once only adds load.
_MIN_RETRY_AFTER_S = 0.005
_MAX_RETRY_AFTER_S = 30.0
# Weight of the newest batch in the running estimate of batch latency (for retry hints).
_LATENCY_EWMA_WEIGHT = 0.2
# An INTERACTIVE item within this many seconds means unary callers are live, and BULK
# batches shrink to the interactive step budget (BatcherLimits.interactive_step_s). Longer
# than one slow call, so a caller that waited behind a full-size batch keeps the cap on.
_INTERACTIVE_LIVE_S = 2.0
# Unary calls arrive one by one, so their batches are small; they may go to the engine past
# max_inflight_batches (up to this many times as many batches) as long as the engine holds
# less than max_inflight_batches full batches' worth of tokens. Counting each small batch as
# a full slot would keep the rest waiting here while vLLM runs half-empty steps.
_INTERACTIVE_INFLIGHT_FACTOR = 8
# Cancelled items stay in their deque until the actor reaches them (removing from the middle
# of a deque is O(n)); compact once they outnumber the live ones so memory stays bounded.
_MIN_DEAD_BEFORE_COMPACT = 64


class Priority(enum.IntEnum):
    """Lower value is served first."""

    INTERACTIVE = 0  # unary calls: always taken before BULK
    BULK = 1  # stream items


# Iterating an Enum class is a Python-level generator: the per-item paths use these instead.
_PRIORITIES = tuple(Priority)
_UP_TO = {p: tuple(q for q in _PRIORITIES if q <= p) for p in _PRIORITIES}


@dataclass(frozen=True)
class BatcherLimits:
    max_batch_tokens: int  # token budget of one batch (sum of len(token_ids))
    max_batch_items: int  # item cap of one batch
    max_wait_s: float  # how long a non-full batch may wait, from its oldest item's enqueue
    max_queue_tokens: int  # bound on queued (not yet dispatched) tokens
    max_queue_items: int  # bound on queued items
    # BULK may fill at most this fraction of the queue bounds; the rest is kept for
    # INTERACTIVE, so a stream that keeps the queue full cannot lock unary callers out.
    bulk_queue_share: float = 0.75
    max_inflight_batches: int = 2  # one batch runs while the next forms/waits
    # While unary callers are live, BULK tokens per batch are capped so a batch takes about
    # this long in the engine: a unary call arriving behind it waits at most that (the
    # engine runs INTERACTIVE batches first). 0: no cap.
    interactive_step_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_items", "max_queue_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_queue_items < 1 or self.max_inflight_batches < 1:
            raise ValueError("max_queue_items and max_inflight_batches must be >= 1")
        if self.max_wait_s < 0 or self.interactive_step_s < 0:
            raise ValueError("max_wait_s and interactive_step_s must be >= 0")
        if not 0.0 < self.bulk_queue_share <= 1.0:
            raise ValueError("bulk_queue_share must be in (0, 1]")


@dataclass(frozen=True)
class ItemResult:
    vector: npt.NDArray[np.float32]  # 1-D row from the engine
    queue_s: float  # enqueue -> dispatch
    inference_s: float  # dispatch -> engine returned
    batch: object | None = None  # what BatchObserver.dispatched returned (telemetry's span)


class QueuedItem(Protocol):
    """What a BatchObserver may read of a queued item."""

    @property
    def n_tokens(self) -> int: ...

    @property
    def priority(self) -> Priority: ...

    @property
    def enqueued_at(self) -> float: ...

    @property
    def context(self) -> object | None:
        """Opaque, from the caller of submit (telemetry: the calling span, for links)."""
        ...


class BatchObserver(Protocol):
    """Telemetry hooks, called on the batching task: they must be quick and must not raise.

    Times are in the batcher's clock. Rejection reasons: "queue_full" (no room now),
    "too_large" (no room even in an empty queue), "deadline_expired" (while queued).
    """

    def dispatched(self, items: Sequence[QueuedItem], now: float) -> object | None:
        """A batch goes to the engine; the return value comes back in `finished` and in
        each item's ItemResult.batch."""
        ...

    def finished(
        self,
        handle: object | None,
        items: Sequence[QueuedItem],
        engine_s: float,
        error: BaseException | None,
    ) -> None:
        """The engine call ended: with vectors (error None), an exception, or cancelled."""
        ...

    def rejected(self, reason: str, priority: Priority, n_items: int) -> None: ...


class QueueFullError(Exception):
    """Admission refused; ``reason`` names the bound that was hit and its limit."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExpiredError(Exception):
    """The item's deadline passed before it was dispatched; it never reached the engine."""


class BatcherClosedError(Exception):
    """The batcher is closing or closed."""


@dataclass(eq=False)
class _Batch:
    items: list[_Item]
    dispatched_at: float
    open_items: int  # items whose caller still waits; at 0 the engine work is pointless
    tokens: int = 0
    task: asyncio.Task[None] | None = None
    finished: bool = False
    observed: object | None = None  # BatchObserver.dispatched's handle

    def item_done(self) -> None:
        """A caller went away while the batch ran; abort the engine call if it was the last."""
        if self.finished:
            return
        self.open_items -= 1
        if self.open_items == 0 and self.task is not None:
            self.task.cancel()  # engines abort on cancellation: free the GPU for live work


@dataclass(eq=False)
class _Item:
    token_ids: Sequence[int]
    n_tokens: int
    priority: Priority
    enqueued_at: float
    deadline: float | None
    future: asyncio.Future[ItemResult]
    queued: bool = True  # still counted in the queue counters
    batch: _Batch | None = None
    context: object | None = None  # the caller's, for the observer (QueuedItem.context)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False)
class _Waiter:
    """A submit_when_ready call parked until its item fits."""

    token_ids: Sequence[int]
    n_tokens: int
    priority: Priority
    deadline: float | None
    context: object | None
    # Resolved with the item's future: the admitting code enqueues on the waiter's behalf, so
    # the space is taken at once and two waiters woken together cannot both claim it.
    granted: asyncio.Future[asyncio.Future[ItemResult]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    item: _Item | None = None  # set when admitted


class _Bound(NamedTuple):
    unit: str  # "tokens" or "items"
    queued: int
    limit: int
    name: str


class Batcher:
    """Token-budget dynamic batcher with priorities, deadlines and backpressure."""

    def __init__(
        self,
        engine: Engine,
        limits: BatcherLimits,
        clock: Callable[[], float] = time.monotonic,
        observer: BatchObserver | None = None,
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._clock = clock
        self._observer = observer
        self._queues: dict[Priority, deque[_Item]] = {p: deque() for p in Priority}
        self._tokens: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._items: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._dead = 0  # released items still sitting in a deque
        self._waiters: dict[Priority, deque[_Waiter]] = {p: deque() for p in Priority}
        self._inflight: set[_Batch] = set()
        self._inflight_tokens = 0
        self._wakeup = asyncio.Event()  # "state changed": the actor re-evaluates
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._batch_latency_s = max(limits.max_wait_s, 0.01)  # prior until a batch is seen
        self._tokens_per_s = 0.0  # engine speed seen on recent batches; 0: not yet known
        self._last_interactive_at = -math.inf
        self._bulk_token_cap = int(limits.max_queue_tokens * limits.bulk_queue_share)
        self._bulk_item_cap = int(limits.max_queue_items * limits.bulk_queue_share)
        self._bulk_share = f"{limits.bulk_queue_share:.0%} BULK share of"

    # ----------------------------------------------------------------- public surface

    @property
    def queued_items(self) -> int:
        return sum(self._items.values())

    @property
    def queued_tokens(self) -> int:
        return sum(self._tokens.values())

    @property
    def inflight_batches(self) -> int:
        return len(self._inflight)

    def oldest_inflight_age_s(self) -> float:
        """How long the oldest batch has been in the engine: a watchdog's view of a hang."""
        now = self._clock()
        return max((now - b.dispatched_at for b in self._inflight), default=0.0)

    def estimated_wait_s(self, priority: Priority) -> float:
        """Rough time until a new item of this priority is embedded, from recent batches."""
        ahead = sum(self._tokens[p] for p in _UP_TO[priority])
        batches = 1 + ahead // self._limits.max_batch_tokens
        return batches * self._batch_latency_s / self._limits.max_inflight_batches

    def fail_all(self, error: Exception) -> None:
        """The engine is gone: every caller, queued, waiting or in flight, gets `error`."""
        self._closing = True
        self._fail_queued(error)
        self._fail_waiters(error)
        for batch in list(self._inflight):
            for item in batch.items:
                if not item.future.done():
                    item.future.set_exception(error)
            if batch.task is not None:
                batch.task.cancel()
        self._wakeup.set()

    async def start(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Refuse new work, fail what is queued, and drain what the engine already has."""
        if not self._closing:
            self._closing = True
            self._fail_queued()
            self._fail_waiters()
            self._wakeup.set()
        # asyncio.wait, not gather: if close() itself is cancelled, in-flight batches must
        # still finish for their callers.
        if self._task is not None:
            await asyncio.wait([self._task])
        running = [b.task for b in self._inflight if b.task is not None]
        if running:
            await asyncio.wait(running)

    def submit(
        self,
        token_ids: Sequence[Sequence[int]],
        priority: Priority,
        deadline: float | None = None,
        context: object | None = None,
    ) -> list[asyncio.Future[ItemResult]]:
        """Admit all items of one request or none of them (a partial answer is useless).

        `context` is opaque here; the observer gets it back with each item.
        """
        self._ensure_open()
        sizes = [self._checked_size(ids) for ids in token_ids]
        if not sizes:
            return []
        never = self._refusal(sum(sizes), len(sizes), priority, empty_queue=True)
        if never is not None:
            self._rejected("too_large", priority, len(sizes))
            raise QueueFullError(
                f"{never.reason}; the request can never be admitted", _MAX_RETRY_AFTER_S
            )
        if self._waiters_ahead(priority):
            # Parked submit_when_ready callers came first; jumping them would starve them.
            self._rejected("queue_full", priority, len(sizes))
            raise QueueFullError(
                f"queue full: callers of priority {priority.name} or higher are waiting",
                self._retry_after(self.queued_tokens, self._limits.max_batch_tokens),
            )
        refusal = self._refusal(sum(sizes), len(sizes), priority)
        if refusal is not None:
            self._rejected("queue_full", priority, len(sizes))
            raise refusal
        items = [
            self._enqueue(ids, n, priority, deadline, context)
            for ids, n in zip(token_ids, sizes, strict=True)
        ]
        self._wakeup.set()
        return [item.future for item in items]

    async def submit_when_ready(
        self,
        token_ids: Sequence[int],
        priority: Priority = Priority.BULK,
        deadline: float | None = None,
        context: object | None = None,
    ) -> asyncio.Future[ItemResult]:
        """Enqueue one item, waiting (FIFO per priority) for space: backpressure for streams."""
        self._ensure_open()
        n_tokens = self._checked_size(token_ids)
        never = self._refusal(n_tokens, 1, priority, empty_queue=True)
        if never is not None:
            self._rejected("too_large", priority, 1)
            raise QueueFullError(
                f"{never.reason}; the item can never be admitted", _MAX_RETRY_AFTER_S
            )
        if not self._waiters_ahead(priority) and self._refusal(n_tokens, 1, priority) is None:
            item = self._enqueue(token_ids, n_tokens, priority, deadline, context)
            self._wakeup.set()
            return item.future
        waiter = _Waiter(token_ids, n_tokens, priority, deadline, context)
        self._waiters[priority].append(waiter)
        try:
            return await waiter.granted
        except BaseException:
            self._abandon(waiter)
            raise

    # ------------------------------------------------------------- admission control

    def _ensure_open(self) -> None:
        if self._closing:
            raise BatcherClosedError("batcher is closed")

    def _checked_size(self, token_ids: Sequence[int]) -> int:
        n = len(token_ids)
        if n == 0:
            raise ValueError("an item must have at least one token")
        if n > self._limits.max_batch_tokens:
            # Such an item could never be batched; it would block its queue forever.
            raise ValueError(
                f"item has {n} tokens > max_batch_tokens={self._limits.max_batch_tokens}"
            )
        return n

    def _bounds(self, priority: Priority) -> list[_Bound]:
        limits = self._limits
        bounds = [
            _Bound("tokens", self.queued_tokens, limits.max_queue_tokens, "max_queue_tokens"),
            _Bound("items", self.queued_items, limits.max_queue_items, "max_queue_items"),
        ]
        if priority is Priority.BULK:
            share = self._bulk_share
            bulk = Priority.BULK
            bounds += [
                _Bound(
                    "tokens", self._tokens[bulk], self._bulk_token_cap, f"{share} max_queue_tokens"
                ),
                _Bound("items", self._items[bulk], self._bulk_item_cap, f"{share} max_queue_items"),
            ]
        return bounds

    def _refusal(
        self, n_tokens: int, n_items: int, priority: Priority, empty_queue: bool = False
    ) -> QueueFullError | None:
        """The error to raise if the items do not fit now (or even into an empty queue)."""
        for bound in self._bounds(priority):
            wanted = n_tokens if bound.unit == "tokens" else n_items
            queued = 0 if empty_queue else bound.queued
            if queued + wanted > bound.limit:
                reason = (
                    f"queue full: {queued} queued + {wanted} requested {bound.unit}"
                    f" > {bound.limit} ({bound.name})"
                )
                per_batch = self._limits.max_batch_tokens
                if bound.unit == "items":
                    per_batch = self._limits.max_batch_items
                return QueueFullError(
                    reason, self._retry_after(queued + wanted - bound.limit, per_batch)
                )
        return None

    def _retry_after(self, deficit: int, per_batch: int) -> float:
        # Space frees one dispatched batch at a time; batches leave at about
        # max_inflight_batches per batch latency.
        batches = max(1, math.ceil(deficit / per_batch))
        estimate = batches * self._batch_latency_s / self._limits.max_inflight_batches
        return min(max(estimate, _MIN_RETRY_AFTER_S), _MAX_RETRY_AFTER_S)

    def _waiters_ahead(self, priority: Priority) -> bool:
        return any(self._waiters[p] for p in _UP_TO[priority])

    def _rejected(self, reason: str, priority: Priority, n_items: int) -> None:
        if self._observer is not None:
            self._observer.rejected(reason, priority, n_items)

    def _enqueue(
        self,
        token_ids: Sequence[int],
        n_tokens: int,
        priority: Priority,
        deadline: float | None,
        context: object | None = None,
    ) -> _Item:
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        item = _Item(
            token_ids, n_tokens, priority, self._clock(), deadline, future, context=context
        )
        self._queues[priority].append(item)
        if priority is Priority.INTERACTIVE:
            self._last_interactive_at = item.enqueued_at
        self._tokens[priority] += n_tokens
        self._items[priority] += 1
        future.add_done_callback(functools.partial(self._on_item_done, item))
        return item

    def _admit_waiters(self) -> bool:
        """Hand freed space to parked callers: INTERACTIVE first, FIFO within a priority.

        Returns whether anything was admitted.
        """
        admitted = False
        for priority in _PRIORITIES:
            waiters = self._waiters[priority]
            while waiters:
                waiter = waiters[0]
                if waiter.granted.done():  # its caller is gone (defensive; _abandon removes it)
                    waiters.popleft()
                    continue
                if self._refusal(waiter.n_tokens, 1, priority) is not None:
                    # Stop at the first that does not fit: later (or lower-priority) waiters
                    # must not overtake it, or a large item could wait forever.
                    return admitted
                waiters.popleft()
                waiter.item = self._enqueue(
                    waiter.token_ids, waiter.n_tokens, priority, waiter.deadline, waiter.context
                )
                waiter.granted.set_result(waiter.item.future)
                self._wakeup.set()
                admitted = True
        return admitted

    def _abandon(self, waiter: _Waiter) -> None:
        """The submit_when_ready caller went away: leave no trace of it."""
        with contextlib.suppress(ValueError):
            self._waiters[waiter.priority].remove(waiter)
        item = waiter.item
        if item is not None:
            # Admitted, but cancelled before it could resume: give the space back now rather
            # than when the done-callback runs, so the caller's counters look untouched.
            item.future.cancel()
            if item.queued:
                self._drop_queued(item)
        self._admit_waiters()  # it may have been the head that blocked others

    # ------------------------------------------------------------- queue bookkeeping

    def _release(self, item: _Item) -> None:
        """The item stops counting against the queue bounds."""
        item.queued = False
        self._tokens[item.priority] -= item.n_tokens
        self._items[item.priority] -= 1

    def _drop_queued(self, item: _Item) -> None:
        """Release an item that stays in its deque (cancelled); the actor skips it later."""
        self._release(item)
        self._dead += 1
        if self._dead > max(_MIN_DEAD_BEFORE_COMPACT, self.queued_items):
            self._compact()
        self._admit_waiters()

    def _compact(self) -> None:
        for priority in Priority:
            self._queues[priority] = deque(i for i in self._queues[priority] if i.queued)
        self._dead = 0

    def _on_item_done(self, item: _Item, _future: asyncio.Future[ItemResult]) -> None:
        # Runs for every outcome; only a caller that went away early needs handling.
        if item.queued:
            self._drop_queued(item)
        elif item.batch is not None:
            item.batch.item_done()

    def _live_head(self, queue: deque[_Item], now: float) -> _Item | None:
        """Pop released, cancelled and expired items off the head; return the live head."""
        while queue:
            item = queue[0]
            if not item.queued:
                queue.popleft()
                self._dead -= 1
            elif item.future.done():  # cancelled; its done-callback has not run yet
                queue.popleft()
                self._release(item)
            elif item.expired(now):
                queue.popleft()
                self._release(item)
                self._rejected("deadline_expired", item.priority, 1)
                item.future.set_exception(DeadlineExpiredError("deadline passed while queued"))
            else:
                return item
        return None

    def _fail_queued(self, error: Exception | None = None) -> None:
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                if item.queued:
                    self._release(item)
                    if not item.future.done():
                        item.future.set_exception(error or BatcherClosedError("batcher closed"))
        self._dead = 0

    def _fail_waiters(self, error: Exception | None = None) -> None:
        for waiters in self._waiters.values():
            while waiters:
                waiter = waiters.popleft()
                if not waiter.granted.done():
                    waiter.granted.set_exception(error or BatcherClosedError("batcher closed"))

    # ------------------------------------------------------------------- the actor

    async def _run(self) -> None:
        try:
            while not self._closing:
                await self._step()
        except Exception:
            # A bug here would otherwise leave every caller hanging; fail loudly instead.
            logger.exception("batching task crashed; closing the batcher")
            self._closing = True
            self._fail_queued()
            self._fail_waiters()

    async def _step(self) -> None:
        now = self._clock()
        hold = self._hold_for(now)
        # Space freed by the last dispatch, or by purging expired/cancelled heads just now.
        if self._admit_waiters():
            return  # the queue changed: re-evaluate
        if hold is None:
            await self._sleep(None)
        elif hold > 0:
            await self._sleep(hold)
        else:
            batch = self._take_batch(now)
            if batch:
                self._dispatch(batch, now)

    def _engine_has_room(self, priority: Priority) -> bool:
        """Whether a batch of `priority` items may go to the engine now."""
        limits = self._limits
        if len(self._inflight) < limits.max_inflight_batches:
            return True
        return (
            priority is Priority.INTERACTIVE
            and len(self._inflight) < _INTERACTIVE_INFLIGHT_FACTOR * limits.max_inflight_batches
            and self._inflight_tokens < limits.max_inflight_batches * limits.max_batch_tokens
        )

    def _hold_for(self, now: float) -> float | None:
        """None: nothing to do until woken. 0: dispatch now. >0: wait this long for more items."""
        ready = [p for p in _PRIORITIES if self._engine_has_room(p)]
        heads = [h for p in ready if (h := self._live_head(self._queues[p], now)) is not None]
        if not heads:
            return None
        limits = self._limits
        # Queued totals are what the next batch draws from, so they tell whether it is full.
        if (
            sum(self._items[p] for p in ready) >= limits.max_batch_items
            or sum(self._tokens[p] for p in ready) >= limits.max_batch_tokens
        ):
            return 0.0
        oldest = min(h.enqueued_at for h in heads)
        return max(0.0, oldest + limits.max_wait_s - now)

    async def _sleep(self, delay_s: float | None) -> None:
        """Wait for a state change, or at most delay_s (the rest of a forming batch's wait)."""
        # Clearing right before waiting is safe: state was checked with no await in between.
        self._wakeup.clear()
        if delay_s is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._wakeup.wait()

    def _take_batch(self, now: float) -> list[_Item]:
        """INTERACTIVE first, then BULK, FIFO; stop before the first item that does not fit.

        Stopping (rather than skipping to smaller items) keeps FIFO order and guarantees a big
        item is first in line for the next batch.
        """
        batch: list[_Item] = []
        tokens = 0
        for priority in _PRIORITIES:
            if not self._engine_has_room(priority):
                continue
            budget = self._token_budget(priority, now)
            queue = self._queues[priority]
            while (item := self._live_head(queue, now)) is not None:
                if len(batch) >= self._limits.max_batch_items:
                    return batch
                # The first item always fits: submit refuses items over max_batch_tokens.
                if batch and tokens + item.n_tokens > budget:
                    return batch
                queue.popleft()
                self._release(item)
                batch.append(item)
                tokens += item.n_tokens
        return batch

    def _token_budget(self, priority: Priority, now: float) -> int:
        """Tokens a batch may hold once items of `priority` join it."""
        full = self._limits.max_batch_tokens
        step_s = self._limits.interactive_step_s
        if (
            priority is Priority.INTERACTIVE
            or not step_s
            or not self._tokens_per_s
            or now - self._last_interactive_at > _INTERACTIVE_LIVE_S
        ):
            return full
        return min(full, max(1, int(self._tokens_per_s * step_s)))

    def _dispatch(self, items: list[_Item], now: float) -> None:
        batch = _Batch(
            items, dispatched_at=now, open_items=len(items), tokens=sum(i.n_tokens for i in items)
        )
        for item in items:
            item.batch = batch
        if self._observer is not None:
            batch.observed = self._observer.dispatched(items, now)
        batch.task = asyncio.create_task(self._run_batch(batch))
        self._inflight.add(batch)
        self._inflight_tokens += batch.tokens

    async def _run_batch(self, batch: _Batch) -> None:
        error: BaseException | None = None
        try:
            # The engine runs a batch holding any INTERACTIVE item ahead of queued BULK ones.
            priority = min(item.priority for item in batch.items)
            vectors = await self._engine.embed([i.token_ids for i in batch.items], int(priority))
            self._deliver(batch, vectors)
        except asyncio.CancelledError as exc:
            # Either every caller left (nothing to deliver) or the loop is shutting down.
            error = exc
            for item in batch.items:
                item.future.cancel()
            raise
        except Exception as exc:
            # The batcher survives a failed batch; only this batch's callers see the error.
            error = exc
            for item in batch.items:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            batch.finished = True
            if batch in self._inflight:
                self._inflight.discard(batch)
                self._inflight_tokens -= batch.tokens
            self._wakeup.set()  # a slot is free
            if self._observer is not None:
                engine_s = self._clock() - batch.dispatched_at
                self._observer.finished(batch.observed, batch.items, engine_s, error)

    def _deliver(self, batch: _Batch, vectors: npt.NDArray[np.float32]) -> None:
        items = batch.items
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise EngineUnavailableError(
                f"engine returned shape {vectors.shape} for a batch of {len(items)} items"
            )
        done_at = self._clock()
        inference_s = done_at - batch.dispatched_at
        self._batch_latency_s += _LATENCY_EWMA_WEIGHT * (inference_s - self._batch_latency_s)
        if inference_s > 0:
            # Includes time spent behind another in-flight batch, so it errs slow: bulk
            # batches sized from it finish early rather than late.
            rate = sum(item.n_tokens for item in items) / inference_s
            weight = _LATENCY_EWMA_WEIGHT if self._tokens_per_s else 1.0
            self._tokens_per_s += weight * (rate - self._tokens_per_s)
        for row, item in enumerate(items):
            if not item.future.done():
                result = ItemResult(
                    vectors[row],
                    batch.dispatched_at - item.enqueued_at,
                    inference_s,
                    batch.observed,
                )
                item.future.set_result(result)
