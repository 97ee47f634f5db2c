"""What waits in front of the engine: admission, the two priority queues, and fair shares.

Callers only touch this through the Batcher: they enqueue (cheap, synchronous, all-or-nothing
for a request) or park until there is room (streams); the batching task takes items off
for batches. Both run on the event loop, so nothing here needs a lock.

- INTERACTIVE items (unary calls) form one FIFO queue.
- BULK items (stream items) queue per *flow*, one flow per stream. Batches take from the
  flow that has been served the fewest tokens so far (a new or returning flow starts level
  with the least-served active one, so idle time earns no credit). A small job started
  behind a big one therefore gets half of every batch at once, instead of waiting behind
  everything the big one queued.
- Parked BULK callers are admitted round-robin across flows, for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from service.batching.limits import PRIORITIES, UP_TO, BatcherLimits, ItemResult, Priority
from service.errors import BatcherClosedError, DeadlineExpiredError, QueueFullError

# retry_after_s is a hint, never zero: a client that retries at once only adds load.
MIN_RETRY_AFTER_S = 0.005
MAX_RETRY_AFTER_S = 30.0
# Cancelled items stay in their deque until the batching task reaches them (removing from
# the middle of a deque is O(n)); compact once they outnumber the live ones so memory stays
# bounded.
_MIN_DEAD_BEFORE_COMPACT = 64


class InflightBatch(Protocol):
    """What an item knows of the engine batch it went into."""

    def item_done(self) -> None:
        """The item's caller went away while the batch ran."""
        ...


@dataclass(eq=False)
class Item:
    token_ids: Sequence[int]
    n_tokens: int
    priority: Priority
    enqueued_at: float
    deadline: float | None
    future: asyncio.Future[ItemResult]
    flow: object | None = None  # BULK: which fair share it belongs to (its stream)
    queued: bool = True  # still counted in the queue counters
    batch: InflightBatch | None = None
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
    flow: object | None
    # Resolved with the item's future: the admitting code enqueues on the waiter's behalf, so
    # the space is taken at once and two waiters woken together cannot both claim it.
    granted: asyncio.Future[asyncio.Future[ItemResult]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    item: Item | None = None  # set when admitted


class _Bound(NamedTuple):
    unit: str  # "tokens" or "items"
    queued: int
    limit: int
    name: str


class _Flow:
    __slots__ = ("items", "key", "served")

    def __init__(self, key: object, served: int) -> None:
        self.key = key
        self.items: deque[Item] = deque()
        self.served = served  # tokens taken into batches while active


class FairQueue:
    """BULK items, FIFO per flow; the head is the least-served active flow's oldest item."""

    def __init__(self) -> None:
        self._flows: dict[object, _Flow] = {}  # active flows only: memory stays bounded
        self._heap: list[tuple[int, int, _Flow]] = []  # (served, tie-break, flow)
        self._ties = itertools.count()
        self._level = 0  # served tokens of the flow served last: where newcomers start

    @property
    def flows(self) -> int:
        return len(self._flows)

    def append(self, item: Item) -> None:
        flow = self._flows.get(item.flow)
        if flow is None:
            flow = self._flows[item.flow] = _Flow(item.flow, self._level)
            heapq.heappush(self._heap, (flow.served, next(self._ties), flow))
        flow.items.append(item)

    def head(self, live: Callable[[deque[Item]], Item | None]) -> Item | None:
        """The next item to serve; `live` pops dead items off a flow's head."""
        while self._heap:
            flow = self._heap[0][2]
            item = live(flow.items)
            if item is not None:
                return item
            heapq.heappop(self._heap)
            del self._flows[flow.key]
        return None

    def pop_head(self) -> Item:
        """Take the item `head` returned, and charge its flow."""
        _, _, flow = heapq.heappop(self._heap)
        item = flow.items.popleft()
        flow.served += item.n_tokens
        self._level = flow.served
        if flow.items:
            heapq.heappush(self._heap, (flow.served, next(self._ties), flow))
        else:
            del self._flows[flow.key]
        return item

    def push_front(self, items: Sequence[Item]) -> None:
        """Put items taken for a batch back, ahead of their flows, uncharged."""
        for item in reversed(items):
            flow = self._flows.get(item.flow)
            if flow is None:
                flow = self._flows[item.flow] = _Flow(item.flow, self._level)
                heapq.heappush(self._heap, (flow.served, next(self._ties), flow))
            flow.items.appendleft(item)
        # Undo the charges; the heap keys catch up as the flows are served.
        for item in items:
            self._flows[item.flow].served -= item.n_tokens
        self._heap = [(f.served, n, f) for _, n, f in self._heap]
        heapq.heapify(self._heap)

    def compact(self, keep: Callable[[Item], bool]) -> None:
        for flow in self._flows.values():
            flow.items = deque(i for i in flow.items if keep(i))

    def drain(self) -> list[Item]:
        items = [i for f in self._flows.values() for i in f.items]
        self._flows.clear()
        self._heap.clear()
        return items


class _FairWaiters:
    """Parked BULK callers: FIFO per flow, admitted round-robin across flows."""

    def __init__(self) -> None:
        self._by_flow: dict[object, deque[_Waiter]] = {}
        self._ring: deque[object] = deque()  # flows with waiters, in turn order

    def __bool__(self) -> bool:
        return bool(self._ring)

    def append(self, waiter: _Waiter) -> None:
        queue = self._by_flow.get(waiter.flow)
        if queue is None:
            queue = self._by_flow[waiter.flow] = deque()
            self._ring.append(waiter.flow)
        queue.append(waiter)

    def head(self) -> _Waiter | None:
        while self._ring:
            queue = self._by_flow[self._ring[0]]
            while queue and queue[0].granted.done():  # its caller is gone
                queue.popleft()
            if queue:
                return queue[0]
            del self._by_flow[self._ring.popleft()]
        return None

    def pop_head(self) -> _Waiter:
        """Take the head; its flow goes to the back of the ring."""
        key = self._ring.popleft()
        queue = self._by_flow[key]
        waiter = queue.popleft()
        if queue:
            self._ring.append(key)
        else:
            del self._by_flow[key]
        return waiter

    def remove(self, waiter: _Waiter) -> None:
        queue = self._by_flow.get(waiter.flow)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)

    def drain(self) -> list[_Waiter]:
        waiters = [w for q in self._by_flow.values() for w in q]
        self._by_flow.clear()
        self._ring.clear()
        return waiters


class _FifoWaiters:
    """Parked INTERACTIVE callers: one FIFO."""

    def __init__(self) -> None:
        self._queue: deque[_Waiter] = deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def append(self, waiter: _Waiter) -> None:
        self._queue.append(waiter)

    def head(self) -> _Waiter | None:
        while self._queue and self._queue[0].granted.done():
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    def pop_head(self) -> _Waiter:
        return self._queue.popleft()

    def remove(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(waiter)

    def drain(self) -> list[_Waiter]:
        waiters = list(self._queue)
        self._queue.clear()
        return waiters


RejectionHook = Callable[[str, Priority, int], None]


class Queues:
    """Admission control and the queued items; the batching task's only source of work."""

    def __init__(
        self,
        limits: BatcherLimits,
        clock: Callable[[], float],
        batch_latency_s: Callable[[], float],
        rejected: RejectionHook,
        changed: Callable[[], None],
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._batch_latency_s = batch_latency_s
        self._rejected = rejected
        self._changed = changed  # wakes the batching task
        self._interactive: deque[Item] = deque()
        self._bulk = FairQueue()
        self._tokens: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._items: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._dead = 0  # released items still sitting in a deque
        self._waiters: dict[Priority, _FifoWaiters | _FairWaiters] = {
            Priority.INTERACTIVE: _FifoWaiters(),
            Priority.BULK: _FairWaiters(),
        }
        self._bulk_token_cap = int(limits.max_queue_tokens * limits.bulk_queue_share)
        self._bulk_item_cap = int(limits.max_queue_items * limits.bulk_queue_share)
        self._bulk_share = f"{limits.bulk_queue_share:.0%} BULK share of"
        self.closed = False

    # ------------------------------------------------------------------ counters

    @property
    def queued_items(self) -> int:
        return sum(self._items.values())

    @property
    def queued_tokens(self) -> int:
        return sum(self._tokens.values())

    @property
    def bulk_flows(self) -> int:
        return self._bulk.flows

    def tokens(self, priority: Priority) -> int:
        return self._tokens[priority]

    def items(self, priority: Priority) -> int:
        return self._items[priority]

    # ----------------------------------------------------------------- admission

    def ensure_open(self) -> None:
        if self.closed:
            raise BatcherClosedError("batcher is closed")

    def checked_size(self, token_ids: Sequence[int]) -> int:
        n = len(token_ids)
        if n == 0:
            raise ValueError("an item must have at least one token")
        if n > self._limits.item_tokens:
            # The engine could never run it; it would block its queue forever.
            raise ValueError(f"item has {n} tokens > max_item_tokens={self._limits.item_tokens}")
        return n

    def admit_all(
        self,
        token_ids: Sequence[Sequence[int]],
        priority: Priority,
        deadline: float | None,
        context: object | None,
    ) -> list[asyncio.Future[ItemResult]]:
        """All items of one request or none of them (a partial answer is useless)."""
        self.ensure_open()
        sizes = [self.checked_size(ids) for ids in token_ids]
        if not sizes:
            return []
        never = self._refusal(sum(sizes), len(sizes), priority, empty_queue=True)
        if never is not None:
            self._rejected("too_large", priority, len(sizes))
            raise QueueFullError(
                f"{never.reason}; the request can never be admitted", MAX_RETRY_AFTER_S
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
        futures = [
            self._enqueue(ids, n, priority, deadline=deadline, context=context, flow=None).future
            for ids, n in zip(token_ids, sizes, strict=True)
        ]
        self._changed()
        return futures

    async def admit_when_ready(
        self,
        token_ids: Sequence[int],
        priority: Priority,
        deadline: float | None,
        context: object | None,
        flow: object | None,
    ) -> asyncio.Future[ItemResult]:
        """One item, waiting for room (fairly across flows): backpressure for streams."""
        self.ensure_open()
        n_tokens = self.checked_size(token_ids)
        never = self._refusal(n_tokens, 1, priority, empty_queue=True)
        if never is not None:
            self._rejected("too_large", priority, 1)
            raise QueueFullError(
                f"{never.reason}; the item can never be admitted", MAX_RETRY_AFTER_S
            )
        if not self._waiters_ahead(priority) and self._refusal(n_tokens, 1, priority) is None:
            item = self._enqueue(
                token_ids, n_tokens, priority, deadline=deadline, context=context, flow=flow
            )
            self._changed()
            return item.future
        waiter = _Waiter(token_ids, n_tokens, priority, deadline, context, flow)
        self._waiters[priority].append(waiter)
        try:
            return await waiter.granted
        except BaseException:
            self._abandon(waiter)
            raise

    def admit_waiters(self) -> bool:
        """Hand freed space to parked callers: INTERACTIVE first. Returns whether any was."""
        admitted = False
        for priority in PRIORITIES:
            waiters = self._waiters[priority]
            while (waiter := waiters.head()) is not None:
                if self._refusal(waiter.n_tokens, 1, priority) is not None:
                    # Stop at the first that does not fit: later (or lower-priority) waiters
                    # must not overtake it, or a large item could wait forever.
                    return admitted
                waiters.pop_head()
                waiter.item = self._enqueue(
                    waiter.token_ids,
                    waiter.n_tokens,
                    priority,
                    deadline=waiter.deadline,
                    context=waiter.context,
                    flow=waiter.flow,
                )
                waiter.granted.set_result(waiter.item.future)
                self._changed()
                admitted = True
        return admitted

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
        estimate = batches * self._batch_latency_s() / self._limits.max_inflight_batches
        return min(max(estimate, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)

    def _waiters_ahead(self, priority: Priority) -> bool:
        return any(self._waiters[p] for p in UP_TO[priority])

    def _enqueue(
        self,
        token_ids: Sequence[int],
        n_tokens: int,
        priority: Priority,
        *,
        deadline: float | None,
        context: object | None,
        flow: object | None,
    ) -> Item:
        future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
        item = Item(
            token_ids, n_tokens, priority, self._clock(), deadline, future, flow, context=context
        )
        if priority is Priority.INTERACTIVE:
            self._interactive.append(item)
        else:
            self._bulk.append(item)
        self._tokens[priority] += n_tokens
        self._items[priority] += 1
        future.add_done_callback(functools.partial(self._on_item_done, item))
        return item

    def _abandon(self, waiter: _Waiter) -> None:
        """The submit_when_ready caller went away: leave no trace of it."""
        self._waiters[waiter.priority].remove(waiter)
        item = waiter.item
        if item is not None:
            # Admitted, but cancelled before it could resume: give the space back now rather
            # than when the done-callback runs, so the caller's counters look untouched.
            item.future.cancel()
            if item.queued:
                self._drop_queued(item)
        self.admit_waiters()  # it may have been the head that blocked others

    # ---------------------------------------------------------- queue bookkeeping

    def _release(self, item: Item) -> None:
        """The item stops counting against the queue bounds."""
        item.queued = False
        self._tokens[item.priority] -= item.n_tokens
        self._items[item.priority] -= 1

    def _drop_queued(self, item: Item) -> None:
        """Release an item that stays in its deque (cancelled); the batching task skips it."""
        self._release(item)
        self._dead += 1
        if self._dead > max(_MIN_DEAD_BEFORE_COMPACT, self.queued_items):
            self._compact()
        self.admit_waiters()

    def _compact(self) -> None:
        self._interactive = deque(i for i in self._interactive if i.queued)
        self._bulk.compact(lambda i: i.queued)
        self._dead = 0

    def _on_item_done(self, item: Item, _future: asyncio.Future[ItemResult]) -> None:
        # Runs for every outcome; only a caller that went away early needs handling.
        if item.queued:
            self._drop_queued(item)
        elif item.batch is not None:
            item.batch.item_done()

    def _live(self, queue: deque[Item], now: float) -> Item | None:
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

    def head(self, priority: Priority, now: float) -> Item | None:
        """The item a batch would take next from `priority`'s queue (dead ones purged)."""
        if priority is Priority.INTERACTIVE:
            return self._live(self._interactive, now)
        return self._bulk.head(lambda q: self._live(q, now))

    def take(self, priority: Priority, now: float) -> Item:
        """Remove the item `head` just returned; it no longer counts as queued."""
        if priority is Priority.INTERACTIVE:
            item = self._interactive.popleft()
        else:
            item = self._bulk.pop_head()
        self._release(item)
        return item

    def requeue(self, items: Sequence[Item]) -> None:
        """Items of a batch taken back from the engine: queued again, first in line. Those
        whose caller left meanwhile are dropped."""
        live = [i for i in items if not i.future.done()]
        for item in live:
            item.queued = True
            item.batch = None
            self._tokens[item.priority] += item.n_tokens
            self._items[item.priority] += 1
        interactive = [i for i in live if i.priority is Priority.INTERACTIVE]
        self._interactive.extendleft(reversed(interactive))
        self._bulk.push_front([i for i in live if i.priority is Priority.BULK])
        self._changed()

    def fail_queued(self, error: Exception | None = None) -> None:
        for item in [*self._interactive, *self._bulk.drain()]:
            if item.queued:
                self._release(item)
                if not item.future.done():
                    item.future.set_exception(error or BatcherClosedError("batcher closed"))
        self._interactive.clear()
        self._dead = 0

    def fail_waiters(self, error: Exception | None = None) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters.drain():
                if not waiter.granted.done():
                    waiter.granted.set_exception(error or BatcherClosedError("batcher closed"))
