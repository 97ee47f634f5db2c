"""The bulk streams: items read as the server can take them, results sent as they finish.

ItemStream is what every stream shares, whatever its items are: reading under the stream
budget, ids in flight, per-item errors, results out of order, and cancelling the work of a
caller that leaves. StreamSession is one EmbedStream call on it (items embedded a group at
a time); rerank_stream.RerankStreamSession is one RerankStream call.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from embedding.v1 import embedding_pb2 as pb
from service.api.calls.embed import encode_outcome
from service.api.grpc import wire
from service.api.grpc.status import to_status
from service.api.grpc.stream_budget import StreamBudget
from service.api.runtime import Runtime
from service.errors import InvalidInputError
from service.pipeline import EmbedOutcome, EmbedSpec


class Undecodable:
    """Stands in for a request protobuf could not parse (for example invalid UTF-8).

    grpc would answer such a request with a bare INTERNAL/UNKNOWN before any handler runs;
    deferring the failure lets the handler answer INVALID_ARGUMENT (or, in a stream, fail
    just that item).
    """

    def __init__(self, error: DecodeError) -> None:
        self.error = error

    def invalid(self, field: str) -> InvalidInputError:
        return InvalidInputError(field, f"not a valid message: {self.error}")


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


Request = TypeVar("Request")
Item = TypeVar("Item", bound=_Identified)
# A stream's response: it has `id` and a `result` oneof of which `error` is one side.
Response = TypeVar("Response", pb.EmbedStreamResponse, pb.RerankStreamResponse)
# (response, stream slots it frees, item ids it takes out of flight)
Reply = tuple[Response, int, Sequence[str]]


class ItemStream(abc.ABC, Generic[Request, Item, Response]):
    """One bidirectional bulk stream: a reader feeds items in, results go out as they finish.

    Items read but not yet answered hold room in the server-wide StreamBudget: at most
    `stream_max_inflight` for this stream, and a fair share of the total when streams
    compete. The reader stops pulling requests when it has no room, so a client that sends
    faster than the engine works, or stops reading its results, is slowed by HTTP/2 flow
    control instead of making the server buffer. The stream is its items' flow in the
    batcher, so concurrent streams share the engine evenly, behind interactive calls. A
    caller that leaves (cancel, disconnect, deadline) cancels every item still in work.

    A subclass reads its requests (`_read`, with `_read_one` and `_refuse`) and starts the
    work of the items read (`_dispatch`, with `_start`); each item's work hands its answer
    to `_reply`.
    """

    def __init__(self, budget: StreamBudget, response: Callable[..., Response]) -> None:
        self._response: Callable[..., Response] = response  # the stream's response type
        self._slots = budget.share()
        self._results: asyncio.Queue[Reply[Response] | None] = asyncio.Queue()
        self._inflight_ids: set[str] = set()
        self._pending: list[Item] = []  # read, not yet dispatched
        self._arrived = asyncio.Event()
        self._reading = True
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, requests: AsyncIterator[Request | Undecodable]) -> AsyncIterator[Response]:
        reader = asyncio.create_task(self._read_all(requests))
        worker = asyncio.create_task(self._work())
        try:
            while (reply := await self._results.get()) is not None:
                response, slots, ids = reply
                yield response
                self._inflight_ids.difference_update(ids)
                self._slots.release(slots)
            await reader  # re-raise a failure of the request stream itself
        finally:
            for task in (reader, worker, *self._tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, worker, *self._tasks, return_exceptions=True)
            self._slots.close()

    async def _read_all(self, requests: AsyncIterator[Request | Undecodable]) -> None:
        try:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await self._refuse(request.invalid("request"))
                else:
                    await self._read(request)
        finally:
            self._reading = False
            self._arrived.set()

    @abc.abstractmethod
    async def _read(self, request: Request) -> None:
        """Take one request's items in (`_read_one`), or refuse it."""

    @abc.abstractmethod
    async def _dispatch(self) -> None:
        """Start the work of (some of) the pending items, taking them off `_pending`."""

    async def _refuse(self, error: Exception, item_id: str = "") -> None:
        """A message answered at once with an error, holding one slot until it is sent; with
        no id when none can be read from it (the stream goes on either way)."""
        await self._slots.acquire()
        self._reply(self._response(id=item_id, error=to_status(error)), 1)

    async def _read_one(self, item: Item, slots: int = 1) -> None:
        """One item holding `slots` of room until answered: queued for work, or refused alone
        when its id is in flight."""
        await self._slots.acquire(slots)
        if self._accept(item):
            self._arrived.set()
        else:
            self._reply(self._response(id=item.id, error=duplicate(item.id)), slots)

    def _accept(self, item: Item) -> bool:
        """Queue the item for work, unless its id is in flight (then only it is refused)."""
        if item.id in self._inflight_ids:
            return False
        self._inflight_ids.add(item.id)
        self._pending.append(item)
        return True

    def _reply(self, response: Response, slots: int, ids: Sequence[str] = ()) -> None:
        """Send `response`; once sent, it frees `slots` and takes `ids` out of flight."""
        self._results.put_nowait((response, slots, ids))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run some items' work; cancelled with the stream."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self) -> None:
        """Dispatches read items as they arrive; ends the results once all are answered."""
        while True:
            if not self._pending:
                if not self._reading:
                    break
                # Cleared right before waiting, with the state checked and no await between.
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._dispatch()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self._results.put_nowait(None)


def duplicate(item_id: str) -> status_pb2.Status:
    return to_status(InvalidInputError("id", f"id {item_id!r} is already in flight on this stream"))


# A stream's items go to the pipeline in groups: tokenizing, post-processing and encoding
# once per group costs a fraction of doing it per item. A group is what arrived within
# _GROUP_WAIT_S of its first item, at most _GROUP_ITEMS.
_GROUP_ITEMS = 256
_GROUP_WAIT_S = 0.001


@dataclass(frozen=True, slots=True)
class _Item:
    """One item read from a stream: a whole single-item message, or one of its `items`."""

    id: str
    input: str
    options: pb.EmbedOptions
    batched: bool  # came in `items`, so it is answered in a response's `results`


_Reply = Reply[pb.EmbedStreamResponse]


class StreamSession(ItemStream[pb.EmbedStreamRequest, _Item, pb.EmbedStreamResponse]):
    """One EmbedStream call: an item per message, or many (`items`); embedded a group of
    items at a time, each answered alone or in one response per group's multi-item ones."""

    def __init__(
        self, rt: Runtime, budget: StreamBudget, deadline: float | None, default_truncate: str
    ) -> None:
        self._embedder = rt.embedding_for(None).embedder  # raises on a rerank-only server
        super().__init__(budget, pb.EmbedStreamResponse)
        self._rt = rt
        self._truncate = default_truncate
        self._deadline = deadline
        # A message never needs more slots than exist, or its reader would wait forever.
        self._max_items = min(rt.validator.max_inputs, budget.per_stream)

    async def _read(self, request: pb.EmbedStreamRequest) -> None:
        if request.items:
            await self._read_items(request)
        else:
            await self._read_one(_Item(request.id, request.input, request.options, False))

    async def _read_items(self, request: pb.EmbedStreamRequest) -> None:
        items = request.items
        refusal = None
        if request.id or request.input:
            refusal = "set either items or id and input, not both"
        elif len(items) > self._max_items:
            refusal = f"{len(items)} items exceed the limit of {self._max_items} per message"
        if refusal is not None:
            # Like an undecodable message: one error with no id, and the stream goes on.
            await self._refuse(InvalidInputError("items", f"{refusal} (first id {items[0].id!r})"))
            return
        await self._slots.acquire(len(items))
        duplicates = []
        for it in items:
            if not self._accept(_Item(it.id, it.input, request.options, True)):
                duplicates.append(pb.StreamItemResult(id=it.id, error=duplicate(it.id)))
        if duplicates:
            self._reply(pb.EmbedStreamResponse(results=duplicates), len(duplicates))
        self._arrived.set()

    async def _dispatch(self) -> None:
        """Hands read items to the pipeline a group at a time."""
        if self._reading and len(self._pending) < _GROUP_ITEMS:
            await asyncio.sleep(_GROUP_WAIT_S)  # let the rest of a burst arrive
        group = self._pending[:_GROUP_ITEMS]
        del self._pending[:_GROUP_ITEMS]
        self._start(self._items(group))

    async def _items(self, group: list[_Item]) -> None:
        started = time.perf_counter()
        rt = self._rt
        answers = _Answers(started)
        specs: dict[int, EmbedSpec] = {}  # the items of one message share its options
        by_spec: dict[EmbedSpec, list[_Item]] = {}
        for item in group:
            try:
                rt.validator.text(item.input, "input")  # the result's id names the item
                spec = specs.get(id(item.options))
                if spec is None:
                    spec = specs[id(item.options)] = rt.validator.options(
                        wire.request_options(item.options, self._truncate)
                    )
            except Exception as exc:
                answers.error(item, exc)
                continue
            by_spec.setdefault(spec, []).append(item)
        await asyncio.gather(
            *(self._embed(spec, items, answers) for spec, items in by_spec.items())
        )
        for reply in answers.replies():
            self._reply(*reply)

    async def _embed(self, spec: EmbedSpec, items: list[_Item], answers: _Answers) -> None:
        """Items with the same options: one pipeline call, one encoding pass."""
        texts = [item.input for item in items]
        try:
            outcomes = await self._embedder.embed_bulk(
                texts, spec, "input", self._deadline, flow=self
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcomes = [exc] * len(items)
        good = [
            (item, o)
            for item, o in zip(items, outcomes, strict=True)
            if not isinstance(o, Exception)
        ]
        if good:
            merged = EmbedOutcome.join([o for _, o in good])
            embeddings = encode_outcome(merged, spec)
            for (item, ok), embedding in zip(good, embeddings, strict=True):
                answers.embedding(item, wire.embedding(embedding), ok)
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Exception):
                answers.error(item, outcome)


class _Answers:
    """The results of one group: a response per single item, one response for the rest."""

    def __init__(self, started: float) -> None:
        self._started = started
        self._singles: list[_Reply] = []
        self._batched: list[pb.StreamItemResult] = []

    def embedding(self, item: _Item, embedding: pb.Embedding, outcome: EmbedOutcome) -> None:
        self._add(item, wire.timing(outcome.timing, self._started), embedding=embedding)

    def error(self, item: _Item, error: Exception) -> None:
        self._add(item, wire.timing(None, self._started), error=to_status(error))

    def _add(
        self,
        item: _Item,
        timing: pb.Timing,
        embedding: pb.Embedding | None = None,
        error: status_pb2.Status | None = None,
    ) -> None:
        if item.batched:
            result = pb.StreamItemResult(
                id=item.id, embedding=embedding, error=error, timing=timing
            )
            self._batched.append(result)
        else:
            response = pb.EmbedStreamResponse(
                id=item.id, embedding=embedding, error=error, timing=timing
            )
            self._singles.append((response, 1, (item.id,)))

    def replies(self) -> list[_Reply]:
        if not self._batched:
            return self._singles
        response = pb.EmbedStreamResponse(results=self._batched)
        return [*self._singles, (response, len(self._batched), [r.id for r in self._batched])]
