"""The batching task: the one actor that takes items off the queues and feeds the engine.

The shape follows TEI's router: callers only *enqueue* (service.batching.queues), and a
single batching task is the only code that takes items off the queues, so batch formation
needs no locks. It forms a batch under a token budget and an item cap, holds a non-full
batch for at most ``max_wait_s``, and keeps at most ``max_inflight_batches`` batches in the
engine, so one batch runs while the next waits there.

Interactive latency under bulk load comes from four rules:
- a batch takes INTERACTIVE items first, and the engine runs batches holding them first
  (the priority passed to the engine: vLLM's priority scheduling);
- BULK batches are sized from the measured engine speed to take about
  ``interactive_step_s`` (service.batching.pacing), always, because the engine cannot
  pre-empt a step that is running: whenever a unary call arrives, it waits for one such
  step at most, whether or not unary traffic came before it;
- a BULK batch still waiting in the engine behind another BULK batch is *recalled* when an
  INTERACTIVE batch goes in: its sequences are aborted and its items go back to the front
  of their queues. Without that, the engine would run it in the same step as the unary
  call (a step takes everything waiting), and the call would wait for two bulk steps;
- INTERACTIVE batches may go to the engine past the in-flight limit (unary calls arrive one
  by one, in small batches) as long as the engine holds little work.

This module knows nothing about vLLM or gRPC: it talks to the ``Engine`` protocol only and
reports problems as plain exceptions that the faces map to their errors.

Clock note: ``clock`` timestamps items and is what deadlines and ``max_wait_s`` are measured
against; it must tick in seconds, because the actor sleeps on event-loop timers for the
remaining wait. A test clock that never advances simply means "not yet waited long enough".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from service.batching.limits import PRIORITIES, UP_TO, BatcherLimits, ItemResult, Priority
from service.batching.pacing import EngineSpeed
from service.batching.queues import Item, Queues
from service.engines.base import Engine
from service.errors import EngineUnavailableError

logger = logging.getLogger(__name__)

# Unary calls arrive one by one, so their batches are small; they may go to the engine past
# max_inflight_batches (up to this many times as many batches) as long as the engine holds
# less than max_inflight_batches full batches' worth of tokens. Counting each small batch as
# a full slot would keep the rest waiting here while vLLM runs half-empty steps.
_INTERACTIVE_INFLIGHT_FACTOR = 8


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


class ItemSubmitter(Protocol):
    """What callers of the batcher use: the Batcher itself, or the vector cache in front of
    it (service.vector_cache.CachingBatcher), which answers repeated inputs without it."""

    # Positional, as the pipeline calls them; the Batcher's own docstrings say what they do.
    def submit(
        self,
        ids: Sequence[Sequence[int]],
        priority: Priority,
        deadline: float | None,
        ctx: object,
        /,
    ) -> list[asyncio.Future[ItemResult]]: ...

    async def submit_when_ready(
        self,
        ids: Sequence[int],
        priority: Priority,
        deadline: float | None,
        ctx: object,
        flow: object,
        /,
    ) -> asyncio.Future[ItemResult]: ...

    def estimated_wait_s(self, priority: Priority) -> float: ...


class BatchRecalledError(Exception):
    """The batch was taken back from the engine before it ran; its items are queued again."""


@dataclass(eq=False)
class _Batch:
    items: list[Item]
    dispatched_at: float
    open_items: int  # items whose caller still waits; at 0 the engine work is pointless
    tokens: int = 0
    bulk: bool = False  # BULK items only
    task: asyncio.Task[None] | None = None
    finished: bool = False
    recalled: bool = False
    observed: object | None = None  # BatchObserver.dispatched's handle

    def item_done(self) -> None:
        """A caller went away while the batch ran; abort the engine call if it was the last."""
        if self.finished:
            return
        self.open_items -= 1
        if self.open_items == 0 and self.task is not None:
            self.task.cancel()  # engines abort on cancellation: free the GPU for live work


class Batcher:
    """Token-budget dynamic batcher with priorities, fair shares, deadlines and backpressure."""

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
        self._speed = EngineSpeed(prior_latency_s=max(limits.max_wait_s, 0.01))
        self._wakeup = asyncio.Event()  # "state changed": the actor re-evaluates
        self._queues = Queues(
            limits, clock, lambda: self._speed.batch_latency_s, self._rejected, self._wakeup.set
        )
        self._inflight: dict[_Batch, None] = {}  # in dispatch order
        self._inflight_tokens = 0
        self._task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- public surface

    @property
    def queued_items(self) -> int:
        return self._queues.queued_items

    @property
    def queued_tokens(self) -> int:
        return self._queues.queued_tokens

    @property
    def inflight_batches(self) -> int:
        return len(self._inflight)

    @property
    def engine_tokens_per_s(self) -> float:
        """The engine's measured speed (0 before the first batch)."""
        return self._speed.tokens_per_s

    def oldest_inflight_age_s(self) -> float:
        """How long the oldest batch has been in the engine: a watchdog's view of a hang."""
        now = self._clock()
        return max((now - b.dispatched_at for b in self._inflight), default=0.0)

    def estimated_wait_s(self, priority: Priority) -> float:
        """Rough time until a new item of this priority is embedded, from recent batches."""
        ahead = sum(self._queues.tokens(p) for p in UP_TO[priority])
        batches = 1 + ahead // self._limits.max_batch_tokens
        return batches * self._speed.batch_latency_s / self._limits.max_inflight_batches

    def fail_all(self, error: Exception) -> None:
        """The engine is gone: every caller, queued, waiting or in flight, gets `error`."""
        self._queues.closed = True
        self._queues.fail_queued(error)
        self._queues.fail_waiters(error)
        for batch in list(self._inflight):
            for item in batch.items:
                if not item.future.done():
                    item.future.set_exception(error)
            if batch.task is not None:
                batch.task.cancel()
        self._wakeup.set()

    async def start(self) -> None:
        if self._task is None and not self._queues.closed:
            self._task = asyncio.create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Refuse new work, fail what is queued, and drain what the engine already has."""
        if not self._queues.closed:
            self._queues.closed = True
            self._queues.fail_queued()
            self._queues.fail_waiters()
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
        return self._queues.admit_all(token_ids, priority, deadline, context)

    async def submit_when_ready(
        self,
        token_ids: Sequence[int],
        priority: Priority = Priority.BULK,
        deadline: float | None = None,
        context: object | None = None,
        flow: object | None = None,
    ) -> asyncio.Future[ItemResult]:
        """Enqueue one item, waiting for space: backpressure for streams.

        `flow` names the fair share the item belongs to (its stream): BULK flows share the
        queue's space and the engine's batches evenly.
        """
        return await self._queues.admit_when_ready(token_ids, priority, deadline, context, flow)

    def _rejected(self, reason: str, priority: Priority, n_items: int) -> None:
        if self._observer is not None:
            self._observer.rejected(reason, priority, n_items)

    # ------------------------------------------------------------------- the actor

    async def _run(self) -> None:
        try:
            while not self._queues.closed:
                await self._step()
        except Exception:
            # A bug here would otherwise leave every caller hanging; fail loudly instead.
            logger.exception("batching task crashed; closing the batcher")
            self._queues.closed = True
            self._queues.fail_queued()
            self._queues.fail_waiters()

    async def _step(self) -> None:
        now = self._clock()
        hold = self._hold_for(now)
        # Space freed by the last dispatch, or by purging expired/cancelled heads just now.
        if self._queues.admit_waiters():
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
        queues = self._queues
        ready = [p for p in PRIORITIES if self._engine_has_room(p)]
        heads = [h for p in ready if (h := queues.head(p, now)) is not None]
        if not heads:
            return None
        limits = self._limits
        # Queued totals are what the next batch draws from, so they tell whether it is full.
        if sum(queues.items(p) for p in ready) >= limits.max_batch_items or sum(
            queues.tokens(p) for p in ready
        ) >= self._token_budget(ready[-1]):
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

    def _take_batch(self, now: float) -> list[Item]:
        """INTERACTIVE first, FIFO; then BULK, fairly across flows. Stop before the first
        item that does not fit.

        Stopping (rather than skipping to smaller items) keeps the order and guarantees a
        big item is first in line for the next batch.
        """
        queues = self._queues
        batch: list[Item] = []
        tokens = 0
        for priority in PRIORITIES:
            if not self._engine_has_room(priority):
                continue
            budget = self._token_budget(priority)
            while (item := queues.head(priority, now)) is not None:
                if len(batch) >= self._limits.max_batch_items:
                    return batch
                # The first item always goes, alone if it is over the budget: submit
                # refuses only items the engine could never run (over max_item_tokens).
                if batch and tokens + item.n_tokens > budget:
                    return batch
                batch.append(queues.take(priority, now))
                tokens += item.n_tokens
        return batch

    def _token_budget(self, priority: Priority) -> int:
        """Tokens a batch may hold once items of `priority` join it."""
        full = self._limits.max_batch_tokens
        if priority is Priority.INTERACTIVE:
            return full
        step = self._speed.tokens_in(self._limits.interactive_step_s)
        return full if step is None else min(full, step)

    def _dispatch(self, items: list[Item], now: float) -> None:
        bulk = all(i.priority is Priority.BULK for i in items)
        batch = _Batch(
            items,
            dispatched_at=now,
            open_items=len(items),
            tokens=sum(i.n_tokens for i in items),
            bulk=bulk,
        )
        if not bulk:
            self._recall_waiting_bulk()
        for item in items:
            item.batch = batch
        if self._observer is not None:
            batch.observed = self._observer.dispatched(items, now)
        self._speed.dispatched(now)
        batch.task = asyncio.create_task(self._run_batch(batch))
        self._inflight[batch] = None
        self._inflight_tokens += batch.tokens

    def _recall_waiting_bulk(self) -> None:
        """Take back the BULK batches that wait in the engine behind another BULK batch.

        The oldest BULK batch in flight is (about to be) running and stays. One only ever
        waits behind a BULK batch, never behind a unary one, so continuous unary traffic
        cannot keep bulk work out of the engine.
        """
        recalled = [b for b in self._inflight if b.bulk][1:]
        for batch in recalled:
            batch.recalled = True
            if batch.task is not None:
                batch.task.cancel()  # the engine aborts its sequences
            del self._inflight[batch]
            self._inflight_tokens -= batch.tokens
        if recalled:
            # All at once, in dispatch order, so each flow keeps its order.
            self._queues.requeue([i for b in recalled for i in b.items])

    async def _run_batch(self, batch: _Batch) -> None:
        error: BaseException | None = None
        try:
            # The engine runs a batch holding any INTERACTIVE item ahead of queued BULK ones.
            priority = min(item.priority for item in batch.items)
            vectors = await self._engine.embed([i.token_ids for i in batch.items], int(priority))
            self._deliver(batch, vectors)
        except asyncio.CancelledError as exc:
            if batch.recalled:
                # Taken back before it ran; its items are queued again already.
                error = BatchRecalledError()
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                return
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
            done_at = self._clock()
            self._speed.finished(batch.tokens, batch.dispatched_at, done_at, error is None)
            if batch in self._inflight:
                del self._inflight[batch]
                self._inflight_tokens -= batch.tokens
            self._wakeup.set()  # a slot is free
            if self._observer is not None:
                engine_s = done_at - batch.dispatched_at
                self._observer.finished(batch.observed, batch.items, engine_s, error)

    def _deliver(self, batch: _Batch, vectors: npt.NDArray[np.float32]) -> None:
        items = batch.items
        if vectors.ndim != 2 or vectors.shape[0] != len(items):
            raise EngineUnavailableError(
                f"engine returned shape {vectors.shape} for a batch of {len(items)} items"
            )
        inference_s = self._clock() - batch.dispatched_at
        for row, item in enumerate(items):
            if not item.future.done():
                result = ItemResult(
                    vectors[row],
                    batch.dispatched_at - item.enqueued_at,
                    inference_s,
                    batch.observed,
                )
                item.future.set_result(result)
