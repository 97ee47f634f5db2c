"""The exact-match vector cache, between tokenization and the batcher.

Key: the model input's token ids, so the key is exact by construction: an instruction, a
prompt or truncation that changes the input changes the ids. Value: the engine's raw vector
(float32, before slicing, normalization and encoding), so one entry serves every
`dimensions`, `normalize` and `encoding` a caller may ask for.

`CachingBatcher` stands in front of the real Batcher with the methods the pipeline calls:
- a hit is an already-resolved future (ItemResult.cached, no queue or engine time);
- a miss goes to the batcher; callers that ask for the same ids while it is in flight share
  that one engine request. Each caller gets its own future, so one caller leaving (its
  future cancelled) leaves the others' results intact; the shared request is cancelled
  (dropped from the queue, or aborted in the engine) only once every caller has left;
- a vector is stored when its request succeeds; errors are never cached.

Sharing never makes a caller worse off than asking alone would: a unary (INTERACTIVE)
caller never waits on a stream's (BULK) request, which may queue behind other streams; and
when a shared request's deadline passes in the queue, the callers whose own deadline has
not passed are submitted again (their BULK items at once, without waiting for room, so
they may be refused as queue-full instead). Stream callers parked for room are not shared:
two identical items that wait for room at the same time go to the engine twice.

The cache is bounded in bytes (cachetools' LRUCache, least recently used out first): each
entry counts its vector's and key's bytes plus ENTRY_OVERHEAD_BYTES.
"""

from __future__ import annotations

import array
import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from cachetools import LRUCache

from service.batching import Batcher, ItemResult, Priority
from service.errors import DeadlineExpiredError

Vector = npt.NDArray[np.float32]

# What one entry costs beyond its vector's data and its key's data: the numpy array object,
# the bytes object's header, the (vector, size) tuple and the size int, and the slots of
# LRUCache's three dicts (data, sizes, LRU order). Measured with tracemalloc over 5,000 to
# 45,000 entries of 384- and 4,096-float vectors: 368-464 bytes, depending on where the
# dicts stand in their growth; rounded up so that the accounted bytes never fall short.
ENTRY_OVERHEAD_BYTES = 512


def cache_key(token_ids: Sequence[int]) -> bytes:
    """The ids as uint32 bytes: half a tuple's memory (no int objects kept alive), a hash
    computed once and kept by the bytes object, and as cheap to build as a tuple
    (array.array: about 0.5-1 us for 8-32 ids, a third of np.asarray's cost)."""
    return array.array("I", token_ids).tobytes()


class _Lru(LRUCache[bytes, tuple[Vector, int]]):
    """LRUCache that counts its evictions (it calls popitem for each, and only then)."""

    evictions = 0

    def popitem(self) -> tuple[bytes, tuple[Vector, int]]:
        self.evictions += 1
        return super().popitem()


def _entry_size(entry: tuple[Vector, int]) -> int:
    return entry[1]


class VectorCache:
    """Token-id key -> raw vector, at most `max_bytes` accounted; plain counters for the
    metrics (service.telemetry reads them at collection time)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self._lru = _Lru(max_bytes, getsizeof=_entry_size)
        self.hits = 0  # inputs answered from the cache
        self.misses = 0  # inputs not in the cache (coalesced ones included)
        self.coalesced = 0  # misses that shared an identical engine request in flight

    @property
    def evictions(self) -> int:
        return self._lru.evictions

    @property
    def nbytes(self) -> int:
        return int(self._lru.currsize)

    @property
    def entries(self) -> int:
        return len(self._lru)

    def get(self, key: bytes) -> Vector | None:
        entry = self._lru.get(key)
        return None if entry is None else entry[0]

    def put(self, key: bytes, vector: Vector) -> None:
        # A copy: the engine's row is a view that would keep its whole batch's array alive.
        stored = vector.copy()
        stored.setflags(write=False)  # one entry is shared by every hit
        size = stored.nbytes + len(key) + ENTRY_OVERHEAD_BYTES
        if size <= self.max_bytes:
            self._lru[key] = (stored, size)


# No callback contexts: the callbacks below need none of the caller's context variables,
# and add_done_callback would otherwise copy the context for each.
_NO_CONTEXT = contextvars.Context()


class _Waiter(asyncio.Future[ItemResult]):
    """One caller's future for a shared request, which it carries along with what the
    caller asked with. Its cancel() tells the shared request at once: no done-callback per
    caller (it would run for every result, to learn of the rare cancellation)."""

    __slots__ = ("deadline", "priority", "shared")
    # Set by CachingBatcher._join (cheaper than a Python __init__ over Future's own).
    shared: _Shared
    priority: Priority
    deadline: float | None

    def cancel(self, msg: object | None = None) -> bool:
        if not super().cancel(msg):
            return False
        self.shared.left()
        return True


class _Shared:
    """One engine request, and every caller waiting on it. Plain __slots__, not a
    dataclass: every miss builds one. Called back (as itself) when the request ends."""

    __slots__ = ("context", "inner", "key", "live", "owner", "priority", "token_ids", "waiters")

    def __init__(
        self,
        owner: CachingBatcher,
        key: bytes,
        token_ids: Sequence[int],
        priority: Priority,
        context: object | None,
    ) -> None:
        self.owner = owner
        self.key = key
        self.token_ids = token_ids
        self.priority = priority  # a unary caller never shares a stream item's request
        self.context = context
        self.waiters: list[_Waiter] = []
        self.live = 0  # waiters not cancelled
        self.inner: asyncio.Future[ItemResult] | None = None  # the batcher's

    def left(self) -> None:
        """A waiter was cancelled; the last one to leave cancels the engine request."""
        inner = self.inner
        if inner is None or inner.done():
            return
        self.live -= 1
        if self.live == 0:
            self.owner._forget(self)
            inner.cancel()  # the batcher drops it from its queue, or aborts its batch

    def __call__(self, inner: asyncio.Future[ItemResult]) -> None:
        self.owner._settle(self, inner)


class CachingBatcher:
    """The Batcher's submit methods with the vector cache in front; the rest delegates."""

    def __init__(
        self,
        batcher: Batcher,
        cache: VectorCache,
        clock: Callable[[], float] = time.monotonic,  # the batcher's: deadlines are in it
    ) -> None:
        self._batcher = batcher
        self._cache = cache
        self._clock = clock
        self._inflight: dict[bytes, _Shared] = {}  # the request new callers would share

    @property
    def cache(self) -> VectorCache:
        return self._cache

    # ------------------------------------------------------------ submit, cached

    def submit(
        self,
        token_ids: Sequence[Sequence[int]],
        priority: Priority,
        deadline: float | None = None,
        context: object | None = None,
    ) -> list[asyncio.Future[ItemResult]]:
        """As Batcher.submit: the misses are admitted all together or not at all."""
        cache = self._cache
        plan: list[Vector | _Shared] = []
        new: dict[bytes, _Shared] = {}  # also shares duplicates within the request
        hits = coalesced = 0
        for ids in token_ids:
            key = cache_key(ids)
            vector = cache.get(key)
            if vector is not None:
                plan.append(vector)
                hits += 1
                continue
            shared = new.get(key)
            if shared is None:
                shared = self._inflight.get(key)
                if shared is not None and shared.priority <= priority:
                    coalesced += 1
                else:
                    shared = new[key] = _Shared(self, key, ids, priority, context)
            else:
                coalesced += 1
            plan.append(shared)
        if new:
            # May raise (queue full, closed): nothing has changed yet.
            inner = self._batcher.submit(
                [s.token_ids for s in new.values()], priority, deadline, context
            )
            for shared, future in zip(new.values(), inner, strict=True):
                self._start(shared, future)
        cache.hits += hits
        cache.misses += len(plan) - hits
        cache.coalesced += coalesced
        return [
            _hit(p) if isinstance(p, np.ndarray) else self._join(p, priority, deadline)
            for p in plan
        ]

    async def submit_when_ready(
        self,
        token_ids: Sequence[int],
        priority: Priority = Priority.BULK,
        deadline: float | None = None,
        context: object | None = None,
        flow: object | None = None,
    ) -> asyncio.Future[ItemResult]:
        """As Batcher.submit_when_ready; a hit or a shared request needs no room."""
        cache = self._cache
        key = cache_key(token_ids)
        vector = cache.get(key)
        if vector is not None:
            cache.hits += 1
            return _hit(vector)
        shared = self._inflight.get(key)
        if shared is None or shared.priority > priority:
            inner = await self._batcher.submit_when_ready(
                token_ids, priority, deadline, context, flow
            )
            shared = _Shared(self, key, token_ids, priority, context)
            self._start(shared, inner)
        else:
            cache.coalesced += 1
        cache.misses += 1
        return self._join(shared, priority, deadline)

    # ---------------------------------------------------------- shared requests

    def _start(self, shared: _Shared, inner: asyncio.Future[ItemResult]) -> None:
        shared.inner = inner
        # The newest request for these ids is the one new callers share.
        self._inflight[shared.key] = shared
        inner.add_done_callback(shared, context=_NO_CONTEXT)

    def _join(
        self, shared: _Shared, priority: Priority, deadline: float | None
    ) -> asyncio.Future[ItemResult]:
        waiter = _Waiter(loop=asyncio.get_running_loop())
        waiter.shared = shared
        waiter.priority = priority
        waiter.deadline = deadline
        shared.waiters.append(waiter)
        shared.live += 1
        return waiter

    def _forget(self, shared: _Shared) -> None:
        if self._inflight.get(shared.key) is shared:
            del self._inflight[shared.key]

    def _settle(self, shared: _Shared, inner: asyncio.Future[ItemResult]) -> None:
        """The shared request ended: hand its outcome to every waiter; cache a vector."""
        self._forget(shared)
        waiters = [w for w in shared.waiters if not w.done()]
        shared.waiters = []  # waiter <-> shared would be a cycle, left to the slow cyclic GC
        if inner.cancelled():
            for w in waiters:
                w.cancel()
            return
        error = inner.exception()
        if error is None:
            result = inner.result()
            self._cache.put(shared.key, result.vector)
            for w in waiters:
                w.set_result(result)
            return
        if isinstance(error, DeadlineExpiredError):
            waiters = self._retry_unexpired(shared, waiters)
        for w in waiters:
            w.set_exception(error)

    def _retry_unexpired(self, expired: _Shared, waiters: list[_Waiter]) -> list[_Waiter]:
        """The shared request's deadline (its first caller's) passed in the queue: submit the
        ids again for the waiters whose deadline has not; return those whose has."""
        now = self._clock()
        again = [w for w in waiters if w.deadline is None or w.deadline > now]
        if not again:
            return waiters
        deadlines = [w.deadline for w in again]
        deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
        priority = min(w.priority for w in again)
        try:
            (inner,) = self._batcher.submit(
                [expired.token_ids], priority, deadline, expired.context
            )
        except Exception as refusal:
            for w in again:
                w.set_exception(refusal)
        else:
            shared = _Shared(self, expired.key, expired.token_ids, priority, expired.context)
            for w in again:
                w.shared = shared
            shared.waiters = again
            shared.live = len(again)
            self._start(shared, inner)
        return [w for w in waiters if w not in again]

    # ----------------------------------------------------------------- delegated

    def estimated_wait_s(self, priority: Priority) -> float:
        return self._batcher.estimated_wait_s(priority)


def _hit(vector: Vector) -> asyncio.Future[ItemResult]:
    future: asyncio.Future[ItemResult] = asyncio.get_running_loop().create_future()
    future.set_result(ItemResult(vector, 0.0, 0.0, None, cached=True))
    return future
