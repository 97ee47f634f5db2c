"""The bulk stream: documents in, results out, flow-controlled, reconnecting, resending.

grpc's client takes a request iterator as fast as it yields, so the runner keeps its own
window: at most `max_inflight` items (the server's stream_max_inflight) sent and not yet
answered. Items leave in multi-item messages of up to `items_per_message` items and
`message_bytes` bytes, a full message at a time while the server is the bottleneck, or
whatever is ready while the reader is. Each item goes out under a wire id unique to the
run, mapped back to its document.

Several runners can share one Feed (`--streams N`), each with its own stream: a runner
takes documents whenever its window has room, so a faster server gets more of them, and
every document is taken by exactly one runner, which alone sends it again after a loss.

When the stream fails with a retryable status (UNAVAILABLE while the server restarts, ...)
or ends early, every item without an answer is sent again on a new stream, after an
exponential backoff; the run gives up after `retry_timeout` seconds without a result. An
item's own error is final unless its code says to try again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio
from google.rpc import status_pb2

from embedding.v1 import embedding_pb2 as pb
from embedding.v1 import embedding_pb2_grpc as pb_grpc
from embedding_client.cli.connection import RETRYABLE, Backoff, FatalError
from embedding_client.cli.documents import Document, Failure

# Item errors that say "not now" rather than "never": the item is sent again.
_RETRY_ITEM = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)
_ITEM_ATTEMPTS = 5
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_MESSAGE_OVERHEAD = 64 << 10  # room for ids, framing and options in a message

_Call = grpc.aio.StreamStreamCall[pb.EmbedStreamRequest, pb.EmbedStreamResponse]


class _Stalled(Exception):
    """The stream is open but nothing comes back."""


class Sink(Protocol):
    def embedded(self, pairs: list[tuple[Document, pb.Embedding]]) -> None: ...

    def failed(self, failure: Failure) -> None: ...


@dataclass(frozen=True)
class StreamLimits:
    max_inflight: int = 1024
    items_per_message: int = 64
    message_bytes: int = 4 << 20  # target size of one message
    max_request_bytes: int = 32 << 20  # the server's limit: larger messages are refused

    @classmethod
    def from_server(
        cls, limits: pb.ServerLimits, items_per_message: int, max_inflight: int = 0
    ) -> StreamLimits:
        window = max_inflight or limits.stream_max_inflight or 1024
        per_message = min(
            items_per_message, window, limits.max_inputs_per_request or items_per_message
        )
        request_bytes = limits.max_request_bytes or 32 << 20
        return cls(
            max_inflight=window,
            items_per_message=max(per_message, 1),
            message_bytes=min(4 << 20, request_bytes // 2),
            max_request_bytes=request_bytes,
        )


class Feed:
    """Documents handed over from the reader thread, read ahead a bounded number of batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_ahead: int = 64) -> None:
        self._loop = loop
        self._slots = threading.Semaphore(read_ahead)
        self._batches: deque[deque[Document]] = deque()
        self.available = 0
        self.exhausted = False
        self.error: BaseException | None = None
        self._closed = False
        self._watchers: list[Callable[[], None]] = []

    # Reader-thread side.

    def fill(self, documents: Iterable[Document], batch_docs: int = 128) -> None:
        """Runs in the reader thread: batches of documents, then the end (or the error)."""
        error: BaseException | None = None
        try:
            batch: list[Document] = []
            size = 0
            for doc in documents:
                batch.append(doc)
                size += doc.size
                if len(batch) >= batch_docs or size >= 1 << 20:
                    if not self._put(batch):
                        return
                    batch, size = [], 0
            if batch and not self._put(batch):
                return
        except BaseException as err:
            error = err
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(self._end, error)

    def _put(self, batch: list[Document]) -> bool:
        self._slots.acquire()
        if self._closed:
            return False
        try:
            self._loop.call_soon_threadsafe(self._offer, batch)
        except RuntimeError:
            return False
        return True

    def close(self) -> None:
        """Lets a reader blocked on read-ahead finish (the run is over)."""
        self._closed = True
        self._slots.release()

    # Loop side.

    def watch(self, on_change: Callable[[], None]) -> None:
        """Calls `on_change` whenever documents arrive or the end is reached."""
        self._watchers.append(on_change)

    def _changed(self) -> None:
        for on_change in self._watchers:
            on_change()

    def _offer(self, batch: list[Document]) -> None:
        self._batches.append(deque(batch))
        self.available += len(batch)
        self._changed()

    def _end(self, error: BaseException | None) -> None:
        self.exhausted = True
        self.error = error
        self._changed()

    def take(self, n: int, budget: int) -> list[Document]:
        """Up to n documents of at most `budget` bytes together (at least one, if any)."""
        taken: list[Document] = []
        size = 0
        batches = self._batches
        while batches and len(taken) < n:
            batch = batches[0]
            while batch and len(taken) < n:
                doc = batch[0]
                if taken and size + doc.size > budget:
                    self.available -= len(taken)
                    return taken
                taken.append(batch.popleft())
                size += doc.size
            if not batch:
                batches.popleft()
                self._slots.release()
        self.available -= len(taken)
        return taken


@dataclass(slots=True)
class _Sent:
    doc: Document
    attempts: int


class StreamRunner:
    def __init__(
        self,
        stub: pb_grpc.EmbeddingServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        *,
        options: pb.EmbedOptions,
        feed: Feed,
        sink: Sink,
        limits: StreamLimits,
        retry_timeout: float = 300.0,
        note: Callable[[str], None] = lambda _: None,
        check_server: Callable[[], Awaitable[None]] | None = None,
        backoff: Backoff | None = None,
        refused: Callable[[], FatalError] | None = None,
    ) -> None:
        self._stub = stub
        self._metadata = metadata
        self._options = options
        self._feed = feed
        self._sink = sink
        self._limits = limits
        self._retry_timeout = retry_timeout
        self._note = note
        self._check_server = check_server
        self._backoff = backoff or Backoff()
        self._refused = refused  # the error for UNAUTHENTICATED (keys rotated mid-run)
        self._wire_ids = itertools.count()
        self._pending: dict[str, _Sent] = {}  # sent on the current stream, not answered
        self._resend: deque[_Sent] = deque()  # to send before new documents
        self._delayed = 0  # items waiting out a retryable error of their own
        self._wake = asyncio.Event()
        self._progressed = False
        self._waiting_since = 0.0  # the last answer, or the first send with none pending
        self.streams = 0  # streams opened (1 when nothing failed)
        feed.watch(self._wake.set)

    @property
    def unfinished(self) -> int:
        return len(self._pending) + len(self._resend) + self._delayed + self._feed.available

    def _finished(self) -> bool:
        return self._feed.exhausted and not (
            self._pending or self._resend or self._delayed or self._feed.available
        )

    async def run(self) -> None:
        """Until every document has an answer; raises FatalError when giving up."""
        stalled_since: float | None = None
        attempt = 0
        while True:
            try:
                if stalled_since is not None and self._check_server is not None:
                    await self._check_server()
                await self._one_stream()
                if self._finished():
                    return
                reason = "the server ended the stream early"
            except _Stalled as err:
                reason = str(err)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAUTHENTICATED and self._refused is not None:
                    raise self._refused() from err
                # DEADLINE_EXCEEDED comes from check_server on a slow server: try again.
                if err.code() not in RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED}:
                    message = f"the stream failed: {err.code().name}: {err.details()}"
                    raise FatalError(message) from err
                reason = f"{err.code().name}: {err.details()}"
            self._requeue_pending()
            now = time.monotonic()
            if self._progressed or stalled_since is None:
                stalled_since, attempt, self._progressed = now, 0, False
            waited = now - stalled_since
            if waited >= self._retry_timeout:
                raise FatalError(
                    f"gave up after {waited:.0f} s without an answer ({reason}); "
                    f"{self.unfinished} documents not embedded: run again to resume"
                )
            delay = min(self._backoff.delay(attempt), self._retry_timeout - waited)
            self._note(
                f"stream lost ({reason}); retrying in {delay:.1f} s, "
                f"{len(self._resend)} documents to send again"
            )
            await asyncio.sleep(delay)
            attempt += 1

    def _requeue_pending(self) -> None:
        # Oldest first, ahead of anything already waiting to be resent.
        self._resend.extendleft(reversed(list(self._pending.values())))
        self._pending.clear()

    async def _one_stream(self) -> None:
        self.streams += 1
        call = self._stub.EmbedStream(metadata=self._metadata)
        writer = asyncio.create_task(self._write(call))
        try:
            while True:
                if self._feed.error is not None:
                    raise self._feed.error
                # A server that holds items and never answers counts as gone.
                response = await self._read(call)
                if not isinstance(response, pb.EmbedStreamResponse):
                    break  # EOF: the server closed the stream
                self._answer(response)
        except grpc.aio.AioRpcError:
            if self._feed.error is not None:
                raise self._feed.error from None  # the reader broke; the writer cancelled
            problem = writer.exception() if writer.done() and not writer.cancelled() else None
            if problem is not None:
                raise problem from None  # the writer broke (a bug), not the server
            raise
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await writer
            call.cancel()
        if self._feed.error is not None:
            raise self._feed.error

    async def _read(self, call: _Call) -> object:
        """The next response; _Stalled when items are out and none comes for too long."""
        # Not wait_for: it would wait for grpc's read to honour the cancellation, which it
        # need not; cancelling the call ends the read for sure.
        read = asyncio.ensure_future(call.read())
        while True:
            timeout = self._retry_timeout
            if self._pending:
                timeout -= time.monotonic() - self._waiting_since
            try:
                done, _ = await asyncio.wait({read}, timeout=max(timeout, 0.0))
            except asyncio.CancelledError:
                read.cancel()  # the run is being stopped
                raise
            if done:
                return read.result()
            if self._pending and time.monotonic() - self._waiting_since >= self._retry_timeout:
                call.cancel()
                with contextlib.suppress(BaseException):
                    await read
                raise _Stalled(f"no answer for {self._retry_timeout:.0f} s")

    async def _write(self, call: _Call) -> None:
        limits = self._limits
        try:
            while True:
                if self._feed.error is not None:
                    call.cancel()
                    return
                if self._finished():
                    await call.done_writing()
                    return
                free = limits.max_inflight - len(self._pending)
                ready = len(self._resend) + self._feed.available
                n = min(limits.items_per_message, ready, free)
                # A full message, or everything there is: never dribble into a full window.
                if n > 0 and n in (limits.items_per_message, ready):
                    request = self._message(n)
                    if request is not None:
                        await call.write(request)
                    continue
                self._wake.clear()
                await self._wake.wait()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the stream is over; the reader sees its status
        except BaseException:
            call.cancel()  # wake the reader, which re-raises this
            raise

    def _message(self, n: int) -> pb.EmbedStreamRequest | None:
        """Takes up to n items (resends first) within the byte budget and marks them sent."""
        limits = self._limits
        budget = limits.message_bytes
        chosen: list[_Sent] = []
        size = 0
        resend = self._resend
        while resend and len(chosen) < n:
            if chosen and size + resend[0].doc.size > budget:
                break
            sent = resend.popleft()
            chosen.append(sent)
            size += sent.doc.size
        if len(chosen) < n and (not chosen or size < budget):
            fresh = self._feed.take(n - len(chosen), budget - size if chosen else budget)
            chosen += [_Sent(doc, 0) for doc in fresh]
        if not self._pending and chosen:
            self._waiting_since = time.monotonic()
        items: list[pb.StreamItem] = []
        pending = self._pending
        for sent in chosen:
            if sent.doc.size > limits.max_request_bytes - _MESSAGE_OVERHEAD:
                message = (
                    f"{sent.doc.size} bytes of text, over the server's limit of "
                    f"{limits.max_request_bytes} bytes per message"
                )
                self._sink.failed(Failure.of(sent.doc, "TOO_LARGE", message))
                continue
            wire_id = format(next(self._wire_ids), "x")
            pending[wire_id] = sent
            items.append(pb.StreamItem(id=wire_id, input=sent.doc.text))
        if not items:
            return None
        return pb.EmbedStreamRequest(items=items, options=self._options)

    def _answer(self, response: pb.EmbedStreamResponse) -> None:
        results: Sequence[pb.StreamItemResult | pb.EmbedStreamResponse] = response.results
        if not results:
            if not response.id and response.HasField("error"):
                error = response.error
                name = _CODE_NAMES.get(error.code, str(error.code))
                raise FatalError(f"the server refused a whole message: {name}: {error.message}")
            results = [response]  # the single-item form (never sent, but answered alike)
        done: list[tuple[Document, pb.Embedding]] = []
        for result in results:
            sent = self._pending.pop(result.id, None)
            if sent is None:
                continue
            if result.HasField("embedding"):
                done.append((sent.doc, result.embedding))
            else:
                self._item_error(sent, result.error)
        if done:
            self._sink.embedded(done)
        self._progressed = True
        self._waiting_since = time.monotonic()
        self._wake.set()

    def _item_error(self, sent: _Sent, error: status_pb2.Status) -> None:
        name = _CODE_NAMES.get(error.code, str(error.code))
        retryable = any(error.code == code.value[0] for code in _RETRY_ITEM)
        if retryable and sent.attempts + 1 < _ITEM_ATTEMPTS:
            sent.attempts += 1
            self._delayed += 1
            asyncio.get_running_loop().call_later(
                self._backoff.delay(sent.attempts), self._retry_later, sent
            )
            return
        self._sink.failed(Failure.of(sent.doc, name, error.message))

    def _retry_later(self, sent: _Sent) -> None:
        self._delayed -= 1
        self._resend.append(sent)
        self._wake.set()


async def run_all(runners: Sequence[StreamRunner]) -> None:
    """Runs every runner to its end; when one gives up, the others are stopped with it."""
    tasks = [asyncio.ensure_future(runner.run()) for runner in runners]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
